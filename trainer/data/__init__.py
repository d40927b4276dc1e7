"""Where tokens come from: corpus -> tokenizer -> token cache -> per-rank batches.

``token_cache.prepare_corpus`` runs once on the launcher; ``batches.open_tokens`` and
``BatchSampler`` serve every rank; ``tokenizer`` / ``tokenizer_files`` are what a checkpoint
carries so generate and eval read text as training did. ``corpus`` (files, shards,
documents) and ``tokenizer_choice`` (which tokenizer, BPE training) are the cache's own.
``structure`` turns the corpus's Python files into syntax-tree and graph examples of the
function-name task (its own cache; docs/design.md §3.7). ``inputs`` is what a run reads
its data through, whichever of the two it trains on.
"""

__all__ = ["batches", "inputs", "structure", "token_cache", "tokenizer", "tokenizer_files"]
