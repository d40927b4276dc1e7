"""Adaptive computation time (PonderNet): one weight-tied block applied up to N times.

Shape legend: N steps (``model.ponder.max_steps``), B batch, S sequence, D width.

After application ``n`` (1-based) a halting head gives ``lambda_n = sigmoid(w . h_n + b)``,
the probability of halting at step n given the token got there. The halting distribution
is ``p_n = lambda_n * prod_{j<n} (1 - lambda_j)`` for ``n < N``, and the last step takes
the remainder ``p_N = prod_{j<N} (1 - lambda_j)``, so ``sum_n p_n = 1`` per token.

Training (``unroll``, static shapes): every token runs all N applications with plain
causal attention over the other tokens' previous-step states; the model stacks the N step
states along the batch, runs the rest of the network on them, and minimises the expected
cross-entropy ``sum_n p_n * ce_n`` plus ``kl_coef * KL(p || prior)`` with the geometric
prior ``g_n = lambda_p (1 - lambda_p)^(n-1)``, truncated the same way (``g_N`` the
remainder).

Decoding (``causal``, and :mod:`turnout.models.decode`): a token halts, deterministically,
after the first step whose cumulative halting probability ``1 - prod_{j<=n}(1 - lambda_j)``
is above ``model.ponder.threshold`` (1.0 never halts early). A halted token does no more
work and writes nothing to the caches of the later applications: application n's keys
are the tokens that reached n (the masked-dense form of MoD's skip), and the token leaves
the block with its halted state. :meth:`PonderBlock.decode_step` is the cached form (one
cache per application). An early-exited token (no configuration combines exits with a
ponder block, but the block states the rule) is a key in every application and runs
none; :meth:`PonderBlock.propagate` writes it once every row of a call has exited.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from turnout.config.model import ModelConfig
from turnout.models.block import Block, keys_and_work, keys_mask
from turnout.models.kvcache import KVCache, LayerState
from turnout.models.terms import Aux, Term


class PonderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, block: Block) -> None:
        super().__init__()
        self.block = block
        self.max_steps = cfg.ponder.max_steps
        self.prior = cfg.ponder.prior
        self.threshold = cfg.ponder.threshold
        self.halt = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.halt.weight, std=cfg.init_std)
        self.reset_halting()

    @torch.no_grad()
    def reset_halting(self) -> None:
        """Start halting at the prior's rate (bias = logit(lambda_p)): the KL starts small."""
        p = min(max(self.prior, 1e-4), 1 - 1e-4)
        self.halt.bias.fill_(math.log(p / (1 - p)))

    def lam(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """fp32 ``lambda_BS``: the probability of halting after producing ``h``."""
        return torch.sigmoid(self.halt(h_BSD).squeeze(-1).float())

    def unroll(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Aux]:
        """All N step states ``h_NBSD`` (every token, every step), the halting
        distribution ``p_NBS`` and the aux terms (its KL to the prior, expected steps)."""
        states = []
        lams = []
        h_BSD = x_BSD
        for n in range(self.max_steps):
            h_BSD, _ = self.block(h_BSD, pos_BS)
            states.append(h_BSD)
            if n < self.max_steps - 1:
                lams.append(self.lam(h_BSD))
        p_NBS = halting_distribution(lams, x_BSD.shape[:2], x_BSD.device)
        return torch.stack(states), p_NBS, self.terms(p_NBS)

    def terms(self, p_NBS: torch.Tensor) -> Aux:
        steps_N = torch.arange(1, self.max_steps + 1, device=p_NBS.device, dtype=p_NBS.dtype)
        expected_BS = (p_NBS * steps_N.view(-1, 1, 1)).sum(0)
        return {
            Term.PONDER_KL: geometric_kl(p_NBS, self.prior),
            Term.PONDER_STEPS: expected_BS.mean().detach(),
        }

    def causal(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        threshold: float,
        exited_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Aux]:
        """Thresholded halting (what decoding does): the output, ``steps_BS``, the
        halting distribution ``p_NBS`` of the states each token reached, and aux terms.
        ``exited_BS``: early-exited tokens, keys of every application, never run."""
        B, S, _ = x_BSD.shape
        device = x_BSD.device
        active_BS = torch.ones(B, S, dtype=torch.bool, device=device)
        if exited_BS is not None:
            active_BS = ~exited_BS
        survive_BS = torch.ones(B, S, dtype=torch.float32, device=device)
        steps_BS = torch.zeros(B, S, dtype=torch.long, device=device)
        lams = []
        h_BSD = x_BSD
        for n in range(self.max_steps):
            # Keys: the tokens that reached this application (the diagonal keeps rows finite).
            keys_BS, _ = keys_and_work(active_BS, exited_BS)
            mask_BSS = keys_mask(keys_BS)
            delta_BSD, _ = self.block.increment(h_BSD, pos_BS, mask_BSS, active_BS)
            h_BSD = torch.where(active_BS.unsqueeze(-1), h_BSD + delta_BSD, h_BSD)
            steps_BS = steps_BS + active_BS.long()
            if n == self.max_steps - 1:
                break
            lam_BS = self.lam(h_BSD)
            lams.append(lam_BS)
            survive_BS, active_BS = halt_step(lam_BS, survive_BS, active_BS, threshold)
        p_NBS = halting_distribution(lams, (B, S), device)
        return h_BSD, steps_BS, p_NBS, self.terms(p_NBS)

    def new_decode_state(self, cache: Callable[[], KVCache]) -> LayerState:
        """Empty decode state: one cache per application (``more``: applications 2..N)."""
        return LayerState(cache(), more=[cache() for _ in range(self.max_steps - 1)])

    def decode_step(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        state: LayerState,
        exited_BS: torch.Tensor | None = None,
        threshold: float = 1.0,
    ) -> torch.Tensor:
        """Apply the block until each new token halts at ``threshold``; application n
        attends over (and fills) cache n. ``state.steps_BS``: the applications taken.
        Exited rows (``exited_BS``, None: none) only write their K/V to every cache."""
        B, S, _ = x_BSD.shape
        active_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        if exited_BS is not None:
            active_BS = ~exited_BS
        survive_BS = torch.ones(B, S, dtype=torch.float32, device=x_BSD.device)
        steps_BS = torch.zeros(B, S, dtype=torch.long, device=x_BSD.device)
        for n, cache in enumerate(state.caches):
            running = (n == 0 and exited_BS is None) or bool(active_BS.any())
            if not running and exited_BS is None:
                state.skipped += B * S * (self.max_steps - n)
                break
            keys_BS, work_BS = keys_and_work(active_BS, exited_BS)
            x_BSD = self.block.cached_step(x_BSD, pos_BS, state, cache, keys_BS, work_BS)
            steps_BS = steps_BS + active_BS.long()
            if running and n < self.max_steps - 1:
                survive_BS, active_BS = halt_step(self.lam(x_BSD), survive_BS, active_BS, threshold)
        state.steps_BS = steps_BS
        return x_BSD

    def propagate(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, state: LayerState) -> None:
        """Every row has exited: their K/V (one projection) into every application's cache."""
        self.block.propagate(x_BSD, pos_BS, state)


def halt_step(
    lam_BS: torch.Tensor, survive_BS: torch.Tensor, active_BS: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One thresholded halting decision: the new survival and still-active masks."""
    survive_BS = torch.where(active_BS, survive_BS * (1 - lam_BS), survive_BS)
    return survive_BS, active_BS & ~((1 - survive_BS) > threshold)


def halting_distribution(
    lams: list[torch.Tensor], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``p_NBS`` from the N-1 halting probabilities; the last step takes the remainder."""
    survive = torch.ones(*shape, dtype=torch.float32, device=device)
    ps = []
    for lam in lams:
        ps.append(lam * survive)
        survive = survive * (1 - lam)
    ps.append(survive)
    return torch.stack(ps)


def geometric_prior(n_steps: int, prior: float) -> torch.Tensor:
    """The truncated geometric prior ``g_N`` (the last step takes the remainder)."""
    g = [prior * (1 - prior) ** n for n in range(n_steps - 1)]
    g.append((1 - prior) ** (n_steps - 1))
    return torch.tensor(g, dtype=torch.float32)


def geometric_kl(p_NBS: torch.Tensor, prior: float) -> torch.Tensor:
    """Mean over tokens of ``KL(p || g)`` (0 log 0 = 0; a zero prior step is clamped)."""
    g_N = geometric_prior(p_NBS.shape[0], prior).to(p_NBS.device).clamp_min(1e-12)
    p = p_NBS.float()
    kl_NBS = torch.xlogy(p, p) - p * g_N.log().view(-1, 1, 1)
    return kl_NBS.sum(0).mean()
