"""The import order holds: turnout (neutral) <- models <- parallel <- trainer <- launch.

Every ``import``/``from`` statement of every package file is read with ``ast``, lazy ones
inside functions included, and mapped to its layer. An import that runs up the order
fails, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Folder of each layer, lowest first, and the dotted package it is installed as.
LAYERS = [
    ("turnout", "turnout"),
    ("models", "turnout.models"),
    ("parallel", "turnout.parallel"),
    ("trainer", "turnout.trainer"),
    ("launch", "turnout.launch"),
]


def layer_of_module(name: str) -> int | None:
    """Layer index of a dotted turnout module, None for third-party modules."""
    if name != "turnout" and not name.startswith("turnout."):
        return None
    best = 0
    for i, (_, package) in enumerate(LAYERS):
        if name == package or name.startswith(package + "."):
            best = i
    return best


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            mod = node.module or ""
            out.append((node.lineno, mod))
            # `from turnout import launch` names a subpackage
            out.extend((node.lineno, f"{mod}.{a.name}") for a in node.names if mod == "turnout")
    return out


def package_files() -> list[tuple[int, Path]]:
    files = []
    for i, (folder, _) in enumerate(LAYERS):
        files.extend((i, p) for p in sorted((ROOT / folder).rglob("*.py")))
    return files


def test_every_layer_has_files() -> None:
    layers = {i for i, _ in package_files()}
    assert layers == set(range(len(LAYERS)))


@pytest.mark.parametrize("layer,path", package_files(), ids=lambda v: str(v))
def test_no_import_runs_up_the_order(layer: int, path: Path) -> None:
    bad = []
    for line, mod in imports(path):
        target = layer_of_module(mod)
        if target is not None and target > layer:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} ({LAYERS[target][0]}/)")
        if layer == 1 and (mod == "torch.distributed" or mod.startswith("torch.distributed.")):
            bad.append(f"{path.relative_to(ROOT)}:{line}: models/ never imports {mod}")
        if layer == 0 and mod.split(".")[0] == "torch":
            bad.append(f"{path.relative_to(ROOT)}:{line}: the neutral floor never imports torch")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from turnout.trainer.train import train\n")
    assert [layer_of_module(m) for _, m in imports(f)] == [3]
    assert layer_of_module("turnout.config.model") == 0
    assert layer_of_module("torch.nn") is None
