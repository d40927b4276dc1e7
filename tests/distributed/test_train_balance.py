"""train() on 2 gloo ranks (ep 2, ZeRO-2) with model.moe.balance=bias: the bias moves in
the real loop, is saved as an fp32 buffer, resumes exactly, and the load metrics and the
heatmap reach MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_train_loop import WORLD, _overrides
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

BIAS_KEY = "layers.1.block.ffn.expert_bias"  # layer 1 is the 'mode' block


def _balance_overrides(tmp_path: Path) -> list[str]:
    return [
        *_overrides(tmp_path, steps=4),
        "model.moe.balance=bias",
        "model.moe.bias_rate=0.01",
        "train.ckpt_every=2",
        "train.eval_every=4",
        "tracking.load_image_every=2",
        "tracking.expert_series_max=0",
    ]


def _train_then_resume(rank: int, world: int, overrides: list[str], data: str) -> tuple:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.train import train

    cfg = load_config("tiny", overrides)
    groups = build_groups(cfg.parallel.ep_size)
    first = train(cfg, Path(data), groups)
    resume_from = str(Path(first.checkpoint).parent / "step2")
    second = train(
        load_config("tiny", [*overrides, f"train.resume={resume_from}"]), Path(data), groups
    )
    return first, second


def test_bias_trains_saves_resumes_and_shows(tmp_path: Path) -> None:
    from turnout.trainer.weights.from_checkpoint import consolidated_state

    overrides = _balance_overrides(tmp_path)
    data = prepare_corpus(load_config("tiny", overrides).data)
    (first, second), _ = run_ranks(_train_then_resume, WORLD, overrides, str(data))
    run_dir = Path(first.checkpoint).parent
    biases = {}
    for tag in ("step2", "step4"):
        state, cfg, step = consolidated_state(run_dir / tag)
        assert cfg.model.moe.balance == "bias"
        bias = state[BIAS_KEY]
        assert bias.dtype == torch.float32 and bias.shape == (4,)
        # bias_rate 0.01 sign steps, re-centred: a multiple of 0.0025 away from 0.
        assert bias.abs().sum() > 0 and abs(float(bias.sum())) < 1e-6
        biases[step] = bias
    assert not torch.equal(biases[2], biases[4])  # it kept moving
    # The resumed run (from step 2, bias included) ends where the uninterrupted one did.
    # The same layout repeats the same arithmetic (bitwise today); 1e-6 only absorbs ulps.
    assert second.final_val_loss == pytest.approx(first.final_val_loss, rel=1e-6, abs=1e-7)
    resumed, _, _ = consolidated_state(second.checkpoint)
    assert torch.equal(resumed[BIAS_KEY], biases[4])
    assert second.run_id == first.run_id  # a resumed run appends to the same MLflow run
    _check_mlflow(tmp_path, first.run_id)


def _check_mlflow(tmp_path: Path, run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(run_id).data.metrics
    assert "aux/moe_lb" in metrics  # still logged under balance=bias
    for name in ("load_max_over_mean", "load_min_over_mean", "load_cv", "load_entropy"):
        assert f"layer1/{name}" in metrics, name
    assert 0 <= metrics["layer1/dead_experts"] <= 4
    assert not [k for k in metrics if "expert0_load" in k]  # expert_series_max=0
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if "expert_load" in p)
    # The first run logs the heatmap at steps 2 and 4 (every 2 and at the end); the run
    # resumed from step 2 appends to the same MLflow run and logs its own end, step 4.
    assert steps == [2, 4, 4]
