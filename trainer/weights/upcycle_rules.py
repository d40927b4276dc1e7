"""The mapping rules of ``train.init_from``, pure: shapes and configs in, rules out.

Which weight of the new model comes from which of the source, and how (copy, dense FFN
-> experts, repeat m times, keep the fresh init); the config checks that name the first
key that cannot map; the noise and Drop-Upcycling re-draw of upcycled experts. No file
is read here: :mod:`turnout.trainer.weights.upcycle` reads the source and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turnout.config.model import ModelConfig
from turnout.errors import ConfigError
from turnout.trainer.weights.retrofit_rules import new_mod_part

KEY = "train.init_from"


#: Expert-bank weight -> (dense SwiGLU weight it comes from, transposed).
FROM_DENSE = {
    "experts.w_gate_EDF": "w_gate.weight",
    "experts.w_up_EDF": "w_up.weight",
    "experts.w_down_EFD": "w_down.weight",
}


_ROUTER = "router_DE"


_BIAS = "expert_bias"
#: Hyper-experts: the per-layer expert embeddings (one row per expert, like the bias) and
#: the model's shared hypernetwork (``hyper.*``).
_HYPER_EMB = "hyper_emb_RC"
_HYPER_NET = "hyper."


@dataclass(frozen=True)
class Rule:
    """How one weight of the new model is made."""

    kind: str
    """'copy', 'dense' (dense FFN -> experts), 'expand' (repeat m times along dim),
    'fresh' (keep the new model's init) or 'zero' (a retrofitted MoD router)."""
    source: str = ""
    """Source state-dict key."""
    factor: int = 1
    dim: int = 0


def _mismatch(key: str, here: object, there: object, path: str) -> ConfigError:
    return ConfigError(f"model.{key}", f"is {here} here but {there} in {KEY} {path}")


def check_configs(src: ModelConfig, dst: ModelConfig, path: str) -> None:
    """The config-level rules; ConfigError naming the first model key that cannot map."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
        if getattr(src, name) != getattr(dst, name):
            raise _mismatch(name, getattr(dst, name), getattr(src, name), path)
    if src.kv_heads() != dst.kv_heads():
        raise _mismatch("n_kv_heads", dst.kv_heads(), src.kv_heads(), path)
    if dst.tie_embeddings and not src.tie_embeddings:
        raise _mismatch("tie_embeddings", True, False, path)
    for i, (s, d) in enumerate(zip(src.blocks(), dst.blocks(), strict=True)):
        where = f"layer {i} is {d.name!r} here, {s.name!r} in the source"
        if s.mod_routed and not d.mod_routed:
            raise ConfigError("model.layer_pattern", f"{where}: MoD routing cannot be removed")
        if s.has_moe and not d.has_moe:
            raise ConfigError("model.layer_pattern", f"{where}: experts cannot fold into one FFN")
        if not s.has_moe and d.has_moe and src.ffn_dim != dst.expert_hidden():
            raise ConfigError(
                "model.moe.expert_ffn_dim",
                f"{where}: experts of hidden {dst.expert_hidden()} cannot copy a dense FFN "
                f"of hidden {src.ffn_dim}",
            )
        if not s.has_moe and not d.has_moe and src.ffn_dim != dst.ffn_dim:
            raise _mismatch("ffn_dim", dst.ffn_dim, src.ffn_dim, path)
        if not s.has_moe:
            continue
        e_src, e_dst = src.moe.num_experts, dst.moe.num_experts
        if src.expert_hidden() != dst.expert_hidden():
            raise _mismatch("moe.expert_ffn_dim", dst.expert_hidden(), src.expert_hidden(), path)
        if e_dst % e_src:
            raise ConfigError(
                "model.moe.num_experts",
                f"is {e_dst} here, not a multiple of {e_src} in {KEY} {path}",
            )
        noop_src, noop_dst = src.noop_choices(s), dst.noop_choices(d)
        if (e_dst != e_src and (noop_src or noop_dst)) or noop_src != noop_dst:
            raise _mismatch("moe.num_noop_experts", noop_dst, noop_src, path)


def weight_rules(
    src_shapes: dict[str, torch.Size], dst_shapes: dict[str, torch.Size], path: str
) -> dict[str, Rule]:
    """A :class:`Rule` for every new weight; ConfigError naming the first that cannot map."""
    rules: dict[str, Rule] = {}
    for key, shape in dst_shapes.items():
        have = src_shapes.get(key)
        if have == shape:
            rules[key] = Rule("copy", key)
            continue
        ffn, _, leaf = key.rpartition("ffn.")
        ffn += "ffn."
        rule: Rule | None = None
        if leaf in FROM_DENSE and have is not None:
            m = shape[0] // have[0]
            if m * have[0] == shape[0] and have[1:] == shape[1:]:
                rule = Rule("expand", key, m, 0)
        elif leaf in FROM_DENSE and src_shapes.get(ffn + FROM_DENSE[leaf]) == shape[1:][::-1]:
            rule = Rule("dense", ffn + FROM_DENSE[leaf])
        elif leaf in (_ROUTER, _BIAS, _HYPER_EMB) and have is not None:
            dim = 1 if leaf == _ROUTER else 0
            m = shape[dim] // have[dim]
            if m * have[dim] == shape[dim] and len(have) == len(shape):
                rule = Rule("expand", key, m, dim)
        elif leaf in (_ROUTER, _BIAS) and ffn + FROM_DENSE["experts.w_gate_EDF"] in src_shapes:
            rule = Rule("fresh")
        elif have is None and (leaf == _HYPER_EMB or key.startswith(_HYPER_NET)):
            rule = Rule("fresh")  # new hyper-experts: their adapter starts at zero
        elif have is None and new_mod_part(key):
            rule = Rule(str(new_mod_part(key)))
        if rule is None:
            there = "absent" if have is None else f"{tuple(have)}"
            raise ConfigError(KEY, f"{key} {tuple(shape)} cannot map from {path} ({there} there)")
        rules[key] = rule
    used = {r.source for r in rules.values()}
    unused = sorted(set(src_shapes) - used)
    if unused:
        raise ConfigError(
            KEY, f"{path} has {unused[0]} {tuple(src_shapes[unused[0]])}: no place here"
        )
    return rules


def perturb(
    banks: dict[str, torch.Tensor], noise: float, reinit: float, gen: torch.Generator
) -> None:
    """Noise and Drop-Upcycling re-initialisation on one layer's three expert weights."""
    gate, up, down = (banks[k] for k in FROM_DENSE)
    E, _, F = gate.shape
    n_drop = round(reinit * F)
    stats = {id(w): (w.float().mean().item(), w.float().std().item()) for w in (gate, up, down)}
    for e in range(E):
        if n_drop:
            idx = torch.randperm(F, generator=gen)[:n_drop]
            for w, cols in ((gate, True), (up, True), (down, False)):
                mean, std = stats[id(w)]
                part = w[e][:, idx] if cols else w[e][idx]
                fresh = torch.randn(part.shape, generator=gen) * std + mean
                if cols:
                    w[e][:, idx] = fresh.to(w.dtype)
                else:
                    w[e][idx] = fresh.to(w.dtype)
        if noise:
            for w in (gate, up, down):
                w[e] *= 1 + noise * torch.randn(w[e].shape, generator=gen).to(w.dtype)


def first_forward_note(src: ModelConfig, dst: ModelConfig) -> str:
    """Why the upcycled model's first forward may differ from the source's ('' if not)."""
    pairs = list(zip(src.blocks(), dst.blocks(), strict=True))
    if any(not s.has_moe and d.has_moe for s, d in pairs):
        if not dst.moe.gates_normalized():
            return "model.moe.normalize_gates is off: each token's FFN output is scaled by its gate"
        if dst.moe.capacity_factor is not None:
            return "capacity dropping may drop assignments (dropless keeps it exact)"
    if any(s.has_moe for s, _ in pairs) and dst.moe.num_experts != src.moe.num_experts:
        m = dst.moe.num_experts // src.moe.num_experts
        if dst.moe.top_k != m * src.moe.top_k:
            return f"model.moe.top_k={dst.moe.top_k} is not {m} x {src.moe.top_k}"
        if dst.moe.gates_normalized() != src.moe.gates_normalized():
            return "model.moe.normalize_gates differs from the source's"
    return ""
