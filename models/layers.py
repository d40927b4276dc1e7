"""Dense building blocks: RMSNorm, rotary embeddings, causal attention, SwiGLU.

Shape legend: B batch, S sequence (or the compacted chosen positions), D width,
H heads, Hd head dim, F FFN hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """RoPE applied at explicit positions, so compacted (MoD) tokens keep their real ones."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x_BHSd: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        cos = self.cos[pos_BS].unsqueeze(1)  # [B, 1, S, Hd/2]
        sin = self.sin[pos_BS].unsqueeze(1)
        xf = x_BHSd.float()
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x_BHSd.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = rotary

    def forward(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, mask_BSS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention in index order; ``mask_BSS`` (True = may attend) overrides it."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(q, pos_BS), self.rotary(k, pos_BS)
        if mask_BSS is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BSS.unsqueeze(1))
        return self.proj(o.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
