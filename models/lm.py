"""Decoder-only language model with per-layer block kinds (dense, moe, mod, mode, imode).

Shape legend: B batch, S sequence, D width, V vocabulary.
``forward`` returns an :class:`LMOutput`: the logits, the total loss (cross-entropy
plus the weighted aux losses) when targets are given, and per-layer statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.model import ModelConfig
from turnout.models.block import Block
from turnout.models.layers import RMSNorm, Rotary
from turnout.models.mod import MoDBlock
from turnout.models.moe import MoELayer


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
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted aux terms summed over layers (detached): moe_lb, moe_z, mod_pred_loss."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-layer counters, keyed ``layer{i}/{name}`` (detached)."""


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList()
        self.kinds = cfg.block_kinds()
        for kind in self.kinds:
            ffn = {"dense": "dense", "mod": "dense", "moe": "moe", "mode": "moe", "imode": "imode"}[
                kind
            ]
            block = Block(cfg, rotary, ffn)
            self.layers.append(MoDBlock(cfg, block) if kind in ("mod", "mode") else block)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.coefs = {
            "moe_lb": cfg.moe.aux_loss_coef,
            "moe_z": cfg.moe.z_loss_coef,
            "mod_pred_loss": cfg.mod.predictor_loss_coef,
        }

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        routing: str = "topk",
    ) -> LMOutput:
        B, S = tokens_BS.shape
        pos_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
        x_BSD = self.embed(tokens_BS)
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MoDBlock):
                x_BSD, aux = layer(x_BSD, pos_BS, routing=routing)
            else:
                x_BSD, aux = layer(x_BSD, pos_BS)
            for name, value in aux.items():
                if name in self.coefs:
                    aux_loss = aux_loss + self.coefs[name] * value.float()
                    terms[name] = terms.get(name, 0) + value.detach().float()
                    stats[f"layer{i}/{name}"] = value.detach()
                else:
                    stats[f"layer{i}/{name}"] = value
        logits_BSV = self.head(self.norm(x_BSD))
        out = LMOutput(logits=logits_BSV, aux_loss=aux_loss, terms=terms, stats=stats)
        if targets_BS is not None:
            ce = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1))
            out.loss = ce + aux_loss
            out.ce = ce.detach()
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt_BS: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample with causal MoD decisions (the predictor), re-running the window each step."""
        tokens = prompt_BS
        for _ in range(max_new_tokens):
            window = tokens[:, -self.cfg.max_seq_len :]
            logits = self(window, routing="causal").logits[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens
