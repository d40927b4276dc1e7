"""Where a run resumes: automatic recovery after a failure, and whether a layout fits.

``recovery`` decides, collectively, where a restarted attempt of a job resumes and what
it trains again; ``layout`` checks a checkpoint resumes at this run's layout (on the
launcher too) and picks the gradient accumulation that keeps its global batch.
"""

__all__ = ["layout", "recovery"]
