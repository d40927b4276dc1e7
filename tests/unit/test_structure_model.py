"""The function-name model (models/structure.py): targets, a learnable task (a few
functions fitted by both encoders), predictions scored by subtoken F1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from turnout.config.model import MoEConfig
from turnout.config.structure import AstConfig
from turnout.models.structure import IGNORE, StructureModel, name_targets
from turnout.trainer.data.structure.batches import structure_batch
from turnout.trainer.data.structure.dataset import StructureData
from turnout.trainer.data.structure.examples import build
from turnout.trainer.data.structure.names import score, subtokens
from turnout.trainer.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.unit


def test_name_targets_end_after_the_name_and_ignore_the_rest() -> None:
    t = name_targets([[3, 4], [5, 6, 7, 8]], max_name=3, end=9)
    assert t.tolist() == [[3, 4, 9], [5, 6, 7]]
    assert name_targets([[]], 2, 9).tolist() == [[9, IGNORE]]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> StructureData:
    import json

    src = Path(json.__file__).parent
    folder, _ = build(
        str(src), ByteTokenizer(), AstConfig(label_tokens=6), tmp_path_factory.mktemp("c"), 0.0
    )
    return StructureData(folder)


@pytest.mark.parametrize(
    ("encoder", "moe"),
    [
        ("treelstm", None),
        ("gnn", None),
        ("gnn", MoEConfig(num_experts=4, top_k=2)),
        ("transformer", None),
    ],
)
def test_each_encoder_fits_a_few_names(
    data: StructureData, encoder: str, moe: MoEConfig | None
) -> None:
    """Eight functions, fitted from a fixed seed: the loss falls by more than 10x and the
    names come back exactly, so the encoder, decoder and targets are wired to learn."""
    torch.manual_seed(0)
    model = StructureModel(
        encoder, len(data.node_types), 256, len(data.edge_types), data.classes,
        data.max_name, d_model=32, ffn_dim=64, layers=2, moe=moe, init_std=0.1,
    )  # fmt: skip
    batch, targets = structure_batch(data, "train", range(8), encoder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = model(batch, targets)
        assert out.loss is not None
        first = float(out.loss.detach()) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss.detach()) < first / 10
    predicted = [data.target_words(ids) for ids in model.predict(model(batch).logits_BKV)]
    names = [data.splits["train"].names[i] for i in range(8)]
    truth = [data.target_words(data.target_ids(n)) for n in names]
    assert score(predicted, truth).f1 == 1.0
    assert all(t == subtokens(n)[: data.max_name] for t, n in zip(truth, names, strict=True))
