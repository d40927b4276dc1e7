"""Corpus -> memory-mapped byte tokens -> per-rank deterministic batches.

Shape legend: B micro batch (sequences), S sequence length (tokens per window).

``prepare_corpus`` runs once on the launcher side: it reads the corpus ('stdlib' = this
Python's standard-library sources, or a user's text file / directory), tokenizes it
with the byte-level tokenizer (one UTF-8 byte = one token, vocab 256) and writes a
cache folder ``<cache_dir>/<fingerprint>/`` holding ``tokens.bin`` (uint8) and
``meta.json``. The folder is written under a temporary name and renamed into place,
so a killed run never leaves a half-written cache; an existing cache is reused.

``open_tokens`` memory-maps it; the tail ``val_fraction`` of the token stream is the
validation split. ``BatchSampler`` gives rank r of w random windows of S+1 tokens from
the training split by global sample slot; a slot's window is a pure function of
(seed, step, slot), so the data position is resumable from the step alone, at any world.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turnout.config.train import DataConfig
from turnout.errors import ConfigError

VOCAB_SIZE = 256
CACHE_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
_SEPARATOR = b"\n\n"


# ----------------------------------------------------------------------------- sources


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _looks_binary(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def _user_files(corpus: str) -> list[Path]:
    path = Path(corpus).expanduser()
    if not path.exists():
        raise ConfigError("data.corpus", f"no such file or directory: {corpus}")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise ConfigError("data.corpus", f"cannot read {corpus}")
        if _looks_binary(path):
            raise ConfigError("data.corpus", f"{corpus} is a binary file, not text")
        return [path.resolve()]
    if not path.is_dir():
        raise ConfigError("data.corpus", f"{corpus} is neither a file nor a directory")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if not name.startswith(".") and f.is_file() and not _looks_binary(f):
                files.append(f.resolve())
    if not files:
        raise ConfigError("data.corpus", f"directory {corpus} holds no readable text files")
    return files


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The corpus's files in reading order (deterministic)."""
    files = _stdlib_files() if cfg.corpus == "stdlib" else _user_files(cfg.corpus)
    if not files:
        raise ConfigError("data.corpus", f"no source files found for corpus {cfg.corpus!r}")
    return files


def fingerprint(cfg: DataConfig, files: list[Path]) -> str:
    """Hash of what determines the tokens: file names, sizes, mtimes, max_bytes, tokenizer."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{cfg.tokenizer}|{cfg.max_bytes}|{cfg.corpus}".encode())
    if cfg.corpus == "stdlib":
        h.update(sys.version.encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _read_corpus(cfg: DataConfig, files: list[Path]) -> bytes:
    limit = cfg.max_bytes or math.inf
    parts: list[bytes] = []
    total = 0
    for f in files:
        if total >= limit:
            break
        try:
            data = f.read_bytes()
        except OSError as e:
            if cfg.corpus != "stdlib" and len(files) == 1:
                raise ConfigError("data.corpus", f"cannot read {f}: {e.strerror}") from None
            continue  # one unreadable file in a directory is skipped
        if not data:
            continue
        if parts:
            parts.append(_SEPARATOR)
            total += len(_SEPARATOR)
        parts.append(data)
        total += len(data)
    blob = b"".join(parts)
    if cfg.max_bytes:
        blob = blob[: cfg.max_bytes]
    return blob


# ----------------------------------------------------------------------------- cache


def prepare_corpus(cfg: DataConfig) -> Path:
    """Tokenize the corpus once into ``<cache_dir>/<fingerprint>/``; return that folder.

    Reuses an existing cache. Raises ConfigError('data.corpus', ...) for a missing,
    empty or unreadable corpus.
    """
    files = corpus_files(cfg)
    key = fingerprint(cfg, files)
    cache_root = Path(cfg.cache_dir).expanduser().resolve()
    final = cache_root / key
    if (final / "meta.json").is_file():
        return final
    blob = _read_corpus(cfg, files)
    if not blob:
        raise ConfigError("data.corpus", f"corpus {cfg.corpus!r} is empty")
    # Byte-level tokenizer: the UTF-8 bytes are the token ids.
    tokens = np.frombuffer(blob, dtype=np.uint8)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
    try:
        tokens.tofile(tmp / "tokens.bin")
        meta = {
            "version": CACHE_VERSION,
            "corpus": cfg.corpus,
            "num_files": len(files),
            "num_tokens": int(tokens.size),
            "max_bytes": cfg.max_bytes,
            "tokenizer": cfg.tokenizer,
            "vocab_size": VOCAB_SIZE,
            "dtype": "uint8",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its copy first: keep theirs.
            if not (final / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class TokenData:
    """Memory-mapped token stream split into train (head) and val (tail)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    path: Path


def open_tokens(path: str | os.PathLike, val_fraction: float = 0.02) -> TokenData:
    """Memory-map a cache folder from :func:`prepare_corpus`; the tail is validation."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("data.cache_dir", f"{path} is not a token cache ({e})") from None
    tokens = np.memmap(path / "tokens.bin", dtype=np.uint8, mode="r", shape=(meta["num_tokens"],))
    n_val = max(1, int(round(tokens.size * val_fraction)))
    return TokenData(
        train=tokens[: tokens.size - n_val],
        val=tokens[tokens.size - n_val :],
        vocab_size=int(meta["vocab_size"]),
        path=path,
    )


def byte_unigram_entropy(tokens: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy of the unigram token distribution, nats per token: -sum_v p_v log p_v."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- batches


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from the training split, by global slot.

    An optimizer step trains on a global batch of ``micro_batch x grad_accum x world``
    windows; slot ``j`` of step ``s`` is a window whose start is a pure function of
    (seed, s, j), independent of the layout. Micro step ``m`` of rank ``r`` takes micro
    batch ``k = m * world + r``, i.e. slots ``k*B .. k*B + B-1``. So a run resumed at
    another world size with the same micro batch and global batch (gradient accumulation
    adjusted: ``turnout.trainer.resume_layout``) trains on exactly the same micro batches,
    and the data position is the step alone. ``eval_batch(i)`` returns fixed windows
    evenly spread over this rank's share of the validation split.
    """

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        eval_batches: int = 1,
    ) -> None:
        self.data = data
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.rank = rank
        self.world = world
        self.seed = seed
        if data.train.size < seq_len + 1:
            raise ConfigError(
                "data.corpus",
                f"training split ({data.train.size} tokens) is shorter than one window "
                f"of {seq_len + 1} tokens (model.max_seq_len={seq_len})",
            )
        if data.val.size < seq_len + 1:
            raise ConfigError(
                "data.val_fraction",
                f"validation split has {data.val.size} tokens, fewer than one window "
                f"of {seq_len + 1}",
            )
        total = eval_batches * micro_batch * world
        starts = np.linspace(0, data.val.size - seq_len - 1, num=total).astype(np.int64)
        self.eval_starts = starts[rank::world].reshape(eval_batches, micro_batch)

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        win = torch.from_numpy(tokens[idx].astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def slot_start(self, step: int, slot: int) -> int:
        """Start of the window of global sample slot ``slot`` at optimizer step ``step``."""
        rng = np.random.default_rng(_seed(self.seed, step, slot))
        return int(rng.integers(0, self.data.train.size - self.seq_len))

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_BS, targets_BS) long tensors for this rank at (step, micro)."""
        first = (micro * self.world + self.rank) * self.micro_batch
        starts = np.array([self.slot_start(step, first + b) for b in range(self.micro_batch)])
        return self._windows(self.data.train, starts)

    def eval_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.data.val, self.eval_starts[i])
