"""The one table of what a block returns besides its output: aux losses and statistics.

Every block returns ``Aux = dict[Term, Tensor]``. :data:`TERMS` says, per name, whether
it is a loss (then the config coefficient that weighs it into the training loss), how
the trainer turns it into MLflow metrics, and what it means. The model (which terms are
losses), the metrics (which metric names) and the metric page ``docs/metrics.md``
(generated from it by ``turnout metrics --markdown``; a test fails when it is stale) all
read this table; a name missing from it raises instead of vanishing.

Metric names: ``layer<i>/...`` per layer ``i``; ``aux/<name>`` for a loss summed over
layers. The MoE counts become per-expert loads: ``expert<e>`` stands for each expert
(logged only while the experts of all MoE layers number at most
``tracking.expert_series_max``) and the load summaries of ``trainer/metrics/load_stats.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from turnout.config.model import ModelConfig


class Term(str, Enum):
    """Names of the per-layer aux terms and statistics."""

    MOE_LB = "moe_lb"
    MOE_Z = "moe_z"
    MOE_COUNTS = "moe_counts"
    MOE_DROP = "moe_drop"
    MOE_NOOP = "moe_noop"
    MOE_HYPER = "moe_hyper_norm"
    MOD_PRED_LOSS = "mod_pred_loss"
    MOD_CAPACITY = "mod_capacity"
    MOD_PRED_ACC = "mod_pred_acc"
    EXIT_CE = "exit_ce"
    EXIT_LOSS = "exit_loss"
    PONDER_KL = "ponder_kl"
    PONDER_STEPS = "ponder_steps"
    REC_PRED_LOSS = "recursion_pred_loss"
    REC_PRED_ACC = "recursion_pred_acc"
    REC_BALANCE = "recursion_balance"
    REC_DEPTH = "recursion_depth"


Aux = dict[Term, torch.Tensor]

#: Per-layer metric names a ``moe_counts`` vector turns into (loads over ALL ranks).
EXPERT_LOAD = "expert<e>_load"
LOAD_MAX = "load_max"
LOAD_MAX_OVER_MEAN = "load_max_over_mean"
LOAD_MIN_OVER_MEAN = "load_min_over_mean"
LOAD_CV = "load_cv"
LOAD_ENTROPY = "load_entropy"
DEAD_EXPERTS = "dead_experts"

#: What each of them means, in the order the metric page lists them.
LOAD_METRICS: dict[str, str] = {
    LOAD_MAX: "the largest expert's share",
    LOAD_MAX_OVER_MEAN: "the largest expert's share over the mean share (1 = balanced)",
    LOAD_MIN_OVER_MEAN: "the smallest expert's share over the mean share (1 = balanced)",
    LOAD_CV: "coefficient of variation of the shares: std over mean (0 = balanced)",
    LOAD_ENTROPY: "entropy of the shares over log E (1 = balanced)",
    DEAD_EXPERTS: "experts that got no token in the interval (each newly dead expert is "
    "also warned about once in the log)",
    EXPERT_LOAD: "each expert's share, logged only while the experts of all MoE layers "
    "number at most tracking.expert_series_max (64), so 128 experts x 12 layers do not "
    "make 1,536 series",
}


@dataclass(frozen=True)
class TermSpec:
    term: Term
    coef: str | None
    """Dotted ModelConfig field weighing the loss (``moe.aux_loss_coef``); None: a statistic."""
    metrics: tuple[str, ...]
    """Per-layer metric names (``layer<i>/`` + each)."""
    meaning: str
    where: str
    """Which layers log it (the metric page's column)."""

    @property
    def is_loss(self) -> bool:
        return self.coef is not None

    @property
    def is_counts(self) -> bool:
        """A per-expert count vector (summed over ranks, then normalised into loads)."""
        return self.term is Term.MOE_COUNTS

    def coefficient(self, cfg: ModelConfig) -> float:
        """The loss weight from the config (0 for a statistic)."""
        if self.coef is None:
            return 0.0
        if self.term is Term.MOE_LB and not cfg.moe.uses_aux_loss():
            return 0.0  # model.moe.balance=bias: the loss is logged but weighs nothing
        section, name = self.coef.split(".")
        return float(getattr(getattr(cfg, section), name))

    def aux_metric(self) -> str | None:
        """The run-level metric of a loss summed over layers (``aux/<name>``)."""
        return f"aux/{self.term.value}" if self.is_loss else None


TERMS: dict[Term, TermSpec] = {
    s.term: s
    for s in (
        TermSpec(
            Term.MOE_LB,
            "moe.aux_loss_coef",
            ("moe_lb",),
            "load-balance loss E * sum_e f_e * P_e (unweighted)",
            "MoE layers (moe, mode, imode)",
        ),
        TermSpec(
            Term.MOE_Z,
            "moe.z_loss_coef",
            ("moe_z",),
            "router z-loss mean(logsumexp(logits)^2) (unweighted)",
            "MoE layers (moe, mode, imode)",
        ),
        TermSpec(
            Term.MOE_COUNTS,
            None,
            tuple(LOAD_METRICS),
            "fraction of the assignments routed to each expert over the log interval and "
            "all ranks (before drops; per expert only when tracking.expert_series_max "
            "allows), its max, max and min over the mean, coefficient of variation, "
            "entropy over log E, and how many experts got no token",
            "MoE layers (moe, mode, imode)",
        ),
        TermSpec(
            Term.MOE_DROP,
            None,
            ("drop_fraction",),
            "fraction of the real-expert assignments dropped for capacity",
            "MoE layers (moe, mode, imode)",
        ),
        TermSpec(
            Term.MOE_NOOP,
            None,
            ("noop_fraction",),
            "fraction of the assignments that chose a no-op expert (imode blocks)",
            "imode layers",
        ),
        TermSpec(
            Term.MOE_HYPER,
            None,
            ("hyper_norm",),
            "mean L2 norm of the hyper-expert adapter's output per token (0 at the start: "
            "the adapter's up maps start at zero)",
            "MoE layers with model.moe.hyper.enabled",
        ),
        TermSpec(
            Term.MOD_PRED_LOSS,
            "mod.predictor_loss_coef",
            ("mod_pred_loss",),
            "BCE of the causal predictor against top-k membership (unweighted)",
            "MoD layers (mod, mode)",
        ),
        TermSpec(
            Term.MOD_CAPACITY,
            None,
            ("mod_capacity",),
            "realised fraction of positions the MoD block processed",
            "MoD layers (mod, mode)",
        ),
        TermSpec(
            Term.MOD_PRED_ACC,
            None,
            ("mod_pred_acc",),
            "how often the causal predictor agrees with the top-k choice",
            "MoD layers (mod, mode)",
        ),
        TermSpec(
            Term.EXIT_CE,
            None,
            ("exit_ce",),
            "cross-entropy of the early exit after this layer (shared norm and head)",
            "exit points (the layer each follows)",
        ),
        TermSpec(
            Term.EXIT_LOSS,
            "exit.loss_coef",
            (),
            "the exits' cross-entropies weighted by model.exit.loss_weights, summed",
            "the model (early exit)",
        ),
        TermSpec(
            Term.PONDER_KL,
            "ponder.kl_coef",
            ("ponder_kl",),
            "KL of the halting distribution to the truncated geometric prior (unweighted)",
            "ponder layers",
        ),
        TermSpec(
            Term.PONDER_STEPS,
            None,
            ("ponder_steps",),
            "expected applications of the ponder block under its halting distribution",
            "ponder layers",
        ),
        TermSpec(
            Term.REC_PRED_LOSS,
            "recursion.predictor_loss_coef",
            ("recursion_pred_loss",),
            "BCE of the recursions' causal predictors against top-k membership among the "
            "tokens that could be chosen, mean over the routed recursions (unweighted)",
            "recursion layers (expert routing)",
        ),
        TermSpec(
            Term.REC_PRED_ACC,
            None,
            ("recursion_pred_acc",),
            "how often the recursions' causal predictors agree with the top-k choice",
            "recursion layers (expert routing)",
        ),
        TermSpec(
            Term.REC_BALANCE,
            "recursion.balance_coef",
            ("recursion_balance",),
            "depth load-balance loss R * sum_d f_d * P_d of token routing (unweighted)",
            "recursion layers (token routing)",
        ),
        TermSpec(
            Term.REC_DEPTH,
            None,
            ("recursion_depth",),
            "mean recursions per token (training: the top-k or token-choice depths)",
            "recursion layers",
        ),
    )
}


def spec(name: Term | str) -> TermSpec:
    """The table row of ``name``; KeyError naming it when it is not in the table."""
    try:
        return TERMS[Term(name)]
    except ValueError:
        raise KeyError(f"unknown aux term or statistic {name!r}; add it to TERMS") from None


def mlflow_metrics() -> set[str]:
    """Every MLflow metric name the table produces (``layer<i>/...`` and ``aux/...``)."""
    names = {f"layer<i>/{m}" for s in TERMS.values() for m in s.metrics}
    return names | {a for s in TERMS.values() if (a := s.aux_metric()) is not None}
