"""Weights in and out: a checkpoint as a plain model, exports, and upcycling.

``from_checkpoint`` loads any checkpoint into a one-process ``TransformerLM``; ``export``
writes it as turnout's folder or (``hf_format``) a Hugging Face Llama / Mixtral folder;
``upcycle`` starts a run from an earlier model (``train.init_from``), with the pure
mapping rules in ``upcycle_rules``.
"""

__all__ = ["export", "from_checkpoint", "hf_format", "upcycle"]
