"""turnout sweep: grids of configs at fixed training-FLOP budgets, run as Ray Tune trials.

``driver.run_sweep`` runs (or resumes) a sweep; ``trials`` expands a spec into checked
trials; ``trial_run`` is what one Tune trial does (a normal turnout run). ``report``
turns the results into the isoFLOP study.
"""

__all__ = ["driver", "trials"]
