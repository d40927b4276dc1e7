"""Every config key with its default and its field docstring (``turnout keys``).

The structured configs document each field with a string right below it; Python keeps
those only in the source, so they are read back with ``ast``. The README's key table
is this module's Markdown output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

from turnout.config import TurnoutConfig


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` for a dataclass whose fields carry a string below them."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    stmts = getattr(body, "body", [])
    for stmt, nxt in zip(stmts, stmts[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_keys(cls: type = TurnoutConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, description)`` for every leaf field, in declaration order."""
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows.extend(config_keys(type(default), f"{key}."))
        else:
            rows.append((key, default, docs.get(f.name, "")))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def markdown_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in config_keys():
        lines.append(f"| `{key}` | `{_show(default)}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def plain_listing() -> str:
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {_show(d):<22} {doc}" for k, d, doc in rows)
