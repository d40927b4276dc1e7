"""A pre-norm transformer block whose FFN is dense SwiGLU or a MoE layer.

Shape legend: B batch, S positions (full or compacted), D width.
``increment`` returns only what the block adds to the residual stream; MoD routing
scales that increment, so the residual is never counted twice.
"""

from __future__ import annotations

import torch
from torch import nn

from turnout.config.model import ModelConfig
from turnout.models.layers import Attention, RMSNorm, Rotary, SwiGLU
from turnout.models.moe import MoELayer

Aux = dict[str, torch.Tensor]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, ffn: str = "dense") -> None:
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, rotary)
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_kind = ffn
        if ffn == "dense":
            self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.ffn_dim)
        elif ffn in ("moe", "imode"):
            noop = cfg.moe.num_noop_experts if ffn == "imode" else 0
            self.ffn = MoELayer(cfg.d_model, cfg.expert_hidden(), cfg.moe, cfg.init_std, noop)
        else:
            raise ValueError(f"unknown ffn kind {ffn!r}")

    def _ffn(self, h_ND: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        if isinstance(self.ffn, MoELayer):
            y_ND, moe = self.ffn(h_ND)
            aux = {
                "moe_lb": moe.load_balance,
                "moe_z": moe.z_loss,
                "moe_counts": moe.counts_E,
                "moe_drop": moe.dropped,
            }
            if self.ffn.num_noop:
                aux["moe_noop"] = moe.noop_fraction
            return y_ND, aux
        return self.ffn(h_ND), {}

    def increment(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        mask_BSS: torch.Tensor | None = None,
        rows_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Aux]:
        """The block's residual increment ``block(x) - x``, computed directly.

        ``mask_BSS`` replaces the causal mask; ``rows_BS`` limits the FFN to those rows
        (others get a zero FFN increment) — both serve the masked-dense MoD path.
        """
        a_BSD = self.attn(self.norm_attn(x_BSD), pos_BS, mask_BSS)
        h_BSD = self.norm_ffn(x_BSD + a_BSD)
        B, S, D = h_BSD.shape
        if rows_BS is None:
            f_ND, aux = self._ffn(h_BSD.reshape(B * S, D))
            f_BSD = f_ND.view(B, S, D)
        else:
            f_ND, aux = self._ffn(h_BSD[rows_BS])
            f_BSD = torch.zeros_like(h_BSD).index_put((rows_BS,), f_ND.to(h_BSD.dtype))
        return a_BSD + f_BSD, aux

    def forward(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        delta_BSD, aux = self.increment(x_BSD, pos_BS)
        return x_BSD + delta_BSD, aux
