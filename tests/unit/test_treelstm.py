"""The level-batched Child-Sum Tree-LSTM (models/treelstm.py) against its node-at-a-time
oracle, with and without bucket padding, on real syntax trees of this Python's stdlib."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.models.nodes import MIN_BUCKET, bucket
from turnout.models.treelstm import TreeLSTM, reference_encode, tree_batch
from turnout.trainer.data.structure.ast_graph import NODE_TYPES, function_graph, functions

pytestmark = pytest.mark.unit

L = 4


def _trees(count: int) -> list[tuple[np.ndarray, ...]]:
    """The first ``count`` functions of json/decoder.py, labels as byte ids."""
    source = Path(json.__file__).with_name("decoder.py").read_text()
    out = []
    for fn in functions(ast.parse(source))[:count]:
        g = function_graph(fn)
        tokens = [
            list(label.encode()[:L]) + [-1] * (L - len(label.encode()[:L])) for label in g.labels
        ]
        out.append((np.array(g.types), np.array(tokens), np.array(g.parent), np.array(g.height)))
    return out


def _model(seed: int = 0) -> TreeLSTM:
    torch.manual_seed(seed)
    # init_std 0.3: gates away from 0.5 and states of order 1, so a wrong sum shows.
    return TreeLSTM(len(NODE_TYPES), 256, 16, init_std=0.3).double()


def test_level_batches_equal_the_node_at_a_time_oracle() -> None:
    model = _model()
    batch = tree_batch(_trees(6))
    got, want = model(batch), reference_encode(model, batch)
    # float64, the same products summed in another order: ~1e-15 measured.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(got.detach().abs().max()) > 0.1
    g = torch.randn_like(got)
    params = list(model.parameters())
    for a, b in zip(
        torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_padding_to_buckets_changes_nothing_but_the_shapes() -> None:
    model = _model(1)
    trees = _trees(5)
    padded, exact = tree_batch(trees), tree_batch(trees, pad=False)
    torch.testing.assert_close(model(padded), model(exact), rtol=1e-12, atol=1e-12)
    for lv in padded.levels:
        for n in (lv.nodes_P.numel(), lv.child_Q.numel()):
            assert n == 0 or (n >= MIN_BUCKET and n & (n - 1) == 0)
    assert [bucket(n) for n in (0, 1, 8, 9, 100)] == [0, 8, 8, 16, 128]


def test_a_tree_is_independent_of_the_others_in_its_batch() -> None:
    model = _model(2)
    trees = _trees(3)
    alone = model(tree_batch([trees[1]]))
    batch = tree_batch(trees)
    start = int(batch.roots_B[1])
    together = model(batch)[start : start + len(trees[1][0])]
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_levels_hold_every_node_once_children_below_parents() -> None:
    batch = tree_batch(_trees(4), pad=False)
    seen = torch.cat([lv.nodes_P for lv in batch.levels])
    assert sorted(seen.tolist()) == list(range(batch.num_nodes))
    done: set[int] = set()
    for lv in batch.levels:
        assert set(lv.child_Q.tolist()) <= done
        done |= set(lv.nodes_P.tolist())
    assert batch.parent_N[batch.roots_B].eq(-1).all()
