"""turnout: train transformers whose compute depends on the input (MoE, MoD, MoDE).

Where the code lives: this folder (``turnout/``) is the root package and the neutral
floor every layer may import: :mod:`turnout.errors`, every config schema in
:mod:`turnout.config`, and :mod:`turnout.redact` (what keeps secrets out of records).
The layers are the repository's top-level folders, installed as subpackages and
importing only downward: ``turnout.models`` (plain ``nn.Module`` code) <-
``turnout.parallel`` (everything that knows about ranks) <- ``turnout.trainer`` (engine,
loop, checkpoints, tracking) <- ``turnout.launch`` (CLI, Ray, worker entry).
``tests/unit/test_layering.py`` enforces it.
"""

__version__ = "0.1.0"
