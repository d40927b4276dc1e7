"""The one weight mapping between turnout's state dict and a Hugging Face one, both ways.

Each :class:`Link` ties one turnout tensor to the HF tensors it is made of and carries
both directions next to each other (``to_hf`` and ``from_hf``, inverse of each other
exactly: reorders, splits, concatenations and transposes only, no arithmetic), so the
export (:mod:`turnout.trainer.weights.hf_format`) and the import
(:mod:`turnout.trainer.weights.hf_import`) cannot drift apart. Shape legend: D width,
H query heads, G key/value heads, Hd head dim, F FFN hidden, E experts, V vocabulary.

- ``embed.weight`` <-> ``model.embed_tokens.weight``; ``norm.weight`` <->
  ``model.norm.weight``; ``head.weight`` <-> ``lm_head.weight`` (absent when tied).
- ``attn.qkv.weight`` ``[H Hd + 2 G Hd, D]`` <-> ``q_proj``, ``k_proj``, ``v_proj``. Our
  RoPE rotates interleaved pairs (dims 2i, 2i+1 at frequency i); HF's ``rotate_half``
  rotates (i, i + Hd/2). So each head's q and k rows are reordered evens-then-odds on
  the way out (odd/even interleaved on the way in): the same dot products, HF's layout.
  The per-head q/k norm weights (``attn.q_norm`` / ``attn.k_norm`` <-> ``q_norm`` /
  ``k_norm``, Qwen3) act on the same head dims, so they take the same reorder.
- ``norm_attn`` / ``norm_ffn`` <-> ``input_layernorm`` / ``post_attention_layernorm``.
- dense SwiGLU ``w_gate``, ``w_up``, ``w_down`` <-> ``mlp.gate_proj``, ``up_proj``,
  ``down_proj``.
- MoE router ``router_DE`` <-> ``gate.weight`` ``[E, D]`` (transposed); expert e's
  ``w_gate_EDF[e]``, ``w_up_EDF[e]``, ``w_down_EFD[e]`` (x @ W) <-> the hub's
  per-expert matrices (W x, so transposed): Mixtral ``block_sparse_moe.experts.e.w1``,
  ``w3``, ``w2``; Qwen3-MoE ``mlp.experts.e.gate_proj``, ``up_proj``, ``down_proj``.
  These are the layouts every transformers version loads and 5.x saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from turnout.config.model import ModelConfig

Tensor = torch.Tensor

#: HF ``model_type`` -> its causal-LM class name (``architectures`` in config.json).
ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
#: The MoE architectures among :data:`ARCHS`: where their MoE layer's tensors live.
MOE_PREFIX = {"mixtral": "block_sparse_moe.", "qwen3_moe": "mlp."}
#: Expert matrices per architecture, in the order gate, up, down.
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
#: Architectures with the per-head q/k RMSNorm.
QK_NORM_ARCHS = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Link:
    """One turnout tensor and the HF tensors it is made of, with both conversions."""

    ours: str
    theirs: tuple[str, ...]
    to_hf: Callable[[Tensor], list[Tensor]]
    """Our tensor -> the HF tensors, in the order of ``theirs``."""
    from_hf: Callable[[list[Tensor]], Tensor]
    """The HF tensors (order of ``theirs``) -> our tensor."""


def _same(ours: str, theirs: str) -> Link:
    return Link(ours, (theirs,), lambda w: [w], lambda ws: ws[0])


def _transposed(ours: str, theirs: str) -> Link:
    return Link(ours, (theirs,), lambda w: [w.t()], lambda ws: ws[0].t())


def to_halves(w_RX: Tensor, heads: int, head_dim: int) -> Tensor:
    """Each head's rows from interleaved RoPE pairs to HF's halves (evens, then odds)."""
    w_HdX = w_RX.reshape(heads, head_dim, -1)
    out = torch.cat((w_HdX[:, 0::2], w_HdX[:, 1::2]), dim=1)
    return out.reshape(w_RX.shape)


def to_pairs(w_RX: Tensor, heads: int, head_dim: int) -> Tensor:
    """The inverse of :func:`to_halves`: HF's halves back to interleaved pairs."""
    w_H2hX = w_RX.reshape(heads, 2, head_dim // 2, -1)
    return w_H2hX.transpose(1, 2).reshape(w_RX.shape)


def _qkv(ours: str, attn: str, H: int, G: int, Hd: int) -> Link:
    sizes = [H * Hd, G * Hd, G * Hd]

    def out(w: Tensor) -> list[Tensor]:
        q, k, v = w.split(sizes, dim=0)
        return [to_halves(q, H, Hd), to_halves(k, G, Hd), v]

    def into(ws: list[Tensor]) -> Tensor:
        q, k, v = ws
        return torch.cat((to_pairs(q, H, Hd), to_pairs(k, G, Hd), v), dim=0)

    names = tuple(f"{attn}{p}_proj.weight" for p in "qkv")
    return Link(ours, names, out, into)


def _head_norm(ours: str, theirs: str, Hd: int) -> Link:
    return Link(
        ours,
        (theirs,),
        lambda w: [to_halves(w, 1, Hd)],
        lambda ws: to_pairs(ws[0], 1, Hd),
    )


def _bank(ours: str, theirs: list[str]) -> Link:
    """An expert bank ``[E, X, Y]`` (x @ W) <-> E HF matrices ``[Y, X]`` (W x)."""
    return Link(
        ours,
        tuple(theirs),
        lambda w: [w[e].t() for e in range(w.shape[0])],
        lambda ws: torch.stack([t.t() for t in ws]),
    )


def links(m: ModelConfig, arch: str) -> list[Link]:
    """Every turnout tensor of ``m`` and where it lives in an HF ``arch`` state dict."""
    H, G, Hd = m.n_heads, m.kv_heads(), m.head_size()
    out = [
        _same("embed.weight", "model.embed_tokens.weight"),
        _same("norm.weight", "model.norm.weight"),
    ]
    if not m.tie_embeddings:
        out.append(_same("head.weight", "lm_head.weight"))
    for i, kind in enumerate(m.blocks()):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        attn = dst + "self_attn."
        out += [
            _qkv(src + "attn.qkv.weight", attn, H, G, Hd),
            _same(src + "attn.proj.weight", attn + "o_proj.weight"),
            _same(src + "norm_attn.weight", dst + "input_layernorm.weight"),
            _same(src + "norm_ffn.weight", dst + "post_attention_layernorm.weight"),
        ]
        if m.qk_norm:
            out.append(_head_norm(src + "attn.q_norm.weight", attn + "q_norm.weight", Hd))
            out.append(_head_norm(src + "attn.k_norm.weight", attn + "k_norm.weight", Hd))
        if not kind.has_moe:
            for ours, theirs in (
                ("w_gate", "gate_proj"),
                ("w_up", "up_proj"),
                ("w_down", "down_proj"),
            ):
                out.append(_same(src + f"ffn.{ours}.weight", dst + f"mlp.{theirs}.weight"))
            continue
        moe = dst + MOE_PREFIX[arch]
        out.append(_transposed(src + "ffn.router_DE", moe + "gate.weight"))
        for ours, theirs in zip(
            ("w_gate_EDF", "w_up_EDF", "w_down_EFD"), EXPERT_NAMES[arch], strict=True
        ):
            names = [f"{moe}experts.{e}.{theirs}.weight" for e in range(m.moe.num_experts)]
            out.append(_bank(src + "ffn.experts." + ours, names))
    return out
