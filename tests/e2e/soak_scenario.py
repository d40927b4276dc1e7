"""The chaos soak's scenario (tests/e2e/test_chaos_soak.py), run inside a private mount
namespace whose checkpoint folder is a small tmpfs, so that the disk can be filled.

``python soak_scenario.py SETTINGS.json`` runs tests/jobs.py's JOB with frequent
checkpoints and these events, in order, at steps drawn from a seeded generator:

1. a training worker is SIGKILLed (Ray restarts the group, which resumes from the
   newest checkpoint);
2. the driver is SIGTERMed (a graceful stop: a checkpoint, exit 143);
3. the same command with ``train.resume=auto`` is run again, and the checkpoint
   filesystem is filled while it trains, so its next checkpoint cannot be written (one
   line, not retried);
4. the filler is removed and the same command is run again, to the end.

It prints one JSON object: each event with the step it happened at, each job's exit
code, output and ``turnout:`` lines, and where the final checkpoint was copied (out of
the tmpfs, which ends with the namespace). The test holds the assertions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.jobs import (  # noqa: E402
    JOB,
    finish,
    our_lines,
    ray_workers,
    reaped,
    recovery_record,
    start_train,
    summary_value,
    wait_for_record,
)

CKPT_EVERY = 4


def _fill(mnt: Path, leave: int) -> int:
    """Fill the filesystem at ``mnt`` but ``leave`` bytes; the filler's size."""
    st = os.statvfs(mnt)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with (mnt / "filler").open("wb") as f:
        chunk = b"\0" * (1 << 20)
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
    return size


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    cwd, mnt = Path(settings["cwd"]), Path(settings["mnt"])
    rng = random.Random(settings["seed"])
    kill_after = rng.randint(5, 7)  # between the checkpoints at 4 and 8
    term_after = rng.randint(10, 13)
    fill_after = rng.randint(15, 18)  # the checkpoint at 20 is the first that cannot fit
    args = [
        *JOB,
        f"train.ckpt_every={CKPT_EVERY}",
        "train.keep_checkpoints=2",
        f"train.ckpt_dir={mnt / 'checkpoints'}",  # tests/jobs.py reads its records there
        "launch.max_failures=2",
        "launch.preempt_grace_s=600",  # a loaded 2-core machine; how fast is not the point
        "tracking.experiment=soak",
    ]
    events: list[dict] = []
    jobs: list[dict] = []

    def _record(name: str, proc, out: str, err: str) -> None:  # noqa: ANN001
        jobs.append({"name": name, "code": proc.returncode, "out": out, "lines": our_lines(err)})

    # 1 and 2: one job, a worker killed, then the driver terminated.
    with reaped(start_train(cwd, args)) as proc:
        at = wait_for_record(lambda r: r["step"] >= kill_after, proc, mnt, 600, "the kill")
        workers = ray_workers(proc)
        assert len(workers) == 2, workers
        os.kill(max(workers, key=lambda p: p.pid).pid, signal.SIGKILL)
        events.append({"event": "SIGKILL a worker", "after_step": at["step"]})
        at = wait_for_record(
            lambda r: r["attempt"] == 1 and r["step"] >= term_after, proc, mnt, 600, "the stop"
        )
        os.kill(proc.pid, signal.SIGTERM)
        events.append({"event": "SIGTERM the driver", "after_step": at["step"]})
        out, err = proc.communicate(timeout=600)
    _record("killed, then terminated", proc, out, err)

    # 3: resumed, and the disk fills under it.
    resume = [*args, "train.resume=auto"]
    with reaped(start_train(cwd, resume)) as proc:
        at = wait_for_record(lambda r: r["step"] >= fill_after, proc, mnt, 600, "the fill")
        size = _fill(mnt, leave=2 << 20)  # the recovery record fits, a checkpoint does not
        events.append({"event": "disk filled", "after_step": at["step"], "filler": size})
        out, err = proc.communicate(timeout=600)
    _record("resumed, disk filled", proc, out, err)

    # 4: room again; resumed to the end.
    (mnt / "filler").unlink()
    events.append({"event": "disk freed", "after_step": (recovery_record(mnt) or {}).get("step")})
    proc = start_train(cwd, resume)
    out, err = finish(proc, 900)
    _record("resumed to the end", proc, out, err)
    # The tmpfs goes with this namespace: the final checkpoint is copied out for the test.
    final = ""
    if proc.returncode == 0:
        final = str(shutil.copytree(summary_value(out, "checkpoint"), cwd / "final"))

    result = {"events": events, "jobs": jobs, "seed": settings["seed"], "final": final}
    print(json.dumps(result))


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    print(f"soak: {time.monotonic() - t0:.0f} s", file=sys.stderr)
