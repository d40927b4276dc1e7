"""FLOP counting of the function-name models (models/structure_flops.py) against torch's
FlopCounterMode on real batches: both count the same matmuls of the same shapes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.unit.test_flops import _grouped_mm_flops
from tests.unit.test_structure_model import data  # noqa: F401 - the module's fixture
from turnout.config.model import MoEConfig
from turnout.models.structure import StructureModel
from turnout.models.structure_flops import batch_flops
from turnout.trainer.data.structure.batches import structure_batch
from turnout.trainer.data.structure.dataset import StructureData

pytestmark = pytest.mark.unit


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:  # noqa: ANN001
    """FlopCounterMode has no formula for the CPU attention kernel: scores and context,
    ``2 * 2 B H L S E`` (torch's own formula for the other attention kernels)."""
    B, H, L, E = q_shape
    S = k_shape[2]
    return 2 * 2 * B * H * L * S * E


@pytest.mark.parametrize(
    ("encoder", "moe", "pad"),
    [
        ("treelstm", None, False),
        ("treelstm", None, True),
        ("gnn", None, False),
        ("gnn", None, True),
        ("gnn", MoEConfig(num_experts=4, top_k=2, capacity_factor=None), True),
        ("transformer", None, True),
        ("transformer", MoEConfig(num_experts=4, top_k=2, capacity_factor=None), True),
    ],
)
def test_counts_agree_with_torch_flop_counter(
    data: StructureData,  # noqa: F811 - the fixture
    encoder: str,
    moe: MoEConfig | None,
    pad: bool,
) -> None:
    torch.manual_seed(0)
    model = StructureModel(
        encoder, len(data.node_types), 256, len(data.edge_types), data.classes,
        data.max_name, d_model=16, ffn_dim=24, layers=2, moe=moe,
    )  # fmt: skip
    batch, _ = structure_batch(data, "train", range(5), encoder, pad=pad)
    grouped = {
        torch.ops.aten._grouped_mm: _grouped_mm_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=grouped) as fc:
        model(batch)
    # Integer counts of the same shapes on both sides: equal, not approximately.
    assert batch_flops(model, batch) == fc.get_total_flops()
