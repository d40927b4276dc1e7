"""Tokenizers: bytes, a byte-level BPE trained on the corpus, or a user's tokenizer.json.

Every tokenizer maps a document's UTF-8 text to token ids and appends an end-of-document
(EOD) id after it:

- :class:`ByteTokenizer` (``data.tokenizer=byte``): a byte is its own id (vocab 256); the
  EOD is byte 0 (NUL), which text never holds (a file with one is binary, and NULs inside
  a JSON or Parquet text are dropped). Encoding is a numpy view, no Python loop.
- :class:`HFTokenizer`: a Hugging Face ``tokenizers`` tokenizer, either a byte-level BPE
  trained on the corpus (``data.tokenizer=bpe``, :func:`train_bpe`, EOD ``<|endoftext|>``)
  or a ``tokenizer.json`` the user names (EOD ``data.eod_token`` or the first of
  :data:`EOD_NAMES` it has). Special-token text inside a document is encoded as text.

:meth:`Tokenizer.token_bytes` gives the UTF-8 bytes each id stands for (the EOD counts as
one byte, like the byte tokenizer's separator): the denominator of bits per byte, and how a
``data.max_bytes`` cut lands on a token boundary. :meth:`Tokenizer.to_json` is a Hugging
Face ``tokenizer.json`` (for bytes: a merge-free BPE whose ids are the byte values), written
into the token cache and into every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from turnout.errors import ConfigError

BYTE_EOD = 0
BPE_EOD = "<|endoftext|>"
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
PAD_MULTIPLE = 128
"""model.vocab_size may exceed a tokenizer.json's size up to the next multiple of this."""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte value -> the printable character standing for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = dict(zip(keep, keep, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


class Tokenizer:
    """What the corpus pipeline, the trainer and ``turnout generate``/``eval`` need."""

    name: str
    """'byte', 'bpe' or the tokenizer.json path it was loaded from."""
    vocab_size: int
    eod_id: int

    def encode_pieces(self, pieces: list[bytes]) -> list[np.ndarray]:
        """Token ids of each UTF-8 piece (no EOD added)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.encode_pieces([text.encode("utf-8")])[0]]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; EOD ids are left out, invalid UTF-8 replaced."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: the UTF-8 bytes each id stands for (EOD: 1)."""
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    @property
    def digest(self) -> str:
        """Identifies the mapping (part of the token cache's key)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.name} (vocab {self.vocab_size}, eod id {self.eod_id})"


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = 256
    eod_id = BYTE_EOD

    def encode_pieces(self, pieces: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(p.replace(b"\0", b"") if b"\0" in p else p, np.uint8) for p in pieces]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8").replace(b"\0", b""))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i != BYTE_EOD).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def to_json(self) -> str:
        return _byte_tokenizer_json()


@lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = byte_alphabet()
    hf = HF(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf.to_str()


class HFTokenizer(Tokenizer):
    def __init__(self, hf: Any, name: str, eod_token: str = "") -> None:
        self.hf = hf
        self.name = name
        hf.encode_special_tokens = True  # '<|endoftext|>' typed in a document is text
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        self.eod_id = self._eod(eod_token)

    def _eod(self, eod_token: str) -> int:
        names = (eod_token,) if eod_token else EOD_NAMES
        for n in names:
            i = self.hf.token_to_id(n)
            if i is not None:
                return int(i)
        key = "data.eod_token" if eod_token else "data.tokenizer"
        want = repr(eod_token) if eod_token else f"any of {', '.join(EOD_NAMES)}"
        raise ConfigError(key, f"{self.name} has no end-of-document token ({want})")

    def encode_pieces(self, pieces: list[bytes]) -> list[np.ndarray]:
        texts = [p.decode("utf-8", errors="replace") for p in pieces]
        encs = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids if i != self.eod_id]))

    def token_bytes(self) -> np.ndarray:
        spec = json.loads(self.hf.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        letters = set(byte_alphabet().values())
        out = np.ones(self.vocab_size, dtype=np.int64)
        special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
        for i in range(self.vocab_size):
            tok = self.hf.id_to_token(i)
            if tok is None or i == self.eod_id:
                continue
            if i in special:
                out[i] = len(tok.encode())
            elif byte_level:
                out[i] = sum(1 if ch in letters else len(ch.encode()) for ch in tok)
            else:  # e.g. SentencePiece's '▁' stands for one space
                out[i] = max(1, len(tok.replace("\u2581", " ").encode()))
        return out

    def to_json(self) -> str:
        return str(self.hf.to_str())


def load_file(path: str | Path, eod_token: str = "", key: str = "data.tokenizer") -> HFTokenizer:
    """A Hugging Face tokenizer.json; ConfigError(key) when missing or unreadable."""
    from tokenizers import Tokenizer as HF

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(key, f"no such tokenizer file: {path} (want 'byte', 'bpe' or a path)")
    try:
        hf = HF.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(key, f"{p} is not a Hugging Face tokenizer.json ({first})") from None
    return HFTokenizer(hf, str(p), eod_token)


def from_json(text: str, name: str, eod_token: str = "") -> Tokenizer:
    """The tokenizer a token cache or checkpoint stored (``name`` 'byte' gives bytes)."""
    if name == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HF

    return HFTokenizer(HF.from_str(text), name, eod_token or (BPE_EOD if name == "bpe" else ""))


def train_bpe(texts: Iterator[str], vocab_size: int, out: Path, progress: bool) -> HFTokenizer:
    """Learn a byte-level BPE of ``vocab_size`` tokens (EOD included) from ``texts`` and
    write it to ``out`` (temporary name, then renamed: a killed run leaves nothing)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    hf.train_from_iterator(texts, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{np.random.default_rng().integers(1 << 30)}")
    tmp.write_text(hf.to_str())
    tmp.replace(out)
    return HFTokenizer(hf, "bpe", BPE_EOD)


def check_vocab(tok: Tokenizer, vocab_size: int, trained: bool = False) -> None:
    """``model.vocab_size`` must hold every id; beyond that a tokenizer.json may be padded
    up to the next multiple of :data:`PAD_MULTIPLE` (a trained BPE may fall short of the
    size it was asked for on a small corpus)."""
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{vocab_size} is smaller than the {tok.vocab_size} tokens of {tok.name}; "
            f"set model.vocab_size={tok.vocab_size}",
        )
    padded = -(-tok.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
    if not trained and tok.name != "byte" and vocab_size > padded:
        raise ConfigError(
            "model.vocab_size",
            f"{vocab_size} is larger than the {tok.vocab_size} tokens of {tok.name} "
            f"(padding allowed up to {padded}); set model.vocab_size={tok.vocab_size}",
        )
