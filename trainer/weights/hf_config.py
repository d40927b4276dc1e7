"""The Hugging Face ``config.json`` of a turnout model, and the turnout model of one.

Both directions live here, field by field, so they stay each other's inverse:
:func:`hf_config` writes the fields :func:`model_config` reads. What turnout cannot
express is refused by :func:`model_config` in one :class:`ConfigError` naming the HF
field: another attention kind (sliding windows, per-layer types), biases, RoPE scaling,
an activation other than SiLU, dropout, router jitter, an architecture outside
:data:`turnout.trainer.weights.hf_map.ARCHS`.

An imported MoE model routes dropless (``model.moe.capacity_factor: null``), as HF
does, so its logits equal HF's whatever the input; its top-k gates are renormalised
exactly when HF's are (Mixtral always; Qwen3-MoE when ``norm_topk_prob``); softmax over
all experts, then top-k, in both.
"""

from __future__ import annotations

from typing import Any

import torch

from turnout.config.model import ModelConfig, MoEConfig, validate_model
from turnout.errors import ConfigError
from turnout.trainer.weights.hf_map import ARCHS, MOE_PREFIX, QK_NORM_ARCHS

#: What our errors name when an HF config field has no turnout counterpart.
HF_KEY = "config.json"


#: turnout key -> the HF config.json field it is read from (for validation errors).
FIELD_OF = {
    "model.vocab_size": "vocab_size",
    "model.d_model": "hidden_size",
    "model.n_layers": "num_hidden_layers",
    "model.n_heads": "num_attention_heads",
    "model.n_kv_heads": "num_key_value_heads",
    "model.head_dim": "head_dim",
    "model.ffn_dim": "intermediate_size",
    "model.max_seq_len": "max_position_embeddings",
    "model.rope_theta": "rope_theta",
    "model.norm_eps": "rms_norm_eps",
    "model.init_std": "initializer_range",
    "model.moe.num_experts": "num_experts",
    "model.moe.top_k": "num_experts_per_tok",
    "model.moe.expert_ffn_dim": "moe_intermediate_size",
    "model.moe.aux_loss_coef": "router_aux_loss_coef",
}


def _refuse(field: str, message: str) -> ConfigError:
    return ConfigError(f"{HF_KEY}:{field}", message)


def hf_config(m: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``m`` as an HF ``arch`` model."""
    dt = str(dtype).removeprefix("torch.")
    out: dict = {
        "model_type": arch,
        "architectures": [ARCHS[arch]],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_size(),
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
        "torch_dtype": dt,
        "dtype": dt,
        "sliding_window": None,
    }
    if arch in ("llama", "mistral", "qwen3"):
        out.update(intermediate_size=m.ffn_dim, mlp_bias=False, pretraining_tp=1)
    if arch == "qwen3":
        out.update(use_sliding_window=False)
    if arch == "mixtral":
        out.update(
            intermediate_size=m.expert_hidden(),
            num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            router_aux_loss_coef=m.moe.aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    if arch == "qwen3_moe":
        out.update(
            intermediate_size=m.ffn_dim,
            moe_intermediate_size=m.expert_hidden(),
            num_experts=m.moe.num_experts,
            num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            norm_topk_prob=m.moe.gates_normalized(),
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, k in enumerate(m.blocks()) if not k.has_moe],
            router_aux_loss_coef=m.moe.aux_loss_coef,
            output_router_logits=False,
            use_sliding_window=False,
        )
    return out


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise _refuse(f"{field}.rope_type", f"is {kind!r}; turnout has plain RoPE only")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _check_unmapped(hf: dict, arch: str) -> None:
    """One ConfigError naming the first field whose value turnout cannot express."""
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", f"is {hf['hidden_act']!r}; turnout's FFNs are SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(field, "is true; turnout's projections have no biases")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch in ("mistral", "mixtral"))
    limit = hf.get("max_position_embeddings", 0)
    if window is not None and uses_window and window < limit:
        raise _refuse(
            "sliding_window",
            f"is {window} (< max_position_embeddings {limit}); turnout attends over the "
            "whole prefix",
        )
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise _refuse("layer_types", f"has {sorted(kinds)}; turnout has full attention only")
    for field in ("attention_dropout", "router_jitter_noise"):
        if hf.get(field):
            raise _refuse(field, f"is {hf[field]}; turnout has no such noise")


def _layer_pattern(hf: dict, arch: str, n_layers: int) -> list[str]:
    if arch not in MOE_PREFIX:
        return ["dense"]
    if arch == "mixtral":
        return ["moe"]
    dense = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    experts = _experts(hf)
    kinds = [
        "moe" if i not in dense and experts > 0 and (i + 1) % step == 0 else "dense"
        for i in range(n_layers)
    ]
    return kinds if len(set(kinds)) > 1 else kinds[:1]


def _experts(hf: dict) -> int:
    return int(hf.get("num_experts") or hf.get("num_local_experts") or 0)


def hf_arch(hf: dict) -> str:
    """The ``model_type`` of an HF config, if turnout maps it (else ConfigError)."""
    arch = str(hf.get("model_type", ""))
    if arch not in ARCHS:
        raise _refuse("model_type", f"is {arch!r}; turnout imports {', '.join(sorted(ARCHS))}")
    return arch


def model_config(hf: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(architecture, turnout model config) of an HF ``config.json`` (see the docstring)."""
    arch = hf_arch(hf)
    _check_unmapped(hf, arch)
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    G = int(hf.get("num_key_value_heads") or H)
    head_dim = int(hf.get("head_dim") or D // H)
    n_layers = int(hf["num_hidden_layers"])
    moe = MoEConfig(capacity_factor=None)
    ffn = int(hf["intermediate_size"])
    E = _experts(hf)
    if arch in MOE_PREFIX and E > 0:  # a Qwen3-MoE config without experts is dense
        moe = MoEConfig(
            num_experts=E,
            top_k=int(hf["num_experts_per_tok"]),
            capacity_factor=None,  # HF routes dropless
            normalize_gates=True if arch == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            expert_ffn_dim=int(hf.get("moe_intermediate_size") or ffn),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", MoEConfig.aux_loss_coef)),
        )
    m = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=D,
        n_layers=n_layers,
        n_heads=H,
        n_kv_heads=0 if G == H else G,
        head_dim=0 if head_dim * H == D else head_dim,
        qk_norm=arch in QK_NORM_ARCHS,
        ffn_dim=ffn,
        max_seq_len=int(hf.get("max_position_embeddings", ModelConfig.max_seq_len)),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", ModelConfig.init_std)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_pattern=_layer_pattern(hf, arch, n_layers),
        moe=moe,
    )
    try:
        validate_model(m)
    except ConfigError as e:  # name the HF field the bad value came from
        field = FIELD_OF.get(e.key)
        if field is None:
            raise
        raise _refuse(field, e.message) from None
    return arch, m
