"""``train.trainable=routers`` on 2 gloo ranks under ZeRO 0-3: MoD retrofitted onto a dense
export, only the new router in the optimizer, frozen weights bit-equal after training, and
checkpoint save / resume with frozen parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_train_loop import _overrides
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.models.lm import TransformerLM
from turnout.trainer.data.batches import prepare_corpus
from turnout.trainer.weights.export import write_turnout
from turnout.trainer.weights.from_checkpoint import consolidated_state

pytestmark = pytest.mark.distributed

WORLD = 2


def _optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    """The parameters an engine's optimizer steps, whatever the ZeRO stage."""
    for attr in ("bit16_groups", "fp16_groups"):  # ZeRO 1/2, ZeRO 3
        groups = getattr(optimizer, attr, None)
        if groups is not None:
            return [p for g in groups for p in g]
    return [p for g in optimizer.param_groups for p in g["params"]]  # ZeRO 0: AdamW


def _check_then_train(rank: int, world: int, items: list[str], data: str) -> dict:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.run_setup import setup
    from turnout.trainer.train import train

    cfg = load_config("tiny", items)
    groups = build_groups(cfg.parallel.ep_size)
    run = setup(cfg, Path(data), groups)
    model = run.engine.module
    stepped = {id(p) for p in _optimizer_params(run.engine.optimizer)}
    in_optimizer = sorted(n for n, p in model.named_parameters() if id(p) in stepped)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    run.tracker.finish("FINISHED")
    first = train(cfg, Path(data), groups)
    resumed = load_config("tiny", [*items, f"train.resume={Path(first.checkpoint).parent}/step2"])
    second = train(resumed, Path(data), groups)
    return dict(
        in_optimizer=in_optimizer,
        trainable=trainable,
        first=first.checkpoint,
        second=second.checkpoint,
        loss=(first.final_train_loss, second.final_train_loss),
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_routers_only_under_every_zero_stage(tmp_path: Path, stage: int) -> None:
    base = [
        *_overrides(tmp_path, steps=4),
        "parallel.ep_size=1",
        f"parallel.zero_stage={stage}",
        "train.ckpt_every=2",
        "train.eval_every=2",
    ]
    src_cfg = load_config("tiny", [*base, "model.layer_pattern=[dense,dense]"])
    torch.manual_seed(5)
    source = TransformerLM(src_cfg.model)
    folder = tmp_path / "source"
    write_turnout(folder, source.state_dict(), src_cfg, step=0)
    items = [
        *base,
        "model.layer_pattern=[dense,mod]",
        f"train.init_from={folder}",
        "train.trainable=routers",
    ]
    data = prepare_corpus(load_config("tiny", items).data)
    res = run_ranks(_check_then_train, WORLD, items, str(data))
    routers = {"layers.1.router.weight"} | {
        n for n in res[0]["trainable"] if n.startswith("layers.1.predictor.")
    }
    for r in res:
        assert set(r["trainable"]) == routers
        assert r["in_optimizer"] == r["trainable"]  # frozen ones take no optimizer state
    src = source.state_dict()
    for ckpt in (res[0]["first"], res[0]["second"]):
        state, _, step = consolidated_state(ckpt)
        assert step == 4
        for name, value in state.items():
            if name in routers:
                continue
            # Frozen: never stepped, saved and restored by copies (bitwise).
            want = src[name.replace("layers.1.block.", "layers.1.")]
            torch.testing.assert_close(value, want, atol=0, rtol=0, msg=name)
        assert not torch.equal(state["layers.1.router.weight"], torch.zeros(1, 32))
    # The resumed run ends where the uninterrupted one did (same layout, same arithmetic;
    # 1e-6 absorbs ulps, as in test_train_loop).
    first, second = res[0]["loss"]
    assert second == pytest.approx(first, rel=1e-6)
