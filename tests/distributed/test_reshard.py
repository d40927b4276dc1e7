"""Checkpoints resume at another layout: world size, ep_size and ZeRO stage all change.

A reference run trains a tiny MoDE model (4 experts) at (world 2, ep 2, ZeRO 2) without
interruption, checkpointing at step ``N``. Each resume loads a checkpoint at a new layout,
saves it straight back (so the test process can compare the consolidated state: weights
AND AdamW moments must be the very same tensors, not reset) and trains on; its losses must
match the reference's for the same steps. The global batch stays the same (gradient
accumulation adjusted to the world size), so every step trains on the same sequences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.decisions import recorded
from tests.distributed.test_train_loop import _overrides
from tests.margins import assert_clear
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.trainer.checkpointing.files import consolidated_master
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

N = 3
"""Steps before the checkpoint."""
K = 2
"""Steps after each resume."""
LOSS_TOL = dict(rel=2e-4, abs=2e-5)
"""fp32, with the reduction order changed by the layout (measured: <= 3e-8 relative, so this
is loose; it could hide a flipped routing decision, hence the margin check below)."""


def _base(tmp: Path) -> list[str]:
    return [
        *_overrides(tmp, steps=N + 2 * K),
        "tracking.enabled=false",
        "train.peak_tflops=1",
        "train.precision=fp32",
        "train.ckpt_every=0",
        "train.grad_accum=2",
        # Routing scores of order 1: at the default init_std 0.02 the MoD top-8 cuts sit
        # ~4e-7 from ties, where a layout's other reduction order (2.7e-8 relative in the
        # losses, measured) could flip one; at 0.2 every decision is >= 3e-3 from a tie.
        "model.init_std=0.2",
        # Hyper-experts: dense weights at the model's root and in every MoE layer that
        # every layout must carry (trained N steps, so the adapter is no longer zero).
        "model.moe.hyper.enabled=true",
    ]


def _layout(world: int, ep: int, zero: int) -> list[str]:
    return [f"launch.num_workers={world}", f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}"]


def _phase(
    rank: int,
    world: int,
    overrides: list[str],
    data: str,
    resume: str,
    stop: int,
    save_at: list[int],
    out_dir: str,
) -> dict:
    """Train (from ``resume`` when given) up to step ``stop``; save at ``save_at`` steps
    (the resumed step included: the loaded state, saved straight back)."""
    from turnout.parallel.groups import build_groups
    from turnout.trainer.checkpointing import collective as checkpoint
    from turnout.trainer.metrics.routing import StatsAccumulator
    from turnout.trainer.resume.layout import resume_config
    from turnout.trainer.run_setup import setup
    from turnout.trainer.step import run_step

    cfg = load_config("tiny", [*overrides, f"train.resume={resume}"])
    groups = build_groups(cfg.parallel.ep_size)
    cfg = resume_config(cfg, world)
    run = setup(cfg, Path(data), groups)
    start = int(checkpoint.load(run.engine, resume, groups)["step"]) if resume else 0
    losses, folders = {}, {}
    with recorded(run.engine.module) as decisions:
        for step in range(start, stop + 1):
            if step in save_at:
                folder = checkpoint.save(
                    run.engine, Path(out_dir), step, {"step": step}, groups, cfg, run.tokenizer_file
                )
                folders[step] = str(folder)
            if step == stop:
                break
            res = run_step(
                run.engine, run.sampler, step, cfg.train.grad_accum, StatsAccumulator(), rank, world
            )
            losses[step] = res.loss
    return dict(
        losses=losses,
        folders=folders,
        grad_accum=cfg.train.grad_accum,
        gap=decisions.min_gap(),
        worst=decisions.worst(),
    )


def _assert_same_state(
    a: str, b: str, moments_of: str | None = "layers.1.block.ffn.experts.w_up_EDF"
) -> None:
    params_a, buffers_a, meta_a = consolidated_master(Path(a))
    params_b, buffers_b, meta_b = consolidated_master(Path(b))
    assert set(params_a) == set(params_b)
    assert any(len(v) == 3 for v in params_a.values())
    for name, value in params_a.items():
        assert set(value) == {"param", "exp_avg", "exp_avg_sq"}, name
        for key, t in value.items():
            assert torch.equal(t, params_b[name][key]), (name, key)
    # The moments are real (not reset): nonzero after N steps.
    for name in [moments_of] if moments_of else params_a:
        assert float(params_a[name]["exp_avg_sq"].abs().sum()) > 0, name
    assert buffers_a.keys() == buffers_b.keys()
    for name, t in buffers_a.items():
        assert torch.equal(t, buffers_b[name]), name
    assert meta_a["optimizer_step"] == meta_b["optimizer_step"] == meta_a["step"]
    assert meta_a["scheduler_epoch"] == meta_b["scheduler_epoch"]
    assert meta_a["global_batch"] == meta_b["global_batch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(world 2, ep 2, ZeRO 2), uninterrupted for N + 2K steps, saving at N and N + K."""
    tmp = tmp_path_factory.mktemp("reshard")
    base = _base(tmp)
    data = str(prepare_corpus(load_config("tiny", base).data))
    outs = run_ranks(
        _phase, 2, [*base, *_layout(2, 2, 2)], data, "", N + 2 * K, [N, N + K], str(tmp / "ref")
    )
    # The resumed runs must take the reference's routing decisions (MoD top-8, expert top-2)
    # from weights that other layouts reduced in another order: every one is clear of a tie.
    for rank, out in enumerate(outs):
        assert_clear(out["gap"], f"reference rank {rank}: {out['worst']}")
    return dict(tmp=tmp, base=base, data=data, **outs[0])


def _resume(reference: dict, world: int, layout: list[str], ckpt: int, name: str) -> dict:
    tmp = reference["tmp"]
    out = run_ranks(
        _phase,
        world,
        [*reference["base"], *layout],
        reference["data"],
        reference["folders"][ckpt],
        ckpt + K,
        [ckpt, ckpt + K],
        str(tmp / name),
    )[0]
    meta = torch.load(Path(out["folders"][ckpt]) / "meta.pt", weights_only=True)
    wanted = {k.split("=")[0]: int(k.split("=")[1]) for k in layout}
    assert (meta["world"], meta["ep_size"], meta["zero_stage"]) == (
        world,
        wanted["parallel.ep_size"],
        wanted["parallel.zero_stage"],
    )
    # Loaded at the new layout and saved straight back: the same weights and moments.
    _assert_same_state(reference["folders"][ckpt], out["folders"][ckpt])
    for step in range(ckpt, ckpt + K):
        assert out["losses"][step] == pytest.approx(reference["losses"][step], **LOSS_TOL), step
    return out


def test_resume_at_world2_ep1_zero1_then_back_to_ep2_zero0(reference: dict) -> None:
    out = _resume(reference, 2, _layout(2, 1, 1), N, "w2e1")
    assert out["grad_accum"] == 2
    # ep 1 -> ep 2 (and ZeRO 1 -> 0), from the checkpoint the ep 1 run wrote.
    chained = {**reference, "folders": {N + K: out["folders"][N + K]}}
    _resume(chained, 2, _layout(2, 2, 0), N + K, "w2e2z0")


def test_resume_at_world1(reference: dict) -> None:
    out = _resume(reference, 1, _layout(1, 1, 2), N, "w1e1")
    assert out["grad_accum"] == 4  # the global batch of 2 ranks x 2 micro steps


@pytest.mark.slow
def test_resume_at_world4_ep2(reference: dict) -> None:
    out = _resume(reference, 4, _layout(4, 2, 2), N, "w4e2")
    assert out["grad_accum"] == 1


@pytest.mark.slow
def test_zero3_with_experts_split_saves_and_resumes(reference: dict) -> None:
    """ZeRO-3 with ep 2 (experts partitioned over their expert-data-parallel group) loads
    the ZeRO-2 checkpoint, saves, and a ZeRO-0 world-1 run resumes what it wrote."""
    out = _resume(reference, 2, _layout(2, 2, 3), N, "w2e2z3")
    chained = {**reference, "folders": {N + K: out["folders"][N + K]}}
    _resume(chained, 1, _layout(1, 1, 0), N + K, "w1e1z0")


def test_launcher_refuses_what_cannot_resume(
    reference: dict, capsys: pytest.CaptureFixture
) -> None:
    """Exit 2 and one line naming the key, before any worker starts."""
    from turnout.launch.cli import main

    ckpt = reference["folders"][N]
    base = [*reference["base"], f"train.resume={ckpt}"]
    cases = [
        # Another model: its parameters have other shapes.
        (["model.d_model=64", "model.n_heads=4"], "model.d_model"),
        # 2 x 3 workers does not divide the global batch of 8 sequences.
        (["launch.num_workers=3", "parallel.ep_size=1"], "train.micro_batch_size"),
    ]
    for extra, key in cases:
        assert main(["train", "tiny", *base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"turnout: error: {key}") and err.count("\n") == 1, err
    # A layout that can resume passes the preflight; grad_accum is set in the workers.
    from turnout.trainer.resume.layout import resume_config

    cfg = load_config("tiny", [*base, *_layout(4, 4, 1), "train.grad_accum=7"])
    assert resume_config(cfg).train.grad_accum == 1


@pytest.mark.slow
def test_bf16_masters_and_moments_survive_a_layout_change(tmp_path: Path) -> None:
    """bf16 keeps fp32 masters apart from the weights (ZeRO 2: flat partitions; ZeRO 0:
    DeepSpeed's unfused optimizer's per-parameter copies): both round-trip exactly."""
    base = [*_base(tmp_path), "train.precision=bf16"]
    data = str(prepare_corpus(load_config("tiny", base).data))
    ref = run_ranks(
        _phase, 2, [*base, *_layout(2, 2, 2)], data, "", N + 1, [N], str(tmp_path / "ref")
    )[0]
    out = run_ranks(
        _phase,
        1,
        [*base, *_layout(1, 1, 0)],
        data,
        ref["folders"][N],
        N + 1,
        [N],
        str(tmp_path / "w1"),
    )[0]
    _assert_same_state(ref["folders"][N], out["folders"][N])
    assert out["losses"][N] == pytest.approx(ref["losses"][N], rel=1e-3)
