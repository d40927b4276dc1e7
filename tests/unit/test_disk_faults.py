"""Disk faults a retry cannot fix, from real kernel errors (no mocks of the disk):

- EFBIG from a file-size limit (``RLIMIT_FSIZE`` set in a child process): portable, any
  user, any filesystem; the write starts, then fails part-way, as a full disk's does;
- ENOSPC from a real 256 KiB tmpfs, mounted in a private user + mount namespace
  (``unshare -Urm``); skipped where the machine forbids unprivileged namespaces;
- EACCES from a folder without write permission; skipped as root (root writes anyway).

Each failure must be one :class:`DiskError` line naming the path and the bytes needed,
leave no temporary file, and leave what was there before as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from turnout.errors import DiskError
from turnout.trainer.checkpointing import disk

pytestmark = pytest.mark.unit

# Run in a child: the file-size limit or the tmpfs must not reach the test process.
CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path

    import torch

    from turnout.errors import DiskError
    from turnout.files import write_atomic
    from turnout.trainer.checkpointing import disk
    from turnout.trainer.resume.recovery import _write

    run_dir = Path(sys.argv[1])
    if sys.argv[2] == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    out = {}
    (run_dir / "latest").write_text("step10")  # small: fits under both limits
    try:
        write_atomic(run_dir / "latest", "step" + "0" * 400_000)
    except OSError as e:
        out["atomic"] = e.errno
    try:
        disk.save_tensors({"w": torch.zeros(100_000)}, run_dir / "dense.pt", 1_200_000)
    except DiskError as e:
        out["save"] = e.message
    try:  # the recovery record, written after every step: its own size named
        _write(run_dir / "recovery.json", 0, 7, [])
        out["recovery"] = "written"
        (run_dir / "pad").write_bytes(b"x" * 1_000_000)
    except OSError:
        pass
    try:
        _write(run_dir / "recovery.json", 0, 8, [])
    except DiskError as e:
        out["recovery"] = e.message
    out["warned"] = [disk.warn_if_short(run_dir, 10**15, "checkpoint step20") for _ in "ab"]
    out["files"] = sorted(p.name for p in run_dir.iterdir())
    out["latest"] = (run_dir / "latest").read_text()
    print("RESULT " + json.dumps(out))
    """
)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1].removeprefix("RESULT "))


def _check(out: dict, run_dir: str, errno_name: str) -> None:
    assert out["atomic"] in (28, 27)  # ENOSPC or EFBIG: the OSError itself, intact
    assert out["latest"] == "step10"  # the old file as it was
    # No temporary left (".latest.tmp-<pid>"), nor the part of dense.pt that was written.
    assert not [f for f in out["files"] if ".tmp-" in f or f == "dense.pt"], out["files"]
    assert out["save"].startswith(
        f"{disk.UNFIXABLE[28 if errno_name == 'ENOSPC' else 27]} "
        f"({errno_name}) writing {run_dir}/dense.pt: "
    )
    assert "the checkpoint needs about 1.2 MB" in out["save"]
    assert "train.ckpt_dir" in out["save"] and "\n" not in out["save"]


def test_a_file_size_limit_is_one_line_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = _result(_run([sys.executable, "-c", CHILD, str(tmp_path), "fsize"]))
    _check(out, str(tmp_path), "EFBIG")
    assert out["recovery"] == "written"  # 50 bytes fit under the limit


def _unshare() -> list[str]:
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("no unshare(1) here")
    probe = _run([exe, "-Urm", "true"])
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged user namespaces here: {probe.stderr.strip()}")
    return [exe, "-Urm"]


def test_a_full_filesystem_is_one_line_and_leaves_no_temporary(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {mnt} || exit 77; "
        f'exec {sys.executable} -c "$0" {mnt} tmpfs'
    )
    proc = _run([*_unshare(), "sh", "-c", script, CHILD])
    if proc.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    out = _result(proc)
    _check(out, str(mnt), "ENOSPC")
    assert "free there" in out["save"]
    # The record fits at first; once the disk is full its write is one line too.
    assert out["recovery"].startswith(f"no space left on device (ENOSPC) writing {mnt}/")
    assert "the run folder's recovery.json needs about" in out["recovery"]
    assert out["warned"] == [True, False]  # once per run folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_no_permission_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(DiskError, match=r"permission denied \(EACCES\) writing .*ro/x.pt"):
            disk.save_tensors({}, locked / "x.pt", 10)
    finally:
        locked.chmod(0o755)


def test_errors_a_retry_can_fix_are_left_alone(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        disk.save_tensors({}, tmp_path / "no" / "such" / "x.pt", 10)
    assert disk.disk_error(OSError(5, "I/O error"), tmp_path, 10) is None


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (30, "read-only file system (EROFS)"),
        (13, "permission denied (EACCES)"),
        (1, "operation not permitted (EPERM)"),
        (122, "disk quota exceeded (EDQUOT)"),
    ],
)
def test_each_unfixable_errno_names_itself_and_the_file(
    tmp_path: Path, code: int, words: str
) -> None:
    # The OSError the kernel's errno becomes (what open() raises on a read-only mount).
    error = OSError(code, os.strerror(code), str(tmp_path / "run" / "meta.pt"))
    found = disk.disk_error(error, tmp_path, 3_000_000)
    assert found is not None and found.key == "train.ckpt_dir"
    assert found.message.startswith(f"{words} writing {tmp_path}/run/meta.pt: ")
    assert "the checkpoint needs about 3.0 MB" in found.message
