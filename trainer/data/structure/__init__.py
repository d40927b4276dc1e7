"""Structured data: the corpus's Python sources as syntax trees and graphs, and the
function-name task over them; the models are :mod:`turnout.models.structure`, the
training path :mod:`turnout.trainer.structure`.

``ast_graph`` turns one function into a node table with tree and data-flow edges;
``names`` splits identifiers into subtokens and scores predicted names; ``examples``
builds, caches and splits the dataset from a corpus; ``prepare`` is the launcher's
step (the cache built once); ``dataset`` and ``batches`` read it.
"""
