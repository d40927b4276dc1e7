"""``turnout plan``: a config's size, FLOPs, memory, all-to-all and step-time bound.

``plan.plan`` is the entry (arithmetic on the config, nothing built); ``text`` prints a
:class:`~turnout.trainer.planner.plan.Plan`. ``devices`` (the peak-figure table) and
``memory`` (model states, activations, all-to-all bytes) are its own.
"""

__all__ = ["plan", "text"]
