"""The launcher's step of a function-name run: the structure cache, built once.

:func:`prepare_structure` runs before any worker starts (the token cache's place in a
language-model run): it resolves ``data.tokenizer``, parses the corpus into the cache
(:func:`~turnout.trainer.data.structure.examples.build`; an unchanged corpus is read
back) and returns the folder and the one-line warning for files that did not parse.
"""

from __future__ import annotations

from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.trainer.data.corpus import list_sources
from turnout.trainer.data.structure.dataset import parse_warning
from turnout.trainer.data.structure.examples import build
from turnout.trainer.data.tokenizer_choice import resolve_tokenizer


def prepare_structure(cfg: TurnoutConfig) -> tuple[Path, str | None]:
    """(the cache folder, the parse warning or None); ConfigError naming data.* for a
    corpus with no Python to learn from."""
    sources = list_sources(cfg.data.corpus, "data.corpus")
    tok, _ = resolve_tokenizer(cfg.data, cfg.model.vocab_size, sources)
    folder, stats = build(
        cfg.data.corpus,
        tok,
        cfg.data.ast,
        Path(cfg.data.cache_dir).expanduser().resolve(),
        cfg.data.val_fraction,
        cfg.data.max_bytes,
    )
    return folder, parse_warning(stats)
