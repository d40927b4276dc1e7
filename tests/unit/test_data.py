"""Corpus cache, train/val split, per-rank deterministic batches, unigram entropy."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.config.train import DataConfig
from turnout.errors import ConfigError
from turnout.trainer.data.batches import (
    BatchSampler,
    TokenData,
    open_tokens,
    token_unigram_entropy,
)
from turnout.trainer.data.token_cache import prepare_corpus

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path, corpus: str | Path, **kw: object) -> DataConfig:
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


def _random_text(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(32, 127, size=n, dtype=np.uint8).tobytes()


def test_file_corpus_cached_once_and_reused(tmp_path: Path) -> None:
    text = "héllo wörld\n" * 50
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    cfg = _cfg(tmp_path, f)
    path = prepare_corpus(cfg)
    tokens_file = path / "tokens.bin"
    stamp = tokens_file.stat().st_mtime_ns
    # Byte-level tokenizer: the tokens are the UTF-8 bytes, then the EOD byte 0.
    assert np.fromfile(tokens_file, dtype=np.uint8).tobytes() == text.encode() + b"\0"
    assert prepare_corpus(cfg) == path
    assert tokens_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    # Only the finished cache folder is there: no temporary leftovers.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
    # A changed corpus gets a new cache.
    f.write_text(text + "more", encoding="utf-8")
    assert prepare_corpus(cfg) != path


def test_max_bytes_and_stale_partial_cache_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(_random_text(5000))
    cfg = _cfg(tmp_path, f, max_bytes=1000)
    # What a run killed mid-write leaves: a hidden temporary folder with a partial file.
    path_guess = prepare_corpus(cfg)
    stale = tmp_path / "cache" / f".{path_guess.name}.tmp-killed"
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"xx")
    shutil.rmtree(path_guess)
    path = prepare_corpus(cfg)
    assert path == path_guess
    data = open_tokens(path, val_fraction=0.1)
    assert data.train.size + data.val.size == 1000
    assert (data.train.tobytes() + data.val.tobytes()) == f.read_bytes()[:1000]


def test_directory_corpus_reads_text_files_in_order(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second")
    (d / "a.md").write_text("first")
    (d / "sub" / "c.txt").write_text("third")
    (d / ".hidden").write_text("skip me")
    (d / "blob.bin").write_bytes(b"\x00\x01binary")
    path = prepare_corpus(_cfg(tmp_path, d))
    # Each document ends with the byte tokenizer's end-of-document token, byte 0.
    assert np.fromfile(path / "tokens.bin", dtype=np.uint8).tobytes() == (b"first\0second\0third\0")


@pytest.mark.parametrize("kind", ["missing", "empty-file", "empty-dir", "binary-only-dir"])
def test_bad_corpus_names_the_key(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "corpus"
    if kind == "empty-file":
        target.write_bytes(b"")
    elif kind == "empty-dir":
        target.mkdir()
    elif kind == "binary-only-dir":
        target.mkdir()
        (target / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError) as err:
        prepare_corpus(_cfg(tmp_path, target))
    assert err.value.key == "data.corpus"
    assert str(target) in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_stdlib_corpus_is_deterministic(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "stdlib", max_bytes=20000)
    path = prepare_corpus(cfg)
    assert prepare_corpus(cfg) == path
    tokens = np.fromfile(path / "tokens.bin", dtype=np.uint8)
    assert tokens.size == 20000
    assert b"import" in tokens.tobytes() or b"def " in tokens.tobytes()


def _token_data(n: int = 20000, val_fraction: float = 0.1) -> TokenData:
    stream = np.frombuffer(_random_text(n, seed=3), dtype=np.uint8)
    n_val = int(round(n * val_fraction))
    return TokenData(train=stream[:-n_val], val=stream[-n_val:], vocab_size=256, path=Path("."))


def test_val_split_is_the_disjoint_tail(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(_random_text(10000))
    data = open_tokens(prepare_corpus(_cfg(tmp_path, f)), val_fraction=0.05)
    assert data.val.size == 500 and data.train.size == 9501  # 10000 bytes + EOD
    assert data.train.tobytes() + data.val.tobytes() == f.read_bytes() + b"\0"
    assert data.val_bytes == 500 and data.val_tokens_per_byte == 1.0
    sampler = BatchSampler(data, seq_len=16, micro_batch=4, rank=0, world=2, seed=1, eval_batches=3)
    val, train = data.val.tobytes(), data.train.tobytes()
    for i in range(3):
        tokens, targets = sampler.eval_batch(i)
        for row, tgt in zip(tokens, targets, strict=True):
            window = bytes(row.tolist()) + bytes([int(tgt[-1])])
            assert window in val and window not in train


def test_slots_are_deterministic_layout_free_and_resumable() -> None:
    data = _token_data()
    world, seq = 2, 32
    samplers = [BatchSampler(data, seq, 4, r, world, seed=5) for r in range(world)]
    train = data.train.tobytes()
    for s in samplers:
        tokens, targets = s.batch(step=7, micro=1)
        assert tokens.shape == targets.shape == (4, seq)
        assert tokens.dtype == targets.dtype == torch.int64
        assert (tokens[:, 1:] == targets[:, :-1]).all()
        for row, tgt in zip(tokens, targets, strict=True):
            window = bytes(row.tolist()) + bytes([int(tgt[-1])])
            assert window in train
    # The ranks take different slots of the global batch...
    assert not (samplers[0].batch(7, 1)[0] == samplers[1].batch(7, 1)[0]).all()
    # ...and the same micro batches as one rank with twice the accumulation: micro m of
    # rank r is global micro batch m * world + r, whatever the world size.
    single = BatchSampler(data, seq, 4, 0, 1, seed=5)
    for r in range(world):
        assert (samplers[r].batch(7, 1)[0] == single.batch(7, 1 * world + r)[0]).all()
    # Pure function of (seed, step, slot): a fresh sampler resumes exactly.
    again = BatchSampler(data, seq, 4, 0, world, seed=5)
    assert (again.batch(7, 1)[0] == samplers[0].batch(7, 1)[0]).all()
    assert not (samplers[0].batch(7, 1)[0] == samplers[0].batch(8, 1)[0]).all()
    assert not (samplers[0].batch(7, 0)[0] == samplers[0].batch(7, 1)[0]).all()
    other_seed = BatchSampler(data, seq, 4, 0, world, seed=6)
    assert not (other_seed.batch(7, 1)[0] == samplers[0].batch(7, 1)[0]).all()


def test_too_small_corpus_is_a_config_error() -> None:
    data = _token_data(n=100, val_fraction=0.5)
    with pytest.raises(ConfigError) as err:
        BatchSampler(data, seq_len=64, micro_batch=2, rank=0, world=2, seed=0)
    assert err.value.key == "data.corpus"


def test_unigram_entropy_matches_the_formula(tmp_path: Path) -> None:
    assert token_unigram_entropy(np.frombuffer(b"aaaa", dtype=np.uint8)) == 0.0
    # b"aab": p(a) = 2/3, p(b) = 1/3.
    h = token_unigram_entropy(np.frombuffer(b"aab", dtype=np.uint8))
    assert h == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    # Four equiprobable bytes: ln 4. Computed on the training split only (val = tail).
    f = tmp_path / "c.txt"
    f.write_bytes(b"abcd" * 100 + b"zzzzzzzzzz")
    data = open_tokens(prepare_corpus(_cfg(tmp_path, f)), val_fraction=11 / 411)
    assert data.val.tobytes() == b"z" * 10 + b"\0"
    assert token_unigram_entropy(data.train) == pytest.approx(math.log(4))
