"""Make a config's relative paths absolute against the launcher's working directory.

Ray workers (and a joined cluster's nodes) do not necessarily run in the directory the
user typed ``turnout train`` in. Resolving every path-like field on the driver, before
the config is shipped, makes MLflow's ``sqlite:///mlflow.db``, the checkpoints and the
token cache land where the user expects: next to them.
"""

from __future__ import annotations

import copy
from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.config.train import RESUME_AUTO
from turnout.trainer.tracking.uri import absolute_tracking_uri


def _abs(path: str, base: Path) -> str:
    if not path:
        return path
    return str((base / Path(path).expanduser()).resolve())


def resolve_paths(cfg: TurnoutConfig, cwd: Path | None = None) -> TurnoutConfig:
    """A copy of ``cfg`` whose file-system paths are absolute (relative to ``cwd``)."""
    base = (cwd or Path.cwd()).resolve()
    out = copy.deepcopy(cfg)
    out.tracking.uri = absolute_tracking_uri(out.tracking.uri, base)
    if out.data.corpus != "stdlib":
        out.data.corpus = _abs(out.data.corpus, base)
    out.data.cache_dir = _abs(out.data.cache_dir, base)
    if out.data.val_corpus and out.data.val_corpus != "stdlib":
        out.data.val_corpus = _abs(out.data.val_corpus, base)
    if out.data.tokenizer not in ("byte", "bpe"):
        out.data.tokenizer = _abs(out.data.tokenizer, base)
    out.train.ckpt_dir = _abs(out.train.ckpt_dir, base)
    if out.train.resume != RESUME_AUTO:
        out.train.resume = _abs(out.train.resume, base)
    out.train.init_from = _abs(out.train.init_from, base)
    out.launch.storage_path = _abs(out.launch.storage_path or ".turnout/ray", base)
    return out
