"""``train.init_from``: start a run's weights from an earlier model (upcycling, expanding).

The source is a checkpoint (run or step folder, read with ``consolidated_state``), a
``turnout export`` folder, or a Hugging Face folder (Llama, Mistral, Qwen3, Mixtral,
Qwen3-MoE: :mod:`turnout.trainer.weights.hf_import`, read shard by shard). Every weight
of the new model is mapped from the source:

- same name, same shape: copied (attention, norms, embeddings, dense FFNs, MoD routers,
  and MoE layers with the same expert count);
- a dense SwiGLU FFN -> every expert of the new MoE layer (sparse upcycling); the new
  router keeps its fresh random init;
- E experts -> m*E: expert e becomes experts e*m .. e*m+m-1, its router column is
  repeated likewise (and so is a selection bias ``expert_bias``, and the hyper-expert
  embeddings ``hyper_emb_RC``);
- hyper-experts new to the model (``model.moe.hyper``): their embeddings and the shared
  hypernetwork keep the fresh init, whose adapter output is zero;
- a dense block -> a MoD-routed one (retrofit, :mod:`.retrofit_rules`): its weights move
  under ``layers.<i>.block.``, the new router is zero (a predictor keeps its fresh init);
  early exits need no weights (they share the final norm and head). A second log line
  states the first forward's relation to the source.

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
from pathlib import Path

import torch
from torch import nn

from turnout.config import TurnoutConfig
from turnout.config.model import ModelConfig
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.models.pretrained import export_config, is_export, read_export, restore_tied
from turnout.trainer.weights.from_checkpoint import (
    checkpoint_config,
    consolidated_state,
    step_folder,
)
from turnout.trainer.weights.hf_config import HF_KEY
from turnout.trainer.weights.hf_import import hf_source, is_hf, read_config
from turnout.trainer.weights.retrofit_rules import (
    rename_source,
    retrofit_note,
    retrofitted_layers,
)
from turnout.trainer.weights.upcycle_rules import (
    FROM_DENSE,
    KEY,
    check_configs,
    first_forward_note,
    perturb,
    weight_rules,
)

log = logging.getLogger("turnout.trainer")


def _rekey(e: ConfigError) -> ConfigError:
    """The error as ``train.init_from``'s, still naming an HF config field it names."""
    return ConfigError(KEY, f"{e.key} {e.message}" if e.key.startswith(HF_KEY) else e.message)


def source_config(path: str | os.PathLike) -> TurnoutConfig:
    """The config the source was trained with (reads only config.yaml)."""
    try:
        if is_hf(path):
            return read_config(path, KEY)[1]
        if is_export(path):
            return export_config(path, KEY)
        return checkpoint_config(step_folder(path))
    except ConfigError as e:
        raise _rekey(e) from None


def read_source(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TurnoutConfig, int]:
    """(state dict, config, step) of a checkpoint, export or HF folder (HF: step -1)."""
    try:
        if is_hf(path):
            (state, cfg), step = hf_source(path, KEY), -1
        elif is_export(path):
            state, cfg, step = read_export(path, KEY)
        else:
            state, cfg, step = consolidated_state(path)
    except ConfigError as e:
        raise _rekey(e) from None
    return restore_tied(state, cfg), cfg, step


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
    moved = retrofitted_layers(src.model, cfg.model)
    weight_rules(rename_source(_shapes(src.model), moved), _shapes(cfg.model), path)
    return src


@torch.no_grad()
def init_from(model: nn.Module, cfg: TurnoutConfig) -> TurnoutConfig:
    """Load ``cfg.train.init_from`` into ``model`` (built from ``cfg.model``, before any
    parallel wrapping): see the module docstring. Returns the source's config."""
    path = cfg.train.init_from
    state, src, step = read_source(path)
    check_configs(src.model, cfg.model, path)
    state = rename_source(state, retrofitted_layers(src.model, cfg.model))
    target = model.state_dict()
    rules = weight_rules(
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
        if rule.kind == "zero":
            out[key] = torch.zeros_like(target[key])
            continue
        w = state[rule.source].to(dtype)
        if rule.kind == "dense":
            w = w.t().unsqueeze(0).expand(target[key].shape).clone()
        elif rule.kind == "expand" and rule.factor > 1:
            w = w.repeat_interleave(rule.factor, dim=rule.dim)
        out[key] = w.clone()
        ffn, _, leaf = key.rpartition("ffn.")
        if leaf in FROM_DENSE and (rule.kind == "dense" or rule.factor > 1):
            upcycled.setdefault(ffn, {})[leaf] = out[key]
    t = cfg.train
    if t.upcycle_noise or t.upcycle_reinit:
        for banks in upcycled.values():
            perturb(banks, t.upcycle_noise, t.upcycle_reinit, gen)
    model.load_state_dict(out)
    note = first_forward_note(src.model, cfg.model)
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
    retrofit = retrofit_note(src.model, cfg.model)
    if retrofit:
        log.info("init_from retrofit: %s", retrofit)
    return src
