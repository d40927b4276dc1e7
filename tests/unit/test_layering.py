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


# ----------------------------------------------------------------------------- rooms
# trainer/ and launch/ keep flat files (the "hall": the loop and its pieces, the command)
# and rooms (sub-packages, one concern each). A room's __init__ names in ``__all__`` the
# modules other code may import; the rest are the room's own. Tests may import any module.

ROOMED = [("trainer", "turnout.trainer"), ("launch", "turnout.launch")]


def room_exports(root: Path, folder: str, room: str) -> list[str] | None:
    """``__all__`` of a room's __init__ (read with ast), None when it has none."""
    tree = ast.parse((root / folder / room / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return None


def rooms(root: Path, folder: str) -> list[str]:
    return sorted(p.parent.name for p in (root / folder).glob("*/__init__.py"))


def unit_of(root: Path, folder: str, package: str, module: str) -> tuple[str, str] | None:
    """(unit, module inside the room or '') of a dotted module of this layer: a unit is a
    room or a flat file of the hall. None for modules of other layers."""
    if not module.startswith(package + "."):
        return None
    head, _, rest = module[len(package) + 1 :].partition(".")
    if (root / folder / head / "__init__.py").is_file():
        return head, rest.partition(".")[0]
    return head, ""


def imports_with_names(path: Path) -> list[tuple[int, str]]:
    """:func:`imports`, plus ``pkg.name`` for every ``from pkg import name`` (a name may be
    a module: ``from turnout.trainer.data import corpus``)."""
    out = imports(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def unit_imports(root: Path, folder: str, package: str) -> list[tuple[Path, int, str, str, str]]:
    """(file, line, importing unit, imported unit, module inside it) for every import of
    this layer's own modules across units."""
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        rel = path.relative_to(root / folder)
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, mod in imports_with_names(path):
            unit = unit_of(root, folder, package, mod)
            if unit is not None and unit[0] != me:
                out.append((path, line, me, *unit))
    return out


def room_violations(root: Path, folder: str, package: str) -> list[str]:
    """Private-module imports from outside a room, rooms without a docstring and
    ``__all__``, and import circles between units."""
    bad = []
    exports = {}
    for room in rooms(root, folder):
        init = root / folder / room / "__init__.py"
        if not ast.get_docstring(ast.parse(init.read_text())):
            bad.append(f"{init.relative_to(root)}: a room says what it owns in a docstring")
        names = room_exports(root, folder, room)
        if names is None:
            bad.append(f"{init.relative_to(root)}: no __all__ naming the room's public modules")
            names = []
        here = root / folder / room  # a public module is a file or a package of the room
        missing = [
            n
            for n in names
            if not ((here / f"{n}.py").is_file() or (here / n / "__init__.py").is_file())
        ]
        if missing:
            bad.append(f"{init.relative_to(root)}: __all__ names no such module {missing}")
        exports[room] = set(names)
    edges: dict[str, set[str]] = {}
    for path, line, me, unit, inner in unit_imports(root, folder, package):
        edges.setdefault(me, set()).add(unit)
        if unit in exports and inner and inner not in exports[unit]:
            bad.append(
                f"{path.relative_to(root)}:{line} imports {package}.{unit}.{inner}, "
                f"private to {folder}/{unit}/ (its __all__: {sorted(exports[unit])})"
            )
    bad.extend(f"{folder}/: import circle {' -> '.join(c)}" for c in circles(edges))
    return bad


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the unit graph that has one."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    return found


@pytest.mark.parametrize("folder,package", ROOMED)
def test_rooms_keep_their_private_modules_and_no_circles(folder: str, package: str) -> None:
    assert rooms(ROOT, folder), f"{folder}/ has no rooms"
    bad = room_violations(ROOT, folder, package)
    assert not bad, "\n".join(bad)


def test_the_room_checker_catches_a_private_import_and_a_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "trainer"
    for room, init in (("a", '"""A."""\n__all__ = ["pub"]\n'), ("b", '"""B."""\n')):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text(init)
    (pkg / "a" / "pub.py").write_text("from turnout.trainer.b.x import y\n")
    (pkg / "a" / "own.py").write_text("")
    (pkg / "b" / "x.py").write_text("from turnout.trainer.a.own import z\n")
    (pkg / "hall.py").write_text("from turnout.trainer.a import pub\n")
    (pkg / "other.py").write_text("from turnout.trainer.a import own\n")
    bad = room_violations(tmp_path, "trainer", "turnout.trainer")
    assert any("imports turnout.trainer.a.own, private to trainer/a/" in b for b in bad), bad
    assert any("trainer/b/__init__.py: no __all__" in b for b in bad), bad
    assert any("import circle a -> b -> a" in b for b in bad), bad
    assert any(b.startswith("trainer/other.py:1 imports turnout.trainer.a.own") for b in bad), bad
    assert not any("hall.py" in b for b in bad), bad  # the room's public module is fine
