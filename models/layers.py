"""Dense building blocks: RMSNorm, rotary embeddings, causal attention, SwiGLU.

Shape legend: B batch, S sequence (or the compacted chosen positions), D width,
H query heads, G key/value heads, Hd head dim, C = G * Hd, L keys, F FFN hidden.
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

    cos: torch.Tensor
    sin: torch.Tensor

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
    """Multi-head attention with ``n_kv_heads`` key/value heads (grouped-query attention).

    One fused projection gives Q (``H * Hd`` columns) then K and V (``G * Hd`` columns
    each); each K/V head serves ``H / G`` query heads. With ``G = H`` it is plain
    multi-head attention with the same parameter layout. ``head_dim`` 0 means
    ``d_model / n_heads``. ``qk_norm_eps`` (None: off) adds a per-head RMSNorm on the
    queries and keys before RoPE (Qwen3's ``q_norm`` / ``k_norm``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        rotary: Rotary,
        n_kv_heads: int = 0,
        head_dim: int = 0,
        qk_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.q_dim = n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, self.q_dim + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(self.q_dim, d_model, bias=False)
        self.rotary = rotary
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(self.head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, qk_norm_eps)

    def heads(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q_BHSd`` and ``k_BGSd``, ``v_BGSd`` of ``x``, RoPE applied at ``pos_BS``."""
        B, S, _ = x_BSD.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x_BSD).split([self.q_dim, kv_dim, kv_dim], dim=-1)
        q_BSHd = q.view(B, S, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHd = self.q_norm(q_BSHd)
        q_BHSd = q_BSHd.transpose(1, 2)
        k_BGSd, v_BGSd = self._kv_heads(k, v, pos_BS)
        return self.rotary(q_BHSd, pos_BS), k_BGSd, v_BGSd

    def q(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        """Only ``q_BHSd`` of ``x`` (RoPE at ``pos_BS``): the query columns of the fused
        projection. What a row needs that attends over keys and values computed before (a
        recursion over the first recursion's cache)."""
        B, S, _ = x_BSD.shape
        q_BSHd = F.linear(x_BSD, self.qkv.weight[: self.q_dim]).view(B, S, self.n_heads, -1)
        if self.q_norm is not None:
            q_BSHd = self.q_norm(q_BSHd)
        return self.rotary(q_BSHd.transpose(1, 2), pos_BS)

    def kv(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only ``k_BGSd``, ``v_BGSd`` of ``x`` (RoPE at ``pos_BS``): the K/V columns of the
        fused projection, without the queries. What a row that serves only as a key needs
        (an exited token's state propagated into a later block's cache)."""
        kv = F.linear(x_BSD, self.qkv.weight[self.q_dim :])
        k, v = kv.split(kv.shape[-1] // 2, dim=-1)
        return self._kv_heads(k, v, pos_BS)

    def _kv_heads(
        self, k_BSC: torch.Tensor, v_BSC: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values ``[B, S, G * Hd]`` as heads, (norm and) RoPE on the keys."""
        B, S, _ = k_BSC.shape
        k_BSGd = k_BSC.view(B, S, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k_BSGd = self.k_norm(k_BSGd)
        k_BGSd = k_BSGd.transpose(1, 2)
        v_BGSd = v_BSC.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.rotary(k_BGSd, pos_BS), v_BGSd

    def attend(
        self,
        q_BHSd: torch.Tensor,
        k_BGLd: torch.Tensor,
        v_BGLd: torch.Tensor,
        mask_BSL: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """SDPA of S queries over L keys (``mask_BSL``: True = may attend), projected out."""
        B, _, S, _ = q_BHSd.shape
        mask = None if mask_BSL is None else mask_BSL.unsqueeze(1)
        o_BHSd = F.scaled_dot_product_attention(
            q_BHSd,
            k_BGLd,
            v_BGLd,
            attn_mask=mask,
            is_causal=causal and mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.proj(o_BHSd.transpose(1, 2).reshape(B, S, -1))

    def forward(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, mask_BSS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention in index order; ``mask_BSS`` (True = may attend) overrides it."""
        q_BHSd, k_BGSd, v_BGSd = self.heads(x_BSD, pos_BS)
        return self.attend(q_BHSd, k_BGSd, v_BGSd, mask_BSS, causal=True)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
