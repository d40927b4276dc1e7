"""Bad configs through the real CLI: exit 2, one stderr line naming the key, no traceback.

Each case runs ``python -m turnout.launch.cli train ...`` in a fresh working directory,
so the test also proves nothing was started or written (no MLflow store, no
checkpoints, no Ray run folder) before the error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# (id, argv after `train`, the dotted key the one error line must name)
CASES = [
    ("unknown-key", ["tiny", "model.bogus=1"], "model.bogus"),
    ("structure-without-encoder", ["tiny", "data.structure=ast"], "model.structure.encoder"),
    ("encoder-without-structure", ["ast-gnn", "data.structure="], "data.structure"),
    ("tree-lstm-has-no-ffn", ["ast-treelstm", "model.structure.moe=true"], "model.structure.moe"),
    ("ast-bad-range", ["ast-gnn", "data.ast.max_nodes=0"], "data.ast.max_nodes"),
    ("ast-corpus-without-python", ["ast-gnn", "data.corpus=@binary_dir"], "data.corpus"),
    ("unknown-section", ["tiny", "nosuch.key=1"], "nosuch.key"),
    ("wrong-type-int", ["tiny", "model.d_model=abc"], "model.d_model"),
    ("wrong-type-bool", ["tiny", "tracking.enabled=maybe"], "tracking.enabled"),
    ("top-k-above-experts", ["tiny", "model.moe.top_k=5"], "model.moe.top_k"),
    ("exit-beyond-the-stack", ["tiny", "model.exit.layers=[9]"], "model.exit.layers"),
    (
        "ponder-without-steps",
        [
            "tiny",
            "model.layer_pattern=[dense,ponder]",
            "model.n_layers=2",
            "model.ponder.max_steps=0",
        ],
        "model.ponder.max_steps",
    ),
    (
        "experts-not-divisible-by-ep",
        ["tiny", "model.moe.num_experts=6", "parallel.ep_size=4", "launch.num_workers=4"],
        "parallel.ep_size",
    ),
    (
        "world-not-divisible-by-ep",
        ["tiny", "parallel.ep_size=2", "launch.num_workers=3"],
        "parallel.ep_size",
    ),
    ("capacity-factor-zero", ["tiny", "model.moe.capacity_factor=0"], "model.moe.capacity_factor"),
    (
        "capacity-factor-negative",
        ["tiny", "model.moe.capacity_factor=-1.5"],
        "model.moe.capacity_factor",
    ),
    ("mod-capacity-zero", ["tiny", "model.mod.capacity=0"], "model.mod.capacity"),
    ("mod-capacity-above-one", ["tiny", "model.mod.capacity=1.5"], "model.mod.capacity"),
    ("layer-pattern-unknown", ["tiny", "model.layer_pattern=[dense,foo]"], "model.layer_pattern"),
    ("layer-pattern-empty", ["tiny", "model.layer_pattern=[]"], "model.layer_pattern"),
    ("heads-not-dividing", ["tiny", "model.n_heads=3"], "model.n_heads"),
    ("zero-steps", ["tiny", "train.steps=0"], "train.steps"),
    ("negative-keep", ["tiny", "train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    ("keep-every-without-keep", ["tiny", "train.keep_every=100"], "train.keep_every"),
    ("negative-peak", ["tiny", "train.peak_tflops=-1"], "train.peak_tflops"),
    ("nan-peak", ["tiny", "train.peak_tflops=nan"], "train.peak_tflops"),
    ("nccl-without-gpu", ["tiny", "parallel.backend=nccl"], "parallel.backend"),
    ("zero-pg-timeout", ["tiny", "parallel.timeout_s=0"], "parallel.timeout_s"),
    ("nan-pg-timeout", ["tiny", "parallel.timeout_s=nan"], "parallel.timeout_s"),
    (
        "negative-skip-limit",
        ["tiny", "train.max_consecutive_skipped_steps=-1"],
        "train.max_consecutive_skipped_steps",
    ),
    ("negative-flush", ["tiny", "tracking.flush_timeout_s=-1"], "tracking.flush_timeout_s"),
    ("negative-model-mb", ["tiny", "tracking.log_model_max_mb=-1"], "tracking.log_model_max_mb"),
    ("model-name-slash", ["tiny", "tracking.register_as=a/b"], "tracking.register_as"),
    (
        "register-without-log-model",
        ["tiny", "tracking.register_as=lm", "tracking.log_model=false"],
        "tracking.register_as",
    ),
    ("zero-stage", ["tiny", "parallel.zero_stage=4"], "parallel.zero_stage"),
    ("negative-grace", ["tiny", "launch.preempt_grace_s=-1"], "launch.preempt_grace_s"),
    # A checkpoint of megabytes in a microsecond: no disk writes a terabyte a second.
    (
        "grace-shorter-than-the-checkpoint",
        ["tiny", "launch.preempt_grace_s=0.000001"],
        "launch.preempt_grace_s",
    ),
    ("override-without-equals", ["tiny", "train.steps"], "train.steps"),
    ("unknown-preset", ["no-such-preset"], "config"),
    ("missing-yaml", ["missing.yaml"], "config"),
    ("malformed-yaml", ["@malformed"], "config"),
    ("yaml-unknown-key", ["@unknown_key"], "model.bogus"),
    ("yaml-wrong-type", ["@wrong_type"], "train.steps"),
    ("corpus-missing", ["tiny", "data.corpus=does/not/exist"], "data.corpus"),
    ("corpus-empty-dir", ["tiny", "data.corpus=@empty_dir"], "data.corpus"),
    ("corpus-too-small", ["tiny", "data.corpus=@small_file"], "data.corpus"),
    ("corpus-binary-file", ["tiny", "data.corpus=@binary_file"], "data.corpus"),
    ("corpus-binary-in-dir", ["tiny", "data.corpus=@binary_dir"], "data.corpus"),
    ("resume-missing", ["tiny", "train.resume=no/such/run"], "train.resume"),
    ("resume-not-a-checkpoint", ["tiny", "train.resume=@not_a_checkpoint"], "train.resume"),
    ("tracking-uri-scheme", ["tiny", "tracking.uri=ftp://host/mlruns"], "tracking.uri"),
]

# What a binary corpus file holds: enough bytes for a run, with NULs in them.
BINARY = bytes(range(256)) * 64

FILES = {
    "malformed": "model: [unclosed\n  d_model: 3\n",
    "unknown_key": "model:\n  bogus: 1\n",
    "wrong_type": "train:\n  steps: many\n",
}


def _materialise(args: list[str], cwd: Path) -> list[str]:
    """Replace @name placeholders with files/folders created in the test's cwd."""
    out = []
    for a in args:
        if a.startswith("@") and a[1:] in FILES:
            path = cwd / f"{a[1:]}.yaml"
            path.write_text(FILES[a[1:]])
            a = str(path)
        elif a.endswith("=@empty_dir"):
            (cwd / "empty_dir").mkdir()
            a = a.replace("@empty_dir", str(cwd / "empty_dir"))
        elif a.endswith("=@small_file"):
            (cwd / "small.txt").write_text("print('hello')\n" * 4)
            a = a.replace("@small_file", str(cwd / "small.txt"))
        elif a.endswith("=@binary_file"):
            (cwd / "blob.bin").write_bytes(BINARY)
            a = a.replace("@binary_file", str(cwd / "blob.bin"))
        elif a.endswith("=@binary_dir"):
            (cwd / "blobs").mkdir()
            (cwd / "blobs" / "blob.bin").write_bytes(BINARY)
            a = a.replace("@binary_dir", str(cwd / "blobs"))
        elif a.endswith("=@not_a_checkpoint"):
            (cwd / "run").mkdir()
            (cwd / "run" / "notes.txt").write_text("not a checkpoint\n")
            a = a.replace("@not_a_checkpoint", str(cwd / "run"))
        out.append(a)
    return out


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "turnout.launch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("args", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_exit_2(args: list[str], key: str, tmp_path: Path) -> None:
    argv = ["train", *_materialise(args, tmp_path)]
    before = set(os.listdir(tmp_path))
    proc = _run_cli(argv, tmp_path)

    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"turnout: error: {key}"), lines[0]
    assert proc.stdout == ""
    # Nothing was started or written before the error.
    created = set(os.listdir(tmp_path)) - before - {".turnout_cache"}
    assert not created, created
    for name in ("mlflow.db", "mlruns", "mlartifacts", "checkpoints", ".turnout"):
        assert not (tmp_path / name).exists(), name


def test_show_uses_the_same_validation(tmp_path: Path) -> None:
    proc = _run_cli(["show", "tiny", "model.moe.top_k=5"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("turnout: error: model.moe.top_k:")


def test_usage_error_is_one_line(tmp_path: Path) -> None:
    proc = _run_cli(["train", "--no-such-flag"], tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--no-such-flag" in proc.stderr


def test_console_script_reports_the_key(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("turnout")
    script = str(exe) if exe.exists() else shutil.which("turnout")
    assert script, "the `turnout` console script is not installed"
    proc = subprocess.run(
        [script, "train", "tiny", "model.moe.capacity_factor=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "turnout: error: model.moe.capacity_factor: must be > 0 or null (dropless), got 0.0"
    )


def test_validation_does_not_import_the_heavy_stack() -> None:
    """A bad config must fail before Ray, DeepSpeed, MLflow or torch are even imported."""
    code = (
        "import sys\n"
        "from turnout.launch.cli import main\n"
        "rc = main(['train', 'tiny', 'model.moe.top_k=99'])\n"
        "heavy = sorted(m for m in ('ray', 'deepspeed', 'mlflow', 'torch', 'torch.distributed')"
        " if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "override",
    ["train.resume=no/such/run", "tracking.uri=ftp://host/mlruns", "data.corpus=blob.bin"],
)
def test_launcher_checks_come_before_ray(override: str, tmp_path: Path) -> None:
    """A bad resume path, store or corpus is reported by the launcher: Ray, DeepSpeed and
    MLflow are never imported (so no worker started). No clock is read: how long that takes
    depends on the machine, and the import check is what proves no worker started."""
    (tmp_path / "blob.bin").write_bytes(BINARY)
    code = (
        "import json, sys\n"
        "from turnout.launch.cli import main\n"
        f"rc = main(['train', 'tiny', {override!r}])\n"
        "heavy = sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules)\n"
        "print(json.dumps([rc, heavy]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    rc, heavy = json.loads(proc.stdout)
    assert (rc, heavy) == (2, []), proc.stdout + proc.stderr
    key = override.split("=", 1)[0]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"turnout: error: {key}: ")
