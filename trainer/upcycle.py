"""``train.init_from``: start a run's weights from an earlier model (upcycling, expanding).

The source is a checkpoint (run or step folder, read with ``consolidated_state``) or a
``turnout export`` folder. Every weight of the new model is mapped from the source:

- same name, same shape: copied (attention, norms, embeddings, dense FFNs, MoD routers,
  and MoE layers with the same expert count);
- a dense SwiGLU FFN -> every expert of the new MoE layer (sparse upcycling); the new
  router keeps its fresh random init;
- E experts -> m*E: expert e becomes experts e*m .. e*m+m-1, its router column is
  repeated likewise (and so is a selection bias ``expert_bias``).

Upcycled experts may get ``train.upcycle_noise`` (each weight times 1 + N(0, std^2)) and
``train.upcycle_reinit`` (Drop-Upcycling: per expert, that fraction of the hidden units
get their gate/up columns and down row re-drawn from a normal with the source matrix's
mean and std). Both draw from a generator seeded with ``train.seed``, so every rank
builds the same weights.

When the first forward equals the source model's (without noise or re-initialisation):
dense -> MoE when the top-k gates are renormalised (any router then mixes identical
experts with weights summing to 1) and nothing is dropped (dropless, or a capacity
large enough); E -> m*E when the new top_k is m times the old one (each token picks
all m copies of the experts it picked before, each with 1/m of the probability, so
gates - renormalised or not - and bucket order are unchanged; so is the capacity
C = cf*T*k/E). Otherwise training starts from a nearby function; a log line says so.

Anything else (another width, a MoE layer where the source has a dense one of another
hidden size, E not a multiple of the source's, ...) is one :class:`ConfigError` naming
the key, raised on the launcher by :func:`check_init_from` before any worker starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turnout.config import TurnoutConfig
from turnout.config.model import ModelConfig
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.models.pretrained import export_config, is_export, read_export, restore_tied
from turnout.trainer.export import checkpoint_config, consolidated_state, step_folder

KEY = "train.init_from"
log = logging.getLogger("turnout.trainer")

#: Expert-bank weight -> (dense SwiGLU weight it comes from, transposed).
_FROM_DENSE = {
    "experts.w_gate_EDF": "w_gate.weight",
    "experts.w_up_EDF": "w_up.weight",
    "experts.w_down_EFD": "w_down.weight",
}
_ROUTER = "router_DE"
_BIAS = "expert_bias"


@dataclass(frozen=True)
class Rule:
    """How one weight of the new model is made."""

    kind: str
    """'copy', 'dense' (dense FFN -> experts), 'expand' (repeat m times along dim),
    or 'fresh' (keep the new model's init)."""
    source: str = ""
    """Source state-dict key."""
    factor: int = 1
    dim: int = 0


def _rekey(e: ConfigError) -> ConfigError:
    return ConfigError(KEY, e.message)


def source_config(path: str | os.PathLike) -> TurnoutConfig:
    """The config the source was trained with (reads only config.yaml)."""
    try:
        if is_export(path):
            return export_config(path, KEY)
        return checkpoint_config(step_folder(path))
    except ConfigError as e:
        raise _rekey(e) from None


def read_source(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TurnoutConfig, int]:
    """(state dict, config, step) of a checkpoint or export folder."""
    try:
        if is_export(path):
            state, cfg, step = read_export(path, KEY)
        else:
            state, cfg, step = consolidated_state(path)
    except ConfigError as e:
        raise _rekey(e) from None
    return restore_tied(state, cfg), cfg, step


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
        if s.mod_routed != d.mod_routed:
            raise ConfigError("model.layer_pattern", f"{where}: MoD routing must match")
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


def plan(
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
        if leaf in _FROM_DENSE and have is not None:
            m = shape[0] // have[0]
            if m * have[0] == shape[0] and have[1:] == shape[1:]:
                rule = Rule("expand", key, m, 0)
        elif leaf in _FROM_DENSE and src_shapes.get(ffn + _FROM_DENSE[leaf]) == shape[1:][::-1]:
            rule = Rule("dense", ffn + _FROM_DENSE[leaf])
        elif leaf in (_ROUTER, _BIAS) and have is not None:
            dim = 1 if leaf == _ROUTER else 0
            m = shape[dim] // have[dim]
            if m * have[dim] == shape[dim] and len(have) == len(shape):
                rule = Rule("expand", key, m, dim)
        elif leaf in (_ROUTER, _BIAS) and ffn + _FROM_DENSE["experts.w_gate_EDF"] in src_shapes:
            rule = Rule("fresh")
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


def _shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in TransformerLM(cfg).state_dict().items()}


def check_init_from(cfg: TurnoutConfig) -> TurnoutConfig | None:
    """Launcher preflight: the source's config maps onto ``cfg.model`` (no weights read).

    Returns the source config (None when ``train.init_from`` is unset or a resume wins).
    """
    path = cfg.train.init_from
    if not path or cfg.train.resume:
        return None
    src = source_config(path)
    check_configs(src.model, cfg.model, path)
    plan(_shapes(src.model), _shapes(cfg.model), path)
    return src


def _perturb(
    banks: dict[str, torch.Tensor], noise: float, reinit: float, gen: torch.Generator
) -> None:
    """Noise and Drop-Upcycling re-initialisation on one layer's three expert weights."""
    gate, up, down = (banks[k] for k in _FROM_DENSE)
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


def _first_forward_note(src: ModelConfig, dst: ModelConfig) -> str:
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


@torch.no_grad()
def init_from(model: nn.Module, cfg: TurnoutConfig) -> TurnoutConfig:
    """Load ``cfg.train.init_from`` into ``model`` (built from ``cfg.model``, before any
    parallel wrapping): see the module docstring. Returns the source's config."""
    path = cfg.train.init_from
    state, src, step = read_source(path)
    check_configs(src.model, cfg.model, path)
    target = model.state_dict()
    rules = plan(
        {k: v.shape for k, v in state.items()}, {k: v.shape for k, v in target.items()}, path
    )
    gen = torch.Generator().manual_seed(cfg.train.seed + 7919)
    out: dict[str, torch.Tensor] = {}
    upcycled: dict[str, dict[str, torch.Tensor]] = {}
    for key, rule in rules.items():
        dtype = target[key].dtype
        if rule.kind == "fresh":
            out[key] = target[key]
            continue
        w = state[rule.source].to(dtype)
        if rule.kind == "dense":
            w = w.t().unsqueeze(0).expand(target[key].shape).clone()
        elif rule.kind == "expand" and rule.factor > 1:
            w = w.repeat_interleave(rule.factor, dim=rule.dim)
        out[key] = w.clone()
        ffn, _, leaf = key.rpartition("ffn.")
        if leaf in _FROM_DENSE and (rule.kind == "dense" or rule.factor > 1):
            upcycled.setdefault(ffn, {})[leaf] = out[key]
    t = cfg.train
    if t.upcycle_noise or t.upcycle_reinit:
        for banks in upcycled.values():
            _perturb(banks, t.upcycle_noise, t.upcycle_reinit, gen)
    model.load_state_dict(out)
    note = _first_forward_note(src.model, cfg.model)
    kinds = sorted({r.kind for r in rules.values()})
    log.info(
        "init_from %s (step %d): %d weights (%s), %d upcycled MoE layers%s",
        Path(path).name,
        step,
        len(rules),
        ", ".join(kinds),
        len(upcycled),
        f"; the first forward may differ from the source's: {note}" if note else "",
    )
    return src
