"""Checkpoints: the layout-free on-disk format, its readers, and the collective save / load.

``files`` reads a checkpoint in one process (no process group, no ``turnout.parallel``):
export, recovery, the resume preflight and the tracking store use it. ``collective`` saves
and loads a live engine (every rank). ``manifest`` checks a step folder is as written.
``retention`` prunes old checkpoints after a save (``train.keep_checkpoints``); ``disk``
turns a full, read-only or forbidden disk into one line that is not retried.
``master_state`` (one parameter's fp32 master and moments at any ZeRO stage) is the
save / load's own.
"""

__all__ = ["collective", "disk", "files", "manifest", "retention"]
