"""turnout sweep: Ray Tune trials at fixed training-FLOP budgets, and the isoFLOP study made
from their results.

``report`` turns a sweep's trial records into the study (pure: numpy and matplotlib, no
Ray, no MLflow): per family and budget a quadratic isoFLOP fit with its optimum and a
bootstrap std, the same families at equal wall-clock, the LR choice and a verdict, written
as JSON, Markdown and PNG. Its own modules: ``study`` (records to optima and tables),
``fit`` (the math), ``verdict`` (the comparisons and their sentences), ``markdown`` and
``plot`` (the page and the figure, from the JSON alone).
"""

__all__ = ["report"]
