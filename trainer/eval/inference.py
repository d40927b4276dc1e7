"""What ``turnout generate`` and ``turnout eval`` compute on a loaded model (one process).

Shape legend: B batch, S sequence.

- :func:`sample_text`: the checkpoint's tokenizer (:mod:`turnout.trainer.data.tokenizer_files`;
  bytes by default) encodes the prompt and decodes the output,
  :func:`turnout.models.decode.generate` through the KV caches, and what the decode
  steps cost: their tokens/s and the fraction of routed-block work the predictor
  skipped. The prompt's prefill is run once more on its own (same tokens, same
  decisions) and its work and time subtracted, so both figures cover the decode steps
  only. Early-exit and ponder models decode with a threshold (``model.exit.threshold`` /
  ``model.ponder.threshold`` unless given) and report the mean number of blocks the
  decoded tokens used (the mean exit layer).
- :func:`evaluate_model`: validation cross-entropy on the held-out tail of a corpus, with
  top-k and with causal MoD routing, over the windows the training run validated on
  (``train.eval_batches`` batches of ``micro_batch_size x num_workers`` windows, spread
  evenly over the validation split), the same in bits per byte, and the corpus's
  unigram entropy. The corpus is tokenized with the checkpoint's tokenizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from turnout.config import TurnoutConfig
from turnout.config.choices import Routing
from turnout.errors import ConfigError
from turnout.models import decode
from turnout.models.lm import TransformerLM
from turnout.trainer.data.batches import (
    BatchSampler,
    bits_per_byte,
    open_tokens,
    token_unigram_entropy,
)
from turnout.trainer.data.token_cache import prepare_corpus
from turnout.trainer.data.tokenizer import ByteTokenizer, Tokenizer
from turnout.trainer.eval.depth import depth_metric_names, mean_depth
from turnout.trainer.eval.validation import validation_pass


@dataclass(frozen=True)
class Sample:
    text: str
    """Prompt followed by the generated text (invalid UTF-8 bytes replaced)."""
    new_tokens: int
    decode_s: float
    """Seconds of the decode steps (prefill left out)."""
    skipped_fraction: float
    """Of the routed blocks' token-blocks in the decode steps (a recursion block: one per
    recursion), the fraction skipped (nan without MoD-routed or recursion blocks)."""
    decode_routed: tuple[int, int]
    """(processed, skipped) token-blocks of the routed blocks in the decode steps."""
    depth: dict[int, int] = field(default_factory=dict)
    """Early-exit / ponder models: blocks used -> decoded tokens that used that many."""

    @property
    def mean_depth(self) -> float:
        """Mean blocks used per decoded token (the mean exit layer); nan when not tracked."""
        n = sum(self.depth.values())
        return sum(k * v for k, v in self.depth.items()) / n if n else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else math.nan


def encode(text: str, max_seq_len: int, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """``tokens_1S`` of a prompt (bytes by default); ConfigError('--prompt') if it cannot fit."""
    tok = tokenizer or ByteTokenizer()
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("--prompt", "must not be empty")
    if len(ids) > max_seq_len:
        raise ConfigError(
            "--prompt",
            f"{len(ids)} tokens ({tok.name}) is longer than the model's context "
            f"model.max_seq_len={max_seq_len}",
        )
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def sample_text(
    model: TransformerLM,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    threshold: float | None = None,
    tokenizer: Tokenizer | None = None,
) -> Sample:
    """Sample a continuation of ``prompt``; ``max_new_tokens`` is cut to fit the context.

    ``threshold``: the exit / halting threshold (default the config's); ``tokenizer``:
    the checkpoint's (default bytes)."""
    tok = tokenizer or ByteTokenizer()
    limit = model.cfg.max_seq_len
    device = model.embed.weight.device
    prompt_1S = encode(prompt, limit, tok).to(device)
    new = max(0, min(max_new_tokens, limit - prompt_1S.shape[1]))
    generator = torch.Generator(device=device).manual_seed(seed)

    # The prefill alone, on fresh caches: its routed work (the same decisions generate
    # makes on the prompt), then, warm, its time; both come out of the totals below.
    prefill = decode.new_state(model, 1, prompt_1S.shape[1], threshold)
    decode.extend(model, prompt_1S, prefill)

    t0 = time.perf_counter()
    out = decode.generate(model, prompt_1S, new, temperature, generator, threshold)
    _sync(device)
    total_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decode.extend(model, prompt_1S, decode.new_state(model, 1, prompt_1S.shape[1], threshold))
    _sync(device)
    prefill_s = time.perf_counter() - t0

    processed, skipped = out.state.routed_work()
    if new > 0:  # generate fed the prompt and then new - 1 sampled tokens
        pre_processed, pre_skipped = prefill.routed_work()
        processed, skipped = processed - pre_processed, skipped - pre_skipped
    else:
        processed = skipped = 0
    routed = processed + skipped
    fraction = skipped / routed if routed else math.nan
    if not (model.cfg.uses_mod() or model.cfg.uses_recursion()):
        fraction = math.nan
    depth = dict(out.state.depth)
    if new > 0:
        for k, v in prefill.depth.items():
            depth[k] -= v
    else:
        depth = {}
    depth = {k: v for k, v in sorted(depth.items()) if v}
    text = tok.decode(out.tokens_BS[0].tolist())
    return Sample(text, new, max(total_s - prefill_s, 0.0), fraction, (processed, skipped), depth)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    """Validation cross-entropy, top-k routing (nats/token)."""
    loss_causal: float
    """The same with causal MoD decisions and the exit / halting rule of decoding (nan
    without MoD, exit or ponder blocks)."""
    unigram_entropy: float
    """Unigram entropy of the corpus's training split (nats/token)."""
    bits_per_byte: float
    """``loss`` in bits per UTF-8 byte of the validation split (comparable across
    tokenizers)."""
    windows: int
    seq_len: int
    corpus: str
    depth_mean: float = math.nan
    """Early-exit / ponder models: mean blocks used per token under the decode rule."""


@torch.no_grad()
def evaluate_model(
    model: TransformerLM,
    cfg: TurnoutConfig,
    corpus: str | None = None,
    batches: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> Evaluation:
    """Validation loss of ``model`` on ``corpus`` (default: the one it was trained on),
    tokenized with ``tokenizer`` (default: resolved from ``cfg.data``)."""
    data_cfg = cfg.data if corpus is None else replace(cfg.data, corpus=corpus, val_corpus="")
    n_batches = cfg.train.eval_batches if batches is None else batches
    if n_batches < 1:
        raise ConfigError("--batches", f"must be >= 1, got {n_batches}")
    data = open_tokens(
        prepare_corpus(data_cfg, cfg.model.vocab_size, tokenizer), data_cfg.val_fraction
    )
    seq_len = cfg.model.max_seq_len
    per_batch = cfg.train.micro_batch_size * cfg.launch.num_workers
    sampler = BatchSampler(data, seq_len, per_batch, 0, 1, cfg.train.seed, n_batches)
    device = model.embed.weight.device
    causal = cfg.model.uses_mod() or cfg.model.depth_kind() is not None
    levels = list(depth_metric_names(cfg.model)) if cfg.model.depth_kind() is not None else []
    topk = validation_pass(model, sampler, n_batches, Routing.TOPK, device)
    loss_causal, depth_mean = math.nan, math.nan
    if causal:
        res = validation_pass(model, sampler, n_batches, Routing.CAUSAL, device, levels)
        loss_causal = res.loss
        if sum(res.depth_counts.values()):
            depth_mean = mean_depth(res.depth_counts)
    return Evaluation(
        loss=topk.loss,
        loss_causal=loss_causal,
        unigram_entropy=token_unigram_entropy(data.train, data.vocab_size),
        bits_per_byte=bits_per_byte(topk.loss, data.val_tokens_per_byte),
        windows=n_batches * per_batch,
        seq_len=seq_len,
        corpus=str(Path(data_cfg.corpus)) if data_cfg.corpus != "stdlib" else "stdlib",
        depth_mean=depth_mean,
    )
