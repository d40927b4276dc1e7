"""The kernel build lock (models/build_lock.py) with real processes: a build killed while
it held both our lock and torch's baton heals at once, a live build is waited on with one
line and only as long as allowed, and the kernel loader then uses the reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from turnout.models import kernels
from turnout.models.build_lock import (
    DEFAULT_WAIT_S,
    LOCK_FILE,
    TORCH_LOCK,
    WAIT_ENV,
    BuildLockTimeout,
    build_lock,
    wait_seconds,
)

pytestmark = pytest.mark.unit

# A build in progress: our lock, then torch's baton (as cpp_extension.load takes it), held
# until stdin closes (a clean end) or the process is killed.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from torch.utils.file_baton import FileBaton
    from turnout.models.build_lock import build_lock

    folder = Path(sys.argv[1])
    with build_lock(folder, wait_s=0):
        baton = FileBaton(str(folder / "lock"))
        assert baton.try_acquire()
        print("HELD", flush=True)
        sys.stdin.read()
        baton.release()
    """
)
FOREIGN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from torch.utils.file_baton import FileBaton

    baton = FileBaton(str(Path(sys.argv[1]) / "lock"))
    assert baton.try_acquire()
    print("HELD", flush=True)
    sys.stdin.read()
    baton.release()
    """
)
WAITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from turnout.models.build_lock import build_lock

    with build_lock(Path(sys.argv[1]), wait_s=600):
        print("ACQUIRED", flush=True)
    """
)


def _start(script: str, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _holding(folder: Path) -> subprocess.Popen[str]:
    proc = _start(HOLDER, folder)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "HELD", line + (proc.stderr.read() if proc.stderr else "")
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    """A clean end of the holder's build: it releases both locks and exits."""
    proc.communicate(timeout=120)
    assert proc.returncode == 0


def _turnout_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "turnout:" in str(w.message)]


def test_a_killed_build_heals_at_once(tmp_path: Path) -> None:
    proc = _holding(tmp_path)
    proc.kill()  # SIGKILL mid-build: nothing of it runs any more
    proc.wait(timeout=60)
    assert (tmp_path / TORCH_LOCK).exists()  # torch's baton, left behind: waited on forever
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with build_lock(tmp_path, wait_s=0):  # wait_s=0: no wait at all is allowed
            assert not (tmp_path / TORCH_LOCK).exists()
            baton = FileBaton(str(tmp_path / TORCH_LOCK))
            assert baton.try_acquire()  # torch's own build would go ahead
            baton.release()
    (line,) = _turnout_warnings(caught)
    assert f"was interrupted (by pid {proc.pid} on host " in line
    assert ", no longer running); removed torch's leftover lock" in line
    # A clean end leaves no owner behind: the next build says nothing.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with build_lock(tmp_path, wait_s=0):
            pass
    assert _turnout_warnings(caught) == []
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_torch_lock_without_an_owner_record_is_a_leftover(tmp_path: Path) -> None:
    (tmp_path / TORCH_LOCK).touch()  # a build killed before it took our lock's record
    leftover = r"removed torch's leftover build lock .* \(no process holds it\)"
    with pytest.warns(RuntimeWarning, match=leftover), build_lock(tmp_path, wait_s=0):
        assert not (tmp_path / TORCH_LOCK).exists()


def test_a_live_build_is_waited_on_with_one_line_then_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _holding(tmp_path)
    try:
        whose = rf"by pid {proc.pid} on host .*{WAIT_ENV}"
        with pytest.raises(BuildLockTimeout, match=whose), build_lock(tmp_path, wait_s=0.5):
            pass
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"turnout: waiting for the csrc/ kernel build by pid {proc.pid} on host "
        )
        assert (tmp_path / TORCH_LOCK).exists()  # a live build's baton is not touched
    finally:
        _end(proc)


def test_a_live_torch_baton_of_a_build_without_our_lock_is_not_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A build by a process that does not take our lock (an older turnout): torch's baton
    # alone, held open while it builds. It is waited on, never removed under it.
    proc = _start(FOREIGN, tmp_path)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "HELD"
    try:
        whose = rf"torch's build lock .*, held by pid {proc.pid}, is still there .*{WAIT_ENV}"
        with pytest.raises(BuildLockTimeout, match=whose), build_lock(tmp_path, wait_s=0.5):
            pass
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"turnout: waiting for torch's build lock {tmp_path / TORCH_LOCK}")
        assert (tmp_path / TORCH_LOCK).exists()
    finally:
        _end(proc)
    assert not (tmp_path / TORCH_LOCK).exists()  # released by its owner


def test_the_loader_goes_on_with_the_reference(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv(WAIT_ENV, "0")
    folder = kernels.build_directory("turnout_lock_test")
    assert folder == tmp_path / "ext" / "turnout_lock_test"
    proc = _holding(folder)
    try:
        source = kernels.csrc_dir() / kernels.CPU_SOURCES[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.build("turnout_lock_test", [source], with_cuda=False) is False
        (line,) = _turnout_warnings(caught)
        assert f"pid {proc.pid}" in line and "pure-PyTorch reference" in line
        assert not list(folder.glob("*.so"))  # nothing was compiled
    finally:
        _end(proc)


def test_a_waiter_takes_over_when_the_build_ends(tmp_path: Path) -> None:
    holder = _holding(tmp_path)
    waiter = _start(WAITER, tmp_path)
    assert waiter.stderr is not None
    said = waiter.stderr.readline()  # it waits, and says so, before the holder ends
    assert said.startswith(f"turnout: waiting for the csrc/ kernel build by pid {holder.pid}")
    _end(holder)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.strip() == "ACQUIRED", err
    assert "interrupted" not in err  # a clean end is not a leftover


def test_the_wait_knob(monkeypatch) -> None:
    monkeypatch.delenv(WAIT_ENV, raising=False)
    assert wait_seconds() == DEFAULT_WAIT_S
    monkeypatch.setenv(WAIT_ENV, "2.5")
    assert wait_seconds() == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(WAIT_ENV, bad)
        with pytest.raises(ValueError, match=WAIT_ENV):
            wait_seconds()
