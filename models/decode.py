"""Incremental decoding with a KV cache per block: the sampler and the cache state.

Shape legend: B batch, S new positions of one call (the prompt when prefilling, 1 when
decoding), D width, V vocabulary.

This module holds what a decode carries between calls (:class:`DecodeState`, one
:class:`~turnout.models.kvcache.LayerState` per block), feeds new positions through the
blocks (:func:`extend`), takes the early-exit decisions at the exit depths, and samples
(:func:`generate`). Each block kind owns its cached step (design §3.4): ``decode_step``
and ``propagate`` of :class:`~turnout.models.block.Block` (dense, moe, imode),
:class:`~turnout.models.mod.MoDBlock` (mod, mode) and
:class:`~turnout.models.ponder.PonderBlock`; attention's K/V projection is
:meth:`~turnout.models.layers.Attention.kv`.

It reproduces the causal-routing forward ``model(tokens, routing="causal")`` token by
token (fp32: logits within float noise):

- dense, moe and imode blocks run every token and append its keys/values to the block's
  cache.
- mod and mode blocks ask the causal predictor per token (logit above
  ``mod.CHOOSE_ABOVE_LOGIT``). A skipped token does no work in the block (no attention,
  no FFN, no router) and writes nothing to its cache; it leaves the block unchanged. A
  processed token attends to the block's earlier *processed* tokens and itself, at its
  real RoPE position: the masked-dense definition in :func:`models.mod.masked_dense`.
- MoE layers decode with :meth:`MoELayer.dropless_local` (the local dispatcher,
  **dropless** routing), whatever ``model.moe.capacity_factor`` says. Capacity is a
  training device for fixed-size expert buckets; in decode a step holds one token per
  sequence, so a per-step capacity would make a token's output depend on the batch size
  and on which tokens share its step. Decoding therefore equals the causal forward of
  the same weights with ``capacity_factor = null``; with a capacity factor the two
  differ exactly where the full forward drops an assignment. Prefill follows the same
  rule. It is the training path's kept rows: a one-token step runs its k experts on one
  row each, not all E.
- Batch > 1: a routed block runs only on the sequences that chose at least one of the
  call's positions; the others do no work in it (no projections, no attention, no
  FFN). Among those sequences its norms, Q/K/V projections and attention run on the
  compacted ``[b, M]`` rows, padded where a sequence chose fewer than M (the padded
  rows are computed and discarded, never cached; in one-token decode steps M = 1, so
  there is no padding), and the FFN / MoE (and a block-input router) run on exactly
  the N chosen rows.
- Early exit (``model.exit``): after each exit depth the shared norm and head score the
  new tokens; a token whose max softmax probability is above the state's ``threshold``
  exits there (its logits are that exit's). Every later block keeps it in its caches by
  CALM-style state propagation: its keys/values are projected from its exit hidden
  state, in routed blocks too (whatever their predictor would say) and in every ponder
  application, and its state leaves the block unchanged, matching
  ``model(tokens, routing="causal")``. An exited row reaches no FFN or MoE (nor its
  router); its query runs only in a prefill whose sequence still has unexited positions
  (computed with theirs, discarded). In a call where only some rows have exited, a MoD
  router and predictor or a halting head still score every row of the call (one small
  batched product; the exited rows' decisions are ignored). Once every row of a call has
  exited, every later block, whatever its kind, runs only the K/V projection
  (``propagate``): no attention, FFN, router, predictor or halting head. Propagation,
  not lazy computation: a lazily filled cache would need the skipped layers run later
  for the exited token (the cost comes back at the next token, and the next token's
  attention would wait on it), while propagation costs two small projections per
  skipped block.
- Ponder blocks (``model.ponder``): application n has its own cache; a token halts after
  the first step whose cumulative halting probability is above the threshold and skips
  the later applications and their cache writes (MoD semantics: application n's cache
  holds only the tokens that reached it).
- Recursion blocks (``model.recursion``, :mod:`turnout.models.recursion`): a token runs
  recursion r of the shared group when it ran r-1 and its decision says so (expert
  routing: the recursion's causal predictor; token routing: the depth its entry router
  gave it); a token that stops does no more work in the block and writes nothing to the
  later recursions' caches (``per_recursion``: cache r holds the tokens that ran
  recursion r; ``shared_first``: later recursions read recursion 1's cache, masked to the
  positions at or before each query, and write nothing).
- :attr:`DecodeState.depth` counts, per number of blocks used, the tokens fed.
- The sequence may not outgrow its cache (``max_len``, at most ``model.max_seq_len``,
  the RoPE table and the trained context): no sliding window, since sliding would change
  which earlier tokens a block processed. :func:`generate` refuses such requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import torch

from turnout.models.block import Block
from turnout.models.exit import exits_now
from turnout.models.kvcache import KVCache, LayerState
from turnout.models.mod import MoDBlock
from turnout.models.ponder import PonderBlock
from turnout.models.recursion import RecursionBlock

if TYPE_CHECKING:
    from turnout.models.lm import TransformerLM

Tensor = torch.Tensor

#: The layer kinds that own a cached decode step (``decode_step``, ``propagate``).
CachedLayer: TypeAlias = Block | MoDBlock | PonderBlock | RecursionBlock


@dataclass
class DecodeState:
    """Everything an incremental decode carries between calls."""

    layers: list[LayerState]
    max_len: int
    """Positions the caches hold (prompt + generated tokens fed to the model)."""
    position: int = 0
    """Positions fed so far (the next token's RoPE position)."""
    steps: list[int] = field(default_factory=list)
    """The number of positions of each call (prefill, then 1 per decode step)."""
    threshold: float = 1.0
    """Exit / halting threshold (early-exit and ponder models)."""
    depth: dict[int, int] = field(default_factory=dict)
    """Blocks used -> tokens fed that used that many (early-exit and ponder models)."""

    def mean_depth(self) -> float:
        """Mean blocks used per fed token (nan without an exit / ponder model)."""
        n = sum(self.depth.values())
        return sum(k * v for k, v in self.depth.items()) / n if n else float("nan")

    def cache_lengths(self) -> list[list[int]]:
        """``[layer][sequence]``: tokens cached, i.e. the tokens that block processed."""
        return [list(layer.cache.lengths) for layer in self.layers]

    def routed_work(self) -> tuple[int, int]:
        """(processed, skipped) token-blocks over the MoD-routed blocks."""
        routed = [layer for layer in self.layers if layer.routed]
        return sum(la.processed for la in routed), sum(la.skipped for la in routed)

    def skipped_fraction(self) -> float:
        """Fraction of routed-block work the predictor skipped (0 without routed blocks)."""
        processed, skipped = self.routed_work()
        return skipped / max(processed + skipped, 1)


def new_state(
    model: TransformerLM, batch: int, max_len: int | None = None, threshold: float | None = None
) -> DecodeState:
    """Empty caches for ``batch`` sequences of up to ``max_len`` (default max_seq_len);
    ``threshold``: the exit / halting threshold (default the config's)."""
    cfg = model.cfg
    slots = cfg.max_seq_len if max_len is None else max_len
    if not 1 <= slots <= cfg.max_seq_len:
        raise ValueError(f"max_len must be in [1, model.max_seq_len={cfg.max_seq_len}]")
    w = model.embed.weight
    head_dim = cfg.head_size()

    def cache() -> KVCache:
        return KVCache(batch, cfg.kv_heads(), head_dim, slots, w.device, w.dtype)

    layers = [layer.new_decode_state(cache) for layer in cached_layers(model)]
    return DecodeState(layers=layers, max_len=slots, threshold=model.threshold(threshold))


def cached_layers(model: TransformerLM) -> list[CachedLayer]:
    """The model's blocks, each of a kind that owns its decode step (TypeError if not)."""
    layers: list[CachedLayer] = []
    for layer in model.layers:
        if not isinstance(layer, (Block, MoDBlock, PonderBlock, RecursionBlock)):
            raise TypeError(f"cannot decode a {type(layer).__name__} layer")
        layers.append(layer)
    return layers


def _count_depth(state: DecodeState, blocks_BS: Tensor) -> None:
    for value, n in zip(*torch.unique(blocks_BS, return_counts=True), strict=True):
        state.depth[int(value)] = state.depth.get(int(value), 0) + int(n)


@torch.no_grad()
def extend(model: TransformerLM, tokens_BS: Tensor, state: DecodeState) -> Tensor:
    """Feed ``S`` new positions of every sequence through the caches: ``logits_BSV``."""
    B, S = tokens_BS.shape
    if S < 1 or state.position + S > state.max_len:
        raise ValueError(
            f"{state.position} + {S} positions do not fit the decode state's {state.max_len}"
        )
    start = state.position
    pos_BS = torch.arange(start, start + S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
    x_BSD = model.embed(tokens_BS)
    L = len(model.layers)
    exited_BS: Tensor | None = None  # the rows that have exited (early exit); None: none
    all_exited = False
    blocks_BS: Tensor | None = None
    exit_logits_BSV: Tensor | None = None
    for i, (layer, layer_state) in enumerate(zip(cached_layers(model), state.layers, strict=True)):
        if all_exited:  # the rows only serve as keys: the K/V projection alone
            layer.propagate(x_BSD, pos_BS, layer_state)
            continue
        x_BSD = layer.decode_step(x_BSD, pos_BS, layer_state, exited_BS, state.threshold)
        if layer_state.steps_BS is not None:  # a ponder or recursion block: its applications
            used_BS = layer_state.steps_BS + (L - 1)
            if exited_BS is not None and blocks_BS is not None:  # exited rows keep theirs
                used_BS = torch.where(exited_BS, blocks_BS, used_BS)
            blocks_BS = used_BS
        if i + 1 in model.exit_w:
            exit_logits_BSV = model.head(model.norm(x_BSD))
            now_BS = exits_now(exit_logits_BSV, state.threshold)
            if exited_BS is not None:
                now_BS = now_BS & ~exited_BS
            if blocks_BS is None:
                blocks_BS = torch.full_like(pos_BS, L)
            blocks_BS = torch.where(now_BS, i + 1, blocks_BS)
            out_BS = now_BS if exited_BS is None else exited_BS | now_BS
            n = int(out_BS.sum())  # one host sync per exit depth: which path the blocks take
            exited_BS = out_BS if n else None
            all_exited = n == B * S
    if blocks_BS is not None:
        _count_depth(state, blocks_BS)
    state.position += S
    state.steps.append(S)
    if all_exited and exit_logits_BSV is not None:  # no state moved since the last exit
        return exit_logits_BSV
    return model.head(model.norm(x_BSD))


@dataclass
class Generation:
    tokens_BS: Tensor
    """Prompt followed by the sampled tokens."""
    state: DecodeState
    """The caches and counters after the last fed token."""


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt_BS: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    threshold: float | None = None,
) -> Generation:
    """Prefill the prompt, then sample one token per step through the caches.

    ``temperature <= 0`` is greedy (argmax). The prompt plus the new tokens must fit in
    ``model.max_seq_len`` (ValueError otherwise; see the module docstring).
    """
    B, P = prompt_BS.shape
    limit = model.cfg.max_seq_len
    if P < 1 or max_new_tokens < 0 or P + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) must be in "
            f"[1, model.max_seq_len={limit}]"
        )
    # The last sampled token is never fed, so P + N - 1 positions (at least the prompt's).
    state = new_state(model, B, max(P, P + max_new_tokens - 1), threshold)
    tokens = [prompt_BS]
    if max_new_tokens == 0:
        return Generation(prompt_BS, state)
    logits_BV = extend(model, prompt_BS, state)[:, -1]
    for step in range(max_new_tokens):
        logits_BV = logits_BV.float()
        if temperature <= 0:
            next_B1 = logits_BV.argmax(-1, keepdim=True)
        else:
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            next_B1 = torch.multinomial(probs_BV, 1, generator=generator)
        tokens.append(next_B1)
        if step + 1 < max_new_tokens:
            logits_BV = extend(model, next_B1, state)[:, -1]
    return Generation(torch.cat(tokens, dim=1), state)
