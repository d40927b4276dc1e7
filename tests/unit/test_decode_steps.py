"""Blocks own their decode step: once every row of a call has exited, no block does work.

Shape legend: B batch, S sequence, P prompt.

Early exit decodes with CALM state propagation (design §3.4, §3.5): after every row of a
call has exited, each later block, whatever its kind, only projects the rows' keys and
values from their exit states into its caches. These tests count every module call and
every routing/halting method call in the later blocks while that happens: zero, apart
from the pre-attention norm and RoPE that the K/V projection itself needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.margins import assert_clear, threshold_gap
from turnout.config.model import (
    ExitConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    PonderConfig,
    validate_model,
)
from turnout.models.decode import DecodeState
from turnout.models.exit import confidence
from turnout.models.layers import Attention, Rotary
from turnout.models.lm import TransformerLM
from turnout.models.mod import MoDBlock
from turnout.models.moe import MoELayer
from turnout.models.ponder import PonderBlock

pytestmark = pytest.mark.unit

V, S, P, B = 64, 10, 4, 3
# kind -> (block kind, extra MoE keys)
KINDS = {
    "dense": ("dense", {}),
    "moe": ("moe", {}),
    "mod": ("mod", {}),
    "mode": ("mode", {}),
    "mode-block": ("mode", {"router_input": "block"}),
    "imode": ("imode", {"num_noop_experts": 2}),
    "ponder": ("ponder", {}),
}


def _model(case: str) -> TransformerLM:
    """dense, <kind>, dense with an exit after block 1."""
    kind, moe = KINDS[case]
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=3,
        n_heads=4,
        ffn_dim=48,
        max_seq_len=16,
        layer_pattern=["dense", kind, "dense"],
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=None, min_capacity=1, **moe),
        mod=MoDConfig(capacity=0.5),
        ponder=PonderConfig(max_steps=3),
        exit=ExitConfig(layers=[1]),
    )
    if kind != "ponder":
        validate_model(cfg)
    # else: the validator refuses exits beside a ponder block (one depth rule per model), but
    # the ponder block still owns the rule for exited rows; the model builds without it.
    torch.manual_seed(0)
    return TransformerLM(cfg).eval()


def _count(model: TransformerLM) -> Counter[str]:
    """Calls of every module of blocks 2.. (not the K/V projection's norm and RoPE) and of
    the methods that route or halt, by name; the counter fills while the model runs."""
    calls: Counter[str] = Counter()
    kv_needs = set()
    for layer in model.layers[1:]:
        block = layer.block if isinstance(layer, (MoDBlock, PonderBlock)) else layer
        kv_needs.add(block.norm_attn)
    for i, layer in enumerate(model.layers[1:], start=1):
        for name, m in layer.named_modules(prefix=f"layers.{i}"):
            if m in kv_needs or isinstance(m, Rotary):
                continue
            m.register_forward_hook(lambda *_, name=name: calls.update([name]))
            methods = {
                MoELayer: ["router_logits", "dropless_local"],
                MoDBlock: ["scores", "causal_logits", "block_logits"],
                PonderBlock: ["lam"],
                Attention: ["heads", "attend"],
            }
            for method in methods.get(type(m), []):
                setattr(m, method, _counted(getattr(m, method), f"{name}.{method}", calls))
    return calls


def _counted(fn: Callable[..., Any], name: str, calls: Counter[str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.update([name])
        return fn(*args, **kwargs)

    return wrapper


def _decode(model: TransformerLM, threshold: float) -> DecodeState:
    tokens_BS = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    _, state = model.prefill(tokens_BS[:, :P], threshold=threshold)
    for t in range(P, S):
        model.decode_step(tokens_BS[:, t : t + 1], state)
    return state


@pytest.mark.parametrize("case", list(KINDS))
def test_no_block_works_after_every_row_has_exited(case: str) -> None:
    model = _model(case)
    calls = _count(model)
    # Threshold 0: every token exits after block 1 (a confidence is always above 0), in the
    # prefill and in every decode step.
    state = _decode(model, threshold=0.0)
    assert state.depth == {1: B * S}
    assert not calls, f"work after every row had exited: {dict(calls)}"
    # ... and yet every later block, routed or pondering, holds every token's K/V.
    for layer in state.layers[1:]:
        assert all(c.lengths == [S] * B for c in layer.caches)
        assert layer.propagated == B * S * len(layer.caches)
        assert layer.processed == layer.skipped == 0


@pytest.mark.parametrize("case", list(KINDS))
def test_the_counters_see_the_work_of_a_model_that_never_exits(case: str) -> None:
    """The same hooks do count: at threshold 1.0 no row exits, and the blocks run."""
    model = _model(case)
    calls = _count(model)
    _decode(model, threshold=1.0)
    seen = {name.rsplit(".", 1)[-1] for name in calls}
    assert {"heads", "attend", "proj", "norm_ffn", "ffn"} <= seen  # "ffn": block 3's SwiGLU
    kind = KINDS[case][0]
    if kind in ("moe", "mode", "imode"):
        assert {"experts", "router_logits", "dropless_local"} <= seen
    if kind in ("mod", "mode"):
        assert {"router", "scores", "causal_logits"} <= seen
    if kind == "ponder":
        assert {"halt", "lam"} <= seen


@pytest.mark.parametrize("case", ["dense", "mod", "ponder"])
def test_an_exited_row_only_writes_its_keys_in_a_mixed_step(case: str) -> None:
    """Some rows of a decode step exit, some do not: the exited ones reach no FFN in the
    later blocks, and every later cache (routed, every ponder application) takes their K/V."""
    model = _model(case)
    tokens_BS = torch.randint(0, V, (B, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conf_B = confidence(model(tokens_BS).exit_logits[1][:, 1])
    # A threshold midway between two rows' confidences of the step: those above it exit.
    low, high = conf_B.sort().values[:2]
    threshold = float((low + high) / 2)
    assert_clear(threshold_gap(conf_B, threshold), "exit confidence vs threshold")
    exits = int((conf_B > threshold).sum())
    assert 0 < exits < B
    _, state = model.prefill(tokens_BS[:, :1], threshold=1.0)  # no exit in the prompt
    state.threshold = threshold
    ffn_rows: list[int] = []
    for layer in model.layers[1:]:
        block = layer.block if isinstance(layer, (MoDBlock, PonderBlock)) else layer
        block.ffn.register_forward_hook(lambda m, args, out: ffn_rows.append(args[0].shape[0]))
    before = [[list(c.lengths) for c in layer.caches] for layer in state.layers]
    model.decode_step(tokens_BS[:, 1:], state)
    assert state.depth[1] == exits
    assert max(ffn_rows) <= B - exits  # the exited rows reached no FFN
    if case == "dense":
        assert ffn_rows == [B - exits, B - exits]
    exited = [i for i in range(B) if conf_B[i] > threshold]
    for layer, lengths in zip(state.layers[1:], before[1:], strict=True):
        for cache, old in zip(layer.caches, lengths, strict=True):
            assert all(cache.lengths[i] == old[i] + 1 for i in exited)  # a key everywhere
        assert layer.propagated == exits * len(layer.caches)
