"""Reading a built structure cache: the splits' arrays, examples and name targets.

Shape legend: F examples, N nodes, M edges, L label tokens, K name subtokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from turnout.trainer.data.structure.examples import UNK, BuildStats
from turnout.trainer.data.structure.names import subtokens


@dataclass
class Example:
    """One function: its nodes and edges (in-function indices) and its name."""

    types_N: np.ndarray
    tokens_NL: np.ndarray
    parent_N: np.ndarray
    height_N: np.ndarray
    edges_M3: np.ndarray
    name: str


class Split:
    """The examples of one split (``train`` or ``val``)."""

    def __init__(self, arrays: Any, names: list[str]) -> None:
        self.a = {k: arrays[k] for k in arrays.files}
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def example(self, f: int) -> Example:
        n0, n1 = self.a["node_off"][f], self.a["node_off"][f + 1]
        e0, e1 = self.a["edge_off"][f], self.a["edge_off"][f + 1]
        return Example(
            self.a["types"][n0:n1],
            self.a["tokens"][n0:n1],
            self.a["parent"][n0:n1],
            self.a["height"][n0:n1],
            self.a["edges"][e0:e1],
            self.names[f],
        )


class StructureData:
    """A built cache (:func:`examples.build`): both splits, the vocabularies, the counts."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.splits = {
            s: Split(np.load(folder / f"{s}.npz"), self.meta["names"][s]) for s in ("train", "val")
        }
        self.node_types: list[str] = self.meta["node_types"]
        self.edge_types: list[str] = self.meta["edge_types"]
        self.targets: list[str] = self.meta["targets"]
        self._target_id = {t: i for i, t in enumerate(self.targets)}
        self.stats = BuildStats(**self.meta["stats"])
        self.max_name = int(self.meta["options"]["max_name_subtokens"])
        self.classes = int(self.meta["options"]["target_vocab"]) + 1
        """Name classes a model of this config has (``<unk>`` and ``data.ast.target_vocab``
        subtokens; a corpus with fewer leaves the last unused); the end class follows."""

    def use_targets(self, targets: list[str]) -> None:
        """Read names with another class list (a checkpoint's): the same subtoken keeps
        the class it was trained as, whatever this corpus's frequencies."""
        if len(targets) > self.classes or targets[:1] != [UNK]:
            raise ValueError(f"{len(targets)} name classes do not fit a model of {self.classes}")
        self.targets = list(targets)
        self._target_id = {t: i for i, t in enumerate(self.targets)}

    def target_ids(self, name: str) -> list[int]:
        """The name's first ``max_name_subtokens`` subtokens as target ids (``<unk>`` = 0)."""
        return [self._target_id.get(s, 0) for s in subtokens(name)[: self.max_name]]

    def target_words(self, ids: list[int]) -> list[str]:
        """The subtokens of class ids (an unused class reads as ``<unk>``)."""
        return [self.targets[i] if i < len(self.targets) else UNK for i in ids]

    def unk_id(self) -> int:
        return self._target_id[UNK]


def parse_warning(stats: BuildStats, key: str = "data.corpus") -> str | None:
    """The one warning line for files that did not parse (None when all did)."""
    if not stats.failed:
        return None
    return (
        f"{key}: {stats.failed} of {stats.files} file(s) did not parse as Python and were "
        f"skipped (first: {stats.first_failure})"
    )
