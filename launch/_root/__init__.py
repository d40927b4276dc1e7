"""turnout: train transformers whose compute depends on the input (MoE, MoD, MoDE).

The subpackages come from the repository's top-level folders: ``turnout.models``
(plain ``nn.Module`` code), ``turnout.parallel`` (everything that knows about ranks),
``turnout.trainer`` (the training loop), ``turnout.launch`` (CLI, Ray, worker entry).
"""

__version__ = "0.1.0"
