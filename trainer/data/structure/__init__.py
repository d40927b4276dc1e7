"""Structured data: the corpus's Python sources as syntax trees and graphs, and the
function-name task over them (issue 25's data half; the models come next).

``ast_graph`` turns one function into a node table with tree and data-flow edges;
``names`` splits identifiers into subtokens and scores predicted names; ``examples``
builds, caches and splits the dataset from a corpus.
"""
