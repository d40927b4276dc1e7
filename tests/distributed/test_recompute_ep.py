"""Activation checkpointing under expert parallelism (2 spawned gloo ranks, ep 2) with MoD.

Each rank trains the same model (seed 0) on its own batch with and without
checkpointing; the recompute replays the forward's routing (MoD top-k, expert plan,
capacity drops, the all-to-all counts), so the loss, the per-layer statistics and
every gradient (also of the aux loss alone) must be equal, while capacity drops and MoD
skips really happen. The same comparison runs through a DeepSpeed ZeRO-3 engine (its
hooks gather and release each module's partitioned weights around the recompute). A
short ``train()`` run with checkpointing then goes through DeepSpeed and logs every
rank's peak memory each interval.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.spawn import run_ranks
from turnout.config.hyper import HyperConfig
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig
from turnout.models.terms import Term

pytestmark = pytest.mark.distributed

WORLD = 2
B, S, V = 2, 16, 40


def _cfg(router_input: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        d_model=16,
        n_layers=4,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=S,
        layer_pattern=["mode", "moe", "mod", "mode"],
        # capacity factor 0.5: at least half the assignments over C are dropped
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            capacity_factor=0.5,
            min_capacity=1,
            balance="both",
            router_input=router_input,
            # Hyper-experts on one of the two models: the shared hypernetwork is one module
            # called from every MoE layer, gathered by ZeRO-3 at each call and replayed.
            hyper=HyperConfig(enabled=router_input == "block", rank=2, hidden=4, embed_dim=4),
        ),
        mod=MoDConfig(capacity=0.5),
        init_std=0.2,
    )


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(300 + rank)
    tok = torch.randint(0, V, (B, S + 1), generator=gen)
    return tok[:, :-1], tok[:, 1:]


def _worker(rank: int, world: int) -> dict:
    from turnout.models.lm import TransformerLM
    from turnout.models.moe import moe_layers
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups

    groups = build_groups(2)
    out: dict = {}
    for router_input in ("ffn", "block"):
        for mode in ("none", "moe", "full"):
            for target in ("loss", "aux_loss"):
                torch.manual_seed(0)
                model = TransformerLM(_cfg(router_input))
                with torch.no_grad():  # a selection bias that changes choices
                    for layer in moe_layers(model):
                        assert layer.expert_bias is not None
                        layer.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.2, -0.3]))
                install_expert_parallel(model, groups)
                model.set_activation_checkpointing(mode)
                res = model(*_batch(rank))
                getattr(res, target).backward()
                out[router_input, mode, target] = {
                    "loss": res.loss.detach(),
                    "stats": res.stats,
                    "grads": {
                        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
                    },
                    "rows": [m.dispatcher.rows_sent for m in moe_layers(model)],
                }
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, WORLD)


@pytest.mark.parametrize("router_input", ["ffn", "block"])
@pytest.mark.parametrize("mode", ["moe", "full"])
@pytest.mark.parametrize("target", ["loss", "aux_loss"])
def test_gradients_equal_with_and_without_checkpointing_ep2(
    results: list[dict], router_input: str, mode: str, target: str
) -> None:
    for rank in range(WORLD):
        want = results[rank][router_input, "none", target]
        got = results[rank][router_input, mode, target]
        msg = f"rank {rank} {router_input} {mode} {target}"
        # Bitwise: the checkpointed forward runs the same ops on the same inputs, and the
        # recompute replays its routing decisions (models/recompute.py).
        assert torch.equal(got["loss"], want["loss"]), msg
        assert got["rows"] == want["rows"], msg  # the same all-to-all splits
        for g_aux, w_aux in zip(got["stats"], want["stats"], strict=True):
            assert set(g_aux) == set(w_aux), msg
            for name in w_aux:
                assert torch.equal(g_aux[name], w_aux[name]), f"{msg} {name}"
        assert set(got["grads"]) == set(want["grads"]), msg
        for name, g in want["grads"].items():
            # As tests/unit/test_recompute.py: only the gates' gradient formula may round
            # differently (autograd of gates_of vs the planner's backward).
            torch.testing.assert_close(
                got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=f"{msg} {name}"
            )
        if target == "aux_loss":  # the aux loss trains the routers
            routers = [g for n, g in got["grads"].items() if n.endswith("router_DE")]
            assert len(routers) == 3 and all(float(g.abs().sum()) > 0 for g in routers)


def test_drops_and_skips_really_happen(results: list[dict]) -> None:
    for rank in range(WORLD):
        for router_input in ("ffn", "block"):
            stats = results[rank][router_input, "none", "loss"]["stats"]
            for i in (0, 1, 3):  # the MoE blocks
                assert float(stats[i][Term.MOE_DROP]) > 0, (rank, router_input, i)
            for i in (0, 2, 3):  # the MoD-routed blocks
                assert float(stats[i][Term.MOD_CAPACITY]) == 0.5
            # Experts of both ranks got rows: the all-to-all carried tokens both ways.
            assert all(r > 0 for r in results[rank][router_input, "none", "loss"]["rows"])


def _zero3_worker(rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from turnout.config import TurnoutConfig
    from turnout.models.lm import TransformerLM
    from turnout.models.moe import moe_layers
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups
    from turnout.trainer.engine import build_engine

    cfg = TurnoutConfig()
    cfg.model = _cfg("ffn")
    cfg.parallel.ep_size, cfg.parallel.zero_stage = 2, 3
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.precision = B, 1, "fp32"
    cfg.launch.num_workers = world
    groups = build_groups(2)
    out: dict = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = TransformerLM(cfg.model)
        with torch.no_grad():
            for layer in moe_layers(model):
                assert layer.expert_bias is not None
                layer.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.2, -0.3]))
        install_expert_parallel(model, groups)
        model.set_activation_checkpointing(mode)
        engine, _ = build_engine(model, cfg, groups)
        res = engine(*_batch(rank))
        engine.backward(res.loss)
        grads = {}
        for name, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                grads[name] = g.detach().clone().reshape(p.ds_shape)
        out[mode] = {"loss": res.loss.detach(), "grads": grads}
    return out


def test_gradients_equal_with_and_without_checkpointing_zero3_ep2() -> None:
    """Under ZeRO-3 a recompute must run before any module inside the block gathers its
    weights for backward; otherwise the recompute releases them again (empty weights)."""
    for rank, res in enumerate(run_ranks(_zero3_worker, WORLD)):
        want, got = res["none"], res["full"]
        assert torch.equal(got["loss"], want["loss"]), rank
        assert set(got["grads"]) == set(want["grads"]), rank
        assert any("experts" in n for n in want["grads"]) and len(want["grads"]) > 20
        for name, g in want["grads"].items():
            assert float(g.abs().sum()) > 0 or "expert_bias" in name, (rank, name)
            # The gates' gradient formula, as above.
            torch.testing.assert_close(
                got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}"
            )


def _train(rank: int, world: int, overrides: list[str], data: str) -> dict:
    from turnout.config.load import load_config
    from turnout.parallel.groups import build_groups
    from turnout.trainer.train import train

    cfg = load_config("tiny", overrides)
    res = train(cfg, Path(data), build_groups(cfg.parallel.ep_size))
    return {"loss": res.final_train_loss, "memory": res.peak_memory_mb, "run_id": res.run_id}


def test_train_with_checkpointing_logs_each_ranks_peak_memory(tmp_path: Path) -> None:
    import mlflow

    from turnout.config.load import load_config
    from turnout.trainer.data.batches import prepare_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"route {i % 7} tokens to expert {i % 4} now" for i in range(800)))
    overrides = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.ffn_dim=64",
        "model.max_seq_len=32",
        "model.layer_pattern=[dense,mode]",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        f"data.corpus={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.1",
        "train.steps=4",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.log_every=2",
        f"train.ckpt_dir={tmp_path / 'ckpt'}",
        "train.activation_checkpointing=full",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "parallel.ep_size=2",
        f"launch.num_workers={WORLD}",
    ]
    data = prepare_corpus(load_config("tiny", overrides).data)
    first, second = run_ranks(_train, WORLD, overrides, str(data))
    assert 0 < first["loss"] < 10
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for r in range(WORLD):
        history = client.get_metric_history(first["run_id"], f"rank{r}/peak_memory_mb")
        assert [m.step for m in history] == [2, 4]
        assert all(m.value > 50 for m in history)  # a torch process holds more than that
        assert history[-1].value <= first["memory"][r]  # the end value is the run's peak
