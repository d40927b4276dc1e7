"""What a run reads its data through, whatever the task (tokens or syntax trees)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunInputs:
    sampler: Any
    """The rank's batch sampler: ``batch(step, micro)``, ``eval_batch(i)``."""
    baseline: float
    """The loss a model that ignores its input reaches (nats): the token unigram entropy,
    or the entropy of the name targets' frequencies."""
    params: dict[str, str]
    """What MLflow records about the data beyond the config."""
    datasets: dict[str, tuple[str, str]]
    """MLflow dataset inputs: context -> (corpus, fingerprint)."""
    val_tokens_per_byte: float = math.nan
    """nats/token -> nats/byte of the validation split (nan: no bytes behind the loss)."""
    tokenizer_file: Path | None = None
    """The tokenizer.json a checkpoint saves (None: none)."""
