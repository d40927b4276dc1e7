"""Bytes a forward keeps for its backward, by block: a measurement, not an estimate.

:func:`saved_bytes_by_block` runs one forward of a :class:`TransformerLM` inside
``torch.autograd.graph.saved_tensors_hooks`` and sums each saved storage once (views
share one), attributing it to the block whose forward was running (forward hooks on the
blocks; ``None`` for the embedding, head and loss). Inside a checkpointed block the
checkpoint's own hooks take over, so what is counted there is exactly what
checkpointing keeps: the block's inputs. It then runs the backward, which checks the
graph is whole. The benchmark ``benchmarks/activation_memory.py`` and the planner's
test use it.
"""

from __future__ import annotations

import torch

from turnout.models.lm import TransformerLM


def saved_bytes_by_block(model: TransformerLM, tokens_BS1: torch.Tensor) -> dict[int | None, int]:
    """Bytes saved for backward by each block index (None: outside the blocks) in one
    forward of ``tokens_BS1[:, :-1]`` against ``tokens_BS1[:, 1:]``; runs the backward."""
    seen: set[tuple[int, int]] = set()
    owner: list[int | None] = [None]
    per: dict[int | None, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:  # the graph holds every saved tensor: no address is reused
            seen.add(key)
            per[owner[0]] = per.get(owner[0], 0) + storage.nbytes()
        return t

    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: owner.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: owner.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:])
    finally:
        for h in hooks:
            h.remove()
    if out.loss is None:
        raise ValueError("the model returned no loss")
    out.loss.backward()
    return per
