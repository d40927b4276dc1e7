"""The checkpoint manifest: written for the files present, verified file by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turnout.errors import CheckpointError
from turnout.trainer.checkpointing import manifest


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step4"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"\x00\x01" * 5000)
    (folder / "sub" / "b.txt").write_text("hello\n")
    return folder


def test_manifest_lists_every_file_with_size_and_sha(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    manifest.write(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == {"a.bin", "sub/b.txt"}
    assert files["a.bin"]["bytes"] == 10000
    assert files["sub/b.txt"] == manifest.file_entry(folder / "sub" / "b.txt")
    manifest.verify(folder)
    assert manifest.is_complete(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


def test_known_entries_are_trusted_not_rehashed(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    fake = {"bytes": 10000, "sha256": "0" * 64}
    manifest.write(folder, {"a.bin": fake})
    assert manifest.read(folder)["a.bin"] == fake
    with pytest.raises(CheckpointError, match="a.bin does not match its sha256"):
        manifest.verify(folder)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: (f / "a.bin").write_bytes(b"\x00"), r"a.bin has 1 bytes.*truncated"),
        (lambda f: (f / "sub" / "b.txt").write_text("jello\n"), r"b.txt does not match"),
        (lambda f: (f / "sub" / "b.txt").unlink(), r"b.txt is missing"),
        (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe junk"), r"manifest.json is dam"),
        (lambda f: (f / "manifest.json").unlink(), r"has no manifest.json"),
    ],
)
def test_damage_is_named(tmp_path: Path, damage, match: str) -> None:
    folder = _folder(tmp_path)
    manifest.write(folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=match):
        manifest.verify(folder)
    if "match" not in match:  # a content change of the same size passes the cheap check
        assert not manifest.is_complete(folder)
