"""Corpus formats (text, JSONL, JSONL.gz, Parquet, globs, a separate validation corpus),
sharded and parallel tokenization, bad input, and a killed tokenization resuming."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from turnout.config.train import DataConfig
from turnout.errors import ConfigError
from turnout.launch.cli import main
from turnout.trainer.data.batches import open_tokens, tracking_params
from turnout.trainer.data.token_cache import prepare_corpus

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path, corpus: str | Path, **kw: object) -> DataConfig:
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


def _tokens(path: Path) -> bytes:
    meta = json.loads((path / "meta.json").read_text())
    return np.fromfile(path / "tokens.bin", dtype=meta["dtype"]).tobytes()


def _jsonl(path: Path, docs: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(d) + "\n" for d in docs)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_gz_and_parquet_documents_end_with_the_eod_token(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    a = _jsonl(d / "a.jsonl", [{"body": "first", "id": 1}, {"body": "sécond"}])
    b = _jsonl(d / "b.jsonl.gz", [{"body": "third"}, {"body": ""}], gz=True)
    c = d / "c.parquet"
    pq.write_table(pa.table({"body": ["fourth", None, "fifth"], "n": [1, 2, 3]}), c)
    expect = {
        a: "first\0sécond\0".encode(),
        b: b"third\0",  # empty documents are left out
        c: b"fourth\0fifth\0",
    }
    for f, want in expect.items():
        assert _tokens(prepare_corpus(_cfg(tmp_path, f, text_field="body"))) == want
    # A folder and a glob read them in name order, one stream.
    whole = b"".join(expect.values())
    assert _tokens(prepare_corpus(_cfg(tmp_path, d, text_field="body"))) == whole
    glob = prepare_corpus(_cfg(tmp_path, d / "[abc].*", text_field="body"))
    assert _tokens(glob) == whole


def test_separate_validation_corpus(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "x" * 3000}])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "héllo"}, {"text": "bye"}])
    path = prepare_corpus(_cfg(tmp_path, train, val_corpus=str(val)))
    data = open_tokens(path, val_fraction=0.3)  # ignored with a validation corpus
    assert data.train.tobytes() == b"x" * 3000 + b"\0"
    assert data.val.tobytes() == "héllo\0bye\0".encode()
    assert data.val_bytes == data.val.size
    params = tracking_params(data)
    assert params["corpus.val_tokens"] == str(data.val.size)
    assert params["corpus.val_fingerprint"] != params["corpus.fingerprint"]


def test_parallel_shards_give_the_same_stream_as_one_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "\n", "  "]
    for i in range(6):
        docs = [{"text": " ".join(rng.choice(words, size=200))} for _ in range(50)]
        _jsonl(tmp_path / f"shard-{i}.jsonl", docs)
    spec = tmp_path / "shard-*.jsonl"
    one = prepare_corpus(DataConfig(corpus=str(spec), cache_dir=str(tmp_path / "c1"), workers=1))
    two = prepare_corpus(DataConfig(corpus=str(spec), cache_dir=str(tmp_path / "c2"), workers=2))
    assert _tokens(one) == _tokens(two)
    assert json.loads((two / "meta.json").read_text())["num_docs"] == 300
    # max_bytes cuts the stream at that many bytes of text, shards in order.
    cut = prepare_corpus(
        DataConfig(corpus=str(spec), cache_dir=str(tmp_path / "c3"), workers=2, max_bytes=5000)
    )
    assert _tokens(cut) == _tokens(one)[:5000]


def _bad(tmp_path: Path, kind: str) -> tuple[DataConfig, str, str]:
    """(config, key, text the error must contain) for one kind of bad input."""
    if kind == "no-field":
        f = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"txt": "typo"}])
        return _cfg(tmp_path, f), "data.corpus", f"{f}:2: no field 'text'"
    if kind == "not-json":
        f = tmp_path / "a.jsonl"
        f.write_text('{"text": "ok"}\n{"text": \n')
        return _cfg(tmp_path, f), "data.corpus", f"{f}:2: not JSON"
    if kind == "not-text":
        f = _jsonl(tmp_path / "a.jsonl.gz", [{"text": 3}], gz=True)
        return _cfg(tmp_path, f), "data.corpus", f"{f}:1: field 'text' is int"
    if kind == "bad-gzip":
        f = tmp_path / "a.jsonl.gz"
        f.write_bytes(b"not gzip at all")
        return _cfg(tmp_path, f), "data.corpus", f"{f}:1: cannot read"
    if kind == "no-column":
        f = tmp_path / "a.parquet"
        pq.write_table(pa.table({"content": ["x"]}), f)
        return _cfg(tmp_path, f), "data.corpus", f"{f}: no column 'text' (data.text_field)"
    if kind == "not-parquet":
        f = tmp_path / "a.parquet"
        f.write_text("hello")
        return _cfg(tmp_path, f), "data.corpus", f"{f}: not a readable Parquet file"
    if kind == "empty":
        f = _jsonl(tmp_path / "a.jsonl", [{"text": ""}])
        return _cfg(tmp_path, f), "data.corpus", "is empty"
    if kind == "binary":
        f = tmp_path / "a.txt"
        f.write_bytes(b"\x7fELF\x00\x01")
        return _cfg(tmp_path, f), "data.corpus", f"{f} is a binary file"
    if kind == "glob-none":
        return _cfg(tmp_path, tmp_path / "nope-*.parquet"), "data.corpus", "no files match"
    assert kind == "bad-val"
    f = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}])
    v = _jsonl(tmp_path / "v.jsonl", [{"x": "no"}])
    return _cfg(tmp_path, f, val_corpus=str(v)), "data.val_corpus", f"{v}:1: no field"


BAD = [
    "no-field",
    "not-json",
    "not-text",
    "bad-gzip",
    "no-column",
    "not-parquet",
    "empty",
    "binary",
    "glob-none",
    "bad-val",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    cfg, key, text = _bad(tmp_path, kind)
    with pytest.raises(ConfigError) as err:
        prepare_corpus(cfg)
    assert err.value.key == key
    assert text in str(err.value)
    assert "\n" not in str(err.value)
    # Nothing that looks like a finished cache.
    cache = tmp_path / "cache"
    finished = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.is_dir() else []
    assert finished == []


@pytest.mark.parametrize("kind", ["no-field", "no-column"])
def test_train_preflight_exits_2_before_workers(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture
) -> None:
    cfg, key, text = _bad(tmp_path, kind)
    code = main(
        [
            "train",
            "tiny",
            f"data.corpus={cfg.corpus}",
            f"data.cache_dir={cfg.cache_dir}",
            "tracking.enabled=false",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"turnout: error: {key}: " + err.split(f"{key}: ", 1)[1]
    assert text in err and "\n" not in err


_KILLED = """
import sys
from turnout.config.train import DataConfig
from turnout.trainer.data.token_cache import prepare_corpus
prepare_corpus(DataConfig(corpus=sys.argv[1], cache_dir=sys.argv[2], workers=1,
                          tokenizer="bpe", max_bytes=0), 512)
"""


def test_killed_tokenization_never_looks_complete_and_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    words = np.array([f"w{i}" for i in range(300)])
    for i in range(12):
        docs = [{"text": " ".join(rng.choice(words, size=400))} for _ in range(300)]
        _jsonl(tmp_path / f"s{i:02d}.jsonl", docs)
    spec, cache = str(tmp_path / "s*.jsonl"), tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, spec, str(cache)])
    parts: list[Path] = []
    deadline = time.monotonic() + 120
    while not parts and proc.poll() is None and time.monotonic() < deadline:
        parts = sorted(cache.glob(".*.partial/part-*.bin"))
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert parts, "the tokenization finished before a part was seen"
    # Killed: no finished cache, only the hidden work folder (and the trained BPE).
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == ["tokenizers"]
    # Mark the finished part: if the next run reuses it, the mark shows in its stream.
    first = parts[0]
    marked = np.full(first.stat().st_size // 2, 7, dtype=np.uint16).tobytes()
    first.write_bytes(marked)
    cfg = DataConfig(corpus=spec, cache_dir=str(cache), tokenizer="bpe", max_bytes=0, workers=1)
    resumed = _tokens(prepare_corpus(cfg, 512))
    # A fresh run with the same (cached) BPE, for the unmarked stream.
    fresh_cache = tmp_path / "fresh"
    fresh_cache.mkdir()
    (fresh_cache / "tokenizers").symlink_to(cache / "tokenizers")
    fresh_cfg = DataConfig(**{**cfg.__dict__, "cache_dir": str(fresh_cache)})
    fresh = _tokens(prepare_corpus(fresh_cfg, 512))
    n = len(marked)
    assert resumed[:n] == marked and fresh[:n] != marked
    assert resumed[n:] == fresh[n:]
    assert not list(cache.glob(".*.partial"))  # cleaned up once complete
