"""The sweep's progress bar, drawn by a Ray Tune callback from the trials' records.

Tune pickles its callbacks with the experiment and unpickles them on
``Tuner.restore``, so the callback holds only the sweep folder and the trial count; the
bar is made on the first event and counts finished trials by their ``record.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from turnout.launch.sweep.trial_run import RECORD_FILE


def finished(folder: Path) -> int:
    """Trials of the sweep folder that have a record."""
    return sum(1 for _ in (folder / "trials").glob(f"*/{RECORD_FILE}"))


class SweepProgress(Callback):
    def __init__(self, folder: Path, total: int) -> None:
        self.folder = folder
        self.total = total
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "total": self.total, "bar": None}

    def _draw(self, trial: Any, failed: bool = False) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="turnout sweep", unit="trial")
        self.bar.n = min(finished(self.folder), self.total)
        self.bar.set_postfix_str(str(trial.config["trial"]["id"]), refresh=True)
        if failed:
            self.bar.write(f"turnout: trial {trial.config['trial']['id']} failed")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._draw(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._draw(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._draw(trial, failed=True)

    def on_experiment_end(self, trials: list, **_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
