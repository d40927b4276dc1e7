"""The function-name task in the training system (``data.structure: ast``).

``model`` builds the structure model from a config; ``sampler`` deals the training and
validation functions to ranks by global slot (resumable at any layout, as the token
sampler); ``validation`` scores held-out names (cross-entropy, subtoken F1, exact
match) over all ranks; ``flops`` counts the training FLOPs per node. The data itself
(parsing, the cache) is :mod:`turnout.trainer.data.structure`.
"""

__all__ = ["data", "flops", "model", "sampler", "validation"]
