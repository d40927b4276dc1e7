"""Tokenization throughput (MB/s of UTF-8 text) of the stdlib corpus, byte and BPE, one
process and one per core.

    .venv/bin/python benchmarks/tokenization.py [--vocab 8192] [--workers 1 2]

The BPE is trained once first (not timed); each timed run writes a fresh token cache.
"One process" also keeps the Rust tokenizer to one thread (TOKENIZERS_PARALLELISM=false).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from turnout.config.train import DataConfig
from turnout.trainer.data.corpus import list_sources
from turnout.trainer.data.token_cache import tokenize_corpus
from turnout.trainer.data.tokenizer_choice import resolve_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    args = ap.parse_args()
    sources = list_sources("stdlib")
    with tempfile.TemporaryDirectory() as root:
        for name in ("byte", "bpe"):
            base = DataConfig(tokenizer=name, max_bytes=0, cache_dir=f"{root}/tok")
            tok, _ = resolve_tokenizer(base, args.vocab, sources)
            for workers in args.workers:
                os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers == 1 else "true"
                cfg = DataConfig(
                    tokenizer=name,
                    max_bytes=0,
                    workers=workers,
                    cache_dir=f"{root}/{name}{workers}",
                )
                t0 = time.perf_counter()
                path = tokenize_corpus(cfg, "stdlib", sources, tok, "data.corpus")
                dt = time.perf_counter() - t0
                m = json.loads((Path(path) / "meta.json").read_text())
                print(
                    f"{name:4s} workers={workers}: {m['num_bytes'] / 1e6:.1f} MB -> "
                    f"{m['num_tokens']:,} tokens ({m['num_bytes'] / m['num_tokens']:.2f} B/token) "
                    f"in {dt:.2f} s = {m['num_bytes'] / 1e6 / dt:.1f} MB/s"
                )


if __name__ == "__main__":
    main()
