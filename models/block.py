"""A pre-norm transformer block whose FFN is dense SwiGLU or a MoE layer.

Shape legend: B batch, S positions (full or compacted), D width, N rows reaching the FFN.
``increment`` returns only what the block adds to the residual stream; MoD routing
scales that increment, so the residual is never counted twice.
"""

from __future__ import annotations

import torch
from torch import nn

from turnout.config.model import FFN_DENSE, FFN_MOE, BlockKind, ModelConfig
from turnout.models.layers import Attention, RMSNorm, Rotary, SwiGLU
from turnout.models.moe import MoELayer, Routed
from turnout.models.terms import Aux, Term


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, kind: BlockKind) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, rotary, cfg.kv_heads())
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.kind = kind
        if kind.ffn == FFN_DENSE:
            self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.ffn_dim)
        elif kind.ffn == FFN_MOE:
            self.ffn = MoELayer(
                cfg.d_model, cfg.expert_hidden(), cfg.moe, cfg.init_std, cfg.noop_choices(kind)
            )
        else:
            raise ValueError(f"unknown ffn kind {kind.ffn!r}")

    def moe(self) -> MoELayer:
        """The block's MoE FFN (a dense block has none: ValueError)."""
        if not isinstance(self.ffn, MoELayer):
            raise ValueError(f"a {self.kind.name!r} block has no MoE FFN")
        return self.ffn

    def _ffn(self, h_ND: torch.Tensor, routed: Routed | None) -> tuple[torch.Tensor, Aux]:
        if not isinstance(self.ffn, MoELayer):
            if routed is not None:
                raise ValueError("routing was given to a block with a dense FFN")
            return self.ffn(h_ND), {}
        y_ND, moe = self.ffn(h_ND, routed)
        aux: Aux = {
            Term.MOE_LB: moe.load_balance,
            Term.MOE_Z: moe.z_loss,
            Term.MOE_COUNTS: moe.counts_E,
            Term.MOE_DROP: moe.dropped,
        }
        if self.ffn.num_noop:
            aux[Term.MOE_NOOP] = moe.noop_fraction
        return y_ND, aux

    def increment(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        mask_BSS: torch.Tensor | None = None,
        rows_BS: torch.Tensor | None = None,
        routed: Routed | None = None,
    ) -> tuple[torch.Tensor, Aux]:
        """The block's residual increment ``block(x) - x``, computed directly.

        ``mask_BSS`` replaces the causal mask; ``rows_BS`` limits the FFN to those rows
        (others get a zero FFN increment) — both serve the masked-dense MoD path.
        ``routed`` is the MoE routing of the rows reaching the FFN (all ``B * S`` rows,
        or those of ``rows_BS``, in row-major order), computed by the caller.
        """
        a_BSD = self.attn(self.norm_attn(x_BSD), pos_BS, mask_BSS)
        h_BSD = self.norm_ffn(x_BSD + a_BSD)
        B, S, D = h_BSD.shape
        if rows_BS is None:
            f_ND, aux = self._ffn(h_BSD.reshape(B * S, D), routed)
            f_BSD = f_ND.view(B, S, D)
        else:
            f_ND, aux = self._ffn(h_BSD[rows_BS], routed)
            f_BSD = torch.zeros_like(h_BSD).index_put((rows_BS,), f_ND.to(h_BSD.dtype))
        return a_BSD + f_BSD, aux

    def forward(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        delta_BSD, aux = self.increment(x_BSD, pos_BS)
        return x_BSD + delta_BSD, aux
