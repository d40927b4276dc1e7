"""File and folder names more than one layer reads or writes: each defined here, once.

- :data:`CONFIG_FILE`: the run's resolved config, in a checkpoint step folder, an export
  folder and the MLflow run's artifacts;
- :data:`TOKENIZER_FILE`: the Hugging Face tokenizer, in a token cache, a checkpoint step
  folder and an export folder;
- ``step<N>``: the name of a checkpoint step folder (:func:`step_tag`, :func:`tag_step`);
- :func:`write_atomic`: how every small file a reader must see whole is written.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
_STEP_TAG = re.compile(r"step(\d+)")


def step_tag(step: int) -> str:
    """The name of the checkpoint step folder saved after optimizer step ``step``."""
    return f"step{step}"


def tag_step(name: str) -> int | None:
    """The step a ``step<N>`` folder name says; None for any other name."""
    match = _STEP_TAG.fullmatch(name)
    return int(match.group(1)) if match else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never
    a part: a hidden temporary beside it (per process), then a rename. A write that fails
    (a full disk) removes its temporary and raises; the old file stays as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
