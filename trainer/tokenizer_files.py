"""The tokenizer travels with the weights: ``tokenizer.json`` beside ``config.yaml``.

:func:`save` (called by :func:`turnout.trainer.checkpoint.save` on rank 0) writes the
tokenizer of the token cache this process trained on (:func:`remember`, called by
``open_tokens``) into a checkpoint step folder: a Hugging Face ``tokenizer.json`` for every
tokenizer, the byte tokenizer included (a merge-free BPE whose ids are the byte values), so
an export can hand it on as it is. :func:`load` reads it back for ``turnout generate`` and
``turnout eval``; a checkpoint of the byte tokenizer needs no file.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError
from turnout.files import TOKENIZER_FILE
from turnout.trainer.tokenizer import ByteTokenizer, Tokenizer, from_json

_active: Path | None = None
log = logging.getLogger("turnout.trainer")


def remember(cache: Path) -> None:
    """Note the token cache this process trains on (its tokenizer.json is saved)."""
    global _active
    f = Path(cache) / TOKENIZER_FILE
    _active = f if f.is_file() else None


def save(folder: Path, cfg: TurnoutConfig) -> None:
    """Write the run's tokenizer.json into checkpoint ``folder``."""
    out = Path(folder) / TOKENIZER_FILE
    if cfg.data.tokenizer == "byte":
        out.write_text(ByteTokenizer().to_json())
        return
    source = _active
    if source is None and cfg.data.tokenizer != "bpe" and Path(cfg.data.tokenizer).is_file():
        source = Path(cfg.data.tokenizer)
    if source is None:
        log.warning("no tokenizer.json to save with %s (data.tokenizer=bpe)", folder)
        return
    shutil.copyfile(source, out)


def load(folder: Path, cfg: TurnoutConfig) -> Tokenizer:
    """The tokenizer a checkpoint step ``folder`` was trained with."""
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    f = Path(folder) / TOKENIZER_FILE
    if not f.is_file():
        raise ConfigError(
            "checkpoint", f"{folder} has no {TOKENIZER_FILE} (data.tokenizer={cfg.data.tokenizer})"
        )
    name = "bpe" if cfg.data.tokenizer == "bpe" else str(f)
    return from_json(f.read_text(), name, cfg.data.eod_token)
