"""turnout sweep: grids of configs at fixed training-FLOP budgets, run as Ray Tune trials.

``driver`` runs (or resumes) a sweep and writes its report; ``trials`` expands a spec
into checked trials, each with the steps that make its budget. The room's own modules:
``trial_run`` (what one Tune trial does: a normal ``turnout train``, recorded),
``progress`` (the bar), and the report: ``report`` (records -> the isoFLOP study as
JSON, Markdown and PNG; no Ray, no MLflow) with ``study``, ``fit``, ``verdict``,
``markdown`` and ``plot``.
"""

__all__ = ["driver", "trials"]
