"""Token cache -> memory-mapped train/val splits -> per-rank deterministic batches.

Shape legend: B micro batch (sequences), S sequence length (tokens per window).

The cache folder comes from :func:`turnout.trainer.data.token_cache.prepare_corpus` (run
once on the launcher). ``open_tokens`` memory-maps it: the tail ``val_fraction`` of the
token stream is the validation split, or, for a pair folder (``data.val_corpus``), the
second corpus is. It also counts the UTF-8 bytes the validation tokens stand for, the
denominator of bits per byte. ``BatchSampler`` gives rank r of w random windows of S+1
tokens from the training split by global sample slot; a slot's window is a pure function
of (seed, step, slot), so the data position is resumable from the step alone, at any
world size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turnout.errors import ConfigError
from turnout.files import TOKENIZER_FILE
from turnout.trainer.data.token_cache import prepare_corpus

__all__ = ["BatchSampler", "TokenData", "open_tokens", "prepare_corpus"]

VOCAB_SIZE = 256


@dataclass
class TokenData:
    """Memory-mapped token stream split into train (head) and val (tail)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    path: Path
    val_bytes: int = 0
    """UTF-8 bytes the validation tokens stand for (0 = unknown)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The training cache's meta.json (tokenizer, fingerprint, counts)."""
    tokenizer_file: Path | None = None
    """The training cache's tokenizer.json, which a checkpoint saves (None: it has none)."""

    @property
    def val_tokens_per_byte(self) -> float:
        """Converts nats/token into nats/byte; nan when the byte count is unknown."""
        return self.val.size / self.val_bytes if self.val_bytes else math.nan


def _meta(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / "meta.json").read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError("data.cache_dir", f"{path} is not a token cache ({e})") from None


def _memmap(path: Path, meta: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(meta.get("dtype", "uint8"))
    return np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(meta["num_tokens"],))


def _bytes_of(tokens: np.ndarray, path: Path, vocab_size: int) -> int:
    table = path / "token_bytes.npy"
    if not table.is_file():  # a byte cache of an older turnout
        return int(tokens.size)
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)
    return int(counts @ np.load(table)[: counts.size])


def open_tokens(path: str | os.PathLike, val_fraction: float = 0.02) -> TokenData:
    """Memory-map a cache folder from ``prepare_corpus``; the tail (or the paired
    validation corpus) is validation."""
    path = Path(path)
    meta = _meta(path)
    train_dir = path
    if "train" in meta:  # data.val_corpus: a pair of caches
        train_dir, val_dir = Path(meta["train"]), Path(meta["val"])
        meta, val_meta = _meta(train_dir), _meta(val_dir)
        train, val = _memmap(train_dir, meta), _memmap(val_dir, val_meta)
        meta["val_corpus"], meta["val_fingerprint"] = val_meta["corpus"], val_meta["fingerprint"]
    else:
        val_dir = path
        tokens = _memmap(path, meta)
        n_val = max(1, int(round(tokens.size * val_fraction)))
        train, val = tokens[: tokens.size - n_val], tokens[tokens.size - n_val :]
    vocab = int(meta["vocab_size"])
    tokenizer = train_dir / TOKENIZER_FILE
    return TokenData(
        train,
        val,
        vocab,
        path,
        _bytes_of(val, val_dir, vocab),
        meta,
        tokenizer if tokenizer.is_file() else None,
    )


def token_unigram_entropy(tokens: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy of the unigram token distribution, nats per token: -sum_v p_v log p_v.

    Per token of the run's tokenizer (a byte only for ``data.tokenizer=byte``): the loss of
    a model that knows token frequencies and nothing else, the baseline ``unigram_entropy``
    logs."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """A loss in nats per token as bits per UTF-8 byte: loss x tokens/bytes / ln 2."""
    return nats_per_token * tokens_per_byte / math.log(2)


def tracking_params(data: TokenData) -> dict[str, str]:
    """What MLflow records about the data beyond the config: tokenizer, fingerprint, counts."""
    m = data.meta
    values = {
        "corpus.fingerprint": m.get("fingerprint", ""),
        "corpus.tokenizer": m.get("tokenizer", "byte"),
        "corpus.tokenizer_digest": m.get("tokenizer_digest", ""),
        "corpus.vocab_size": data.vocab_size,
        "corpus.tokens": m.get("num_tokens", data.train.size + data.val.size),
        "corpus.bytes": m.get("num_bytes", ""),
        "corpus.documents": m.get("num_docs", ""),
        "corpus.train_tokens": data.train.size,
        "corpus.val_tokens": data.val.size,
        "corpus.val_bytes": data.val_bytes,
    }
    if "val_fingerprint" in m:
        values["corpus.val_fingerprint"] = m["val_fingerprint"]
    return {k: str(v) for k, v in values.items()}


def dataset_inputs(data: TokenData) -> dict[str, tuple[str, str]]:
    """MLflow dataset inputs: context -> (corpus, fingerprint)."""
    m = data.meta
    out = {"training": (str(m.get("corpus", data.path)), str(m.get("fingerprint", "")))}
    if "val_corpus" in m:
        out["validation"] = (str(m["val_corpus"]), str(m["val_fingerprint"]))
    return out


# ----------------------------------------------------------------------------- batches


def _slot_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SlotRule:
    """Global sample slots dealt to ranks, the rule every sampler shares.

    Slot ``j`` of optimizer step ``s`` draws its sample from a generator seeded with
    (seed, s, j); micro step ``m`` of rank ``r`` takes micro batch ``k = m * world + r``,
    i.e. slots ``k*B .. k*B + B-1``. Validation deals fixed positions round-robin."""

    def __init__(self, micro_batch: int, rank: int, world: int, seed: int) -> None:
        self.micro_batch = micro_batch
        self.rank = rank
        self.world = world
        self.seed = seed

    def slots(self, micro: int) -> range:
        """The global slots of this rank's micro step ``micro``."""
        first = (micro * self.world + self.rank) * self.micro_batch
        return range(first, first + self.micro_batch)

    def slot_rng(self, step: int, slot: int) -> np.random.Generator:
        """The generator of global slot ``slot`` at optimizer step ``step``."""
        return np.random.default_rng(_slot_seed(self.seed, step, slot))

    def deal(self, positions: np.ndarray, eval_batches: int) -> np.ndarray:
        """This rank's ``[eval_batches, B]`` share of ``eval_batches x B x world``
        validation positions, dealt round-robin."""
        return positions[self.rank :: self.world].reshape(eval_batches, self.micro_batch)


class BatchSampler(SlotRule):
    """Random windows of ``seq_len + 1`` tokens from the training split, by global slot.

    An optimizer step trains on a global batch of ``micro_batch x grad_accum x world``
    windows; slot ``j`` of step ``s`` is a window whose start is a pure function of
    (seed, s, j), independent of the layout. Micro step ``m`` of rank ``r`` takes micro
    batch ``k = m * world + r``, i.e. slots ``k*B .. k*B + B-1``. So a run resumed at
    another world size with the same micro batch and global batch (gradient accumulation
    adjusted: ``turnout.trainer.resume.layout``) trains on exactly the same micro batches,
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
        super().__init__(micro_batch, rank, world, seed)
        self.data = data
        self.seq_len = seq_len
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
        self.eval_starts = self.deal(starts, eval_batches)

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        win = torch.from_numpy(tokens[idx].astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def slot_start(self, step: int, slot: int) -> int:
        """Start of the window of global sample slot ``slot`` at optimizer step ``step``."""
        return int(self.slot_rng(step, slot).integers(0, self.data.train.size - self.seq_len))

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_BS, targets_BS) long tensors for this rank at (step, micro)."""
        starts = np.array([self.slot_start(step, j) for j in self.slots(micro)])
        return self._windows(self.data.train, starts)

    def eval_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.data.val, self.eval_starts[i])
