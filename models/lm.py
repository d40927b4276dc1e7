"""Decoder-only language model with per-layer block kinds (dense, moe, mod, mode, imode).

Shape legend: B batch, S sequence, D width, V vocabulary.
``forward`` returns an :class:`LMOutput`: the logits, the total loss (cross-entropy
plus the weighted aux losses) when targets are given, and per-layer statistics. What a
block kind builds comes from ``BLOCK_KINDS``; which aux terms are losses, and their
weights, from ``models.terms.TERMS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.choices import Routing
from turnout.config.model import ModelConfig
from turnout.models import decode
from turnout.models.block import Block
from turnout.models.decode import DecodeState
from turnout.models.layers import RMSNorm, Rotary
from turnout.models.mod import MoDBlock
from turnout.models.terms import TERMS, Aux, Term, spec


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


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList()
        self.kinds = cfg.block_kinds()
        for kind in cfg.blocks():
            block = Block(cfg, rotary, kind)
            self.layers.append(MoDBlock(cfg, block) if kind.mod_routed else block)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.coefs = {t: s.coefficient(cfg) for t, s in TERMS.items() if s.is_loss}

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
    ) -> LMOutput:
        B, S = tokens_BS.shape
        pos_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
        x_BSD = self.embed(tokens_BS)
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        terms: dict[Term, torch.Tensor] = {}
        stats: list[Aux] = []
        for layer in self.layers:
            if isinstance(layer, MoDBlock):
                x_BSD, aux = layer(x_BSD, pos_BS, routing=routing)
            else:
                x_BSD, aux = layer(x_BSD, pos_BS)
            for name, value in aux.items():
                if spec(name).is_loss:
                    aux_loss = aux_loss + self.coefs[name] * value.float()
                    terms[name] = terms.get(name, 0) + value.detach().float()
            stats.append({name: value.detach() for name, value in aux.items()})
        logits_BSV = self.head(self.norm(x_BSD))
        out = LMOutput(logits=logits_BSV, aux_loss=aux_loss, terms=terms, stats=stats)
        if targets_BS is not None:
            ce = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1))
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

    def new_decode_state(self, batch: int, max_len: int | None = None) -> DecodeState:
        """Empty KV caches for incremental decoding (see :mod:`turnout.models.decode`)."""
        return decode.new_state(self, batch, max_len)

    def prefill(
        self, prompt_BS: torch.Tensor, max_len: int | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt through fresh caches: its ``logits_BSV`` and the decode state."""
        state = self.new_decode_state(prompt_BS.shape[0], max_len)
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
    ) -> torch.Tensor:
        """Sample with causal MoD decisions through the KV caches (skipped tokens do no work).

        Prompt + new tokens must fit in ``max_seq_len``; :func:`decode.generate` also
        returns the caches and the skip counters.
        """
        return decode.generate(self, prompt_BS, max_new_tokens, temperature, generator).tokens_BS
