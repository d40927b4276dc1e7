"""Evaluation: one validation loop, the decode-rule depth metrics, generate and eval.

``validation`` is the loop every validation runs (training's, collective; ``turnout
eval``'s, one process); ``depth`` is the early-exit / ponder histogram under the decode
rule; ``inference`` is what ``turnout generate`` and ``turnout eval`` compute on a loaded
model.
"""

__all__ = ["depth", "inference", "validation"]
