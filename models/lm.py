"""Decoder-only language model with per-layer block kinds (dense, moe, mod, mode, imode,
ponder, recursion) and optional early exits.

Shape legend: B batch, S sequence, D width, V vocabulary, N ponder steps.
``forward`` returns an :class:`LMOutput`: the logits, the total loss (cross-entropy
plus the weighted aux losses) when targets are given, and per-layer statistics. What a
block kind builds comes from ``BLOCK_KINDS``; which aux terms are losses, and their
weights, from ``models.terms.TERMS``. Early exit (:mod:`turnout.models.exit`) and the
ponder block (:mod:`turnout.models.ponder`) train with static shapes under
``routing="topk"``; ``routing="causal"`` applies their decode-time rules (exit or halt on a
threshold) in one full-sequence pass, which is what incremental decoding reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.choices import Recompute, Routing
from turnout.config.model import ModelConfig
from turnout.models import decode, recompute
from turnout.models.block import Block
from turnout.models.decode import DecodeState
from turnout.models.exit import dropout_keep, exit_weights, exits_now
from turnout.models.hyper import HyperNet, init_tables
from turnout.models.layers import RMSNorm, Rotary
from turnout.models.mod import MoDBlock
from turnout.models.moe import MoELayer
from turnout.models.ponder import PonderBlock
from turnout.models.recursion import RecursionBlock
from turnout.models.terms import TERMS, Aux, Term, spec

T = TypeVar("T")


@dataclass
class LMOutput:
    logits: torch.Tensor
    """[B, S, V] next-token logits."""
    loss: torch.Tensor | None = None
    """ce + weighted aux losses (what the optimizer minimises); None without targets."""
    ce: torch.Tensor | None = None
    """Mean next-token cross-entropy (nats/token), detached."""
    aux_loss: torch.Tensor | None = None
    """Weighted sum of all aux losses (differentiable)."""
    terms: dict[Term, torch.Tensor] = field(default_factory=dict)
    """The aux losses (``TermSpec.is_loss``), unweighted, summed over layers (detached)."""
    stats: list[Aux] = field(default_factory=list)
    """``stats[i]``: layer i's aux terms and statistics by :class:`Term` (detached);
    empty for a dense block."""
    exit_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """Exit depth d -> ``[B, S, V]`` logits of the early exit after d blocks."""
    halting: torch.Tensor | None = None
    """``[N, B, S]`` halting distribution of the ponder block (sums to 1 per token)."""
    depth: Depth | None = None
    """Blocks each token used under the decode-time rule (exit / ponder models)."""


@dataclass
class Depth:
    """How deep each token went: the decode rule's choice (causal) or what it would pick."""

    kind: str
    """'exit' or 'ponder'."""
    blocks_BS: torch.Tensor
    """Block applications per token (exit: its exit depth; ponder: n_layers - 1 + steps)."""
    levels: tuple[int, ...]
    """The values ``blocks_BS`` can take (the histogram's bins)."""

    def histogram(self) -> dict[int, int]:
        """Tokens per level."""
        return {v: int((self.blocks_BS == v).sum()) for v in self.levels}


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = Rotary(cfg.head_size(), cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList()
        self.kinds = cfg.block_kinds()
        for kind in cfg.blocks():
            block = Block(cfg, rotary, kind)
            if kind.mod_routed:
                self.layers.append(MoDBlock(cfg, block))
            elif kind.ponder:
                self.layers.append(PonderBlock(cfg, block))
            elif kind.recursion:  # the group: this block and group - 1 more of its kind
                more = [Block(cfg, rotary, kind) for _ in range(cfg.recursion.group - 1)]
                self.layers.append(RecursionBlock(cfg, [block, *more]))
            else:
                self.layers.append(block)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Hyper-experts: one hypernetwork for every MoE layer, stored here once.
        self.hyper: HyperNet | None = None
        if cfg.moe.hyper.enabled:
            self.hyper = HyperNet(cfg.d_model, cfg.moe.hyper, cfg.init_std)
            for m in self.modules():
                if isinstance(m, MoELayer):
                    m.attach_hyper(self.hyper)
        self.apply(self._init)
        if self.hyper is not None:  # each layer its own table, off the model's stream
            layers = [m for m in self.modules() if isinstance(m, MoELayer)]
            init_tables([m.hyper_emb_RC for m in layers if m.hyper_emb_RC is not None])
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.coefs = {t: s.coefficient(cfg) for t, s in TERMS.items() if s.is_loss}
        self.exit_w = exit_weights(cfg)
        self.activation_checkpointing = Recompute.NONE.value
        self._recomputed = [False] * len(self.layers)
        # PonderBlock.__init__ sets its halting bias after self.apply(self._init) would not
        # reach it: re-run it (the normal init above zeroed the bias).
        for layer in self.layers:
            if isinstance(layer, PonderBlock):
                layer.reset_halting()

    def set_activation_checkpointing(self, mode: str) -> None:
        """Which blocks a training forward checkpoints: ``train.activation_checkpointing``
        ('none', 'moe': blocks with an MoE FFN, 'full': every block)."""
        self._recomputed = [recompute.recomputes(k, mode) for k in self.cfg.blocks()]
        self.activation_checkpointing = str(mode)

    def _run(self, i: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Layer ``i``'s ``fn``, checkpointed when its block is recomputed and grad is on."""
        if self._recomputed[i] and torch.is_grad_enabled():
            return recompute.checkpointed(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def threshold(self, value: float | None = None) -> float:
        """The decode-rule threshold: ``value``, else the config's (exit or ponder)."""
        if value is not None:
            return value
        return self.cfg.exit.threshold if self.cfg.uses_exit() else self.cfg.ponder.threshold

    def depth_levels(self) -> tuple[int, ...]:
        """The block counts a token can use (exit depths or ponder step counts)."""
        L = self.cfg.n_layers
        if self.cfg.uses_exit():
            return (*self.cfg.exit.layers, L)
        steps, per_step = self.cfg.depth_steps()
        return tuple(L - 1 + per_step * n for n in range(1, steps + 1))

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        routing: str = Routing.TOPK,
        threshold: float | None = None,
    ) -> LMOutput:
        """Logits (and the loss with targets). ``threshold`` overrides the exit / halting
        threshold of the causal (decode-rule) pass and of the depth statistics."""
        B, S = tokens_BS.shape
        cfg = self.cfg
        causal = routing == Routing.CAUSAL
        thr = self.threshold(threshold)
        pos_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
        x_BSD = self.embed(tokens_BS)
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        terms: dict[Term, torch.Tensor] = {}
        stats: list[Aux] = []
        exit_logits: dict[int, torch.Tensor] = {}
        exited_BS = torch.zeros(B, S, dtype=torch.bool, device=tokens_BS.device)
        depth_BS: torch.Tensor | None = None
        p_NBS = None
        drop = self.training and not causal and cfg.exit.layer_dropout > 0
        for i, layer in enumerate(self.layers):
            x_in = x_BSD
            # Exited tokens are keys of every later block, routed ones included (CALM).
            keys_only = exited_BS if causal and self.exit_w else None
            if isinstance(layer, PonderBlock):
                if causal:
                    x_BSD, steps_BS, p_NBS, aux = layer.causal(x_BSD, pos_BS, thr, keys_only)
                    used_BS = steps_BS + (cfg.n_layers - 1)
                    if depth_BS is not None:  # exited tokens keep their exit depth
                        used_BS = torch.where(exited_BS, depth_BS, used_BS)
                    depth_BS = used_BS
                else:
                    h_NBSD, p_NBS, aux = self._run(i, layer.unroll, x_BSD, pos_BS)
                    x_BSD = h_NBSD.flatten(0, 1)  # the N steps along the batch
                    pos_BS = pos_BS.repeat(layer.max_steps, 1)
            elif isinstance(layer, RecursionBlock):
                x_BSD, rec_BS, aux = self._run(i, layer, x_BSD, pos_BS, routing)
                depth_BS = rec_BS * layer.group + (cfg.n_layers - 1)
            elif isinstance(layer, MoDBlock) and causal:
                x_BSD, aux = layer(x_BSD, pos_BS, routing=routing, exited_BS=keys_only)
            else:  # a checkpointed block replays its routing decisions in the recompute
                x_BSD, aux = self._run(i, layer, x_BSD, pos_BS)
            if causal and self.exit_w:  # an exited token keeps its exit state (CALM)
                x_BSD = torch.where(exited_BS.unsqueeze(-1), x_in, x_BSD)
            if drop and x_BSD.shape == x_in.shape:
                keep = dropout_keep(
                    i, cfg.n_layers, cfg.exit.layer_dropout, x_BSD.shape[0], x_BSD.device
                )
                if keep is not None:
                    x_BSD = torch.where(keep, x_BSD, x_in)
            for name, value in aux.items():
                if spec(name).is_loss:
                    aux_loss = aux_loss + self.coefs[name] * value.float()
                    terms[name] = terms.get(name, 0) + value.detach().float()
            stats.append({name: value.detach() for name, value in aux.items()})
            if i + 1 in self.exit_w:
                exit_logits[i + 1] = self.head(self.norm(x_BSD))
                if causal:
                    now_BS = exits_now(exit_logits[i + 1], thr) & ~exited_BS
                    exited_BS = exited_BS | now_BS
                    if depth_BS is None:
                        depth_BS = torch.full_like(pos_BS, cfg.n_layers)
                    depth_BS = torch.where(now_BS, i + 1, depth_BS)
        logits_BSV = self.head(self.norm(x_BSD))
        ponder_steps = None if p_NBS is None or causal else p_NBS.shape[0]
        if ponder_steps is not None:  # the static unroll: logits of every step
            logits_NBSV = logits_BSV.view(ponder_steps, B, S, -1)
            logits_BSV = logits_NBSV[-1]
        out = LMOutput(
            logits=logits_BSV,
            aux_loss=aux_loss,
            terms=terms,
            stats=stats,
            exit_logits=exit_logits,
            halting=p_NBS,
        )
        out.depth = self._depth(out, depth_BS, thr)
        if targets_BS is None:
            return out
        if ponder_steps is not None and p_NBS is not None:
            # PonderNet: the expected cross-entropy under the halting distribution.
            ce_NBS = F.cross_entropy(
                logits_NBSV.float().reshape(-1, logits_NBSV.shape[-1]),
                targets_BS.repeat(ponder_steps, 1).reshape(-1),
                reduction="none",
            ).view(ponder_steps, B, S)
            ce = (p_NBS * ce_NBS).sum(0).mean()
        else:
            ce = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1))
        if exit_logits:
            exit_loss = aux_loss.new_zeros(())
            for d, logits in exit_logits.items():
                ce_d = F.cross_entropy(logits.float().reshape(B * S, -1), targets_BS.reshape(-1))
                exit_loss = exit_loss + self.exit_w[d] * ce_d
                stats[d - 1][Term.EXIT_CE] = ce_d.detach()
            aux_loss = aux_loss + self.coefs[Term.EXIT_LOSS] * exit_loss
            terms[Term.EXIT_LOSS] = exit_loss.detach()
            out.aux_loss = aux_loss
        out.loss = ce + aux_loss
        out.ce = ce.detach()
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TransformerLM:
        """Load a ``turnout export`` folder (see :mod:`turnout.models.pretrained`)."""
        from turnout.models.pretrained import from_pretrained

        return from_pretrained(path, device, dtype)

    def _depth(self, out: LMOutput, causal_BS: torch.Tensor | None, thr: float) -> Depth | None:
        """The blocks each token used (causal pass) or would use (static pass)."""
        kind = self.cfg.depth_kind()
        if kind is None:
            return None
        L = self.cfg.n_layers
        if causal_BS is not None:  # causal routing (a recursion block: both routings)
            blocks_BS = causal_BS
        elif kind == "exit":
            blocks_BS = torch.full(out.logits.shape[:2], L, device=out.logits.device)
            for d in sorted(out.exit_logits, reverse=True):  # the first exit wins
                blocks_BS = torch.where(exits_now(out.exit_logits[d], thr), d, blocks_BS)
        else:
            assert out.halting is not None
            over_NBS = out.halting.detach().cumsum(0) > thr
            over_NBS[-1] = True
            blocks_BS = over_NBS.float().argmax(0) + L
        return Depth(kind, blocks_BS.detach(), self.depth_levels())

    def new_decode_state(
        self, batch: int, max_len: int | None = None, threshold: float | None = None
    ) -> DecodeState:
        """Empty KV caches for incremental decoding (see :mod:`turnout.models.decode`);
        ``threshold``: the exit / halting threshold (default the config's)."""
        return decode.new_state(self, batch, max_len, threshold)

    def prefill(
        self, prompt_BS: torch.Tensor, max_len: int | None = None, threshold: float | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt through fresh caches: its ``logits_BSV`` and the decode state."""
        state = self.new_decode_state(prompt_BS.shape[0], max_len, threshold)
        return decode.extend(self, prompt_BS, state), state

    def decode_step(self, tokens_B1: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one new token per sequence through the caches: next-token ``logits_BV``."""
        if tokens_B1.dim() != 2 or tokens_B1.shape[1] != 1:
            raise ValueError(f"decode_step takes [B, 1] tokens, got {tuple(tokens_B1.shape)}")
        return decode.extend(self, tokens_B1, state)[:, -1]

    def generate(
        self,
        prompt_BS: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        threshold: float | None = None,
    ) -> torch.Tensor:
        """Sample with causal MoD decisions through the KV caches (skipped tokens do no work).

        Prompt + new tokens must fit in ``max_seq_len``; :func:`decode.generate` also
        returns the caches and the skip counters.
        """
        out = decode.generate(self, prompt_BS, max_new_tokens, temperature, generator, threshold)
        return out.tokens_BS
