"""The function-name task in the training system (trainer/structure/): the config rules,
the sampler's layout-free slots, moving a batch, the validation pass's counts, the FLOPs
per node, and the structure-free attention encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turnout.config.load import load_config
from turnout.config.structure import AstConfig
from turnout.errors import ConfigError
from turnout.trainer.data.structure.batches import structure_batch
from turnout.trainer.data.structure.dataset import StructureData
from turnout.trainer.data.structure.examples import build
from turnout.trainer.data.structure.names import score, subtokens
from turnout.trainer.data.tokenizer import ByteTokenizer
from turnout.trainer.meter import IntervalMeter, RunMeter
from turnout.trainer.structure.data import target_entropy
from turnout.trainer.structure.flops import per_node, structure_run_flops
from turnout.trainer.structure.model import structure_model
from turnout.trainer.structure.sampler import StructureSampler
from turnout.trainer.structure.validation import name_pass

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> StructureData:
    """The json package's functions, a third of its files held out."""
    import json
    from pathlib import Path

    src = Path(json.__file__).parent
    cfg = AstConfig(label_tokens=6, target_vocab=30)
    folder, _ = build(str(src), ByteTokenizer(), cfg, tmp_path_factory.mktemp("c"), 0.4)
    out = StructureData(folder)
    assert len(out.splits["val"]) and len(out.splits["train"])
    return out


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.structure.encoder=gnn"], "data.structure"),
        (["model.layer_pattern=[dense,moe]"], "model.layer_pattern"),
        (["model.structure.moe=true", "model.moe.balance=bias"], "model.moe.balance"),
        (["model.structure.moe=true", "model.moe.hyper.enabled=true"], "model.moe.hyper.enabled"),
        (["data.val_corpus=/tmp"], "data.val_corpus"),
        (["train.init_from=/tmp/x"], "train.init_from"),
        (["train.trainable=routers"], "train.trainable"),
        (["train.activation_checkpointing=full"], "train.activation_checkpointing"),
        (["model.structure.encoder=graph"], "model.structure.encoder"),
        (["data.tokenizer=bpe", "model.vocab_size=512"], "data.tokenizer"),
        (["model.structure.encoder=treelstm", "parallel.zero_stage=3"], "parallel.zero_stage"),
        (["tracking.register_as=names"], "tracking.register_as"),
        (["data.structure=trees"], "data.structure"),
    ],
)
def test_what_a_structure_run_cannot_do_is_refused_naming_the_key(
    overrides: list[str], key: str
) -> None:
    base = ["data.structure=ast", "model.structure.encoder=gnn", "model.layer_pattern=[dense]"]
    if overrides[0] == "model.structure.encoder=gnn":
        base = ["model.layer_pattern=[dense]"]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [*base, "parallel.ep_size=1", *overrides])
    assert e.value.key == key


def test_the_presets_load_and_a_structure_moe_counts_as_moe() -> None:
    for name in ("ast-treelstm", "ast-gnn", "ast-gnn-moe", "ast-transformer"):
        cfg = load_config(name)
        assert cfg.data.structure == "ast" and cfg.model.structure.encoder
    assert load_config("ast-gnn-moe").model.uses_moe()
    assert not load_config("ast-gnn").model.uses_moe()


def _sampler(data: StructureData, rank: int, world: int, micro: int = 4) -> StructureSampler:
    return StructureSampler(data, "gnn", micro, rank, world, seed=7, eval_batches=2)


def test_a_step_trains_on_the_same_functions_at_any_layout(
    data: StructureData,
) -> None:
    """Global batch 8: 2 ranks x 1 micro step of 4, or 1 rank x 2 micro steps of 4 (the
    gradient accumulation a resume at another world size sets) see the same functions in
    the same micro batches."""
    two = [_sampler(data, r, 2).indices(step=3, micro=0) for r in range(2)]
    one = [_sampler(data, 0, 1).indices(step=3, micro=m) for m in range(2)]
    assert two == one
    assert _sampler(data, 0, 1).indices(4) != one[0]  # another step, other functions
    nodes = sum(structure_batch(data, "train", ids, "gnn")[0].num_nodes for ids in one)
    assert _sampler(data, 1, 2).step_nodes(3, 8) == nodes  # every rank counts the same


def test_validation_deals_held_out_functions_to_ranks(
    data: StructureData,
) -> None:
    ranks = [_sampler(data, r, 2).eval_examples for r in range(2)]
    assert ranks[0].shape == (2, 4)
    merged = np.stack(ranks, axis=-1).reshape(-1)  # round-robin: rank r takes r, r+2, ...
    assert merged.tolist() == sorted(merged.tolist())
    assert merged.max() < len(data.splits["val"])


def test_a_batch_moves_with_every_tensor(data: StructureData) -> None:
    for encoder in ("treelstm", "gnn"):
        batch, _ = structure_batch(data, "train", range(3), encoder)
        moved = batch.to("meta")
        tensors: list[torch.Tensor] = []
        form = moved.form
        for value in vars(form).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, list):
                tensors += [t for lv in value for t in vars(lv).values()]
        assert tensors and all(t.device.type == "meta" for t in tensors)
        assert moved.num_nodes == batch.num_nodes


def test_the_validation_pass_scores_what_the_model_predicts(
    data: StructureData,
) -> None:
    """The model as a run builds it (its classes from the config: 30 subtokens, <unk>
    and the end, more than the json package's names fill)."""
    torch.manual_seed(0)
    cfg = load_config("ast-gnn", ["data.ast.target_vocab=30", "model.d_model=16"])
    model = structure_model(cfg)
    assert model.end == data.classes == 31 > len(data.targets)
    sampler = StructureSampler(data, "gnn", 3, 0, 1, seed=0, eval_batches=2)
    res = name_pass(model, sampler, 2, torch.device("cpu"))
    predicted, truth, ces = [], [], []
    with torch.no_grad():
        for i in range(2):
            batch, targets = sampler.eval_batch(i)
            out = model(batch, targets)
            ces.append(float(out.ce))
            predicted += [data.target_words(p) for p in model.predict(out.logits_BKV)]
            truth += [subtokens(n) for n in sampler.eval_names(i)]
    assert res.score == score(predicted, truth)
    assert res.loss == pytest.approx(sum(ces) / 2, rel=1e-12)  # the same sum, in float64
    assert model.training  # handed back in train mode


def test_flops_per_node_of_a_dense_model_are_its_dense_twins(
    data: StructureData,
) -> None:
    cfg = load_config("ast-gnn", ["data.ast.target_vocab=30"])
    sampler = StructureSampler(data, "gnn", 4, 0, 1, seed=0)
    flops, dense = structure_run_flops(cfg, sampler)
    assert flops == dense
    moe = structure_run_flops(load_config("ast-gnn-moe", ["data.ast.target_vocab=30"]), sampler)
    # Top-2 of 4 experts of half the dense width: the FFN costs the same, plus the router.
    assert moe[0] > moe[1]
    model = structure_model(cfg)
    assert per_node(model, sampler, steps=1) > 0


def test_the_name_entropy_is_a_proper_entropy(data: StructureData) -> None:
    h = target_entropy(data)
    assert 0 < h < math.log(data.classes + 1)


def test_a_checkpoints_name_classes_replace_the_caches(data: StructureData) -> None:
    """``turnout eval`` reads names with the classes the model learnt: a subtoken keeps
    its class id whatever this corpus's frequencies, and unused classes read as <unk>."""
    name = next(n for n in data.splits["train"].names if len(data.target_ids(n)) > 1)
    theirs = ["<unk>", *reversed(data.targets[1:])]
    before = data.target_ids(name)
    other = StructureData(data.folder)
    other.use_targets(theirs)
    after = other.target_ids(name)
    assert [theirs[i] for i in after] == [data.targets[i] for i in before]
    assert after != before
    assert other.target_words([data.classes - 1]) == ["<unk>"]  # beyond the 16 filled
    with pytest.raises(ValueError):
        other.use_targets(["x", *theirs])


def test_meters_count_the_units_given() -> None:
    interval, whole = IntervalMeter(100), RunMeter(100)
    for units, seconds in ((50, 1.0), (150, 1.0), (300, 2.0)):
        interval.add(1.0, seconds, units)
        whole.add(seconds, units)
    assert interval.flush().tokens_per_s == 500 / 4.0
    assert whole.tokens_per_s() == 450 / 3.0  # the first step left out
    assert whole.units == 500


@pytest.mark.parametrize("moe", [False, True])
def test_attention_encoder_keeps_functions_apart(
    data: StructureData,
    moe: bool,
) -> None:
    """A function's node states in a batch of three equal its states alone: the
    attention mask keeps the others (and the padding) out, and a dropless MoE routes each
    node by itself. Tolerance 1e-5: the batch
    pads to another length, so the attention's sums run over other shapes (fp32)."""
    cfg = load_config(
        "ast-transformer",
        ["data.ast.target_vocab=30"]
        + (["model.structure.moe=true", "model.moe.capacity_factor=null"] if moe else []),
    )
    torch.manual_seed(0)
    model = structure_model(cfg).eval()
    sizes = [len(data.splits["train"].example(i).types_N) for i in range(3)]
    batch, _ = structure_batch(data, "train", [0, 1, 2], "transformer")
    with torch.no_grad():
        h_ND, _ = model.encode(batch)
        for i in range(3):
            alone, _ = structure_batch(data, "train", [i], "transformer")
            start = sum(sizes[:i])
            h_alone, _ = model.encode(alone)
            torch.testing.assert_close(
                h_ND[start : start + sizes[i]], h_alone, rtol=1e-5, atol=1e-5
            )
