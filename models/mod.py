"""Mixture-of-Depths: expert-choice top-k over positions around a transformer block.

Shape legend: B batch, S sequence, M chosen positions per sequence (k), D width.

Training (``routing="topk"``): one scalar router score per token; the top
``k = ceil(capacity * S)`` positions of each sequence, kept in position order, go
through the block (attention among them, causal by original position, RoPE at their
real positions); the block's residual increment is scaled by ``g(score)`` so the
router gets gradient; all other tokens pass through bit-identical.

Sampling (``routing="causal"``): top-k over a sequence looks at the future, so a
per-token decision is needed. A predictor (a small MLP on the stop-gradient input,
or the router itself under an auxiliary BCE) is trained to predict top-k membership;
in causal mode its decision (logit > 0) picks the tokens, and the block runs in the
masked-dense form, which is exact for any per-token choice, S = 1 included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.model import ModelConfig
from turnout.models import ops
from turnout.models.block import Aux, Block
from turnout.models.routing import mod_capacity


class MoDBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, block: Block) -> None:
        super().__init__()
        self.block = block
        self.capacity = cfg.mod.capacity
        self.router_gate = cfg.mod.router_gate
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.init_std)
        self.predictor: nn.Module | None = None
        if cfg.mod.predictor == "mlp":
            h = cfg.mod.predictor_hidden
            self.predictor = nn.Sequential(nn.Linear(cfg.d_model, h), nn.SiLU(), nn.Linear(h, 1))

    def gate(self, score: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(score) if self.router_gate == "sigmoid" else score

    def scores(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.router(x_BSD).squeeze(-1).float()

    def causal_logits(self, x_BSD: torch.Tensor, score_BS: torch.Tensor) -> torch.Tensor:
        """Per-token logit of 'this token is in its sequence's top-k' (causal)."""
        if self.predictor is None:
            return score_BS
        return self.predictor(x_BSD.detach()).squeeze(-1).float()

    def forward(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, routing: str = "topk"
    ) -> tuple[torch.Tensor, Aux]:
        B, S, D = x_BSD.shape
        score_BS = self.scores(x_BSD)
        pred_BS = self.causal_logits(x_BSD, score_BS)
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing must be 'topk' or 'causal', got {routing!r}")
        # The predictor's target is always top-k membership in the sequence it sees (also in
        # causal mode, where the block runs on the predictor's own decisions instead).
        idx_BM, topk_BS = ops.mod_select(score_BS, mod_capacity(S, self.capacity))
        if routing == "topk":
            chosen_BS = topk_BS
            out_BSD, aux = self._compact(x_BSD, pos_BS, score_BS, idx_BM)
        else:
            chosen_BS = pred_BS > 0
            out_BSD, aux = masked_dense(self, x_BSD, pos_BS, score_BS, chosen_BS)
        target_BS = topk_BS.float()
        aux["mod_pred_loss"] = F.binary_cross_entropy_with_logits(pred_BS, target_BS)
        aux["mod_capacity"] = chosen_BS.float().mean().detach()
        aux["mod_pred_acc"] = ((pred_BS > 0) == topk_BS).float().mean().detach()
        return out_BSD, aux

    def _compact(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        score_BS: torch.Tensor,
        idx_BM: torch.Tensor,
    ) -> tuple[torch.Tensor, Aux]:
        D = x_BSD.shape[-1]
        idx_BMD = idx_BM.unsqueeze(-1).expand(-1, -1, D)
        x_BMD = x_BSD.gather(1, idx_BMD)
        pos_BM = pos_BS.gather(1, idx_BM)
        delta_BMD, aux = self.block.increment(x_BMD, pos_BM)
        g_BM1 = self.gate(score_BS.gather(1, idx_BM)).unsqueeze(-1).to(x_BSD.dtype)
        new_BMD = x_BMD + g_BM1 * delta_BMD
        return x_BSD.scatter(1, idx_BMD, new_BMD), aux


def masked_dense(
    mod: MoDBlock,
    x_BSD: torch.Tensor,
    pos_BS: torch.Tensor,
    score_BS: torch.Tensor,
    chosen_BS: torch.Tensor,
) -> tuple[torch.Tensor, Aux]:
    """The MoD block with every token computed and attention keys masked to the chosen.

    Unchosen outputs are replaced by the input. For a top-k choice this equals the
    compacted form; for any other per-token choice it is the definition of the block.
    """
    B, S, _ = x_BSD.shape
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
    eye_SS = torch.eye(S, dtype=torch.bool, device=x_BSD.device)
    # A query attends earlier chosen keys; the diagonal keeps unchosen rows finite.
    mask_BSS = (causal_SS & chosen_BS.unsqueeze(1)) | eye_SS
    delta_BSD, aux = mod.block.increment(x_BSD, pos_BS, mask_BSS, rows_BS=chosen_BS)
    g_BS1 = mod.gate(score_BS).unsqueeze(-1).to(x_BSD.dtype)
    out_BSD = torch.where(chosen_BS.unsqueeze(-1), x_BSD + g_BS1 * delta_BSD, x_BSD)
    return out_BSD, aux
