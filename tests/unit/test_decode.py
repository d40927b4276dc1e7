"""Incremental decoding (models/decode.py) equals the causal-routing forward, skips for real.

Shape legend: B batch, S sequence, P prompt, V vocabulary, G K/V heads, Hd head dim.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.decisions import recorded
from tests.margins import assert_clear, topk_gap
from turnout.config.hyper import HyperConfig
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig, validate_model
from turnout.models.decode import DecodeState, extend, generate
from turnout.models.hyper import hyper_nets
from turnout.models.kvcache import KVCache
from turnout.models.lm import TransformerLM
from turnout.models.mod import CHOOSE_ABOVE_LOGIT, MoDBlock
from turnout.models.moe import moe_layers
from turnout.models.terms import Term

pytestmark = pytest.mark.unit

V, S = 64, 16
# Decode and the causal forward run other GEMM shapes (one row per step vs the whole
# sequence): logits of magnitude ~2 agree to ~1e-6 (measured); 1e-5 leaves 10x.
TOL = 1e-5
# init_std 0.1 (not the default 0.02) makes the decision scores of order 0.1-1 (at 0.02 the
# predictor logits are ~1e-4, all within DECISION_MARGIN of their sign); model seed 2
# leaves every decision of these tests at least 2.4e-4 from a tie (seeds 0 and 3 do not).
INIT_STD, SEED = 0.1, 2

CASES = {
    "dense": (["dense"], {}, {}),
    "dense-gqa": (["dense", "moe"], {}, {"n_kv_heads": 2}),
    "mod-mlp": (["dense", "mod"], {}, {}),
    "mod-router": (["mod", "dense"], {}, {"predictor": "router"}),
    "mod-mqa": (["dense", "mod"], {}, {"n_kv_heads": 1}),
    "moe": (["moe"], {}, {}),
    "moe-bias": (["moe"], {"balance": "bias"}, {}),
    "mode-ffn": (["dense", "mode"], {}, {}),
    "mode-block": (["dense", "mode"], {"router_input": "block"}, {}),
    "imode": (["dense", "imode"], {"num_noop_experts": 2}, {}),
    "moe-shared": (["dense", "moe"], {"shared_experts": 2}, {}),
    "moe-hyper": (["dense", "moe"], {"hyper": HyperConfig(enabled=True)}, {}),
    "mode-hyper": (["dense", "mode"], {"hyper": HyperConfig(enabled=True, rank=2)}, {}),
    "qk-norm": (["dense", "mode"], {}, {"head_dim": 12, "qk_norm": True, "n_kv_heads": 2}),
}


def _cfg(pattern: list[str], moe: dict, extra: dict) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=2 * len(pattern),
        n_heads=4,
        n_kv_heads=extra.get("n_kv_heads", 0),
        head_dim=extra.get("head_dim", 0),
        qk_norm=extra.get("qk_norm", False),
        ffn_dim=48,
        max_seq_len=24,
        init_std=INIT_STD,
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=None, min_capacity=1, **moe),
        mod=MoDConfig(capacity=0.25, predictor=extra.get("predictor", "mlp")),
    )
    validate_model(cfg)
    return cfg


def _model(case: str, seed: int = SEED) -> TransformerLM:
    pattern, moe, extra = CASES[case]
    torch.manual_seed(seed)
    model = TransformerLM(_cfg(pattern, moe, extra)).eval()
    for layer in moe_layers(model):  # a selection bias strong enough to change choices
        if layer.expert_bias is not None:
            layer.expert_bias.copy_(torch.linspace(-2.0, 2.0, layer.expert_bias.numel()))
    with torch.no_grad():
        for net in hyper_nets(model):  # a working adapter, not the zero one of a fresh model
            net.up_HrD.normal_(std=INIT_STD)
    return model


def _tokens(batch: int, length: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _causal(model: TransformerLM, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Full causal-mode logits and each routed layer's predictor decisions ``chosen_BS``;
    every routing decision it takes (predictor sign, expert top-k) is clear of its tie, so
    decoding, which computes the same scores with other GEMM shapes, takes it too."""
    chosen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, MoDBlock):

            def hook(mod: MoDBlock, args: tuple, i: int = i) -> None:
                x_BSD = args[0]
                chosen[i] = mod.causal_logits(x_BSD, mod.scores(x_BSD)) > CHOOSE_ABOVE_LOGIT

            hooks.append(layer.register_forward_pre_hook(hook))
    with recorded(model) as decisions:
        logits_BSV = model(tokens_BS, routing="causal").logits
    for h in hooks:
        h.remove()
    decisions.assert_clear("the causal forward")
    return logits_BSV, chosen


def _decode(model: TransformerLM, tokens_BS: torch.Tensor, prompt: int) -> tuple:
    """Prefill ``prompt`` tokens, then feed the rest one by one: logits_BSV and the state."""
    logits_BPV, state = model.prefill(tokens_BS[:, :prompt])
    steps = [logits_BPV]
    for t in range(prompt, tokens_BS.shape[1]):
        steps.append(model.decode_step(tokens_BS[:, t : t + 1], state).unsqueeze(1))
    return torch.cat(steps, dim=1), state


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt", [1, 6])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_equals_the_causal_forward(case: str, batch: int, prompt: int) -> None:
    model = _model(case)
    tokens_BS = _tokens(batch)
    full_BSV, chosen = _causal(model, tokens_BS)
    dec_BSV, state = _decode(model, tokens_BS, prompt)
    torch.testing.assert_close(dec_BSV, full_BSV, atol=TOL, rtol=0)
    # The cache of each block holds exactly the tokens it processed, per sequence.
    lengths = state.cache_lengths()
    for i, layer in enumerate(model.layers):
        if isinstance(layer, MoDBlock):
            assert lengths[i] == chosen[i].sum(1).tolist()
        else:
            assert lengths[i] == [S] * batch
    processed = sum(int(c.sum()) for c in chosen.values())
    assert state.routed_work() == (processed, len(chosen) * batch * S - processed)
    if chosen:  # the predictor decisions are non-trivial: some tokens run, some skip
        every = torch.stack(list(chosen.values()))
        assert every.any() and not every.all()
        assert 0.0 < state.skipped_fraction() < 1.0
    else:
        assert state.routed_work() == (0, 0) and state.skipped_fraction() == 0.0


@pytest.mark.parametrize("case", ["mod-mlp", "mode-block", "mod-router"])
def test_a_skipped_token_leaves_the_cache_unchanged(case: str) -> None:
    model = _model(case)
    batch, prompt = 3, 4
    tokens_BS = _tokens(batch)
    _, chosen = _causal(model, tokens_BS)
    _, state = model.prefill(tokens_BS[:, :prompt])
    seen = {"skip": 0, "run": 0, "mixed": 0}
    for t in range(prompt, S):
        before = [(la.cache.k_BGLd.clone(), list(la.cache.lengths)) for la in state.layers]
        model.decode_step(tokens_BS[:, t : t + 1], state)
        for i, c_BS in chosen.items():
            cache = state.layers[i].cache
            k_before, len_before = before[i]
            # Some sequences run the block and some skip it: only the runners do work.
            seen["mixed"] += int(0 < int(c_BS[:, t].sum()) < batch)
            for b in range(batch):
                n = len_before[b]
                if c_BS[b, t]:
                    seen["run"] += 1
                    assert cache.lengths[b] == n + 1
                    assert torch.equal(cache.k_BGLd[b, :, :n], k_before[b, :, :n])
                else:
                    seen["skip"] += 1
                    assert cache.lengths[b] == n
                    assert torch.equal(cache.k_BGLd[b], k_before[b])  # not one slot written
    assert seen["skip"] > 0 and seen["run"] > 0 and seen["mixed"] > 0


def test_a_batch_that_skips_everything_does_no_routed_work() -> None:
    model = _model("mode-ffn")
    for layer in model.layers:
        if isinstance(layer, MoDBlock):
            with torch.no_grad():
                layer.predictor[-1].weight.zero_()  # type: ignore[index]
                layer.predictor[-1].bias.fill_(-5.0)  # type: ignore[index]
    tokens_BS = _tokens(3)
    full_BSV, _ = _causal(model, tokens_BS)
    dec_BSV, state = _decode(model, tokens_BS, 5)
    torch.testing.assert_close(dec_BSV, full_BSV, atol=TOL, rtol=0)
    assert state.routed_work() == (0, 2 * 3 * S) and state.skipped_fraction() == 1.0
    for i, layer in enumerate(model.layers):
        if isinstance(layer, MoDBlock):
            assert state.cache_lengths()[i] == [0, 0, 0]
            assert not state.layers[i].cache.k_BGLd.any()


@pytest.mark.parametrize("case", ["moe", "mode-ffn", "mode-block", "imode"])
def test_capacity_mode_decodes_dropless(case: str) -> None:
    """The rule: decode routes dropless, so it equals the dropless causal forward."""
    model = _model(case)
    for moe in moe_layers(model):
        moe.cfg.capacity_factor = 0.5  # binds: the full forward drops assignments
    dropless = copy.deepcopy(model)
    for moe in moe_layers(dropless):
        moe.cfg.capacity_factor = None
    tokens_BS = _tokens(3)
    with torch.no_grad():
        capped = model(tokens_BS, routing="causal")
    dec_BSV, _ = _decode(model, tokens_BS, 6)
    torch.testing.assert_close(dec_BSV, _causal(dropless, tokens_BS)[0], atol=TOL, rtol=0)
    drops = [s[Term.MOE_DROP].item() for s in capped.stats if Term.MOE_DROP in s]
    assert max(drops) > 0
    assert (dec_BSV - capped.logits).abs().max() > 1e-3  # capacity mode differs by design


@pytest.mark.parametrize("case", ["dense", "mod-mlp", "mode-block", "imode"])
def test_greedy_generate_is_the_step_by_step_argmax_of_the_full_forward(case: str) -> None:
    model = _model(case)
    prompt_BP = _tokens(3, 5)
    out = generate(model, prompt_BP, 19, temperature=0.0)  # 5 + 19 = max_seq_len
    assert out.tokens_BS.shape == (3, 24)
    assert torch.equal(out.tokens_BS[:, :5], prompt_BP)
    assert torch.equal(model.generate(prompt_BP, 19, temperature=0.0), out.tokens_BS)
    for t in range(5, 24):  # the old re-run-the-window reference
        logits_BV = _causal(model, out.tokens_BS[:, :t])[0][:, -1]
        assert_clear(topk_gap(logits_BV, 1), f"greedy argmax at position {t}")
        assert torch.equal(out.tokens_BS[:, t], logits_BV.argmax(-1))
    # The last sampled token is never fed: the state holds 5 + 19 - 1 positions.
    assert out.state.position == 23 and out.state.steps == [5] + [1] * 18
    with pytest.raises(ValueError, match="max_seq_len=24"):
        generate(model, prompt_BP, 20, temperature=0.0)


def test_seeded_sampling_is_reproducible() -> None:
    model = _model("mode-ffn")
    prompt_BP = _tokens(2, 3)
    a = model.generate(prompt_BP, 10, 1.0, torch.Generator().manual_seed(5))
    b = model.generate(prompt_BP, 10, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 13)
    assert torch.equal(model.generate(prompt_BP, 0), prompt_BP)


def test_state_limits() -> None:
    model = _model("dense")
    state: DecodeState = model.new_decode_state(2, max_len=4)
    extend(model, _tokens(2, 3), state)
    with pytest.raises(ValueError, match="do not fit"):
        extend(model, _tokens(2, 2), state)
    with pytest.raises(ValueError, match="max_len"):
        model.new_decode_state(2, max_len=25)
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        model.decode_step(_tokens(2, 2), model.new_decode_state(2))


def test_kv_cache_appends_ragged_rows_and_masks_them() -> None:
    G, Hd = 2, 4
    cache = KVCache(3, G, Hd, slots=5, device=torch.device("cpu"), dtype=torch.float32)
    k1 = torch.randn(3, G, 2, Hd)
    keys, _, mask = cache.append(k1, k1 + 1, [2, 2, 2])  # uniform: one slice write
    assert cache.lengths == [2, 2, 2] and keys.shape == (3, G, 2, Hd)
    assert mask is not None and mask[0].tolist() == [[True, False], [True, True]]
    k2 = torch.randn(3, G, 2, Hd)
    keys, values, mask = cache.append(k2, k2 + 1, [2, 0, 1])  # ragged: scattered rows
    assert cache.lengths == [4, 2, 3] and cache.lengths_B.tolist() == [4, 2, 3]
    assert keys.shape == (3, G, 4, Hd)
    torch.testing.assert_close(cache.keys(0)[0], torch.cat([k1[0], k2[0]], dim=1))
    torch.testing.assert_close(cache.keys(1)[1], k1[1] + 1)  # sequence 1 wrote nothing
    torch.testing.assert_close(cache.keys(2)[0], torch.cat([k1[2], k2[2, :, :1]], dim=1))
    assert not cache.k_BGLd[1, :, 2:].any() and not cache.k_BGLd[2, :, 3:].any()
    assert mask is not None
    assert mask[0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert mask[2, 0].tolist() == [True, True, True, False]  # its one new row sees itself
    with pytest.raises(ValueError, match="overflow"):
        cache.append(k2, k2, [2, 0, 0])


def test_kv_cache_appends_to_a_subset_of_sequences() -> None:
    G, Hd = 1, 2
    cache = KVCache(3, G, Hd, slots=4, device=torch.device("cpu"), dtype=torch.float32)
    k0 = torch.randn(3, G, 1, Hd)
    cache.append(k0, k0, [1, 1, 1])
    k1 = torch.randn(2, G, 1, Hd)
    keys, values, mask = cache.append(k1, -k1, [1, 1], rows=[0, 2])  # uniform subset
    assert cache.lengths == [2, 1, 2] and cache.lengths_B.tolist() == [2, 1, 2]
    assert mask is None and keys.shape == (2, G, 2, Hd)
    torch.testing.assert_close(keys[1], torch.cat([k0[2], k1[1]], dim=1))
    torch.testing.assert_close(values[0, :, 1:], -k1[0])
    assert not cache.k_BGLd[1, :, 1:].any()  # sequence 1 untouched
    k2 = torch.randn(2, G, 1, Hd)
    keys, _, mask = cache.append(k2, k2, [1, 1], rows=[1, 2])  # ragged lengths 1 and 2
    assert cache.lengths == [2, 2, 3] and keys.shape == (2, G, 3, Hd)
    assert mask is not None and mask[:, 0].tolist() == [[True, True, False], [True] * 3]
    torch.testing.assert_close(cache.keys(1)[0], torch.cat([k0[1], k2[0]], dim=1))
    torch.testing.assert_close(cache.keys(2)[0], torch.cat([k0[2], k1[1], k2[1]], dim=1))
    with pytest.raises(ValueError, match="rows"):
        cache.append(k2, k2, [1, 1], rows=[0])
