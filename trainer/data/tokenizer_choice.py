"""Which tokenizer a run uses: ``data.tokenizer`` resolved to a :class:`Tokenizer`.

``byte`` is the fixed byte tokenizer; a path is a user's ``tokenizer.json``; ``bpe`` is a
byte-level BPE trained on the corpus itself, once per corpus fingerprint and vocab size,
and read back from ``<cache_dir>/tokenizers/`` by every later run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from turnout.config.train import DataConfig
from turnout.trainer.data.corpus import Source, documents, fingerprint
from turnout.trainer.data.tokenizer import ByteTokenizer, Tokenizer, from_json, load_file, train_bpe


def show_progress() -> bool:
    """Progress bars only where a person watches (stderr is a terminal)."""
    return sys.stderr.isatty()


def _texts(cfg: DataConfig, sources: list[Source], budget: int) -> Iterator[str]:
    seen = 0
    for s in sources:
        for piece, _ in documents(s, cfg.text_field, "data.corpus"):
            if piece:
                yield piece.decode("utf-8", errors="replace")
                seen += len(piece)
                if seen >= budget:
                    return


def resolve_tokenizer(
    cfg: DataConfig, vocab_size: int, sources: list[Source]
) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained here?) for ``data.tokenizer``; a BPE is trained once per corpus
    fingerprint and vocab size, then read from ``<cache_dir>/tokenizers/``."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer(), False
    if cfg.tokenizer != "bpe":
        return load_file(cfg.tokenizer, cfg.eod_token), False
    limits = [n for n in (cfg.max_bytes, cfg.bpe_train_bytes) if n]
    budget = min(limits) if limits else 1 << 62
    key = fingerprint(cfg.corpus, sources, "bpe", vocab_size, budget, cfg.text_field)
    path = Path(cfg.cache_dir).expanduser().resolve() / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return from_json(path.read_text(), "bpe"), True
    tok = train_bpe(_texts(cfg, sources, budget), vocab_size, path, show_progress())
    return tok, True
