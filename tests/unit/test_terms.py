"""The aux-term table (models/terms.py) serves the model, the metrics and docs/metrics.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from turnout.config.hyper import HyperConfig
from turnout.config.model import (
    ExitConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    PonderConfig,
    RecursionConfig,
)
from turnout.launch.metrics_doc import COMMAND, markdown_page
from turnout.models.lm import LMOutput, TransformerLM
from turnout.models.terms import TERMS, Term, mlflow_metrics, spec
from turnout.trainer.metrics.routing import StatsAccumulator

pytestmark = pytest.mark.unit

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_metric_page_lists_the_table() -> None:
    listed = set(re.findall(r"`((?:layer<i>|aux)/[^`]+)`", METRICS_DOC.read_text()))
    assert listed == mlflow_metrics()


def test_metric_page_is_fresh() -> None:
    assert METRICS_DOC.read_text() == markdown_page(), (
        f"docs/metrics.md is stale (models/terms.py or launch/metrics_doc.py changed); "
        f"regenerate it with `{COMMAND}`"
    )


def test_every_term_has_one_row_and_losses_name_a_real_coefficient() -> None:
    assert set(TERMS) == set(Term)
    cfg = ModelConfig(
        moe=MoEConfig(aux_loss_coef=0.3, z_loss_coef=0.05),
        mod=MoDConfig(predictor_loss_coef=0.7),
        exit=ExitConfig(loss_coef=0.4),
        ponder=PonderConfig(kl_coef=0.02),
        recursion=RecursionConfig(predictor_loss_coef=0.25, balance_coef=0.125),
    )
    coefs = {t: s.coefficient(cfg) for t, s in TERMS.items() if s.is_loss}
    assert coefs == {
        Term.MOE_LB: 0.3,
        Term.MOE_Z: 0.05,
        Term.MOD_PRED_LOSS: 0.7,
        Term.EXIT_LOSS: 0.4,
        Term.PONDER_KL: 0.02,
        Term.REC_PRED_LOSS: 0.25,
        Term.REC_BALANCE: 0.125,
    }
    assert all(s.coefficient(cfg) == 0.0 for s in TERMS.values() if not s.is_loss)
    assert all(s.meaning for s in TERMS.values())


def test_unknown_names_raise_instead_of_vanishing() -> None:
    with pytest.raises(KeyError, match="moe_lbb"):
        spec("moe_lbb")
    acc = StatsAccumulator()
    typo = LMOutput(logits=torch.zeros(1), stats=[{"moe_dorp": torch.tensor(0.5)}])  # type: ignore[dict-item]
    with pytest.raises(KeyError, match="moe_dorp"):
        acc.add(typo)
    stat_as_loss = LMOutput(logits=torch.zeros(1), terms={Term.MOE_DROP: torch.tensor(0.5)})
    with pytest.raises(KeyError, match="not a loss"):
        StatsAccumulator().add(stat_as_loss)


def test_every_metric_of_a_real_model_is_in_the_table() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=8,
        n_layers=5,
        layer_pattern=["dense", "moe", "mod", "mode", "imode"],
        moe=MoEConfig(num_experts=4, top_k=2, num_noop_experts=1),
    )
    tokens = torch.randint(0, 32, (2, 8))
    metrics: dict[str, float] = {}
    # Early exit, ponder and recursion blocks do not mix: more models give their metrics.
    exits = dataclasses.replace(cfg, exit=ExitConfig(layers=[1, 3]))
    ponder = dataclasses.replace(cfg, n_layers=2, layer_pattern=["ponder", "mod"])
    recursion = dataclasses.replace(cfg, n_layers=2, layer_pattern=["recursion", "mod"])
    token = dataclasses.replace(recursion, recursion=RecursionConfig(routing="token"))
    hyper = dataclasses.replace(
        cfg,
        n_layers=2,
        layer_pattern=["dense", "moe"],
        moe=MoEConfig(num_experts=4, top_k=2, hyper=HyperConfig(enabled=True)),
    )
    for model_cfg in (cfg, exits, ponder, recursion, token, hyper):
        acc = StatsAccumulator()
        acc.add(TransformerLM(model_cfg)(tokens, tokens))
        metrics.update(acc.reduce())
    generic = {re.sub(r"^layer\d+/", "layer<i>/", k) for k in metrics}
    generic = {re.sub(r"/expert\d+_load$", "/expert<e>_load", k) for k in generic}
    assert generic == mlflow_metrics()  # every table metric appears, and nothing else
