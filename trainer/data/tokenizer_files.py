"""The tokenizer travels with the weights: ``tokenizer.json`` beside ``config.yaml``.

:func:`save` (called by :func:`turnout.trainer.checkpointing.collective.save` on rank 0) writes the
tokenizer the run trained with (the token cache's file, which the caller passes in:
``TokenData.tokenizer_file``) into a checkpoint step folder: a Hugging Face
``tokenizer.json`` for every tokenizer, the byte tokenizer included (a merge-free BPE
whose ids are the byte values), so an export can hand it on as it is. :func:`load` reads
it back for ``turnout generate`` and ``turnout eval``; a checkpoint of the byte tokenizer
needs no file.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError
from turnout.files import TOKENIZER_FILE
from turnout.trainer.data.tokenizer import ByteTokenizer, Tokenizer, from_json

log = logging.getLogger("turnout.trainer")


def save(folder: Path, cfg: TurnoutConfig, trained_with: Path | None) -> None:
    """Write the run's tokenizer.json into checkpoint ``folder``: ``trained_with`` (the
    token cache's tokenizer.json; None when unknown), else the file ``data.tokenizer``
    names."""
    out = Path(folder) / TOKENIZER_FILE
    if cfg.data.tokenizer == "byte":
        out.write_text(ByteTokenizer().to_json())
        return
    source = trained_with
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
