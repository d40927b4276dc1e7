"""The expert load as a picture: a heatmap (MoE layer x expert) logged to MLflow.

Shape legend: L MoE layers, R real experts, H x W image pixels.

At any E a per-expert metric series per layer is unreadable (128 experts x 12 layers =
1,536 series); one image per logging point shows every expert of every layer at once,
and MLflow's image view steps through them over training (``key`` + ``step``). A cell
is the expert's load over the layer's mean (1 = its fair share; 0 = dead, drawn in its
own colour), on a fixed scale 0..2 so pictures of different steps compare.
:class:`LoadMonitor` runs at each log step on the summed counts: it warns about dead
experts and draws the heatmap when ``tracking.load_image_every`` says so.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from turnout.config import TurnoutConfig
from turnout.trainer.metrics.load_stats import DeadExpertWatch
from turnout.trainer.tracking.tracker import Tracker

#: MLflow image key of the heatmap.
IMAGE_KEY = "expert_load"
#: Load over mean at the top of the colour scale (higher loads saturate).
VMAX = 2.0
DPI = 100


def figure_inches(layers: int, experts: int) -> tuple[float, float]:
    """Figure size for an L x R heatmap: wide enough to tell experts apart up to ~128,
    tall enough for the layer labels, bounded both ways."""
    width = min(16.0, max(5.0, 2.5 + 0.1 * experts))
    height = min(12.0, max(2.5, 1.2 + 0.35 * layers))
    return width, height


def image_pixels(layers: int, experts: int) -> tuple[int, int]:
    """(height, width) in pixels of the heatmap of L layers x R experts."""
    w, h = figure_inches(layers, experts)
    return round(h * DPI), round(w * DPI)


def load_matrix(loads: dict[int, torch.Tensor]) -> tuple[list[int], np.ndarray]:
    """The layer indices and the ``[L, R]`` load-over-mean matrix (NaN pads a layer with
    fewer experts; a layer without assignments is all 0)."""
    layers = sorted(loads)
    R = max((loads[i].numel() for i in layers), default=0)
    m_LR = np.full((len(layers), R), np.nan)
    for row, i in enumerate(layers):
        c = loads[i].detach().to("cpu", torch.float64).numpy()
        total = c.sum()
        m_LR[row, : c.size] = c / total * c.size if total > 0 else 0.0
    return layers, m_LR


def render_heatmap(loads: dict[int, torch.Tensor], title: str) -> np.ndarray:
    """The heatmap as an RGB ``uint8`` array ``[H, W, 3]`` (matplotlib's Agg backend,
    no pyplot state, so it is safe in any process)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, m_LR = load_matrix(loads)
    L, R = m_LR.shape
    fig = Figure(figsize=figure_inches(L, R), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Dead experts (load 0, drawn below the scale) stand out; padding cells are grey.
    cmap = colormaps["viridis"].with_extremes(under="red", bad="lightgrey")
    shown = np.where(m_LR == 0, -1.0, m_LR)
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=VMAX)
    ax.set_xlabel("expert (red: no tokens)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layers])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="load / mean", extend="max")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an RGB ``uint8`` image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_due(done: int, every: int, last_image: int, steps: int) -> bool:
    """Whether the log step ``done`` draws the heatmap: a multiple of ``every`` was
    reached since the last image (step ``last_image``), or it is the last step."""
    if every <= 0:
        return False
    return done // every > last_image // every or done == steps


class LoadMonitor:
    """Dead-expert warnings and the heatmap, at the log steps (every rank calls it with
    the same global counts; only rank 0 writes, the tracker is inert elsewhere)."""

    def __init__(self, cfg: TurnoutConfig, tracker: Tracker, rank: int, start: int = 0) -> None:
        self.every = cfg.tracking.load_image_every
        self.steps = cfg.train.steps
        self.tracker = tracker
        self.rank = rank
        self.watch = DeadExpertWatch()
        self.last_log = start
        self.last_image = start

    def observe(self, loads: dict[int, torch.Tensor], done: int) -> bool:
        """Look at one log interval ending at step ``done``; True if an image was logged."""
        first = self.last_log + 1
        self.last_log = done
        if not loads:
            return False
        if self.rank == 0:
            self.watch.check(loads, first, done)
        if not image_due(done, self.every, self.last_image, self.steps):
            return False
        self.last_image = done
        if not self.tracker.active:
            return False
        image = render_heatmap(loads, f"expert load / mean, steps {first}-{done}")
        self.tracker.log_image(image, IMAGE_KEY, done)
        return True
