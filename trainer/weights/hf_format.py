"""Write a turnout model as a Hugging Face Llama / Qwen3 (dense), Mixtral or Qwen3-MoE folder.

The tensors go through the one mapping of :mod:`turnout.trainer.weights.hf_map` (also
the import's), the config through :func:`turnout.trainer.weights.hf_config.hf_config`.
The architecture is the first that expresses the model: a dense model is Llama, or
Qwen3 with ``model.qk_norm``; a MoE model is Mixtral (every layer MoE, renormalised
gates, no q/k norm), or Qwen3-MoE with ``model.qk_norm`` (any mix of dense and MoE
layers, gates renormalised or not: ``norm_topk_prob``).

What none of them can express is refused, naming the key: MoD-routed blocks
(``model.layer_pattern``: mod, mode), no-op experts (imode), shared experts
(``model.moe.shared_experts``: Mixtral and Qwen3-MoE have none, and Qwen2-MoE's are
gated; use ``--format turnout``), hyper-experts (``model.moe.hyper``), a MoE model
without q/k norm that Mixtral cannot hold (a pattern mixing dense and MoE FFNs, top-k
gates that are not renormalised:
``model.moe.normalize_gates``), a non-zero selection bias (``model.moe.balance``), and
capacity dropping (``model.moe.capacity_factor``: HF is dropless) unless the caller
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
from turnout.trainer.weights.hf_config import hf_config
from turnout.trainer.weights.hf_map import links

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
#: turnout's state-dict suffix for the (hC) aux-loss-free selection bias.
BIAS_SUFFIX = "expert_bias"


def check_hf(cfg: TurnoutConfig, state: dict[str, torch.Tensor], allow_dropless: bool) -> str:
    """The HF architecture for this model, or ConfigError naming what HF cannot express."""
    m = cfg.model
    kinds = m.blocks()
    for k in kinds:
        if k.mod_routed:
            raise ConfigError(
                "model.layer_pattern",
                f"HF Llama/Mixtral/Qwen3 have no Mixture-of-Depths; a {k.name!r} block cannot "
                "be exported with --format hf (use --format turnout)",
            )
        if k.ponder or k.recursion:
            raise ConfigError(
                "model.layer_pattern",
                f"HF Llama/Mixtral/Qwen3 reuse no block per token; a {k.name!r} block cannot "
                "be exported with --format hf (use --format turnout)",
            )
        if k.noop_experts:
            raise ConfigError(
                "model.moe.num_noop_experts",
                "HF MoE models have no no-op experts ('imode' blocks); use --format turnout",
            )
    moe = [k.has_moe for k in kinds]
    if not any(moe):
        return "qwen3" if m.qk_norm else "llama"
    if m.moe.hyper.enabled:
        raise ConfigError(
            "model.moe.hyper.enabled",
            "HF Mixtral and Qwen3-MoE have no hypernetwork-generated adapter; use --format turnout",
        )
    if m.moe.shared_experts:
        raise ConfigError(
            "model.moe.shared_experts",
            "HF Mixtral and Qwen3-MoE have no shared experts (Qwen2-MoE's are gated); "
            "use --format turnout",
        )
    if not m.qk_norm and not all(moe):
        raise ConfigError(
            "model.layer_pattern",
            f"HF Mixtral has an MoE FFN in every layer; {m.layer_pattern} mixes dense and MoE "
            "(Qwen3-MoE can, with model.qk_norm)",
        )
    if not m.qk_norm and not m.moe.gates_normalized():
        raise ConfigError(
            "model.moe.normalize_gates",
            "HF Mixtral always renormalises the top-k gates; this model does not",
        )
    if m.moe.capacity_factor is not None and not allow_dropless:
        raise ConfigError(
            "model.moe.capacity_factor",
            f"is {m.moe.capacity_factor}: HF MoE models are dropless; pass --allow-dropless to "
            "export anyway (equal logits whenever no token is dropped)",
        )
    for name, value in state.items():
        if name.endswith(BIAS_SUFFIX) and bool(torch.any(value != 0)):
            raise ConfigError(
                "model.moe.balance",
                f"{name} is non-zero; HF MoE models have no expert selection bias",
            )
    return "qwen3_moe" if m.qk_norm else "mixtral"


def hf_state(m: ModelConfig, arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict of a turnout state dict (:func:`hf_map.links`)."""
    out: dict[str, torch.Tensor] = {}
    for link in links(m, arch):
        for name, tensor in zip(link.theirs, link.to_hf(state[link.ours]), strict=True):
            out[name] = tensor.contiguous()
    return out


def write_hf(
    out: Path, cfg: TurnoutConfig, state: dict[str, torch.Tensor], allow_dropless: bool = False
) -> tuple[str, int]:
    """Write ``config.json`` and ``model.safetensors`` into ``out``: (architecture, tensors)."""
    from safetensors.torch import save_file

    arch = check_hf(cfg, state, allow_dropless)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    tensors = hf_state(cfg.model, arch, state)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(hf_config(cfg.model, arch, dtype), indent=2) + "\n")
    return arch, len(tensors)
