"""Where the text comes from: a corpus spec -> files -> shards -> documents, streamed.

A corpus (``data.corpus`` / ``data.val_corpus``) is ``stdlib`` (this Python's own
standard-library sources), a file, a folder (walked in name order) or a glob; each file's
format follows its suffix:

- ``.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz``): one JSON object per line, its
  ``data.text_field`` is a document;
- ``.parquet``: one document per row of the ``data.text_field`` column (read one record
  batch at a time with pyarrow);
- anything else: a text file, the whole file one document (binary files, those with a NUL
  byte in their first 8 KiB, are refused when named alone and skipped inside a folder).

:func:`documents` streams a file as ``(piece, end)`` pairs: UTF-8 ``piece`` bytes, ``end``
true on a document's last piece. A large text file arrives in pieces of about
``PIECE_BYTES`` cut after a newline (or at a character boundary), so memory stays bounded
whatever the file size. Bad input is a :class:`ConfigError` naming the key and the file
with its line or row.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from turnout.errors import ConfigError

PIECE_BYTES = 1 << 16
"""Text is read and tokenized in pieces of about this many bytes (64 KiB)."""
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
_JSONL = (".jsonl", ".json", ".ndjson")
_PARQUET = (".parquet", ".pq")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One corpus file and what identifies its content for the cache key."""

    path: str
    kind: str
    """'text', 'jsonl' (also gzipped) or 'parquet'."""
    size: int
    mtime_ns: int


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_JSONL):
        return "jsonl"
    if name.endswith(_PARQUET):
        return "parquet"
    return "text"


def _looks_binary(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def _source(path: Path, key: str) -> Source:
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    return Source(str(path.resolve()), file_kind(path), st.st_size, st.st_mtime_ns)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _walk(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if name.startswith(".") or not f.is_file():
                continue
            if file_kind(f) == "text" and _looks_binary(f):
                continue  # a folder may hold images and the like beside its text
            files.append(f)
    return files


def _named_file(f: Path, spec: str, key: str) -> Path:
    if not os.access(f, os.R_OK):
        raise ConfigError(key, f"cannot read {f}")
    if file_kind(f) == "text" and _looks_binary(f):
        raise ConfigError(key, f"{f} is a binary file, not text (in {spec})")
    return f


def list_sources(spec: str, key: str = "data.corpus") -> list[Source]:
    """The files of a corpus spec, in reading order (deterministic); ConfigError(key)
    when it names nothing readable."""
    if spec == "stdlib":
        files = _stdlib_files()
    elif any(c in spec for c in _GLOB_CHARS):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise ConfigError(key, f"no files match {spec}")
        files = []
        for m in map(Path, matches):
            files.extend(_walk(m) if m.is_dir() else [_named_file(m, spec, key)])
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(key, f"no such file or directory: {spec}")
        if path.is_file():
            files = [_named_file(path, spec, key)]
        elif path.is_dir():
            files = _walk(path)
            if not files:
                raise ConfigError(key, f"directory {spec} holds no readable text files")
        else:
            raise ConfigError(key, f"{spec} is neither a file nor a directory")
    if not files:
        raise ConfigError(key, f"no source files found for corpus {spec!r}")
    return [_source(f, key) for f in files]


def corpus_root(spec: str, sources: list[Source]) -> str:
    """The folder a corpus spec names (stdlib: the standard library's; a glob: its folder
    before the first wildcard; a folder: itself; a file: its folder). Paths relative to it
    do not change when files are added beside the old ones."""
    if spec == "stdlib":
        return str(_stdlib_root().resolve())
    wild = [i for i, ch in enumerate(spec) if ch in _GLOB_CHARS]
    head = (os.path.dirname(spec[: wild[0]]) or ".") if wild else spec
    path = Path(head).expanduser().resolve()
    if path.is_dir():
        return str(path)
    return os.path.dirname(sources[0].path) if sources else str(path.parent)


def fingerprint(spec: str, sources: list[Source], *extra: object) -> str:
    """Hash of what determines the text: file names, sizes, mtimes, and ``extra``."""
    h = hashlib.sha256()
    h.update("|".join(map(str, (spec, *extra))).encode())
    if spec == "stdlib":
        h.update(sys.version.encode())
    for s in sources:
        h.update(f"|{s.path}|{s.size}|{s.mtime_ns}".encode())
    return h.hexdigest()[:20]


def group_shards(sources: list[Source], max_bytes: int) -> list[list[Source]]:
    """Group consecutive files into shards, the unit of parallel work and of resuming.

    A JSONL or Parquet file is a shard of its own; small text files are grouped up to a
    target size that depends on the corpus only (so the grouping, and a resumed cache, do not
    depend on the worker count). With ``max_bytes``, text files past it are left out.
    """
    total = sum(s.size for s in sources)
    target = min(max(total // 16, 1 << 20), 1 << 27)
    shards: list[list[Source]] = []
    group: list[Source] = []
    group_size = seen = 0
    for s in sources:
        if max_bytes and seen >= max_bytes:
            break
        if s.kind != "text":
            if group:
                shards.append(group)
                group, group_size = [], 0
            shards.append([s])
            continue
        seen += s.size
        group.append(s)
        group_size += s.size
        if group_size >= target:
            shards.append(group)
            group, group_size = [], 0
    if group:
        shards.append(group)
    return shards


# ----------------------------------------------------------------------------- documents


def _text_pieces(path: Path, key: str) -> Iterator[tuple[bytes, bool]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    with f:
        carry = b""
        while True:
            block = f.read(PIECE_BYTES)
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no newline: cut before the last (maybe incomplete) character
                cut = len(data)
                for c in range(len(data) - 1, max(len(data) - 5, -1), -1):
                    if (data[c] & 0xC0) != 0x80:
                        cut = c or len(data)
                        break
            piece, carry = data[:cut], data[cut:]
            if piece:
                yield piece, False
        yield carry, True


def _jsonl_docs(path: Path, field: str, key: str) -> Iterator[tuple[bytes, bool]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        raw = opener(path, "rb")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None
    lineno = 0
    try:
        with io.TextIOWrapper(raw, encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, start=1):  # noqa: B007 - used in errors
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ConfigError(key, f"{path}:{lineno}: not JSON ({e})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise ConfigError(key, f"{path}:{lineno}: no field {field!r} (data.text_field)")
                text = obj[field]
                if not isinstance(text, str):
                    raise ConfigError(
                        key, f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not text"
                    )
                if text:
                    yield text.encode("utf-8", errors="replace"), True
    except (OSError, EOFError, UnicodeDecodeError) as e:  # a bad gzip stream, bad UTF-8
        where = f"{path}:{lineno + 1}"
        raise ConfigError(key, f"{where}: cannot read ({type(e).__name__}: {e})") from None


def _parquet_docs(path: Path, field: str, key: str) -> Iterator[tuple[bytes, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(key, f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(
            key, f"{path}: no column {field!r} (data.text_field); it has {', '.join(names)}"
        )
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(key, f"{path}: column {field!r} is {kind}, not text")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text:
                    yield text.encode("utf-8", errors="replace"), True
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(key, f"{path}: row {row + 1}: cannot read ({e})") from None


def documents(source: Source, field: str, key: str) -> Iterator[tuple[bytes, bool]]:
    """``(piece, end)`` pairs of one file's documents, streamed (see the module doc)."""
    path = Path(source.path)
    if source.kind == "jsonl":
        return _jsonl_docs(path, field, key)
    if source.kind == "parquet":
        return _parquet_docs(path, field, key)
    return _text_pieces(path, key)
