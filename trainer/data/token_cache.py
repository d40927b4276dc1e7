"""Corpus -> memory-mapped token cache, streamed: bounded memory whatever the corpus size.

``prepare_corpus(cfg, vocab_size)`` runs once on the launcher, before any worker starts:

1. list the corpus files (:mod:`turnout.trainer.data.corpus`) and resolve the tokenizer
   (:mod:`turnout.trainer.data.tokenizer`; ``bpe`` is trained once and cached under
   ``<cache_dir>/tokenizers/``), and check ``model.vocab_size`` against it;
2. tokenize shard by shard (groups of small files, or one JSONL/Parquet file), in a
   process pool when there are several shards and ``data.workers`` allows: each shard is
   read in pieces of 64 KiB and its ids appended to ``.<key>.partial/part-<i>.bin``,
   written under a temporary name and renamed when the shard is done. A killed run
   leaves finished parts that the next run with the same key reuses (resumable);
3. concatenate the parts (cut at ``data.max_bytes`` of text) into ``tokens.bin`` in a
   temporary folder with ``meta.json``, ``tokenizer.json`` and ``token_bytes.npy``, and
   rename it to ``<cache_dir>/<key>/``. Only that rename makes a cache look complete.

Ids are stored as uint8 for the byte tokenizer, uint16 when the vocab fits, else uint32.
With ``data.val_corpus`` both corpora are tokenized and a small ``pair-<hash>/meta.json``
names the two caches; :func:`turnout.trainer.data.batches.open_tokens` opens either kind.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from turnout.config.train import DataConfig
from turnout.errors import ConfigError
from turnout.files import TOKENIZER_FILE, write_atomic
from turnout.trainer.data.corpus import (
    PIECE_BYTES,
    Source,
    documents,
    fingerprint,
    group_shards,
    list_sources,
)
from turnout.trainer.data.tokenizer import (
    Tokenizer,
    check_vocab,
)
from turnout.trainer.data.tokenizer_choice import resolve_tokenizer

CACHE_VERSION = 2
TOKENS, META, TOKEN_BYTES = "tokens.bin", "meta.json", "token_bytes.npy"
_COPY_TOKENS = 1 << 18


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _workers(cfg: DataConfig) -> int:
    if cfg.workers:
        return cfg.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- shards

_TOK: Tokenizer | None = None
_COUNTER: Any = None


def _init_worker(tok: Tokenizer, counter: Any) -> None:
    global _TOK, _COUNTER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per pool process
    _TOK, _COUNTER = tok, counter


def _pool_progress(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _part(work: Path, index: int) -> Path:
    return work / f"part-{index:05d}.bin"


def tokenize_shard(
    tok: Tokenizer,
    shard: list[Source],
    out: Path,
    field: str,
    key: str,
    max_bytes: int,
    progress: Callable[[int], None],
) -> dict[str, int]:
    """Stream ``shard``'s documents through ``tok`` into ``out`` (ids, EOD after each
    document), at most ``max_bytes`` of text (0 = all); returns its counts."""
    dtype = token_dtype(tok.vocab_size)
    nbytes = tok.token_bytes()
    eod = np.array([tok.eod_id], dtype=dtype)
    counts = {"tokens": 0, "bytes": 0, "docs": 0}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    batch: list[tuple[bytes, bool]] = []
    open_doc = [False]  # the current document has tokens (so it gets an EOD)

    def flush(f: Any) -> None:
        ids = tok.encode_pieces([p for p, _ in batch])
        for (_piece, end), arr in zip(batch, ids, strict=True):
            if arr.size:
                f.write(arr.astype(dtype, copy=False).tobytes())
                counts["tokens"] += arr.size
                counts["bytes"] += int(nbytes[arr].sum())
                open_doc[0] = True
            if end and open_doc[0]:
                f.write(eod.tobytes())
                counts["tokens"] += 1
                counts["bytes"] += 1
                counts["docs"] += 1
                open_doc[0] = False
        progress(sum(len(p) for p, _ in batch))
        batch.clear()

    with tmp.open("wb") as f:
        pending = 0
        for source in shard:
            for piece, end in documents(source, field, key):
                batch.append((piece, end))
                pending += len(piece)
                if pending >= PIECE_BYTES or len(batch) >= 4096:
                    flush(f)
                    pending = 0
                    if max_bytes and counts["bytes"] >= max_bytes:
                        break
            if max_bytes and counts["bytes"] >= max_bytes:
                break
        if batch:
            flush(f)
    out.with_suffix(".json").write_text(json.dumps(counts))
    tmp.replace(out)  # the part is complete only once renamed
    return counts


def _pool_shard(task: tuple) -> dict[str, Any]:
    index, shard, out, field, key, max_bytes = task
    assert _TOK is not None
    try:
        return tokenize_shard(_TOK, shard, out, field, key, max_bytes, _pool_progress)
    except ConfigError as e:
        return {"error": [e.key, e.message]}


def _done_part(out: Path) -> dict[str, int] | None:
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return dict(json.loads(meta.read_text()))
    return None


def _run_shards(cfg: DataConfig, tok: Tokenizer, work: Path, shards: list, key: str) -> None:
    from tqdm.auto import tqdm

    total = sum(s.size for shard in shards for s in shard)
    if cfg.max_bytes:
        total = min(total, cfg.max_bytes)
    todo = [i for i in range(len(shards)) if _done_part(_part(work, i)) is None]
    tasks = [(i, shards[i], _part(work, i), cfg.text_field, key, cfg.max_bytes) for i in todo]
    n = min(_workers(cfg), len(tasks))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=None, leave=False)
    seen = 0
    try:
        if n <= 1:
            for _i, shard, out, field, k, mb in tasks:
                if cfg.max_bytes and seen >= cfg.max_bytes:
                    break
                seen += tokenize_shard(tok, shard, out, field, k, mb, bar.update)["bytes"]
            return
        ctx = mp.get_context("spawn")  # no fork after torch/rayon threads started
        counter = ctx.Value("q", 0)
        with ctx.Pool(n, initializer=_init_worker, initargs=(tok, counter)) as pool:
            results = pool.imap(_pool_shard, tasks)
            for _ in tasks:
                while True:
                    try:
                        res = results.next(timeout=0.5)
                        break
                    except mp.TimeoutError:
                        bar.update(counter.value - bar.n)
                if "error" in res:
                    raise ConfigError(*res["error"])
                seen += res["bytes"]
                if cfg.max_bytes and seen >= cfg.max_bytes:
                    break  # the pool is terminated on exit; later shards are not needed
    finally:
        bar.close()


# ----------------------------------------------------------------------------- assembly


def _assemble(
    cfg: DataConfig, tok: Tokenizer, work: Path, n_shards: int, tmp: Path
) -> dict[str, int]:
    """Concatenate the parts into ``tmp/tokens.bin``, cut at data.max_bytes of text."""
    dtype = token_dtype(tok.vocab_size)
    nbytes = tok.token_bytes()
    budget = cfg.max_bytes or None
    tokens = total = docs = 0
    with (tmp / TOKENS).open("wb") as f:
        for i in range(n_shards):
            part = _part(work, i)
            if budget is not None and total >= budget or not part.is_file():
                break
            if part.stat().st_size == 0:
                continue
            ids = np.memmap(part, dtype=dtype, mode="r")
            for lo in range(0, ids.size, _COPY_TOKENS):
                chunk = np.asarray(ids[lo : lo + _COPY_TOKENS])
                size = nbytes[chunk]
                if budget is not None and total + int(size.sum()) > budget:
                    cut = int(np.searchsorted(np.cumsum(size), budget - total, side="right"))
                    chunk, size = chunk[:cut], size[:cut]
                f.write(chunk.tobytes())
                tokens += chunk.size
                total += int(size.sum())
                docs += int((chunk == tok.eod_id).sum())
                if budget is not None and total >= budget:
                    break
            del ids
    return {"num_tokens": tokens, "num_bytes": total, "num_docs": docs}


def tokenize_corpus(
    cfg: DataConfig, spec: str, sources: list[Source], tok: Tokenizer, key: str
) -> Path:
    """The token cache of one corpus (built unless it exists); see the module doc."""
    cache_key = fingerprint(
        spec, sources, f"v{CACHE_VERSION}", cfg.max_bytes, cfg.text_field, tok.digest
    )
    root = Path(cfg.cache_dir).expanduser().resolve()
    final = root / cache_key
    if (final / META).is_file():
        return final
    shards = group_shards(sources, cfg.max_bytes)
    work = root / f".{cache_key}.partial"
    work.mkdir(parents=True, exist_ok=True)
    _run_shards(cfg, tok, work, shards, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_key}.tmp-", dir=root))
    try:
        counts = _assemble(cfg, tok, work, len(shards), tmp)
        if counts["num_tokens"] == 0:
            shutil.rmtree(work, ignore_errors=True)
            raise ConfigError(key, f"corpus {spec!r} is empty (no text in its files)")
        meta = {
            "version": CACHE_VERSION,
            "corpus": spec,
            "fingerprint": cache_key,
            "num_files": len(sources),
            "num_shards": len(shards),
            **counts,
            "max_bytes": cfg.max_bytes,
            "tokenizer": tok.name,
            "tokenizer_digest": tok.digest,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "dtype": token_dtype(tok.vocab_size).name,
        }
        (tmp / TOKENIZER_FILE).write_text(tok.to_json())
        np.save(tmp / TOKEN_BYTES, tok.token_bytes())
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / META).is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return final


def prepare_corpus(
    cfg: DataConfig, vocab_size: int | None = None, tokenizer: Tokenizer | None = None
) -> Path:
    """Tokenize ``data.corpus`` (and ``data.val_corpus``) once; return the folder the
    workers open. ``tokenizer`` (a checkpoint's) replaces resolving ``data.tokenizer``;
    ``vocab_size`` (model.vocab_size) is checked against the tokenizer when given.
    ConfigError naming data.* or model.vocab_size for bad input."""
    sources = list_sources(cfg.corpus, "data.corpus")
    val_sources = list_sources(cfg.val_corpus, "data.val_corpus") if cfg.val_corpus else []
    if tokenizer is None:
        tok, trained = resolve_tokenizer(cfg, vocab_size or 256, sources)
    else:
        tok, trained = tokenizer, False
    if vocab_size is not None:
        check_vocab(tok, vocab_size, trained)
    # The (usually smaller) validation corpus first: its errors show sooner.
    val = (
        tokenize_corpus(cfg, cfg.val_corpus, val_sources, tok, "data.val_corpus")
        if val_sources
        else None
    )
    train = tokenize_corpus(cfg, cfg.corpus, sources, tok, "data.corpus")
    if val is None:
        return train
    pair = Path(cfg.cache_dir).expanduser().resolve() / (
        "pair-" + hashlib.sha256(f"{train}|{val}".encode()).hexdigest()[:20]
    )
    if not (pair / META).is_file():
        pair.mkdir(parents=True, exist_ok=True)
        meta = {"version": CACHE_VERSION, "train": str(train), "val": str(val)}
        write_atomic(pair / META, json.dumps(meta))
    return pair
