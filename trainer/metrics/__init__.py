"""What a run measures besides its loss: routing, expert load, FLOPs and MFU.

``routing`` accumulates per-layer routing metrics over a log interval (reduced over
ranks); ``load_view`` draws the expert load as a heatmap for MLflow; ``compute`` counts
FLOPs per token, probes the device peak and reads peak memory. ``load_stats`` (load
summaries, the dead-expert warning) is the load view's own.
"""

__all__ = ["compute", "load_view", "routing"]
