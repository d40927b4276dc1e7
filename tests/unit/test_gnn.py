"""The message-passing network (models/gnn.py): messages against a dense-adjacency
oracle, bucket padding, batch independence, the MoE FFN's aux, on stdlib graphs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.config.hyper import HyperConfig
from turnout.config.model import MoEConfig
from turnout.models.gnn import GraphNet, dense_messages, graph_batch
from turnout.models.nodes import MIN_BUCKET
from turnout.trainer.data.structure.ast_graph import (
    EDGE_TYPES,
    NODE_TYPES,
    function_graph,
    functions,
)

pytestmark = pytest.mark.unit

L = 4


def _graphs(count: int, start: int = 0) -> list[tuple[np.ndarray, ...]]:
    source = Path(json.__file__).with_name("decoder.py").read_text()
    out = []
    for fn in functions(ast.parse(source))[start : start + count]:
        g = function_graph(fn)
        tokens = [list(s.encode()[:L]) + [-1] * (L - len(s.encode()[:L])) for s in g.labels]
        out.append((np.array(g.types), np.array(tokens), np.array(g.edges)))
    return out


def _net(moe: MoEConfig | None = None, seed: int = 0) -> GraphNet:
    torch.manual_seed(seed)
    # init_std 0.3: messages of order 1, so a wrong edge or a missing mean shows.
    return GraphNet(len(NODE_TYPES), 256, len(EDGE_TYPES), 16, 32, 2, moe, init_std=0.3)


def test_messages_equal_the_dense_adjacency_oracle() -> None:
    net = _net().double()
    batch = graph_batch(_graphs(4), len(EDGE_TYPES))
    layer = net.layers[0]
    x = net.embed(batch.types_N, batch.tokens_NL)
    a = torch.cat([x, x.new_zeros(batch.padded_nodes - x.shape[0], x.shape[1])])
    got = layer.messages(a, batch)[: batch.num_nodes]
    want = dense_messages(layer, x, batch)
    # float64, the same products summed in another order.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(want.detach().abs().max()) > 0.1


def test_padding_to_buckets_changes_nothing_but_the_shapes() -> None:
    net = _net().double()
    graphs = _graphs(3)
    padded = graph_batch(graphs, len(EDGE_TYPES))
    exact = graph_batch(graphs, len(EDGE_TYPES), pad=False)
    torch.testing.assert_close(net(padded)[0], net(exact)[0], rtol=1e-12, atol=1e-12)
    for n in (padded.padded_nodes, padded.src_M.numel()):
        assert n >= MIN_BUCKET and n & (n - 1) == 0


def test_a_graph_is_independent_of_the_others_in_its_batch() -> None:
    net = _net(seed=1).double()
    graphs = _graphs(3)
    alone = net(graph_batch([graphs[2]], len(EDGE_TYPES)))[0]
    batch = graph_batch(graphs, len(EDGE_TYPES))
    start = int(batch.roots_B[2])
    together = net(batch)[0][start:]
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_the_moe_ffn_routes_every_real_node_and_returns_its_aux() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=None)
    net = _net(moe)
    batch = graph_batch(_graphs(3), len(EDGE_TYPES))
    h, auxes = net(batch)
    assert len(auxes) == 2  # one per layer
    for aux in auxes:
        assert int(aux.counts_E.sum()) == 2 * batch.num_nodes  # k per real node, no padding
    loss = h.pow(2).mean() + sum(a.load_balance for a in auxes)
    loss.backward()
    bank = net.layers[1].ffn.experts
    assert all(float(p.grad.abs().sum()) > 0 for p in bank.parameters())


@pytest.mark.parametrize(
    "moe",
    [
        MoEConfig(num_experts=4, top_k=2, balance="bias"),
        MoEConfig(num_experts=4, top_k=2, hyper=HyperConfig(enabled=True)),
    ],
)
def test_what_a_graph_moe_layer_cannot_take_is_refused(moe: MoEConfig) -> None:
    with pytest.raises(ValueError, match="neither hyper-experts nor bias"):
        _net(moe)


def test_a_node_with_hundreds_of_in_edges_gets_its_mean_in_bf16() -> None:
    """300 edges into one node: in bf16 a count stops at 256; the mean must not."""
    net = _net().bfloat16()
    types = np.zeros(301, np.int64)
    tokens = np.full((301, L), -1)
    edges = np.array([[i, 0, 0] for i in range(1, 301)])
    batch = graph_batch([(types, tokens, edges)], len(EDGE_TYPES), pad=False)
    layer = net.layers[0]
    a = torch.randn(batch.padded_nodes, 16, generator=torch.Generator().manual_seed(0))
    got = layer.messages(a.bfloat16(), batch)[0].float()
    want = dense_messages(layer.float(), a[:301], batch)[0]
    # bf16 inputs and outputs (8 bits of mantissa) around an fp32 sum: ~1% of the values.
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
