"""The trainer: what every rank runs, from a validated config to a finished run.

Open :mod:`turnout.trainer.train` first: it is the loop (``train`` on every rank inside one
process group) and names every stage of a step. Beside it, flat, the pieces the loop is
made of: :mod:`~turnout.trainer.run_setup` (what a run builds once), ``step`` (one
optimizer step), ``engine`` (the DeepSpeed engine), ``trainable`` (freezing all but the
routers), ``schedule``, ``balance`` (the aux-loss-free expert bias), ``skips`` and
``meter`` (step bookkeeping), ``stop`` (a SIGTERM's stop request, agreed by every rank).

The rooms, one concern each; a room's ``__all__`` names the modules other code may
import, the rest are its own (tests/unit/test_layering.py keeps that, and keeps the rooms
free of import circles):

- ``data/``: corpus -> tokenizer -> token cache -> per-rank batches;
- ``checkpointing/``: the layout-free format, its readers, and the collective save / load;
- ``resume/``: where a run resumes (automatic recovery, the layout check);
- ``tracking/``: MLflow: the run's life, the background sender, system metrics;
- ``metrics/``: routing metrics, expert load, FLOPs and MFU;
- ``eval/``: the one validation loop, depth metrics, generate / eval on a loaded model;
- ``weights/``: a checkpoint as a plain model, export (turnout and HF), upcycling;
- ``planner/``: ``turnout plan``: size, FLOPs, memory, all-to-all and a step-time bound.
"""
