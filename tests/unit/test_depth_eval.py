"""Validation depth metrics of early-exit / ponder models (trainer/eval/depth.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.config.model import ExitConfig, ModelConfig, PonderConfig, RecursionConfig
from turnout.models.flops import expected_flops
from turnout.models.lm import TransformerLM
from turnout.trainer.data.batches import BatchSampler, TokenData
from turnout.trainer.eval.depth import depth_eval

pytestmark = pytest.mark.unit


class _Engine:
    """What depth_eval needs of the DeepSpeed engine: a device, eval/train, a call."""

    def __init__(self, model: TransformerLM) -> None:
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, *args: object, **kw: object) -> object:
        return self.model(*args, **kw)

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()


def _sampler(vocab: int, seq_len: int) -> BatchSampler:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, 4000).astype(np.uint16)
    data = TokenData(train=tokens[:3000], val=tokens[3000:], vocab_size=vocab, path=Path("."))
    return BatchSampler(data, seq_len, 2, 0, 1, 0, eval_batches=2)


@pytest.mark.parametrize("kind", ["exit", "ponder", "recursion"])
def test_depth_metrics_are_the_causal_pass_histogram(kind: str) -> None:
    tiny = dict(vocab_size=32, d_model=16, n_heads=2, ffn_dim=32, max_seq_len=16)
    if kind == "exit":
        exits = ExitConfig([1], threshold=0.04)
        cfg = ModelConfig(**tiny, n_layers=3, layer_pattern=["dense"], exit=exits)
        names = ["val_exit_layer1", "val_exit_layer3", "val_exit_layer_mean"]
    elif kind == "recursion":
        recursion = RecursionConfig(max_recursions=3, group=2, predictor_hidden=8)
        pattern = ["dense", "recursion"]
        cfg = ModelConfig(**tiny, n_layers=2, layer_pattern=pattern, recursion=recursion)
        names = [f"val_recursion_depth{n}" for n in (1, 2, 3)] + ["val_recursion_depth_mean"]
    else:
        ponder = PonderConfig(max_steps=3, threshold=0.3)
        pattern = ["dense", "ponder"]
        cfg = ModelConfig(**tiny, n_layers=2, layer_pattern=pattern, ponder=ponder)
        names = ["val_ponder_steps1", "val_ponder_steps2", "val_ponder_steps3"]
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    sampler = _sampler(32, 16)
    loss, metrics = depth_eval(_Engine(model), sampler, 2, cfg)
    assert model.training  # handed back in train mode
    assert all(n in metrics for n in names)
    hist: dict[int, int] = {}
    ce = 0.0
    with torch.no_grad():
        for i in range(2):
            tokens, targets = sampler.eval_batch(i)
            out = model.eval()(tokens, targets, routing="causal")
            ce += float(out.ce) / 2
            for k, v in out.depth.histogram().items():
                hist[k] = hist.get(k, 0) + v
    assert loss == pytest.approx(ce)
    n = sum(hist.values())
    mean = sum(k * v for k, v in hist.items()) / n
    assert metrics["val_depth_mean"] == pytest.approx(mean)
    bins = [m for m in metrics if m[-1].isdigit()]
    assert sum(metrics[b] for b in bins) == pytest.approx(1.0)
    assert metrics["val_expected_flops_per_token"] == pytest.approx(expected_flops(cfg, hist))
    if kind == "recursion":  # blocks 1 + 2 per recursion: the mean recursions from them
        assert metrics["val_recursion_depth_mean"] == pytest.approx((mean - 1) / 2)
