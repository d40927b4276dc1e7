"""Incremental decoding with a KV cache per block, where MoD-routed blocks skip for real.

Shape legend: B batch, b the sequences of the batch that run a routed block, S new
positions of one call (the prompt when prefilling, 1 when decoding), M processed
positions per sequence in one call (padded to the batch's largest), N processed rows in
all, D width, E router columns, V vocabulary.

It reproduces the causal-routing forward ``model(tokens, routing="causal")`` token by
token (fp32: logits within float noise):

- dense, moe and imode blocks run every token and append its keys/values to the block's
  cache.
- mod and mode blocks ask the causal predictor per token (logit above
  ``mod.CHOOSE_ABOVE_LOGIT``). A skipped token does no work in the block (no attention,
  no FFN, no router) and writes nothing to its cache; it leaves the block unchanged. A
  processed token attends to the block's earlier *processed* tokens and itself, at its
  real RoPE position: the masked-dense definition in :func:`models.mod.masked_dense`.
- MoE layers decode with the :class:`LocalDispatcher` and **dropless** routing, whatever
  ``model.moe.capacity_factor`` says. Capacity is a training device for fixed-size
  expert buckets; in decode a step holds one token per sequence, so a per-step capacity
  would make a token's output depend on the batch size and on which tokens share its
  step. Decoding therefore equals the causal forward of the same weights with
  ``capacity_factor = null``; with a capacity factor the two differ exactly where the
  full forward drops an assignment. Prefill follows the same rule.
- Batch > 1: a routed block runs only on the sequences that chose at least one of the
  call's positions; the others do no work in it (no projections, no attention, no
  FFN). Among those sequences its norms, Q/K/V projections and attention run on the
  compacted ``[b, M]`` rows, padded where a sequence chose fewer than M (the padded
  rows are computed and discarded, never cached; in one-token decode steps M = 1, so
  there is no padding), and the FFN / MoE (and a block-input router) run on exactly
  the N chosen rows.
- Early exit (``model.exit``): after each exit depth the shared norm and head score the
  new tokens; a token whose max softmax probability is above the state's ``threshold``
  exits there (its logits are that exit's). The later blocks keep it in their caches by
  CALM-style state propagation: its keys/values are projected from its exit hidden state
  (when every row of the call has exited, only the K/V projection runs; otherwise the
  block runs on all rows and the exited rows keep their state), matching
  ``model(tokens, routing="causal")``. Propagation, not lazy computation: a lazily
  filled cache would need the skipped layers run later for the exited token (the cost
  comes back at the next token, and the next token's attention would wait on it), while
  propagation costs two small projections per skipped block and keeps every cache the
  same length, so batched decode stays uniform.
- Ponder blocks (``model.ponder``): application n has its own cache; a token halts after
  the first step whose cumulative halting probability is above the threshold and skips
  the later applications and their cache writes (MoD semantics: application n's cache
  holds only the tokens that reached it).
- :attr:`DecodeState.depth` counts, per number of blocks used, the tokens fed.
- The sequence may not outgrow its cache (``max_len``, at most ``model.max_seq_len``,
  the RoPE table and the trained context): no sliding window, since sliding would change
  which earlier tokens a block processed. :func:`generate` refuses such requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from turnout.models.block import Block
from turnout.models.dispatch import LocalDispatcher
from turnout.models.exit import exits_now
from turnout.models.kvcache import KVCache
from turnout.models.mod import CHOOSE_ABOVE_LOGIT, MoDBlock
from turnout.models.moe import MoELayer
from turnout.models.ponder import PonderBlock, halt_step

if TYPE_CHECKING:
    from turnout.models.lm import TransformerLM

Tensor = torch.Tensor

_LOCAL = LocalDispatcher()


@dataclass
class LayerState:
    """One block's cache and its work counters (token-blocks, summed over sequences)."""

    cache: KVCache
    routed: bool
    """A MoD-routed block (mod, mode): the predictor decides which tokens run."""
    processed: int = 0
    skipped: int = 0
    more: list[KVCache] = field(default_factory=list)
    """A ponder block's caches of applications 2..N (``cache`` is application 1's)."""
    propagated: int = 0
    """Token-blocks whose K/V came from a propagated exit state (early exit)."""


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
    head_dim = cfg.d_model // cfg.n_heads

    def cache() -> KVCache:
        return KVCache(batch, cfg.kv_heads(), head_dim, slots, w.device, w.dtype)

    layers = []
    for layer in model.layers:
        state = LayerState(cache(), isinstance(layer, MoDBlock))
        if isinstance(layer, PonderBlock):
            state.more = [cache() for _ in range(layer.max_steps - 1)]
        layers.append(state)
    return DecodeState(layers=layers, max_len=slots, threshold=model.threshold(threshold))


def _dropless_moe(moe: MoELayer, h_ND: Tensor, logits_NE: Tensor) -> Tensor:
    """The MoE layer on these rows, dropless, on this process (see the module docstring)."""
    plan = moe.plan(logits_NE, None)  # dropless, with the selection bias when there is one
    return _LOCAL(h_ND, plan, moe.experts)


def _increment(
    block: Block,
    x_BMD: Tensor,
    pos_BM: Tensor,
    counts: list[int],
    valid_BM: Tensor | None,
    cache: KVCache,
    router_x_ND: Tensor | None = None,
    rows: list[int] | None = None,
) -> Tensor:
    """The block's residual increment for new rows, attending over (and filling) ``cache``.

    ``valid_BM`` marks the real rows (None: all are); only they reach the FFN.
    ``router_x_ND`` is what a block-input MoE router reads (None: the FFN input).
    ``rows``: the cache's sequences these B rows are (None: all of them, in order).
    """
    attn = block.attn
    q_BHMd, k_BGMd, v_BGMd = attn.heads(block.norm_attn(x_BMD), pos_BM)
    keys_BGLd, values_BGLd, mask_BML = cache.append(k_BGMd, v_BGMd, counts, rows)
    a_BMD = attn.attend(q_BHMd, keys_BGLd, values_BGLd, mask_BML)
    h_BMD = block.norm_ffn(x_BMD + a_BMD)
    h_ND = h_BMD.reshape(-1, h_BMD.shape[-1]) if valid_BM is None else h_BMD[valid_BM]
    if isinstance(block.ffn, MoELayer):
        moe = block.ffn
        logits_NE = moe.router_logits(h_ND if router_x_ND is None else router_x_ND)
        f_ND = _dropless_moe(moe, h_ND, logits_NE).to(h_ND.dtype)
    else:
        f_ND = block.ffn(h_ND)
    if valid_BM is None:
        return a_BMD + f_ND.view_as(h_BMD)
    return a_BMD + torch.zeros_like(h_BMD).index_put((valid_BM,), f_ND)


def _block_step(block: Block, x_BSD: Tensor, pos_BS: Tensor, layer: LayerState) -> Tensor:
    B, S, _ = x_BSD.shape
    layer.processed += B * S
    return x_BSD + _increment(block, x_BSD, pos_BS, [S] * B, None, layer.cache)


def _mod_step(mod: MoDBlock, x_BSD: Tensor, pos_BS: Tensor, layer: LayerState) -> Tensor:
    score_BS = mod.scores(x_BSD)
    chosen_BS = mod.causal_logits(x_BSD, score_BS) > CHOOSE_ABOVE_LOGIT
    g_BS = mod.gate(score_BS)
    return _chosen_step(
        mod.block, x_BSD, pos_BS, chosen_BS, layer, layer.cache, g_BS, mod.routes_from_block_input
    )


def _chosen_step(
    block: Block,
    x_BSD: Tensor,
    pos_BS: Tensor,
    chosen_BS: Tensor,
    layer: LayerState,
    cache: KVCache,
    g_BS: Tensor | None = None,
    block_input: bool = False,
) -> Tensor:
    """``block`` on the chosen positions only (MoD skip): ``x + g * increment`` there.

    ``g_BS`` scales the increments (None: 1); ``block_input``: the MoE router reads the
    block input. Unchosen positions do no work and write nothing to ``cache``.
    """
    B, S, _ = x_BSD.shape
    counts = chosen_BS.sum(1).tolist()  # one host sync: the shapes (and the skip) depend on it
    layer.processed += sum(counts)
    layer.skipped += B * S - sum(counts)
    rows = [i for i, c in enumerate(counts) if c > 0]
    if not rows:
        return x_BSD
    if len(rows) == B:
        return _chosen_rows(block, x_BSD, pos_BS, g_BS, chosen_BS, counts, None, cache, block_input)
    # Only the sequences that chose a position run the block: the others do no work.
    rows_b = torch.tensor(rows, dtype=torch.long, device=x_BSD.device)
    new_bSD = _chosen_rows(
        block,
        x_BSD.index_select(0, rows_b),
        pos_BS.index_select(0, rows_b),
        None if g_BS is None else g_BS.index_select(0, rows_b),
        chosen_BS.index_select(0, rows_b),
        [counts[i] for i in rows],
        rows,
        cache,
        block_input,
    )
    return x_BSD.index_copy(0, rows_b, new_bSD)


def _chosen_rows(
    block: Block,
    x_bSD: Tensor,
    pos_bS: Tensor,
    g_bS: Tensor | None,
    chosen_bS: Tensor,
    counts: list[int],
    rows: list[int] | None,
    cache: KVCache,
    block_input: bool,
) -> Tensor:
    """The block on sequences ``rows`` (None: all), each of which chose a position."""
    b, _, D = x_bSD.shape
    M = max(counts)
    # The chosen positions first, in position order (a stable sort of "not chosen").
    idx_bM = torch.sort((~chosen_bS).to(torch.uint8), dim=1, stable=True).indices[:, :M]
    valid_bM = None
    if min(counts) < M:
        counts_b = torch.tensor(counts, device=x_bSD.device)
        valid_bM = torch.arange(M, device=x_bSD.device).unsqueeze(0) < counts_b.unsqueeze(1)
    idx_bMD = idx_bM.unsqueeze(-1).expand(b, M, D)
    x_bMD = x_bSD.gather(1, idx_bMD)
    router_x_ND = None
    if block_input:
        router_x_ND = x_bMD.reshape(b * M, D) if valid_bM is None else x_bMD[valid_bM]
    delta_bMD = _increment(
        block, x_bMD, pos_bS.gather(1, idx_bM), counts, valid_bM, cache, router_x_ND, rows
    )
    if g_bS is not None:
        delta_bMD = g_bS.gather(1, idx_bM).unsqueeze(-1).to(x_bSD.dtype) * delta_bMD
    new_bMD = x_bMD + delta_bMD
    if valid_bM is not None:
        new_bMD = torch.where(valid_bM.unsqueeze(-1), new_bMD, x_bMD)
    return x_bSD.scatter(1, idx_bMD, new_bMD)


def _ponder_step(
    ponder: PonderBlock, x_BSD: Tensor, pos_BS: Tensor, layer: LayerState, threshold: float
) -> tuple[Tensor, Tensor]:
    """Apply the ponder block until each token halts: the output and ``steps_BS``."""
    B, S, _ = x_BSD.shape
    active_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
    survive_BS = torch.ones(B, S, dtype=torch.float32, device=x_BSD.device)
    steps_BS = torch.zeros(B, S, dtype=torch.long, device=x_BSD.device)
    for n, cache in enumerate([layer.cache, *layer.more]):
        if n and not bool(active_BS.any()):
            layer.skipped += B * S * (ponder.max_steps - n)
            break
        x_BSD = _chosen_step(ponder.block, x_BSD, pos_BS, active_BS, layer, cache)
        steps_BS = steps_BS + active_BS.long()
        if n < ponder.max_steps - 1:
            survive_BS, active_BS = halt_step(ponder.lam(x_BSD), survive_BS, active_BS, threshold)
    return x_BSD, steps_BS


def _kv_only(block: Block, x_BSD: Tensor, pos_BS: Tensor, layer: LayerState) -> None:
    """Propagated exit states: only the K/V projection of ``x``, appended to the cache."""
    attn = block.attn
    B, S, D = x_BSD.shape
    kv_dim = attn.n_kv_heads * attn.head_dim
    kv = torch.nn.functional.linear(block.norm_attn(x_BSD), attn.qkv.weight[D:])
    k, v = kv.split([kv_dim, kv_dim], dim=-1)
    k_BGSd = attn.rotary(k.view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2), pos_BS)
    v_BGSd = v.view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    layer.cache.append(k_BGSd, v_BGSd, [S] * B)
    layer.propagated += B * S


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
    exited_BS = torch.zeros(B, S, dtype=torch.bool, device=tokens_BS.device)
    all_exited = False
    blocks_BS: Tensor | None = None
    for i, (layer, layer_state) in enumerate(zip(model.layers, state.layers, strict=True)):
        if all_exited and isinstance(layer, Block):
            _kv_only(layer, x_BSD, pos_BS, layer_state)
            continue
        x_in = x_BSD
        if isinstance(layer, MoDBlock):
            x_BSD = _mod_step(layer, x_BSD, pos_BS, layer_state)
        elif isinstance(layer, PonderBlock):
            x_BSD, steps_BS = _ponder_step(layer, x_BSD, pos_BS, layer_state, state.threshold)
            blocks_BS = steps_BS + (L - 1)
        elif isinstance(layer, Block):
            x_BSD = _block_step(layer, x_BSD, pos_BS, layer_state)
        else:
            raise TypeError(f"cannot decode a {type(layer).__name__} layer")
        if model.exit_w:
            if bool(exited_BS.any()):
                x_BSD = torch.where(exited_BS.unsqueeze(-1), x_in, x_BSD)
            if i + 1 in model.exit_w:
                now_BS = exits_now(model.head(model.norm(x_BSD)), state.threshold) & ~exited_BS
                exited_BS = exited_BS | now_BS
                if blocks_BS is None:
                    blocks_BS = torch.full_like(pos_BS, L)
                blocks_BS = torch.where(now_BS, i + 1, blocks_BS)
                all_exited = bool(exited_BS.all())
    if blocks_BS is not None:
        _count_depth(state, blocks_BS)
    state.position += S
    state.steps.append(S)
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
