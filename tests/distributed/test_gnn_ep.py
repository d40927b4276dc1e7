"""The MoE graph network under expert parallelism (2 spawned gloo ranks, ep 2) against
one process: each rank encodes its own graphs (a different number of nodes on each), the
MoE FFN's tokens travel to their experts' rank; outputs and gradients equal the
single-process reference on the same weights, capacity and dropless."""

from __future__ import annotations

import pytest
import torch

from tests.decisions import recorded
from tests.spawn import run_ranks
from tests.unit.test_gnn import _graphs, _net
from turnout.config.model import MoEConfig
from turnout.models.gnn import graph_batch
from turnout.parallel.groups import Layout
from turnout.trainer.data.structure.ast_graph import EDGE_TYPES

pytestmark = pytest.mark.distributed

CAPACITY = (None, 1.0)


def _moe(cf: float | None) -> MoEConfig:
    return MoEConfig(num_experts=4, top_k=2, capacity_factor=cf, min_capacity=1)


def _ep_net(cf: float | None):  # type: ignore[no-untyped-def]
    """The MoE net of the test: routers scaled up 20x, so that over the hundreds of
    nodes every top-2 choice is clear of a tie (at the init scale the closest sat ~7e-5
    from one: under the margin the EP path's other GEMM shapes need)."""
    from turnout.models.moe import moe_layers

    net = _net(_moe(cf))
    with torch.no_grad():
        for layer in moe_layers(net):
            layer.router_DE.mul_(20.0)
    return net


def _batch(rank: int):  # type: ignore[no-untyped-def]
    return graph_batch(_graphs(2 + rank, start=3 * rank), len(EDGE_TYPES))


def _worker(rank: int, world: int) -> dict:
    from turnout.models.moe import moe_layers
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups

    groups = build_groups(2)
    out = {}
    for cf in CAPACITY:
        net = _ep_net(cf)
        install_expert_parallel(net, groups)
        h, auxes = net(_batch(rank))
        (h.pow(2).mean() + sum(a.load_balance for a in auxes)).backward()
        out[cf] = {
            "h": h.detach(),
            "dropped": [float(a.dropped) for a in auxes],
            "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "layers": len(moe_layers(net)),
        }
    return out


def test_moe_gnn_under_ep_equals_one_process() -> None:
    results = run_ranks(_worker, 2)
    lay = Layout(2, 2)
    for cf in CAPACITY:
        refs = []
        for rank in range(2):
            net = _ep_net(cf)
            with recorded(net) as decisions:
                h, auxes = net(_batch(rank))
            # The expert rows run in other GEMM shapes under EP: every top-k clear of ties.
            decisions.assert_clear(f"rank {rank}'s expert top-2")
            (h.pow(2).mean() + sum(a.load_balance for a in auxes)).backward()
            refs.append((h.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
        for rank in range(2):
            got = results[rank][cf]
            assert got["layers"] == 2
            if cf is not None:  # the capacity case really drops on some layer
                assert max(results[r][cf]["dropped"][i] for r in range(2) for i in range(2)) > 0
            # fp32; the experts' rows meet other rows in their GEMMs: default tolerances.
            torch.testing.assert_close(got["h"], refs[rank][0])
            off, cnt = lay.expert_slice(rank, 4)
            for name, g in got["grads"].items():
                if ".experts." in name:
                    want = sum(refs[s][1][name][off : off + cnt] for s in lay.ep_ranks(rank))
                else:
                    want = refs[rank][1][name]
                torch.testing.assert_close(g, want, msg=f"cf={cf} rank {rank} {name}")
