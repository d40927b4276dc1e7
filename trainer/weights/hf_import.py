"""Hugging Face checkpoints in: ``turnout import HF_DIR OUT`` and ``train.init_from=HF_DIR``.

An HF folder is ``config.json`` plus ``model.safetensors``, or the shards
``model-0000x-of-0000y.safetensors`` that ``model.safetensors.index.json`` lists. The
config maps through :func:`turnout.trainer.weights.hf_config.model_config` (refusing,
in one line naming the HF field, what turnout cannot express), the tensors through the
one mapping of :mod:`turnout.trainer.weights.hf_map` (the export's, read backwards).
Shards are read one at a time with safetensors' lazy ``safe_open``: a turnout tensor is
built as soon as its last HF piece has been read and the pieces are dropped, so the
whole model is never held twice (at most one layer's expert pieces wait for a later
shard).

The folder's ``tokenizer.json`` comes along: it is read with turnout's tokenizer loader
(the ``tokenizers`` package), must fit ``vocab_size`` (a model may have more rows than
the tokenizer has tokens, never fewer: ``config.json:vocab_size`` is refused otherwise),
and its end-of-document token is the one ``eos_token_id`` names (config.json, else
generation_config.json; else turnout's usual names, ``<|endoftext|>`` etc.). The written
``config.yaml`` points ``data.tokenizer`` at the copy and ``data.eod_token`` at that
token, so a run started from the folder reads text as the model was trained to.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turnout.config import TurnoutConfig
from turnout.config.train import DataConfig
from turnout.errors import CheckpointError, ConfigError
from turnout.files import CONFIG_FILE, TOKENIZER_FILE
from turnout.models.lm import TransformerLM
from turnout.models.pretrained import check_state
from turnout.trainer.data.tokenizer import HFTokenizer, load_file
from turnout.trainer.weights.export import check_out, write_turnout
from turnout.trainer.weights.hf_config import HF_KEY, model_config
from turnout.trainer.weights.hf_format import HF_CONFIG, HF_WEIGHTS
from turnout.trainer.weights.hf_map import links

HF_INDEX = "model.safetensors.index.json"
#: HF tensors no turnout weight comes from, by suffix: RoPE tables some old checkpoints carry.
IGNORED = ("rotary_emb.inv_freq",)
#: The key our errors name for the HF_DIR argument.
KEY = "HF_DIR"


@dataclass(frozen=True)
class Imported:
    folder: Path
    arch: str
    num_tensors: int
    dtype: torch.dtype
    tokenizer: str
    """What happened to tokenizer.json ('copied, N tokens, eod X' or 'none')."""


def is_hf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HF folder (config.json and safetensors weights, no config.yaml)."""
    p = Path(path).expanduser()
    weights = (p / HF_WEIGHTS).is_file() or (p / HF_INDEX).is_file()
    return (p / HF_CONFIG).is_file() and weights and not (p / CONFIG_FILE).is_file()


def read_config(folder: str | os.PathLike, key: str = KEY) -> tuple[str, TurnoutConfig, dict]:
    """(architecture, turnout config, the raw config.json) of an HF folder."""
    p = Path(folder).expanduser()
    if not is_hf(p):
        raise ConfigError(key, f"{p} is not a Hugging Face folder ({HF_CONFIG} + safetensors)")
    try:
        hf = json.loads((p / HF_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {p / HF_CONFIG}: {e}") from None
    arch, m = model_config(hf)
    return arch, TurnoutConfig(model=m), hf


def _shards(folder: Path) -> list[Path]:
    """The safetensors files of the folder, in index order."""
    if not (folder / HF_INDEX).is_file():
        return [folder / HF_WEIGHTS]
    weight_map = json.loads((folder / HF_INDEX).read_text()).get("weight_map", {})
    return [folder / name for name in sorted(set(weight_map.values()))]


def _check_tied(
    cfg: TurnoutConfig, pending: dict[str, torch.Tensor], embed: torch.Tensor | None
) -> None:
    """``tie_word_embeddings`` must agree with the weights: an untied model has its
    ``lm_head.weight``; a tied one may carry a copy only if it equals the embedding."""
    head = pending.pop("lm_head.weight", None)
    if not cfg.model.tie_embeddings:
        return
    if head is not None and (embed is None or not torch.equal(head, embed)):
        raise ConfigError(
            f"{HF_KEY}:tie_word_embeddings",
            "is true, but lm_head.weight differs from model.embed_tokens.weight",
        )


def read_state(folder: str | os.PathLike, cfg: TurnoutConfig, arch: str) -> dict[str, torch.Tensor]:
    """The turnout state dict of an HF folder, read shard by shard (module docstring)."""
    from safetensors import safe_open

    p = Path(folder).expanduser()
    todo = {link.ours: link for link in links(cfg.model, arch)}
    wanted = {name for link in todo.values() for name in link.theirs}
    if cfg.model.tie_embeddings:
        wanted.add("lm_head.weight")  # read to check it equals the embedding
    pending: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for shard in _shards(p):
        if not shard.is_file():
            raise CheckpointError(f"{shard} is missing ({HF_INDEX} lists it)", KEY)
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - not a dict
                    if name.endswith(IGNORED):
                        continue
                    if name not in wanted:
                        raise _unplaced(name)
                    pending[name] = f.get_tensor(name)
        except (ConfigError, CheckpointError):
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is one line
            raise CheckpointError(f"cannot read {shard}: {type(e).__name__}: {e}", KEY) from None
        for ours, link in list(todo.items()):
            if all(n in pending for n in link.theirs):
                state[ours] = link.from_hf([pending.pop(n) for n in link.theirs]).contiguous()
                del todo[ours]
    if todo:
        link = next(iter(todo.values()))
        missing = next(n for n in link.theirs if n not in pending)
        if missing == "lm_head.weight":
            raise ConfigError(
                f"{HF_KEY}:tie_word_embeddings", "is false, yet there is no lm_head.weight"
            )
        raise CheckpointError(f"{p} has no {missing} (wanted for turnout's {link.ours})", KEY)
    _check_tied(cfg, pending, state.get("embed.weight"))
    if cfg.model.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def _unplaced(name: str) -> ConfigError:
    if name == "lm_head.weight":
        return ConfigError(f"{HF_KEY}:tie_word_embeddings", "is true, yet lm_head.weight is there")
    if name.endswith(".bias"):
        return ConfigError(f"{HF_KEY}:attention_bias", f"{name}: turnout has no biases")
    return ConfigError(KEY, f"{name} has no place in the turnout model of {HF_KEY}")


def read_tokenizer(folder: Path, hf: dict[str, Any], vocab_size: int) -> HFTokenizer | None:
    """The folder's tokenizer.json (None without one), checked against ``vocab_size``."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as HF

    eos = hf.get("eos_token_id")
    generation = folder / "generation_config.json"
    if eos is None and generation.is_file():  # older folders keep it only there
        eos = json.loads(generation.read_text()).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    try:
        raw = HF.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise ConfigError(KEY, f"{path} is not a tokenizer.json turnout can read ({e})") from None
    name = raw.id_to_token(int(eos)) if isinstance(eos, int) else None
    tok = load_file(path, name or "", KEY)
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"{HF_KEY}:vocab_size",
            f"is {vocab_size}, smaller than the {tok.vocab_size} tokens of {path}",
        )
    return tok


def hf_source(
    path: str | os.PathLike, key: str = KEY
) -> tuple[dict[str, torch.Tensor], TurnoutConfig]:
    """(state dict, config) of an HF folder: what ``train.init_from`` starts from."""
    arch, cfg, _ = read_config(path, key)
    return read_state(path, cfg, arch), cfg


def import_hf(src: str | os.PathLike, out: str | os.PathLike) -> Imported:
    """Convert the HF folder ``src`` into a turnout export folder ``out``."""
    folder = Path(src).expanduser()
    out_dir = Path(out).expanduser()
    check_out(out_dir)
    arch, cfg, hf = read_config(folder)
    tok = read_tokenizer(folder, hf, cfg.model.vocab_size)
    state = read_state(folder, cfg, arch)
    with torch.device("meta"):  # shapes only: no second copy of the weights
        model = TransformerLM(cfg.model)
    check_state(model, state, str(folder), KEY)
    note = "none"
    if tok is not None:
        data = DataConfig(
            tokenizer=str((out_dir / TOKENIZER_FILE).resolve()),
            eod_token=tok.hf.id_to_token(tok.eod_id),
        )
        cfg = TurnoutConfig(model=cfg.model, data=data)
        note = f"{tok.vocab_size} tokens, eod {data.eod_token!r}"
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    # Every tensor read_state built owns its storage (get_tensor, cat, stack): no copies.
    count = write_turnout(out_dir, state, cfg, -1, copy=False)
    if tok is not None:
        shutil.copyfile(folder / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    return Imported(out_dir, arch, count, dtype, note)
