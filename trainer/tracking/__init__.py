"""MLflow tracking: the run's life, what is logged, and a store that may be away.

``uri`` is the one reader of ``tracking.uri``; ``store`` opens, reopens and ends the run
honestly; ``tracker`` is what the loop logs through (rank 0); ``records`` turns a record
into MLflow calls (also replaying a spool); ``system`` samples system metrics per node.
``queue`` (the background sender) is the tracker's own. ``model_log`` logs a run's
weights as an MLflow logged model (copied, or by reference to its folder; optionally
registered) whose pyfunc flavour, ``pyfunc_model``, generates text.
"""

__all__ = ["model_log", "pyfunc_model", "records", "store", "system", "tracker", "uri"]
