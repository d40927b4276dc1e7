"""`turnout generate` / `turnout eval` refuse what is not a loadable checkpoint in one line.

Loading real checkpoints (ZeRO 0-3, experts split over ranks) and the commands' output are tested
in tests/distributed/test_export.py on checkpoints the engine wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from turnout.config.load import load_config, to_yaml
from turnout.errors import CheckpointError, ConfigError
from turnout.launch.cli import main
from turnout.trainer.checkpointing.files import DENSE_FILE, FORMAT, META_FILE
from turnout.trainer.weights.from_checkpoint import load_for_inference

pytestmark = pytest.mark.unit


def _step_folder(tmp_path: Path, module: object, with_config: bool = True) -> Path:
    """A step folder in the checkpoint format whose weights file holds ``module``."""
    folder = tmp_path / "run" / "step4"
    folder.mkdir(parents=True)
    meta = {"format": FORMAT, "step": 4, "expert_files": [], "weight_dtype": "float32"}
    torch.save(meta, folder / META_FILE)
    if isinstance(module, bytes):
        (folder / DENSE_FILE).write_bytes(module)
    else:
        params = {k: {"param": v} for k, v in dict(module).items()}  # type: ignore[call-overload]
        torch.save({"params": params, "buffers": {}}, folder / DENSE_FILE)
    if with_config:
        (folder / "config.yaml").write_text(to_yaml(load_config("tiny", ["parallel.ep_size=1"])))
    (tmp_path / "run" / "latest").write_text("step4")
    return folder


def _one_error_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("turnout: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_path_that_is_no_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(tmp_path / "nope"), *extra]) == 2
    _one_error_line(capsys, "checkpoint:", str(tmp_path / "nope"))


def test_a_checkpoint_without_its_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _step_folder(tmp_path, {}, with_config=False)
    assert main(["eval", str(folder)]) == 2
    _one_error_line(capsys, "checkpoint:", "config.yaml", str(folder))


def test_unreadable_or_mismatched_weights_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _step_folder(tmp_path / "a", b"not a torch file")
    assert main(["generate", str(folder.parent), "--prompt", "hi"]) == 1
    _one_error_line(capsys, "cannot read", str(folder / DENSE_FILE))

    folder = _step_folder(tmp_path / "b", {"embed.weight": torch.zeros(256, 8)})
    with pytest.raises(CheckpointError, match="does not match its config.yaml"):
        load_for_inference(folder)
    assert main(["eval", str(folder)]) == 1
    _one_error_line(capsys, str(folder), "config.yaml")


def test_bad_generate_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _step_folder(tmp_path, {})
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "-1"]) == 2
    _one_error_line(capsys, "--max-new-tokens")
    max_len = load_config("tiny").model.max_seq_len
    # Too long a prompt is refused from the config, before any weight is read.
    assert main(["generate", str(folder), "--prompt", "y" * (max_len + 1)]) == 2
    _one_error_line(capsys, "--prompt", f"max_seq_len={max_len}")
    assert main(["generate", str(folder), "--prompt", ""]) == 2
    _one_error_line(capsys, "--prompt", "empty")
    if not torch.cuda.is_available():
        assert main(["generate", str(folder), "--prompt", "hi", "--device", "cuda"]) == 2
        _one_error_line(capsys, "--device", "CUDA")
    with pytest.raises(ConfigError, match="checkpoint"):
        load_for_inference(tmp_path / "missing")


def test_sample_text_counts_the_decode_steps_only() -> None:
    from turnout.models.lm import TransformerLM
    from turnout.trainer.eval.inference import sample_text

    cfg = load_config("tiny", ["model.layer_pattern=[dense,mod]", "model.max_seq_len=32"]).model
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    prompt = "héllo"  # 6 bytes
    out = sample_text(model, prompt, max_new_tokens=40, temperature=1.0, seed=1)
    # Cut to the context: 32 - 6 new tokens, of which all but the last were fed back.
    assert out.new_tokens == 26
    routed = sum(1 for kind in cfg.blocks() if kind.mod_routed)
    assert sum(out.decode_routed) == (out.new_tokens - 1) * routed
    assert out.skipped_fraction == out.decode_routed[1] / sum(out.decode_routed)
    assert out.text.startswith(prompt)
    assert len(out.text.encode("utf-8", errors="replace")) >= 6
    assert sample_text(model, prompt, 40, 1.0, seed=1).text == out.text


def _depth_checkpoint(tmp_path: Path, overrides: list[str]) -> Path:
    from turnout.models.lm import TransformerLM

    cfg = load_config("tiny", ["parallel.ep_size=1", "model.layer_pattern=[dense]", *overrides])
    torch.manual_seed(0)
    folder = _step_folder(tmp_path, TransformerLM(cfg.model).state_dict(), with_config=False)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


def test_generate_reports_the_mean_exit_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _depth_checkpoint(tmp_path, ["model.exit.layers=[1,2]"])
    args = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "6"]
    assert main([*args, "--exit-threshold", "0", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "6 new tokens" in err and "mean exit layer 1.00 of 4 blocks" in err, err
    assert main([*args, "--exit-threshold", "1"]) == 0
    assert "mean exit layer 4.00 of 4 blocks" in capsys.readouterr().err
    assert main([*args, "--halt-threshold", "0.5"]) == 2
    _one_error_line(capsys, "--halt-threshold", "ponder")
    assert main([*args, "--exit-threshold", "1.5"]) == 2
    _one_error_line(capsys, "--exit-threshold")


def test_generate_reports_the_ponder_depth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = [
        "model.n_layers=2",
        "model.layer_pattern=[dense,ponder]",
        "model.ponder.max_steps=3",
    ]
    folder = _depth_checkpoint(tmp_path, overrides)
    args = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main([*args, "--halt-threshold", "0"]) == 0
    assert "mean depth (ponder) 2.00 of 4 blocks" in capsys.readouterr().err
    assert main([*args, "--halt-threshold", "1"]) == 0
    assert "mean depth (ponder) 4.00 of 4 blocks" in capsys.readouterr().err
    assert main([*args, "--exit-threshold", "0.5"]) == 2
    _one_error_line(capsys, "--exit-threshold", "early exits")


def test_generate_reports_the_mean_recursion_depth(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [
        "model.n_layers=3",
        "model.layer_pattern=[dense,recursion,dense]",
        "model.recursion.max_recursions=3",
        "model.recursion.group=2",
        "model.recursion.capacities=[1.0,1.0,1.0]",  # every token runs all three
    ]
    folder = _depth_checkpoint(tmp_path, overrides)
    args = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "mean recursion depth 3.00 of 3 (8.00 of 8 blocks)" in err, err
    assert "0.0% of routed-block work skipped" in err, err
    assert main([*args, "--halt-threshold", "0.5"]) == 2
    _one_error_line(capsys, "--halt-threshold", "ponder")
