"""The fixed choices a config field or a call may name: one ``str`` enum each.

Validation and the code that acts on a choice read the same enum, so a value is spelled
once. The members are ``str`` subclasses: a config field stays a plain string (omegaconf,
YAML, MLflow params) and compares equal to its member (``"bf16" == Precision.BF16``).
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Base of the choice enums: ``values()`` for validation and one-line error text."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def spelled(cls) -> str:
        """The choices for an error message: 'a', 'b' or 'c'."""
        quoted = [repr(v) for v in cls.values()]
        return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


class Predictor(Choice):
    """model.mod.predictor: how the causal (sampling-time) MoD decision is made."""

    MLP = "mlp"
    ROUTER = "router"


class RouterGate(Choice):
    """model.mod.router_gate: g(score) scaling a chosen token's residual increment."""

    SIGMOID = "sigmoid"
    IDENTITY = "identity"


class Trainable(Choice):
    """train.trainable: which parameters the optimizer steps (the rest are frozen)."""

    ALL = "all"
    ROUTERS = "routers"
    """MoD routers and causal predictors, MoE routers, ponder halting heads, recursion
    routers and predictors."""
    ROUTERS_NORMS = "routers+norms"
    """The routers and every RMSNorm weight (block, q/k and final norms)."""


class RouterInput(Choice):
    """model.moe.router_input: what the MoE router of a 'mode' block reads."""

    FFN = "ffn"
    """The FFN input (after attention and the norm), like every other MoE block."""
    BLOCK = "block"
    """The block input, so the MoD choice and the expert plan come from one fused op."""


class Balance(Choice):
    """model.moe.balance: how the MoE load is balanced."""

    AUX = "aux"
    """The load-balance loss, weighted by model.moe.aux_loss_coef."""
    BIAS = "bias"
    """The aux-loss-free per-expert selection bias, updated every optimizer step; the
    load-balance loss is still computed and logged but weighs nothing."""
    BOTH = "both"
    """The bias and the weighted loss together."""


class RecursionRouting(Choice):
    """model.recursion.routing: how a recursion block picks each token's depth."""

    EXPERT = "expert"
    """Expert-choice: before recursion r the router keeps the top ceil(capacity_r * S) of
    the tokens still running, per sequence; a causal predictor per recursion decides at
    decode time."""
    TOKEN = "token"
    """Token-choice: one router at the block's entry gives each token its depth (top-1
    of max_recursions); causal by construction."""


class RecursionCache(Choice):
    """model.recursion.cache: which keys/values a recursion attends over."""

    PER_RECURSION = "per_recursion"
    """Recursion r attends over (and caches) the tokens that ran recursion r."""
    SHARED_FIRST = "shared_first"
    """Later recursions attend over the first recursion's keys/values and cache nothing."""


class Routing(Choice):
    """The MoD routing mode of a forward pass."""

    TOPK = "topk"
    """Training: expert-choice top-k over each sequence (looks at the future)."""
    CAUSAL = "causal"
    """Sampling: each token's own predictor decision."""


class Precision(Choice):
    """train.precision."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class Recompute(Choice):
    """train.activation_checkpointing: which blocks keep only their input for backward and
    run their forward again during it."""

    NONE = "none"
    MOE = "moe"
    """Blocks with an MoE FFN (moe, mode, imode): the k expert rows per token, the
    all-to-all buffers and the router tensors are their largest activations."""
    FULL = "full"
    """Every block (a ponder block's whole unroll is one unit)."""


class Backend(Choice):
    """parallel.backend: the torch.distributed backend."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


class Placement(Choice):
    """launch.placement: how Ray places the training workers on the cluster's nodes."""

    PACK = "PACK"
    """As few nodes as possible, spilling over when a node is full (Ray's default)."""
    SPREAD = "SPREAD"
    """Across as many nodes as possible, doubling up when there are too few."""
    STRICT_PACK = "STRICT_PACK"
    """All workers on one node, or the job waits."""
    STRICT_SPREAD = "STRICT_SPREAD"
    """Every worker on its own node, or the job waits (one worker per node)."""


class Structure(Choice):
    """data.structure: what a run trains on."""

    NONE = ""
    """The token stream (a language model)."""
    AST = "ast"
    """Functions' syntax trees and graphs: predict each function's name."""


class Encoder(Choice):
    """model.structure.encoder: the encoder of the function-name task."""

    NONE = ""
    TREELSTM = "treelstm"
    GNN = "gnn"
    TRANSFORMER = "transformer"
