"""One Python function as a graph: its syntax tree plus name and data-flow edges.

Shape legend: N nodes of one function, M edges.

**Nodes** are the function's AST nodes in pre-order (a parent before its children,
children in the order of the node's fields), the ``FunctionDef`` itself first (node 0,
the root). Operators and expression contexts are not nodes of their own: they name the
node that holds them (``BinOp.Add``, ``Name.Store``, ``Compare.Lt``: the first operator
of a chain). A node has

- a **type** from :data:`NODE_TYPES`, a fixed list (so that ids do not depend on the
  Python version; a class it lacks is ``<other>``);
- a **label**, the identifier or literal it holds: ``Name`` its id, ``arg`` its name,
  ``Attribute`` the attribute, ``keyword`` the keyword, ``alias`` the imported name,
  a nested ``FunctionDef``/``ClassDef`` its name, ``ImportFrom`` the module, ``Constant``
  its value (a string cut to :data:`LABEL_CHARS` characters, a number as written);
  ``''`` for the rest.

The task predicts the function's name, so the name appears nowhere: the root's label is
``''`` and every other label equal to it (a recursive call, ``self.save()`` inside
``save``, a keyword or nested definition of that name) is :data:`SELF`.

**Edges** ``(src, dst)`` and their types:

- ``CHILD``: parent -> child, the tree;
- ``NEXT``: each labelled node -> the next labelled node in source order (line, column;
  an attribute's name at its end, after its value: ``a.b.c`` is a, b, c), the token
  sequence;
- ``SAME``: each identifier occurrence (``Name``, ``arg``, ``Attribute``) -> the previous
  occurrence of the same identifier in source order;
- ``USE``: each read of a variable (``Name.Load``) -> the last write of that name
  (``Name.Store``, ``Name.Del`` or a parameter) visible before it in source order, the
  "last lexical write" approximation of def-use. A write in an assignment statement
  (``Assign``, ``AugAssign``, ``AnnAssign``) becomes visible where that statement ends, so
  ``x = x + 1`` reads the earlier ``x``; other writes (a ``for`` target, a ``with ... as``
  name, a parameter, a lambda's or a comprehension's variable, a walrus target) where
  they are written. Control flow is not followed.

Each edge is listed once, in the direction given; a model that wants messages both ways
adds the reverse. :func:`function_graph` also gives every node's **height** (0 for a leaf,
1 + the largest child height otherwise): the levels a Tree-LSTM runs bottom-up.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

SELF = "<self>"
"""The label of a use of the function's own name inside its body."""
LABEL_CHARS = 24
"""A string constant's label keeps its first this-many characters."""

CHILD, NEXT, SAME, USE = 0, 1, 2, 3
EDGE_TYPES = ("child", "next", "same", "use")

_BASES = [
    "FunctionDef",
    "AsyncFunctionDef",
    "ClassDef",
    "Return",
    "Delete",
    "Assign",
    "AugAssign",
    "AnnAssign",
    "For",
    "AsyncFor",
    "While",
    "If",
    "With",
    "AsyncWith",
    "Match",
    "Raise",
    "Try",
    "TryStar",
    "Assert",
    "Import",
    "ImportFrom",
    "Global",
    "Nonlocal",
    "Expr",
    "Pass",
    "Break",
    "Continue",
    "BoolOp",
    "NamedExpr",
    "BinOp",
    "UnaryOp",
    "Lambda",
    "IfExp",
    "Dict",
    "Set",
    "ListComp",
    "SetComp",
    "DictComp",
    "GeneratorExp",
    "Await",
    "Yield",
    "YieldFrom",
    "Compare",
    "Call",
    "FormattedValue",
    "JoinedStr",
    "Constant",
    "Attribute",
    "Subscript",
    "Starred",
    "Name",
    "List",
    "Tuple",
    "Slice",
    "comprehension",
    "ExceptHandler",
    "arguments",
    "arg",
    "keyword",
    "alias",
    "withitem",
    "match_case",
    "MatchValue",
    "MatchSingleton",
    "MatchSequence",
    "MatchMapping",
    "MatchClass",
    "MatchStar",
    "MatchAs",
    "MatchOr",
]
_OPS = [
    "Add",
    "Sub",
    "Mult",
    "MatMult",
    "Div",
    "Mod",
    "Pow",
    "LShift",
    "RShift",
    "BitOr",
    "BitXor",
    "BitAnd",
    "FloorDiv",
    "And",
    "Or",
    "Invert",
    "Not",
    "UAdd",
    "USub",
    "Eq",
    "NotEq",
    "Lt",
    "LtE",
    "Gt",
    "GtE",
    "Is",
    "IsNot",
    "In",
    "NotIn",
]
_CTX = ("Load", "Store", "Del")
_WITH_OP = {"BinOp": "op", "UnaryOp": "op", "BoolOp": "op", "AugAssign": "op", "Compare": "ops"}
_WITH_CTX = ("Name", "Attribute", "Subscript", "Starred", "List", "Tuple")

NODE_TYPES: tuple[str, ...] = (
    "<other>",
    *(b for b in _BASES if b not in _WITH_OP and b not in _WITH_CTX),
    *(f"{b}.{op}" for b in _WITH_OP for op in _OPS),
    *(f"{b}.{c}" for b in _WITH_CTX for c in _CTX),
)
"""Every node type, id = index; fixed, whatever the Python version."""
_TYPE_ID = {t: i for i, t in enumerate(NODE_TYPES)}
_SKIP = (ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop, ast.type_ignore)
_ASSIGNS = (ast.Assign, ast.AugAssign, ast.AnnAssign)


@dataclass
class FunctionGraph:
    """One function: the example's input (its graph) and target (its name)."""

    name: str
    types: list[int]
    """[N] node type ids (:data:`NODE_TYPES`)."""
    labels: list[str]
    """[N] node labels ('' for none)."""
    parent: list[int]
    """[N] parent index, -1 for the root."""
    height: list[int]
    """[N] 0 for a leaf, else 1 + the largest child height."""
    edges: list[tuple[int, int, int]]
    """[M] (src, dst, edge type)."""
    line: int
    """Where the function starts in its file (1-based)."""


def node_type(node: ast.AST) -> str:
    base = type(node).__name__
    if base in _WITH_OP:
        op = getattr(node, _WITH_OP[base])
        op = op[0] if isinstance(op, list) else op
        return f"{base}.{type(op).__name__}"
    if base in _WITH_CTX:
        return f"{base}.{type(getattr(node, 'ctx', ast.Load())).__name__}"
    return base


def _label(node: ast.AST, own: str) -> str:
    """The node's label, the function's own name (wherever it appears) as :data:`SELF`."""
    label = _raw_label(node)
    return SELF if label == own else label


def _raw_label(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.arg):
        return node.arg
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.keyword):
        return node.arg or ""
    if isinstance(node, ast.alias):
        return node.asname or node.name
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.ImportFrom):
        return node.module or ""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, (str, bytes)):
            return repr(v)[:LABEL_CHARS]
        return "" if v is None or v is Ellipsis else repr(v)
    return ""


def _children(node: ast.AST) -> list[ast.AST]:
    out: list[ast.AST] = []
    for _, value in ast.iter_fields(node):
        items = value if isinstance(value, list) else [value]
        out.extend(v for v in items if isinstance(v, ast.AST) and not isinstance(v, _SKIP))
    return out


def _targets(node: ast.AST) -> list[ast.AST] | None:
    """An assignment statement's targets (None for any other node)."""
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    return None


def _order_key(node: ast.AST, start: tuple[int, int]) -> tuple[int, int]:
    """Where a node's token is in the source: an attribute's name comes after its value
    (``a.b``: at its end), every other node's at its start."""
    if isinstance(node, ast.Attribute) and getattr(node, "end_lineno", None) is not None:
        return (node.end_lineno, node.end_col_offset)  # type: ignore[return-value]
    return start


def _pos(node: ast.AST, fallback: tuple[int, int]) -> tuple[int, int]:
    line = getattr(node, "lineno", None)
    return (line, getattr(node, "col_offset", 0)) if line is not None else fallback


Pos = tuple[int, int]
Span = tuple[Pos, Pos]
_SCOPES = (
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)
_FOREVER = (1 << 30, 0)


def _span(node: ast.AST, start: tuple[int, int]) -> Span:
    end = (getattr(node, "end_lineno", None), getattr(node, "end_col_offset", None))
    return (start, end if end[0] is not None else _FOREVER)  # type: ignore[return-value]


def function_graph(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> FunctionGraph:
    """The graph of ``fn`` (see the module docstring)."""
    own = fn.name
    nodes: list[ast.AST] = []
    parent: list[int] = []
    pos: list[tuple[int, int]] = []
    # A write's visibility in source order: from where (an assignment's end, else where
    # it is written; a scope's variable from the scope's start) until where (the end of
    # the lambda, comprehension or nested definition that owns it; else the function's).
    visible: list[Span] = []
    Item = tuple[ast.AST, int, tuple[int, int], tuple[int, int] | None, Span | None, Pos | None]
    stack: list[Item] = [(fn, -1, (fn.lineno, fn.col_offset), None, None, None)]
    while stack:  # pre-order without recursion: deep expressions cannot overflow
        node, up, at, stmt_end, scope, comp = stack.pop()
        i = len(nodes)
        nodes.append(node)
        parent.append(up)
        here = _pos(node, at)
        pos.append(here)
        if isinstance(node, _ASSIGNS):
            stmt_end = (getattr(node, "end_lineno", here[0]), getattr(node, "end_col_offset", 0))
        start = stmt_end if stmt_end is not None else here
        if isinstance(node, ast.Name) and comp is not None:  # a comprehension's variable:
            start = comp  # its element, written first, reads it
        visible.append((start, scope[1] if scope is not None else _FOREVER))
        inner = _span(node, here) if i > 0 and isinstance(node, _SCOPES) else scope
        if isinstance(node, ast.comprehension):
            comp = scope[0] if scope is not None else here
        elif not isinstance(node, ast.Tuple | ast.List | ast.Starred):
            comp = None  # only the target (and its unpacking) of a comprehension
        # An assignment's end reaches its targets only: its value (a lambda or a
        # comprehension in it included) binds its own names where they are written.
        targets = _targets(node)
        for kid in reversed(_children(node)):
            if targets is not None:
                end = stmt_end if any(kid is t for t in targets) else None
            else:
                end = None if isinstance(kid, ast.stmt) else stmt_end
            stack.append((kid, i, here, end, inner, comp))
    n = len(nodes)
    labels = ["" if i == 0 else _label(node, own) for i, node in enumerate(nodes)]
    types = [_TYPE_ID.get(node_type(node), 0) for node in nodes]
    edges = [(parent[i], i, CHILD) for i in range(1, n)]
    order = sorted(range(n), key=lambda i: (_order_key(nodes[i], pos[i]), i))
    named = [i for i in order if labels[i]]
    edges += [(a, b, NEXT) for a, b in zip(named, named[1:], strict=False)]
    last_seen: dict[str, int] = {}
    for i in order:
        if isinstance(nodes[i], (ast.Name, ast.arg, ast.Attribute)) and labels[i]:
            if labels[i] in last_seen:
                edges.append((i, last_seen[labels[i]], SAME))
            last_seen[labels[i]] = i
    edges += _def_use(nodes, labels, pos, visible)
    height = [0] * n
    for i in range(n - 1, 0, -1):  # pre-order: every child comes after its parent
        height[parent[i]] = max(height[parent[i]], height[i] + 1)
    return FunctionGraph(own, types, labels, parent, height, edges, fn.lineno)


def _def_use(
    nodes: list[ast.AST],
    labels: list[str],
    pos: list[tuple[int, int]],
    visible: list[Span],
) -> list[tuple[int, int, int]]:
    """USE edges: each read -> the last write of its name visible at the read."""
    events: list[tuple[tuple[int, int], int, int]] = []  # (when, 0 write / 1 read, node)
    for i, node in enumerate(nodes):
        if isinstance(node, ast.arg) or (
            isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del))
        ):
            events.append((visible[i][0], 0, i))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            events.append((pos[i], 1, i))
    writes: dict[str, list[int]] = {}
    out: list[tuple[int, int, int]] = []
    # At one position a write visible there precedes a read there (a statement's end).
    for when, kind, i in sorted(events):
        if kind == 0:
            writes.setdefault(labels[i], []).append(i)
            continue
        for w in reversed(writes.get(labels[i], [])):
            if when <= visible[w][1]:  # the newest write whose scope holds the read
                out.append((i, w, USE))
                break
    return out


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method of a module, nested ones included, in source order."""
    found = [
        node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return sorted(found, key=lambda f: (f.lineno, f.col_offset))
