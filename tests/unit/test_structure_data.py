"""Structured data (trainer/data/structure): name subtokens and scoring, one function's
graph by hand, the dataset build (skips, split by file, cache) and its reader."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from turnout.config.structure import AstConfig, validate_structure
from turnout.errors import ConfigError
from turnout.trainer.data.structure.ast_graph import (
    CHILD,
    NEXT,
    NODE_TYPES,
    SAME,
    SELF,
    USE,
    function_graph,
    functions,
)
from turnout.trainer.data.structure.dataset import StructureData, parse_warning
from turnout.trainer.data.structure.examples import build, is_val
from turnout.trainer.data.structure.names import score, subtokens
from turnout.trainer.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.unit

FACT = """
def fact(n, acc=1):
    x = n
    x = x + 1
    for i in range(x):
        acc = acc * i
    return fact(n - 1) if n else acc
"""


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("get_HTTPResponse2", ["get", "http", "response", "2"]),
        ("parseURL", ["parse", "url"]),
        ("XMLHttpRequest", ["xml", "http", "request"]),
        ("_private_thing", ["private", "thing"]),
        ("__init__", ["init"]),
        ("_", []),
    ],
)
def test_subtokens(name: str, parts: list[str]) -> None:
    assert subtokens(name) == parts


def test_score_sums_over_examples() -> None:
    s = score([["get", "name"], ["read"], ["set", "x"]], [["get", "file", "name"], ["read"], []])
    # TP 2 + 1 + 0, FP 0 + 0 + 2, FN 1 + 0 + 0: precision 3/5, recall 3/4.
    assert (s.precision, s.recall) == (3 / 5, 3 / 4)
    assert s.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35, rel=1e-12)  # one float formula
    assert s.exact == 1 / 3 and s.examples == 3


def _graph() -> tuple:
    g = function_graph(functions(ast.parse(FACT))[0])
    kinds = {
        k: {(g.labels[a], a, g.labels[b], b) for a, b, t in g.edges if t == k} for k in (0, 1, 2, 3)
    }
    return g, kinds


def test_the_name_is_hidden_and_a_recursive_call_is_self() -> None:
    g, _ = _graph()
    assert g.name == "fact" and g.labels[0] == "" and NODE_TYPES[g.types[0]] == "FunctionDef"
    assert "fact" not in g.labels and g.labels.count(SELF) == 1


def test_tree_edges_parents_and_heights() -> None:
    g, kinds = _graph()
    n = len(g.types)
    assert {(a, b) for _, a, _, b in kinds[CHILD]} == {(g.parent[i], i) for i in range(1, n)}
    assert g.parent[0] == -1 and all(g.parent[i] < i for i in range(1, n))  # pre-order
    for i in range(n):
        kids = [j for j in range(n) if g.parent[j] == i]
        assert g.height[i] == (1 + max(g.height[j] for j in kids) if kids else 0)


def test_def_use_reads_the_last_visible_write() -> None:
    g, kinds = _graph()
    use = {(a_label, b) for a_label, _, _, b in kinds[USE]}
    stores = [i for i, t in enumerate(g.types) if NODE_TYPES[t] == "Name.Store"]
    x1, x2, i_var, acc_w = stores  # x = n; x = x + 1; for i; acc = acc * i
    params = {g.labels[i]: i for i, t in enumerate(g.types) if NODE_TYPES[t] == "arg"}
    # x = x + 1 reads the first x (its own write is visible only after the statement);
    # range(x) the second; acc * i the parameter acc and the loop's i; the return's
    # acc the loop's write (the last in source order: control flow is not followed).
    reads = [(g.labels[a], b) for _, a, _, b in sorted(kinds[USE], key=lambda e: e[1])]
    assert reads == [
        ("n", params["n"]),
        ("x", x1),
        ("x", x2),
        ("acc", params["acc"]),
        ("i", i_var),
        ("n", params["n"]),
        ("n", params["n"]),
        ("acc", acc_w),
    ]
    assert ("range", 0) not in use  # a name never written here has no def-use edge


def test_next_follows_source_order_and_same_links_occurrences() -> None:
    g, kinds = _graph()
    order = {a: b for _, a, _, b in kinds[NEXT]}
    start = next(iter(set(order) - set(order.values())))
    walk = [start]
    while walk[-1] in order:
        walk.append(order[walk[-1]])
    labels = [g.labels[i] for i in walk]
    # The IfExp's body comes before its test in the source: fact(n - 1) if n else acc.
    assert labels == ["n", "acc", "1", "x", "n", "x", "x", "1", "i", "range", "x", "acc",
                      "acc", "i", SELF, "n", "1", "n", "acc"]  # fmt: skip
    same = {(a_label, b_label) for a_label, _, b_label, _ in kinds[SAME]}
    # n, x and acc occur 4 times each (3 links apiece), i twice (1): 10 links.
    assert all(a == b for a, b in same) and len(kinds[SAME]) == 10


def test_every_node_type_of_a_stdlib_module_is_known() -> None:
    import json as module

    tree = ast.parse(Path(module.__file__).with_name("decoder.py").read_text())
    for fn in functions(tree):
        assert 0 not in function_graph(fn).types, fn.name


def _corpus(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text(
        "def read_config(path):\n    with open(path) as f:\n        return f.read()\n\n"
        "class C:\n    def __init__(self):\n        self.x = 1\n\n"
        "    def get_value(self, key):\n        return self.values[key] if key else None\n"
        "def stub():\n    pass\n"
    )
    (root / "pkg" / "b.py").write_text("def broken(:\n    pass\n")
    (root / "c.py").write_text(
        "def parse_header_line(line):\n    name, _, value = line.partition(':')\n"
        "    return name.strip(), value.strip()\n"
    )
    return root


def test_build_skips_what_it_must_and_counts_it(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    cfg = AstConfig(min_nodes=6)
    out, stats = build(str(corpus), ByteTokenizer(), cfg, tmp_path / "cache", val_fraction=0.0)
    assert (stats.files, stats.parsed, stats.failed) == (3, 2, 1)
    assert "b.py" in stats.first_failure and "SyntaxError" in stats.first_failure
    line = parse_warning(stats)
    assert line is not None and "1 of 3 file(s)" in line and "\n" not in line
    assert (stats.functions, stats.dunders, stats.too_small) == (5, 1, 1)
    data = StructureData(out)
    assert sorted(data.splits["train"].names) == ["get_value", "parse_header_line", "read_config"]
    ex = data.splits["train"].example(data.splits["train"].names.index("read_config"))
    assert ex.parent_N[0] == -1 and (ex.parent_N[1:] < np.arange(1, len(ex.parent_N))).all()
    assert ex.tokens_NL.shape == (len(ex.types_N), cfg.label_tokens)
    labels = {bytes(int(t) for t in row if t >= 0).decode() for row in ex.tokens_NL}
    assert {"path", "open", "f", "read"} <= labels and "read_config" not in labels
    assert data.target_ids("read_config") == [data.targets.index("read"),
                                              data.targets.index("config")]  # fmt: skip
    assert data.target_ids("zzz_qqq") == [data.unk_id(), data.unk_id()]


def test_the_split_is_by_file_and_the_cache_is_reused(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    held = [r for r in ("pkg/a.py", "c.py") if is_val(r, 0.5)]
    out, stats = build(str(corpus), ByteTokenizer(), AstConfig(), tmp_path / "cache", 0.5)
    data = StructureData(out)
    files = data.meta["files"]
    for split in ("train", "val"):
        idx = data.splits[split].a["file_index"]
        assert all((files[i] in held) == (split == "val") for i in idx)
    stamp = (out / "meta.json").stat().st_mtime_ns
    again, _ = build(str(corpus), ByteTokenizer(), AstConfig(), tmp_path / "cache", 0.5)
    assert again == out and (out / "meta.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]  # no temp left
    (corpus / "zz").mkdir()  # a new folder beside the old files moves none of them
    (corpus / "zz" / "d.py").write_text("def fresh_one(a):\n    return a + a * a - a\n")
    grown, _ = build(str(corpus), ByteTokenizer(), AstConfig(), tmp_path / "cache", 0.5)
    grown_data = StructureData(grown)
    for split in ("train", "val"):
        kept = {grown_data.meta["files"][i] for i in grown_data.splits[split].a["file_index"]}
        old = {files[i] for i in data.splits[split].a["file_index"]}
        assert old <= kept
    (corpus / "c.py").write_text("def other_name(a):\n    return a + a * a - a\n")
    os.utime(corpus / "c.py", ns=(1, 1))
    changed, _ = build(str(corpus), ByteTokenizer(), AstConfig(), tmp_path / "cache", 0.5)
    assert changed != out


def test_a_corpus_without_functions_is_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("print('hi')\n")
    with pytest.raises(ConfigError) as err:
        build(str(tmp_path / "x.py"), ByteTokenizer(), AstConfig(), tmp_path / "cache", 0.0)
    assert err.value.key == "data.corpus" and "no function" in str(err.value)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"max_nodes": 0}, "data.ast.max_nodes"),
        ({"label_tokens": 0}, "data.ast.label_tokens"),
        ({"min_nodes": 600}, "data.ast.min_nodes"),
    ],
)
def test_bad_options_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_structure(AstConfig(**change))
    assert err.value.key == key


SCOPES = """
def save(self, x):
    g = lambda x: x + 1
    ys = [x for x, w in pairs if w]
    z = [x]
    super().save(a.b.c, save=1)
    def inner(q):
        for x in q:
            pass
        return x
    return x
"""


def test_the_name_is_hidden_wherever_it_appears() -> None:
    g = function_graph(functions(ast.parse(SCOPES))[0])
    assert "save" not in g.labels and g.labels.count(SELF) == 2  # .save( and save=1


def test_def_use_keeps_lambdas_comprehensions_and_nested_defs_to_themselves() -> None:
    g = function_graph(functions(ast.parse(SCOPES))[0])
    line = {i: ln for i, ln in enumerate(_lines(g))}
    reads = sorted((line[a], g.labels[a], line[b]) for a, b, t in g.edges if t == USE)
    assert reads == [
        (3, "x", 3),  # the lambda's body reads its own parameter
        (4, "w", 4),  # the comprehension's condition and element read its variables,
        (4, "x", 4),  # not the function's parameter
        (5, "x", 2),  # past them, x is the parameter again
        (8, "q", 7),
        (10, "x", 8),  # the nested function's loop variable, inside it
        (11, "x", 2),  # and the parameter outside
    ]


def test_an_attribute_comes_after_its_value_in_the_token_order() -> None:
    g = function_graph(functions(ast.parse("def f():\n    return a.b.c\n"))[0])
    assert [g.labels[b] for a, b, t in g.edges if t == NEXT] == ["b", "c"]


def _lines(g: object) -> list[int]:
    """Each node's source line (the graph keeps none: recomputed from the tree walk)."""
    fn = functions(ast.parse(SCOPES))[0]
    out: list[int] = []
    stack: list[tuple[ast.AST, int]] = [(fn, fn.lineno)]
    while stack:
        node, at = stack.pop()
        here = getattr(node, "lineno", at)
        out.append(here)
        kids = [
            v
            for _, value in ast.iter_fields(node)
            for v in (value if isinstance(value, list) else [value])
            if isinstance(v, ast.AST)
            and not isinstance(
                v, (ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop)
            )
        ]
        stack.extend((k, here) for k in reversed(kids))
    return out
