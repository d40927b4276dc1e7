"""Hyper-experts: a low-rank adapter per token, generated from the experts it did not pick.

Shape legend: T tokens, D width, R real experts, K top-k, C expert-embedding width
(``model.moe.hyper.embed_dim``), H hypernetwork width (``.hidden``), r adapter rank
(``.rank``).

After HyperMoE (Zhao et al., ACL 2024): top-k routing leaves what the unselected experts
know out of a token's output. Each MoE layer keeps one embedding per real expert,
``emb_RC``. A token's condition is the router-probability-weighted mean of the
embeddings of the experts it did *not* select (before capacity drops: its choice, not
the dispatcher's luck)::

    c = sum_{e not in S} p_e emb_e / sum_{e not in S} p_e                  [C]
      = softmax(logits, the selected experts masked out) @ emb

One hypernetwork, shared by every MoE layer of the model, turns it into the weights of a
rank-r bottleneck adapter, and the layer adds the adapter's output to the routed one::

    h = gelu(c W_in + b_in)                                                 [H]
    A_down = sum_j h_j G_down[j]      [D, r]      A_up = sum_j h_j G_up[j]  [r, D]
    adapter(x) = gelu(x A_down) A_up                                        [D]

The matrices are linear in ``h``, so the layer never materialises a ``[T, D, r]``
tensor: ``x A_down = sum_j h_j (x G_down[j])`` is one ``[T, D] x [D, H r]`` matmul and a
contraction over H, and ``a A_up = (h outer a) G_up`` one ``[T, H r] x [H r, D]``
matmul. Static shapes throughout; it runs on the layer's own tokens where they are,
beside the dispatcher and never through it, so expert parallelism does not see it (its
weights are dense, replicated, ZeRO-sharded).
:func:`adapter_reference` generates the matrices explicitly: the tests' oracle.

``G_up`` starts at zero, so a model with hyper-experts starts as the same model without.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.hyper import HyperConfig

#: Salts of the generator streams hyper-experts draw their init from (see side_stream).
HYPERNET_STREAM, TABLE_STREAM = 3, 2


@contextmanager
def side_stream(salt: int) -> Iterator[None]:
    """Draw from a CPU generator stream of its own (the seed plus ``salt``), leaving the
    caller's stream where it was: a model's other weights are then those of the same seed
    without hyper-experts, a fair with/without."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + salt)
        yield


def init_tables(tables: list[torch.Tensor]) -> None:
    """The expert-embedding tables, N(0, 1), one after another from their stream (so a
    model's layers get different tables)."""
    with side_stream(TABLE_STREAM), torch.no_grad():
        for table in tables:
            table.normal_()


class HyperNet(nn.Module):
    """The hypernetwork every MoE layer of a model shares."""

    def __init__(self, d_model: int, cfg: HyperConfig, init_std: float) -> None:
        super().__init__()
        C, H, r, D = cfg.embed_dim, cfg.hidden, cfg.rank, d_model
        self.rank, self.hidden = r, H
        self.in_CH = nn.Parameter(torch.empty(C, H))
        self.in_bias_H = nn.Parameter(torch.empty(H))
        self.down_DHr = nn.Parameter(torch.empty(D, H * r))
        self.up_HrD = nn.Parameter(torch.empty(H * r, D))
        self.init_std = init_std
        self.reset()

    def reset(self) -> None:
        """Condition layer at unit gain, the down maps at ``init_std``, the up maps at 0;
        drawn from a fork of the generator, so the model's other weights are those of
        the same seed without hyper-experts."""
        with side_stream(HYPERNET_STREAM):
            nn.init.normal_(self.in_CH, std=1.0 / math.sqrt(self.in_CH.shape[0]))
            nn.init.zeros_(self.in_bias_H)
            nn.init.normal_(self.down_DHr, std=self.init_std)
            nn.init.zeros_(self.up_HrD)

    def features(self, cond_TC: torch.Tensor) -> torch.Tensor:
        """``h``: the H coefficients of each token's adapter."""
        return F.gelu(cond_TC @ self.in_CH + self.in_bias_H)

    def forward(self, x_TD: torch.Tensor, cond_TC: torch.Tensor) -> torch.Tensor:
        """The adapter's output for each token, from its condition (factored form)."""
        T, H, r = x_TD.shape[0], self.hidden, self.rank
        h_TH = self.features(cond_TC.to(x_TD.dtype))
        xg_THr = (x_TD @ self.down_DHr).view(T, H, r)
        a_Tr = F.gelu(torch.bmm(h_TH.unsqueeze(1), xg_THr).squeeze(1))
        outer_THr = (h_TH.unsqueeze(2) * a_Tr.unsqueeze(1)).reshape(T, H * r)
        return outer_THr @ self.up_HrD


def condition(
    logits_TR: torch.Tensor, expert_TK: torch.Tensor, emb_RC: torch.Tensor
) -> torch.Tensor:
    """``c``: the probability-weighted mean embedding of the experts each token did not
    select (``expert_TK``: its top-k choice; ``logits_TR``: the unbiased router logits of
    the real experts). fp32. The weights ``p_e / sum_{unselected} p_e`` are the softmax
    of the logits with the selected ones masked out: the same numbers, computed without
    dividing by a sum that can underflow (a router far more sure of its choice than of
    the rest would otherwise send inf or nan back through the division)."""
    chosen_TR = torch.zeros_like(logits_TR, dtype=torch.bool).scatter_(1, expert_TK, True)
    w_TR = logits_TR.float().masked_fill(chosen_TR, float("-inf")).softmax(-1)
    return w_TR @ emb_RC.float()


def adapter_reference(net: HyperNet, x_TD: torch.Tensor, cond_TC: torch.Tensor) -> torch.Tensor:
    """The adapter with its matrices generated explicitly per token (the oracle of
    :meth:`HyperNet.forward`): ``A_down [T, D, r]`` and ``A_up [T, r, D]``."""
    T, D = x_TD.shape
    H, r = net.hidden, net.rank
    h_TH = net.features(cond_TC.to(x_TD.dtype))
    down_TDr = torch.einsum("th,dhr->tdr", h_TH, net.down_DHr.view(D, H, r))
    up_TrD = torch.einsum("th,hrd->trd", h_TH, net.up_HrD.view(H, r, D))
    a_Tr = F.gelu(torch.einsum("td,tdr->tr", x_TD, down_TDr))
    return torch.einsum("tr,trd->td", a_Tr, up_TrD)


def hyper_nets(model: nn.Module) -> list[HyperNet]:
    """The hypernetworks of ``model`` (one, or none)."""
    return [m for m in model.modules() if isinstance(m, HyperNet)]
