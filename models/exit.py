"""Early exit: exit points that share the final norm and LM head, trained with static shapes.

Shape legend: B batch, S sequence, D width, V vocabulary.

Training (``routing="topk"``): every token runs every block; after each exit depth ``d``
(``model.exit.layers``: blocks run so far) the shared ``head(norm(x))`` gives the exit's
logits and cross-entropy, and the training loss adds
``exit.loss_coef * sum_i w_i * ce_i``. LayerSkip-style layer dropout (optional) skips
block i of a whole sequence with probability ``layer_dropout * i / (n_layers - 1)``
(computed and discarded: static shapes).

Decoding (``routing="causal"`` and :mod:`turnout.models.decode`): a token exits at the
first exit whose confidence, the max softmax probability of its exit logits (fp32), is
above ``threshold``; its logits are that exit's. The later blocks still see it as a key:
CALM-style state propagation copies the exit hidden state forward, so a block after the
exit computes the token's keys and values from that state (in decode no FFN or MoE runs
for it; once every row of a call has exited, each block's ``propagate`` runs the K/V
projection alone, no router, predictor or halting head either) and leaves its residual
stream unchanged. Every later block's cache, MoD-routed or ponder, therefore holds every
exited token, and its logits through the final norm and head are its exit logits.

The full-sequence causal pass and incremental decoding compute the same confidence from
states that agree to float rounding, not bit for bit (other GEMM shapes); a confidence
within rounding of ``threshold`` may exit in one and not in the other (design 3.4).
"""

from __future__ import annotations

import torch

from turnout.config.model import ModelConfig


def exit_weights(cfg: ModelConfig) -> dict[int, float]:
    """Exit depth -> its loss weight (1.0 each when ``loss_weights`` is empty)."""
    weights = cfg.exit.loss_weights or [1.0] * len(cfg.exit.layers)
    return dict(zip(cfg.exit.layers, weights, strict=True))


def confidence(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Max softmax probability per position (fp32): the exit decision's score."""
    return torch.softmax(logits_BSV.float(), dim=-1).amax(-1)


def exits_now(logits_BSV: torch.Tensor, threshold: float) -> torch.Tensor:
    """``exit_BS``: the positions confident enough to exit here."""
    return confidence(logits_BSV) > threshold


def dropout_keep(
    layer: int, n_layers: int, rate: float, batch: int, device: torch.device
) -> torch.Tensor | None:
    """``keep_B11`` of LayerSkip layer dropout for block ``layer`` (None: keep all)."""
    p = rate * layer / max(n_layers - 1, 1)
    if p <= 0:
        return None
    return (torch.rand(batch, 1, 1, device=device) >= p).view(batch, 1, 1)
