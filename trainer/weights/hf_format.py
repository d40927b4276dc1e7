"""Write a turnout model as a Hugging Face Llama (dense) or Mixtral (MoE) folder.

The mapping, block by block (shape legend: D width, H query heads, G key/value heads,
Hd head dim, F FFN hidden, E experts, V vocabulary):

- ``embed.weight`` -> ``model.embed_tokens.weight``; ``norm.weight`` -> ``model.norm.weight``;
  ``head.weight`` -> ``lm_head.weight`` (left out with ``tie_word_embeddings``).
- ``attn.qkv.weight`` ``[D + 2 G Hd, D]`` splits into ``q_proj``, ``k_proj``, ``v_proj``.
  Our RoPE rotates interleaved pairs (dims 2i, 2i+1 at frequency i); HF's ``rotate_half``
  rotates (i, i + Hd/2). So each head's q and k rows are reordered evens-then-odds: the
  same dot products, HF's layout. Same inverse frequencies ``theta^(-2i/Hd)``, scale
  ``Hd^-0.5``, and key/value head ``h // (H/G)`` serving query head h in both.
- ``norm_attn`` / ``norm_ffn`` -> ``input_layernorm`` / ``post_attention_layernorm``
  (RMSNorm in fp32, weight after normalising, ``rms_norm_eps`` = ``model.norm_eps``).
- dense SwiGLU ``w_gate``, ``w_up``, ``w_down`` -> ``mlp.gate_proj``, ``up_proj``, ``down_proj``.
- MoE: ``router_DE`` -> ``block_sparse_moe.gate.weight`` ``[E, D]``; expert e's
  ``w_gate_EDF[e]``, ``w_up_EDF[e]``, ``w_down_EFD[e]`` (x @ W) -> ``experts.e.w1``, ``w3``,
  ``w2`` (W x, so transposed). This is the hub's Mixtral layout, which every transformers
  version loads (5.x fuses it on load).

What Mixtral cannot express is refused, naming the key: MoD-routed blocks
(``model.layer_pattern``: mod, mode), no-op experts (imode), a pattern mixing dense and
MoE FFNs, top-k gates that are not renormalised (Mixtral always renormalises:
``model.moe.normalize_gates``), a non-zero selection bias (``model.moe.balance``), and
capacity dropping (``model.moe.capacity_factor``: Mixtral is dropless) unless the caller
accepts dropless routing (``allow_dropless``: then the two agree whenever our model
drops nothing, e.g. at inference on short inputs with a large enough capacity).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from turnout.config import TurnoutConfig
from turnout.config.model import ModelConfig
from turnout.errors import ConfigError

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
#: turnout's state-dict suffix for the (hC) aux-loss-free selection bias.
BIAS_SUFFIX = "expert_bias"


def check_hf(cfg: TurnoutConfig, state: dict[str, torch.Tensor], allow_dropless: bool) -> str:
    """'llama' or 'mixtral' for this model, or ConfigError naming what HF cannot express."""
    m = cfg.model
    kinds = m.blocks()
    for k in kinds:
        if k.mod_routed:
            raise ConfigError(
                "model.layer_pattern",
                f"HF Llama/Mixtral have no Mixture-of-Depths; a {k.name!r} block cannot be "
                "exported with --format hf (use --format turnout)",
            )
        if k.noop_experts:
            raise ConfigError(
                "model.moe.num_noop_experts",
                "HF Mixtral has no no-op experts ('imode' blocks); use --format turnout",
            )
    moe = [k.has_moe for k in kinds]
    if not any(moe):
        return "llama"
    if not all(moe):
        raise ConfigError(
            "model.layer_pattern",
            f"HF Mixtral has an MoE FFN in every layer; {m.layer_pattern} mixes dense and MoE",
        )
    if not m.moe.gates_normalized():
        raise ConfigError(
            "model.moe.normalize_gates",
            "HF Mixtral always renormalises the top-k gates; this model does not",
        )
    if m.moe.capacity_factor is not None and not allow_dropless:
        raise ConfigError(
            "model.moe.capacity_factor",
            f"is {m.moe.capacity_factor}: HF Mixtral is dropless; pass --allow-dropless to "
            "export anyway (equal logits whenever no token is dropped)",
        )
    for name, value in state.items():
        if name.endswith(BIAS_SUFFIX) and bool(torch.any(value != 0)):
            raise ConfigError(
                "model.moe.balance",
                f"{name} is non-zero; HF Mixtral has no expert selection bias",
            )
    return "mixtral"


def hf_config(m: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """The ``config.json`` of the HF model."""
    head_dim = m.d_model // m.n_heads
    out: dict = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "MixtralForCausalLM"],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "llama":
        out.update(intermediate_size=m.ffn_dim, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(
            intermediate_size=m.expert_hidden(),
            num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            router_aux_loss_coef=m.moe.aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return out


def _rope_rows(w_RD: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved RoPE pairs to HF's halves."""
    w_HdD = w_RD.reshape(heads, head_dim, -1)
    return torch.cat((w_HdD[:, 0::2], w_HdD[:, 1::2]), dim=1).reshape(heads * head_dim, -1)


def hf_state(m: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict of a turnout state dict (see the module docstring)."""
    H, G, Hd = m.n_heads, m.kv_heads(), m.d_model // m.n_heads
    out = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i, kind in enumerate(m.blocks()):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split([H * Hd, G * Hd, G * Hd], dim=0)
        out[dst + "self_attn.q_proj.weight"] = _rope_rows(q, H, Hd)
        out[dst + "self_attn.k_proj.weight"] = _rope_rows(k, G, Hd)
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.proj.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "norm_attn.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "norm_ffn.weight"]
        if not kind.has_moe:
            for ours, theirs in (
                ("w_gate", "gate_proj"),
                ("w_up", "up_proj"),
                ("w_down", "down_proj"),
            ):
                out[dst + f"mlp.{theirs}.weight"] = state[src + f"ffn.{ours}.weight"]
            continue
        moe = dst + "block_sparse_moe."
        out[moe + "gate.weight"] = state[src + "ffn.router_DE"].t()
        bank = src + "ffn.experts."
        for e in range(m.moe.num_experts):
            out[moe + f"experts.{e}.w1.weight"] = state[bank + "w_gate_EDF"][e].t()
            out[moe + f"experts.{e}.w3.weight"] = state[bank + "w_up_EDF"][e].t()
            out[moe + f"experts.{e}.w2.weight"] = state[bank + "w_down_EFD"][e].t()
    return {k: v.contiguous() for k, v in out.items()}


def write_hf(
    out: Path, cfg: TurnoutConfig, state: dict[str, torch.Tensor], allow_dropless: bool = False
) -> tuple[str, int]:
    """Write ``config.json`` and ``model.safetensors`` into ``out``: (architecture, tensors)."""
    from safetensors.torch import save_file

    arch = check_hf(cfg, state, allow_dropless)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    tensors = hf_state(cfg.model, state)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(hf_config(cfg.model, arch, dtype), indent=2) + "\n")
    return arch, len(tensors)
