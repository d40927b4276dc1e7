"""The function-name dataset: corpus files -> parsed functions -> cached arrays, split by file.

Shape legend: F functions (examples) of a split, N their nodes in all, M their edges in
all, L ``data.ast.label_tokens``.

:func:`build` reads the corpus's text files one at a time (``data.corpus``; the first
``max_bytes`` of it), parses each with :mod:`ast` and turns every function (methods and
nested functions included) into one example through :func:`ast_graph.function_graph`:
the input is the function's graph with its name hidden, the target its name's subtokens.
Left out, and counted: special methods (``__x__``, unless ``keep_dunders``), names with
no subtoken (``_``) and functions with fewer than ``min_nodes`` or more than
``max_nodes`` nodes. A file that does not parse (a syntax error, a null byte, an
encoding it does not declare) is counted and skipped; :func:`build` returns the counts
and the first such file, and the caller warns once.

**Split by file**, so no file has functions on both sides: a file is held out for
validation when the first 8 bytes of the SHA-256 of its path relative to the corpus root
(``corpus.corpus_root``: the folder the spec names), read as a fraction of 2^64, fall
below ``val_fraction``. The split depends on the corpus layout only, not on the machine
or the read order, and files added later do not move the others.

**Cache**: the arrays of each split go to ``<cache_dir>/structure-<fingerprint>/``
(``train.npz``, ``val.npz``, ``meta.json``), written under a temporary name and renamed
into place, so a reader sees a whole cache or none. The fingerprint covers the corpus
files (names, sizes, mtimes), the options, the tokenizer and :data:`FORMAT`; an
unchanged corpus is read back, not parsed again.

Per split the arrays are: ``types`` [N] int16, ``tokens`` [N, L] int32 (the label's
token ids, ``-1`` padding), ``parent`` [N] int32 (in-function index, -1 for the root),
``height`` [N] int16, ``edges`` [M, 3] int32 (src, dst, type, in-function indices),
``node_off`` / ``edge_off`` [F + 1] int64 (example f's nodes are
``node_off[f]:node_off[f+1]``), ``line`` [F] int32, ``file_index`` [F] int32 (an index into
``meta.json``'s file list); the names are in ``meta.json`` under the split's name.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from turnout.config.structure import AstConfig
from turnout.errors import ConfigError
from turnout.trainer.data.corpus import corpus_root, fingerprint, list_sources
from turnout.trainer.data.structure.ast_graph import (
    EDGE_TYPES,
    NODE_TYPES,
    FunctionGraph,
    function_graph,
    functions,
)
from turnout.trainer.data.structure.names import subtokens
from turnout.trainer.data.tokenizer import Tokenizer

FORMAT = 1
"""Bumped whenever what an example holds changes (the cache key includes it)."""
SPLITS = ("train", "val")
UNK = "<unk>"


@dataclass
class BuildStats:
    files: int = 0
    parsed: int = 0
    failed: int = 0
    first_failure: str = ""
    functions: int = 0
    kept: int = 0
    dunders: int = 0
    unnamed: int = 0
    """Functions whose name has no subtoken to predict (``_``, ``__``)."""
    too_small: int = 0
    too_large: int = 0
    val_files: int = 0
    examples: dict[str, int] = field(default_factory=dict)


def is_val(relative: str, val_fraction: float) -> bool:
    """Whether the file at ``relative`` (to the corpus root) is held out."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class _Split:
    """The arrays of one split, grown function by function."""

    def __init__(self, label_tokens: int) -> None:
        self.L = label_tokens
        self.types: list[int] = []
        self.tokens: list[list[int]] = []
        self.parent: list[int] = []
        self.height: list[int] = []
        self.edges: list[tuple[int, int, int]] = []
        self.node_off = [0]
        self.edge_off = [0]
        self.line: list[int] = []
        self.file: list[int] = []
        self.names: list[str] = []

    def add(self, g: FunctionGraph, ids_of: dict[str, list[int]], file: int) -> None:
        self.types += g.types
        self.tokens += [ids_of[label] for label in g.labels]
        self.parent += g.parent
        self.height += g.height
        self.edges += g.edges
        self.node_off.append(len(self.types))
        self.edge_off.append(len(self.edges))
        self.line.append(g.line)
        self.file.append(file)
        self.names.append(g.name)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            types=np.asarray(self.types, np.int16),
            tokens=np.asarray(self.tokens, np.int32).reshape(-1, self.L),
            parent=np.asarray(self.parent, np.int32),
            height=np.asarray(self.height, np.int16),
            edges=np.asarray(self.edges, np.int32).reshape(-1, 3),
            node_off=np.asarray(self.node_off, np.int64),
            edge_off=np.asarray(self.edge_off, np.int64),
            line=np.asarray(self.line, np.int32),
            file_index=np.asarray(self.file, np.int32),
        )


def _label_ids(label: str, tok: Tokenizer, L: int, memo: dict[str, list[int]]) -> None:
    if label not in memo:
        ids = tok.encode(label)[:L] if label else []
        memo[label] = ids + [-1] * (L - len(ids))


def target_vocab(names: list[str], size: int) -> list[str]:
    """``<unk>`` then the ``size`` most frequent subtokens of ``names`` (ties: alphabetical)."""
    counts = Counter(s for name in names for s in subtokens(name))
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    return [UNK, *ranked[:size]]


def build(
    corpus: str,
    tok: Tokenizer,
    cfg: AstConfig,
    cache_dir: str | Path,
    val_fraction: float,
    max_bytes: int = 0,
    key: str = "data.corpus",
) -> tuple[Path, BuildStats]:
    """The cache folder of this corpus's examples (built unless already there)."""
    sources = [s for s in list_sources(corpus, key) if s.kind == "text"]
    if not sources:
        raise ConfigError(key, f"{corpus} holds no text files to parse as Python")
    opts = json.dumps(asdict(cfg), sort_keys=True)
    fp = fingerprint(
        corpus, sources, "structure", FORMAT, opts, tok.digest, val_fraction, max_bytes
    )
    out = Path(cache_dir) / f"structure-{fp}"
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        return out, BuildStats(**meta["stats"])
    root = corpus_root(corpus, sources)
    stats = BuildStats()
    splits = {s: _Split(cfg.label_tokens) for s in SPLITS}
    files: list[str] = []
    memo: dict[str, list[int]] = {}
    read = 0
    for src in sources:
        if max_bytes and read >= max_bytes:
            break
        read += src.size
        stats.files += 1
        relative = os.path.relpath(src.path, root)
        try:
            data = Path(src.path).read_bytes()
            with warnings.catch_warnings():  # invalid escapes in old sources: not ours
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(data, filename=relative)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OSError) as e:
            stats.failed += 1
            if not stats.first_failure:
                stats.first_failure = f"{src.path}: {type(e).__name__}: {e}"
            continue
        stats.parsed += 1
        split = "val" if is_val(relative, val_fraction) else "train"
        stats.val_files += split == "val"
        index = len(files)
        files.append(relative)
        for fn in functions(tree):
            stats.functions += 1
            if not cfg.keep_dunders and fn.name.startswith("__") and fn.name.endswith("__"):
                stats.dunders += 1
                continue
            if not subtokens(fn.name):  # '_' and the like: nothing to predict
                stats.unnamed += 1
                continue
            g = function_graph(fn)
            if len(g.types) < cfg.min_nodes:
                stats.too_small += 1
                continue
            if len(g.types) > cfg.max_nodes:
                stats.too_large += 1
                continue
            for label in g.labels:
                _label_ids(label, tok, cfg.label_tokens, memo)
            splits[split].add(g, memo, index)
            stats.kept += 1
    stats.examples = {s: len(splits[s].names) for s in SPLITS}
    if not stats.examples["train"]:
        raise ConfigError(key, f"no function of {corpus} made a training example ({stats})")
    meta = {
        "format": FORMAT,
        "corpus": corpus,
        "root": root,
        "files": files,
        "node_types": list(NODE_TYPES),
        "edge_types": list(EDGE_TYPES),
        "options": asdict(cfg),
        "tokenizer": tok.digest,
        "targets": target_vocab(splits["train"].names, cfg.target_vocab),
        "names": {s: splits[s].names for s in SPLITS},
        "stats": asdict(stats),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for s in SPLITS:
            splits[s].save(tmp / f"{s}.npz")
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.rename(out)
    except OSError:
        if not (out / "meta.json").is_file():
            raise  # not another process's whole cache: a real failure
        # Another process finished the same cache first: keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, stats
