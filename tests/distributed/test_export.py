"""Checkpoints load into one process without DeepSpeed: ZeRO 0, 1, 2 with ep_size 2, and
ZeRO-3 (which turnout allows only without expert parallelism).

Two gloo ranks train a tiny MoDE model through the real engine, save with
``checkpoint.save``, and compute reference logits and validation losses with the live
expert-parallel model (the forward over both ranks, same tokens on each). The test
process then rebuilds the model with ``load_for_inference`` and must reproduce them;
``turnout generate`` / ``turnout eval`` run on the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_train_loop import _overrides
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.launch.cli import main
from turnout.trainer.data.batches import prepare_corpus
from turnout.trainer.eval.inference import evaluate_model
from turnout.trainer.weights.from_checkpoint import load_for_inference

pytestmark = pytest.mark.distributed

WORLD = 2
STAGES = (0, 1, 2)
STEPS = 2


def _train_save_reference(
    rank: int, world: int, base: list[str], data: str, ep: int, stages: tuple[int, ...]
) -> dict:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.checkpointing import collective as checkpoint
    from turnout.trainer.eval.validation import evaluate
    from turnout.trainer.metrics.routing import StatsAccumulator
    from turnout.trainer.run_setup import setup
    from turnout.trainer.step import run_step

    groups = build_groups(ep)
    tokens_BS = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(7))
    out = {}
    for stage in stages:
        cfg = load_config("tiny", [*base, f"parallel.zero_stage={stage}", f"parallel.ep_size={ep}"])
        run = setup(cfg, Path(data), groups)
        for step in range(STEPS):
            run_step(
                run.engine, run.sampler, step, cfg.train.grad_accum, StatsAccumulator(), rank, world
            )
        folder = checkpoint.save(
            run.engine, run.run_dir, STEPS, {"step": STEPS}, groups, cfg, run.tokenizer_file
        )
        val = evaluate(run.engine, run.sampler, cfg.train.eval_batches, "topk")
        val_causal = evaluate(run.engine, run.sampler, cfg.train.eval_batches, "causal")
        run.engine.eval()
        with torch.no_grad():
            logits = {r: run.engine(tokens_BS, routing=r).logits for r in ("topk", "causal")}
        run.tracker.finish("FINISHED")
        out[stage] = dict(folder=str(folder), logits=logits, val=val, val_causal=val_causal)
    return dict(tokens=tokens_BS, stages=out)


def _train(tmp: Path, ep: int, stages: tuple[int, ...]) -> dict:
    base = [*_overrides(tmp, steps=STEPS), "tracking.enabled=false", "train.eval_batches=2"]
    data = prepare_corpus(load_config("tiny", base).data)
    return run_ranks(_train_save_reference, WORLD, base, str(data), ep, stages)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ZeRO 0, 1, 2 with the 4 experts split over the 2 ranks."""
    return _train(tmp_path_factory.mktemp("export"), 2, STAGES)


def test_zero3_checkpoint_is_gathered(tmp_path: Path) -> None:
    trained = _train(tmp_path, 1, (3,))
    ref = trained["stages"][3]
    model, _, info = load_for_inference(ref["folder"])
    assert (info.step, info.zero_stage, info.ep_size) == (STEPS, 3, 1)
    with torch.no_grad():
        for routing, expected in ref["logits"].items():
            got = model(trained["tokens"], routing=routing).logits
            # As in the test below.
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_loaded_model_reproduces_the_trained_one(trained: dict, stage: int) -> None:
    ref = trained["stages"][stage]
    model, cfg, info = load_for_inference(Path(ref["folder"]).parent)  # run folder -> latest
    assert info.folder == Path(ref["folder"])
    assert (info.step, info.zero_stage, info.ep_size) == (STEPS, stage, 2)
    assert cfg.parallel.zero_stage == stage
    # All 4 experts are back in one bank, from the two ranks' slices.
    assert model.layers[1].block.ffn.experts.w_gate_EDF.shape[0] == 4
    # Every routing decision (MoD top-k or predictor, expert top-2) is taken before the only
    # computation that differs from the live model: the experts of the last block, which
    # ran on the peer rank in other buckets. So the decisions are bitwise the same, and
    # the logits may differ by fp32 rounding of those expert outputs (0 measured).
    with torch.no_grad():
        for routing, expected in ref["logits"].items():
            got = model(trained["tokens"], routing=routing).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The validation windows of the training run, on one process: the same losses.
    ev = evaluate_model(model, cfg)
    assert ev.loss == pytest.approx(ref["val"], rel=1e-5)
    assert ev.loss_causal == pytest.approx(ref["val_causal"], rel=1e-5)
    assert ev.windows == cfg.train.eval_batches * cfg.train.micro_batch_size * WORLD


def test_generate_and_eval_commands(trained: dict, capsys: pytest.CaptureFixture) -> None:
    folder = trained["stages"][2]["folder"]
    argv = ["generate", folder, "--prompt", "the quick", "--max-new-tokens", "12", "--seed", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the quick")
    assert len(out.rstrip("\n").encode()) >= len("the quick")
    assert "12 new tokens" in err and "decode tokens/s" in err
    assert "of routed-block work skipped" in err
    # Same seed, same text.
    assert main(argv) == 0
    assert capsys.readouterr().out == out

    assert main(["generate", folder, "--prompt", "x" * 33]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt" in err and "max_seq_len=32" in err

    assert main(["eval", str(Path(folder).parent), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    val = float(out.split("val_loss ")[1].split()[0])
    # Printed with 4 decimals (5e-5) plus fp32 rounding.
    assert val == pytest.approx(trained["stages"][2]["val"], abs=6e-5)
    assert "val_loss_causal" in out and "unigram_entropy" in out

    other = Path(folder).parent / "other.txt"
    other.write_text("".join(f"line {i} of another corpus\n" for i in range(300)))
    assert main(["eval", folder, "--corpus", str(other), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert f"corpus           {other} (4 held-out windows" in out
    assert 0 < float(out.split("val_loss ")[1].split()[0]) < 10
