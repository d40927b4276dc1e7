"""Weights in and out: a checkpoint as a plain model, exports, and upcycling.

``from_checkpoint`` loads any checkpoint into a one-process ``TransformerLM``; ``export``
writes it as turnout's folder or (``hf_format``) a Hugging Face Llama / Qwen3 / Mixtral /
Qwen3-MoE folder; ``hf_import`` reads such a folder (``turnout import``); both go through
the one tensor mapping of ``hf_map`` and the config mapping of ``hf_config``.
``upcycle`` starts a run from an earlier model (``train.init_from``: a checkpoint, an
export or an HF folder), with the pure mapping rules in ``upcycle_rules`` and, for a
dense block made MoD-routed (retrofit), ``retrofit_rules``.
"""

__all__ = ["export", "from_checkpoint", "hf_format", "hf_import", "upcycle"]
