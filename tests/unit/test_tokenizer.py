"""Tokenizers: byte, a BPE trained on the corpus (cached), a user's tokenizer.json; round
trips, end-of-document tokens, bytes per token, vocab checks, the checkpoint copy, and
tokenization in bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.config.load import load_config
from turnout.config.train import DataConfig
from turnout.errors import ConfigError
from turnout.trainer.data import tokenizer_files
from turnout.trainer.data.batches import bits_per_byte, open_tokens
from turnout.trainer.data.token_cache import prepare_corpus
from turnout.trainer.data.tokenizer import BPE_EOD, ByteTokenizer, HFTokenizer, load_file

pytestmark = pytest.mark.unit

TEXT = "héllo wörld, the cat sat on the mat; €uro <|endoftext|> naïve\n"


def _corpus(tmp_path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "héllo", "wörld", "def", "return", "€"]
    lines = [{"text": " ".join(rng.choice(words, size=60)) + "\n"} for _ in range(n)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in lines), encoding="utf-8")
    return f


def _bpe_cfg(tmp_path: Path, **kw: object) -> DataConfig:
    return DataConfig(
        corpus=str(_corpus(tmp_path)), cache_dir=str(tmp_path / "cache"), tokenizer="bpe", **kw
    )


def test_byte_tokenizer_round_trip_and_its_json_is_the_same_mapping() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode())
    assert tok.decode(ids + [tok.eod_id]) == TEXT  # the EOD is left out
    # Its tokenizer.json (what checkpoints carry) maps text to the same ids.
    from tokenizers import Tokenizer as HF

    hf = HF.from_str(tok.to_json())
    assert hf.encode(TEXT).ids == ids and hf.decode(ids) == TEXT


def test_bpe_trained_once_round_trips_and_separates_documents(tmp_path: Path) -> None:
    cfg = _bpe_cfg(tmp_path)
    path = prepare_corpus(cfg, 512)
    trained = list((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))
    assert len(trained) == 1
    stamp = trained[0].stat().st_mtime_ns
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["dtype"] == "uint16"
    assert 256 < meta["vocab_size"] <= 512
    tok = load_file(path / "tokenizer.json", BPE_EOD)
    assert tok.eod_id == meta["eod_id"] == tok.hf.token_to_id(BPE_EOD)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eod_id not in ids  # '<|endoftext|>' typed in a document is text
    assert int(tok.token_bytes()[ids].sum()) == len(TEXT.encode())
    # Subwords: fewer tokens than bytes; one EOD after each of the 300 documents.
    tokens = np.fromfile(path / "tokens.bin", dtype=np.uint16)
    assert tokens.size < meta["num_bytes"] / 2
    assert int((tokens == tok.eod_id).sum()) == meta["num_docs"] == 300
    assert tokens[-1] == tok.eod_id
    docs = tok.decode(tokens[: int(np.argmax(tokens == tok.eod_id))])
    assert docs == json.loads(Path(cfg.corpus).read_text().splitlines()[0])["text"]
    # Bits per byte: the byte count is exact for a byte-level BPE.
    data = open_tokens(path, 0.1)
    assert data.val_bytes == int(tok.token_bytes()[np.asarray(data.val)].sum())
    assert bits_per_byte(2.0, data.val_tokens_per_byte) == pytest.approx(
        2.0 * data.val.size / data.val_bytes / math.log(2)
    )
    # A second run reuses the trained BPE and the token cache.
    assert prepare_corpus(cfg, 512) == path
    assert trained[0].stat().st_mtime_ns == stamp


def test_max_bytes_cut_lands_on_a_token_boundary(tmp_path: Path) -> None:
    path = prepare_corpus(_bpe_cfg(tmp_path, max_bytes=3001), 512)
    meta = json.loads((path / "meta.json").read_text())
    assert 2990 < meta["num_bytes"] <= 3001


def test_user_tokenizer_json_and_vocab_checks(tmp_path: Path) -> None:
    prepare_corpus(_bpe_cfg(tmp_path), 512)
    trained = next((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))
    mine = tmp_path / "tokenizer.json"
    mine.write_text(trained.read_text())
    size = load_file(mine).vocab_size
    cfg = DataConfig(
        corpus=str(_corpus(tmp_path)), cache_dir=str(tmp_path / "c2"), tokenizer=str(mine)
    )
    path = prepare_corpus(cfg, size)
    assert json.loads((path / "meta.json").read_text())["tokenizer"] == str(mine)
    padded = -(-size // 128) * 128
    prepare_corpus(cfg, padded)  # padding the embedding to a multiple of 128 is fine
    for bad, words in [(size - 1, "smaller"), (padded + 1, "larger")]:
        with pytest.raises(ConfigError) as err:
            prepare_corpus(cfg, bad)
        assert err.value.key == "model.vocab_size"
        assert words in str(err.value) and f"model.vocab_size={size}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        prepare_corpus(DataConfig(**{**cfg.__dict__, "eod_token": "<nope>"}), size)
    assert err.value.key == "data.eod_token"
    for text, key in [("{not json", "data.tokenizer"), (None, "data.tokenizer")]:
        bad_file = tmp_path / "bad.json"
        if text is None:
            bad_file.unlink()
        else:
            bad_file.write_text(text)
        with pytest.raises(ConfigError) as err:
            prepare_corpus(DataConfig(**{**cfg.__dict__, "tokenizer": str(bad_file)}), size)
        assert err.value.key == key and str(bad_file) in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.tokenizer=byte", "model.vocab_size=255"],
        ["data.tokenizer=bpe", "model.vocab_size=256"],
    ],
)
def test_vocab_checks_at_train_preflight_name_the_key(overrides: list[str]) -> None:
    from turnout.launch.preflight import prepare_data

    cfg = load_config("tiny", overrides)  # a config alone may have any vocabulary
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg)  # training on a corpus may not: refused before tokenizing
    assert err.value.key == "model.vocab_size"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.tokenizer="], "data.tokenizer"),
        (["data.text_field="], "data.text_field"),
        (["data.workers=-1"], "data.workers"),
    ],
)
def test_static_tokenizer_checks_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert err.value.key == key


def test_checkpoint_carries_the_tokenizer_and_generate_uses_it(tmp_path: Path) -> None:
    from turnout.models.lm import TransformerLM
    from turnout.trainer.eval.inference import encode, sample_text

    data_cfg = _bpe_cfg(tmp_path)
    path = prepare_corpus(data_cfg, 512)
    data = open_tokens(path)  # what a worker does: it trains with that cache's tokenizer
    cfg = load_config(
        "tiny",
        [
            "data.tokenizer=bpe",
            "model.vocab_size=512",
            "model.max_seq_len=32",
            f"data.corpus={data_cfg.corpus}",
        ],
    )
    folder = tmp_path / "step1"
    folder.mkdir()
    tokenizer_files.save(folder, cfg, data.tokenizer_file)
    assert (folder / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    tok = tokenizer_files.load(folder, cfg)
    assert isinstance(tok, HFTokenizer) and tok.encode(TEXT) == load_file(
        path / "tokenizer.json"
    ).encode(TEXT)
    prompt = "the cat sat"
    assert encode(prompt, 32, tok).tolist() == [tok.encode(prompt)]
    with pytest.raises(ConfigError, match="--prompt"):
        encode("the cat " * 40, 32, tok)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model).eval()
    out = sample_text(model, prompt, 10, 1.0, seed=0, tokenizer=tok)
    assert out.text.startswith(prompt) and out.new_tokens == 10
    # A byte run's checkpoint holds the byte tokenizer's json; no file is needed to load it.
    byte_cfg = load_config("tiny")
    tokenizer_files.save(folder, byte_cfg, None)
    assert (folder / "tokenizer.json").read_text() == ByteTokenizer().to_json()
    (folder / "tokenizer.json").unlink()
    assert isinstance(tokenizer_files.load(folder, byte_cfg), ByteTokenizer)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        tokenizer_files.load(folder, cfg)


# Tokenize a corpus several times larger than a memory limit, in a subprocess whose
# data segment (heap and anonymous mappings: RLIMIT_DATA) is capped at what it uses
# after the imports plus HEADROOM. Reading the whole corpus at once fails there.
_BOUNDED = """
import gzip, json, resource, sys
from pathlib import Path
import numpy as np
from turnout.config.train import DataConfig
from turnout.trainer.data.token_cache import prepare_corpus
import tokenizers, pyarrow.parquet  # noqa: F401 - imported before the limit is set

corpus, cache, tokenizer, vocab, headroom = sys.argv[1:6]
def data_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1])
limit = data_kb() * 1024 + int(headroom)
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    Path(corpus).read_bytes()
    print("naive-read-ok")
except MemoryError:
    print("naive-read-failed")
cfg = DataConfig(corpus=corpus, cache_dir=cache, tokenizer=tokenizer, max_bytes=0, workers=1)
path = prepare_corpus(cfg, int(vocab))
print(json.loads((path / "meta.json").read_text())["num_bytes"])
"""


@pytest.mark.parametrize(
    "tokenizer, vocab, size_mb, headroom_mb", [("byte", 256, 320, 64), ("bpe", 1024, 128, 32)]
)
def test_tokenizes_a_corpus_larger_than_its_memory_limit(
    tmp_path: Path, tokenizer: str, vocab: int, size_mb: int, headroom_mb: int
) -> None:
    corpus = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    words = np.array([w.encode() for w in ["alpha", "beta", "gamma", "delta", "épsilon", "\n"]])
    line = b" ".join(rng.choice(words, size=200_000)) + b"\n"
    with corpus.open("wb") as f:
        while f.tell() < size_mb << 20:
            f.write(line)
    cache = tmp_path / "cache"
    if tokenizer == "bpe":  # train the BPE first, unconstrained, on a slice
        small = tmp_path / "small.txt"
        small.write_bytes(corpus.read_bytes()[: 4 << 20])
        cfg = DataConfig(corpus=str(small), cache_dir=str(cache), tokenizer="bpe")
        prepare_corpus(cfg, vocab)
        (cache / "tokenizers" / "user.json").write_text(
            next((cache / "tokenizers").glob("bpe-*.json")).read_text()
        )
        tokenizer = str(cache / "tokenizers" / "user.json")
        vocab = load_file(tokenizer).vocab_size  # a small corpus learns fewer merges
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_BOUNDED),
            str(corpus),
            str(cache),
            tokenizer,
            str(vocab),
            str(headroom_mb << 20),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # Rust threads reserve stacks: the limit is for the data, one thread here.
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == "naive-read-failed"  # the limit is real
    assert int(lines[1]) == corpus.stat().st_size + 1  # every byte, and one EOD
    assert corpus.stat().st_size >= 4 * (headroom_mb << 20)
