"""train() on 2 gloo ranks: finite losses, MLflow run, atomic checkpoints, exact resume,
and a non-finite loss that stops both ranks together."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.errors import ConfigError
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

WORLD = 2
MOD_CAPACITY = 0.25  # configs/tiny.yaml model.mod.capacity: ceil(0.25 * 32) / 32 realised


def _corpus(tmp_path: Path) -> Path:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "experts",
        "route",
        "tokens",
    ]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def _overrides(tmp_path: Path, steps: int = 6) -> list[str]:
    return [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.ffn_dim=64",
        "model.max_seq_len=32",
        "model.layer_pattern=[dense,mode]",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_ffn_dim=32",
        f"data.corpus={_corpus(tmp_path)}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.1",
        f"train.steps={steps}",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.warmup_steps=2",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.log_every=2",
        "train.ckpt_every=3",
        f"train.ckpt_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "parallel.zero_stage=2",
        f"launch.num_workers={WORLD}",
    ]


def _train_then_resume(rank: int, world: int, overrides: list[str], data: str) -> tuple:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.train import train

    cfg = load_config("tiny", overrides)
    groups = build_groups(cfg.parallel.ep_size)  # once per process, as the worker entry does
    first = train(cfg, Path(data), groups)
    resume_from = str(Path(first.checkpoint).parent / "step3")
    cfg2 = load_config("tiny", [*overrides, f"train.resume={resume_from}"])
    second = train(cfg2, Path(data), groups)
    return first, second


def test_train_checkpoint_and_exact_resume(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path)
    data = prepare_corpus(load_config("tiny", overrides).data)
    (first, second), (first1, second1) = run_ranks(_train_then_resume, WORLD, overrides, str(data))
    for res in (first, second, first1, second1):
        assert res.steps == 6
        for value in (res.final_train_loss, res.final_val_loss, res.final_val_loss_causal):
            assert 0 < value < 10
        assert res.tokens_per_s > 0
        assert res.flops_per_token > 0 and res.mfu > 0 and res.peak_measured
        assert len(res.peak_memory_mb) == WORLD and min(res.peak_memory_mb) > 0
        assert res.tflops == pytest.approx(res.flops_per_token * res.tokens_per_s / 1e12)
    # Learning happened: below the uniform-byte loss log(256) = 5.55.
    assert first.final_val_loss < 5.4
    # Val loss is averaged over ranks: both ranks report the same value.
    assert first.final_val_loss == first1.final_val_loss
    # MLflow run ids only on rank 0; the resumed run appends to the run it resumes.
    assert first.run_id and second.run_id == first.run_id
    assert first1.run_id == "" and second1.run_id == ""
    # Checkpoints: step3 and step6 complete, 'latest' -> step6, no temporary folders.
    run_dir = Path(first.checkpoint).parent
    assert Path(first.checkpoint).name == "step6"
    assert (run_dir / "latest").read_text() == "step6"
    for tag in ("step3", "step6"):
        names = {p.name for p in (run_dir / tag).iterdir()}
        # Layout-free: dense masters + moments, the run's position, and (ep 2) each
        # expert-parallel rank's experts, by global index.
        assert {"meta.pt", "dense.pt"} <= names
        assert {"experts_ep0.pt", "experts_ep1.pt"} <= names
        # Written last, it lists every other file with its size and sha256.
        assert set(json.loads((run_dir / tag / "manifest.json").read_text())["files"]) == (
            names - {"manifest.json"}
        )
        # The resolved config rides along, so the checkpoint loads without it.
        assert load_config(str(run_dir / tag / "config.yaml")) == load_config("tiny", overrides)
    # The run folder names the MLflow run, which a resume appends to.
    assert (run_dir / "mlflow_run_id").read_text().strip() == first.run_id
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    # The resumed run restored weights, optimizer, schedule and data position:
    # it ends exactly where the uninterrupted run ended, in a new run folder.
    # The same layout repeats the same arithmetic (bitwise today); 1e-6 only absorbs ulps.
    assert second.final_val_loss == pytest.approx(first.final_val_loss, rel=1e-6, abs=1e-7)
    assert second.final_train_loss == pytest.approx(first.final_train_loss, rel=1e-6, abs=1e-7)
    assert Path(second.checkpoint).parent != run_dir
    _check_mlflow(tmp_path, first.run_id, str(run_dir / "step3"))
    _check_damage_is_named(tmp_path, run_dir, overrides)


def _check_damage_is_named(tmp_path: Path, run_dir: Path, overrides: list[str]) -> None:
    """The launcher's preflight names the first bad file of a damaged checkpoint."""
    from turnout.launch.preflight import preflight

    def refusal(resume: Path) -> str:
        with pytest.raises(ConfigError) as info:
            preflight(load_config("tiny", [*overrides, f"train.resume={resume}"]))
        assert info.value.key == "train.resume"
        return info.value.message

    preflight(load_config("tiny", [*overrides, f"train.resume={run_dir}"]))  # intact: fine

    def damaged(name: str) -> Path:
        copy = tmp_path / "damaged" / name
        shutil.copytree(run_dir, copy)
        return copy

    truncated = damaged("truncated")
    dense = truncated / "step6" / "dense.pt"
    dense.write_bytes(dense.read_bytes()[:1000])
    assert str(dense) in refusal(truncated) and "truncated" in refusal(truncated)

    flipped = damaged("flipped")  # same size, one byte changed
    meta = flipped / "step6" / "meta.pt"
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    meta.write_bytes(bytes(raw))
    assert str(meta) in refusal(flipped) and "sha256" in refusal(flipped)

    missing = damaged("missing")
    (missing / "step6" / "experts_ep1.pt").unlink()
    assert str(missing / "step6" / "experts_ep1.pt") in refusal(missing)

    garbage = damaged("garbage")
    (garbage / "latest").write_bytes(bytes(range(200, 256)) * 3)
    assert str(garbage / "latest") in refusal(garbage) and "damaged" in refusal(garbage)

    unfinished = damaged("unfinished")  # a folder whose save never reached the manifest
    (unfinished / "step6" / "manifest.json").unlink()
    assert "manifest.json" in refusal(unfinished / "step6")

    assert "does not exist" in refusal(tmp_path / "no" / "such" / "run")


def _check_mlflow(tmp_path: Path, run_id: str, resumed_from: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32"
    assert run.data.params["parallel.zero_stage"] == "2"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["ep_size"] == "2"  # configs/tiny.yaml splits the experts
    assert run.data.tags["zero_stage"] == "2"
    assert run.data.tags["git_commit"]
    metrics = run.data.metrics
    for key in ("loss", "val_loss", "val_loss_causal", "lr", "grad_norm", "tokens_per_s"):
        assert key in metrics, key
    for key in ("aux/moe_lb", "aux/moe_z", "aux/mod_pred_loss", "unigram_entropy"):
        assert key in metrics, key
    # Layer 1 is the MoDE block: expert loads (summed over ranks) are fractions.
    loads = [metrics[f"layer1/expert{e}_load"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-6)  # a float sum of fractions: ulps
    assert metrics["layer1/load_max"] == pytest.approx(max(loads))
    # Exactly k of S per sequence, averaged in float: ulps.
    assert metrics["layer1/mod_capacity"] == pytest.approx(MOD_CAPACITY, abs=1e-6)
    assert 0.0 <= metrics["layer1/mod_pred_acc"] <= 1.0
    assert 0.0 <= metrics["layer1/drop_fraction"] <= 1.0
    _check_compute_metrics(client, run_id, tmp_path)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    # One run, each step once: the resumed run (from step 3) trains steps 4-6 again, and
    # the first run's values of them stand (trainer/tracking/tracker.py).
    assert [m.step for m in history] == [2, 4, 6]
    assert run.data.tags["resumed_from"] == resumed_from
    assert run.data.tags["checkpoint/latest_step"] == "6"
    assert Path(run.data.tags["checkpoint/step3"]).name == "step3"
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert "config.yaml" in artifacts
    assert (tmp_path / "mlartifacts").is_dir()


def _check_compute_metrics(client: Any, run_id: str, tmp_path: Path) -> None:
    """FLOPs per token, TFLOP/s, MFU and memory in MLflow, consistent with each other."""
    from turnout.models.flops import forward_flops

    cfg = load_config("tiny", _overrides(tmp_path))
    metrics = client.get_run(run_id).data.metrics
    fwd = forward_flops(cfg.model, cfg.model.max_seq_len, cfg.train.micro_batch_size)
    # The same float64 formula on both sides.
    assert metrics["flops_per_token"] == pytest.approx(fwd.train_per_token, rel=1e-9)
    assert 0 < metrics["flop_fraction"] < 1  # the MoDE block saves against dense
    assert metrics["flop_fraction"] == pytest.approx(
        metrics["flops_per_token"] / metrics["dense_flops_per_token"]
    )
    peak = metrics["peak_tflops_measured"]  # train.peak_tflops unset: probed
    assert math.isfinite(peak) and peak > 0 and metrics["peak_tflops"] == peak
    # One log call stamps its metrics alike: (step, timestamp) pairs them up across the
    # first run and the resumed one that appended to it.
    tflops = sorted(client.get_metric_history(run_id, "tflops"), key=lambda m: m.timestamp)
    mfus = {(m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, "mfu")}
    tps = {
        (m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, "tokens_per_s")
    }
    # Each step once: the resumed run's steps 4-6 are the first run's (see _check_mlflow).
    assert [m.step for m in tflops] == [2, 4, 6]
    # Each run probed its own peak (logged by every attempt): the first run's stands for
    # the 3 entries.
    probes = sorted(
        client.get_metric_history(run_id, "peak_tflops_measured"), key=lambda m: m.timestamp
    )
    assert len(probes) == 2 and probes[-1].value == peak
    for i, m in enumerate(tflops):
        at = (m.step, m.timestamp)
        run_peak = probes[0 if i < 3 else 1].value
        assert m.value == pytest.approx(metrics["flops_per_token"] * tps[at] / 1e12)
        assert mfus[at] == pytest.approx(m.value / (run_peak * WORLD))
    tokens = 2 * 2 * 32 * WORLD  # per step: micro batch x grad_accum x seq x ranks
    runs = sorted(client.get_metric_history(run_id, "train_flops"), key=lambda m: m.timestamp)
    # The first run trained 6 steps, the resumed one 3 (its value is the latest).
    assert [m.value for m in runs] == pytest.approx(
        [metrics["flops_per_token"] * tokens * n for n in (6, 3)]
    )
    assert metrics["train_flops"] == pytest.approx(metrics["flops_per_token"] * tokens * 3)
    assert metrics["run_mfu"] == pytest.approx(metrics["run_tflops"] / (peak * WORLD))
    assert metrics["peak_memory_mb"] > 50  # a torch process holds more than that


def _train_expect_nonfinite(rank: int, world: int, overrides: list[str], data: str) -> str:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.train import NonFiniteLossError, train

    cfg = load_config("tiny", overrides)
    try:
        train(cfg, Path(data), build_groups(cfg.parallel.ep_size))
    except NonFiniteLossError as e:
        return str(e)
    return "no error"


def test_nonfinite_loss_stops_every_rank(tmp_path: Path) -> None:
    overrides = [
        *_overrides(tmp_path, steps=6),
        "train.lr=1e30",
        "train.min_lr=1e30",
        "train.warmup_steps=0",
        "tracking.enabled=false",
    ]
    data = prepare_corpus(load_config("tiny", overrides).data)
    messages = run_ranks(_train_expect_nonfinite, WORLD, overrides, str(data))
    assert messages[0] == messages[1]
    assert messages[0].startswith("non-finite loss at step ")
    assert "stopped all 2 ranks" in messages[0]
    assert "\n" not in messages[0]
    # Nothing was checkpointed: it never reached ckpt_every.
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("step*"))
