"""The compute planner (trainer/planner/plan.py) and parameter counts (models/params.py).

Hand counts use small configs whose numbers are worked out in the comments; the
parameter counts are also checked exactly against the real models' ``numel``.
"""

from __future__ import annotations

import pytest

from turnout.config.load import load_config
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig
from turnout.config.parallel import ParallelConfig
from turnout.config.root import LaunchConfig, TurnoutConfig, validate
from turnout.config.train import TrainConfig
from turnout.errors import ConfigError
from turnout.models.experts import ExpertBank
from turnout.models.flops import forward_flops
from turnout.models.lm import TransformerLM
from turnout.models.params import count_params
from turnout.trainer.planner.devices import DEVICES
from turnout.trainer.planner.plan import plan
from turnout.trainer.planner.text import format_plan

pytestmark = pytest.mark.unit

MIXTRAL = ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    ffn_dim=14336,
    tie_embeddings=False,
    layer_pattern=["moe"],
    moe=MoEConfig(num_experts=8, top_k=2, capacity_factor=None),
)


def test_mixtral_shape_counts_the_published_figures() -> None:
    n = count_params(MIXTRAL)
    assert round(n.total / 1e9, 1) == 46.7
    assert round(n.active / 1e9, 1) == 12.9
    # By hand: attention 4096 * (4096 + 2 * 1024) + 4096^2, two norms, router 4096 * 8,
    # one SwiGLU expert 3 * 4096 * 14336; embedding and untied head 32000 * 4096 each.
    attn, norms, router = 4096 * 6144 + 4096**2, 2 * 4096, 4096 * 8
    expert = 3 * 4096 * 14336
    outside = 2 * 32000 * 4096 + 4096
    assert n.total == outside + 32 * (attn + norms + router + 8 * expert)
    assert n.active == outside + 32 * (attn + norms + router + 2 * expert)
    assert n.experts == 32 * 8 * expert


def test_mixtral_preset_counts_what_its_comment_says() -> None:
    # The preset keeps the byte vocabulary (256); its comment states the resulting counts.
    n = count_params(load_config("mixtral-8x7b").model)
    assert (round(n.total / 1e9, 1), round(n.active / 1e9, 1)) == (46.4, 12.6)
    full = count_params(load_config("mixtral-8x7b", ["model.vocab_size=32000"]).model)
    assert full == count_params(MIXTRAL)


def _small(pattern: list[str], predictor: str = "mlp", **kw: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=48,
        d_model=16,
        n_layers=len(pattern),
        n_heads=4,
        ffn_dim=24,
        max_seq_len=16,
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=4, top_k=2, num_noop_experts=2, expert_ffn_dim=20),
        mod=MoDConfig(predictor=predictor, predictor_hidden=8),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("pattern", [["dense"], ["moe"], ["mod"], ["mode"], ["imode"]])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_heads": 2},
        {"predictor": "router"},
        {"head_dim": 6, "qk_norm": True},
        {"shared_experts": 2},
    ],
)
def test_param_count_equals_the_real_model(pattern: list[str], extra: dict) -> None:
    shared = extra.pop("shared_experts", 0)
    cfg = _small(pattern + ["dense", "moe"], **extra)
    cfg.moe.shared_experts = shared
    model = TransformerLM(cfg)
    n = count_params(cfg)
    assert n.total == sum(p.numel() for p in model.parameters())
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    assert n.experts == sum(p.numel() for b in banks for p in b.parameters())


def test_shared_experts_are_active_for_every_token() -> None:
    plain, shared = _small(["moe"]), _small(["moe"])
    shared.moe.shared_experts = 2
    a, b = count_params(plain).blocks[0], count_params(shared).blocks[0]
    per_expert = 3 * 16 * 20  # D 16, expert width 20
    assert b.total - a.total == b.active - a.active == 2 * per_expert
    assert b.experts == a.experts  # not in the bank: replicated over expert parallelism


def test_active_counts_top_k_experts_and_every_router() -> None:
    cfg = _small(["mode"])
    n, b = count_params(cfg), count_params(cfg).blocks[0]
    # D 16, E 4 (+0 no-op in 'mode'), top-2 of experts of width 20; MoD router 16 and
    # predictor 16*8 + 8 + 8 + 1; MoE router 16 * 4.
    assert b.per_expert == 3 * 16 * 20
    assert b.routing == 16 + (16 * 8 + 8 + 8 + 1) + 16 * 4
    assert n.active == n.total - 2 * b.per_expert
    # A tied head is counted once, an untied one in total and active alike.
    untied = count_params(_small(["mode"], tie_embeddings=False))
    assert untied.total - n.total == untied.active - n.active == 48 * 16


def _job(pattern: list[str], gpus: int = 4, ep: int = 2, stage: int = 2, **train: object):
    cfg = TurnoutConfig(
        model=ModelConfig(
            vocab_size=16,
            d_model=8,
            n_layers=len(pattern),
            n_heads=2,
            ffn_dim=16,
            max_seq_len=16,
            layer_pattern=pattern,
            moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, min_capacity=1),
            mod=MoDConfig(capacity=0.25, predictor_hidden=4),
        ),
        parallel=ParallelConfig(ep_size=ep, zero_stage=stage),
        train=TrainConfig(**{"micro_batch_size": 2, "precision": "fp32", **train}),  # type: ignore[arg-type]
        launch=LaunchConfig(num_workers=gpus),
    )
    validate(cfg)
    return cfg


# The ["dense", "moe"] job of _job: embedding 16*8 = 128, final norm 8; attention
# 8*(8+16) + 64 = 256 and norms 16 per block; dense FFN 3*8*16 = 384; router 8*4 = 32;
# experts 4 * 384 = 1536. Total 128 + 8 + (256+16+384) + (256+16+32+1536) = 2632, of
# which 1536 in experts and 1096 dense. With ep 2 a rank holds 768 expert parameters.
TOTAL, EXPERTS, DENSE = 2632, 1536, 1096


def test_small_job_param_count() -> None:
    cfg = _job(["dense", "moe"])
    n = count_params(cfg.model)
    assert (n.total, n.experts, n.dense) == (TOTAL, EXPERTS, DENSE)
    assert n.total == sum(p.numel() for p in TransformerLM(cfg.model).parameters())


@pytest.mark.parametrize(
    ("stage", "weights", "grads", "optimizer"),
    [
        # fp32: 4 B weights, 4 B grads, 8 B moments. Unsharded a rank holds
        # 1096 + 768 = 1864; sharded 1096/4 + 768/2 = 658 (dense over 4 ranks, each
        # expert slice over its 2 expert-data-parallel ranks).
        (0, 4 * 1864, 4 * 1864, 8 * 1864),
        (1, 4 * 1864, 4 * 1864, 8 * 658),
        (2, 4 * 1864, 4 * 658, 8 * 658),
        (3, 4 * 658, 4 * 658, 8 * 658),
    ],
)
def test_model_states_shrink_with_the_zero_stage(
    stage: int, weights: int, grads: int, optimizer: int
) -> None:
    cfg = _job(["dense", "moe"], stage=stage)
    mem = plan(cfg).memory
    assert (mem.weights, mem.grads, mem.optimizer) == (weights, grads, optimizer)


def test_unsharded_weights_shrink_with_ep_and_bf16_keeps_fp32_master() -> None:
    # ZeRO 2 keeps whole weights: dense 1096 plus 1536/ep expert parameters.
    for ep, held in ((1, 2632), (2, 1864), (4, 1096 + 384)):
        assert plan(_job(["dense", "moe"], ep=ep)).memory.weights == 4 * held
    bf16 = plan(_job(["dense", "moe"], precision="bf16")).memory
    assert (bf16.weights, bf16.grads, bf16.optimizer) == (2 * 1864, 2 * 658, 12 * 658)
    assert plan(_job(["dense", "moe"], precision="auto")).precision == "bf16"


def test_mod_reduces_activations_by_the_hand_count() -> None:
    # B 2, S 16: N = 32 tokens; D 8, G*Hd 8, F 16, V 16, fp32 (4 B per value).
    # Dense block, per token: attention 5*8 + 2*8 = 56, FFN 2*8 + 4*16 = 80 -> 136.
    # Plus the embedding output 8 per token and 2 fp32 logits per vocabulary entry:
    # dense = 4 * (32*136 + 32*8) + 4 * 2 * 32 * 16 = 18432 + 4096 = 22528.
    # MoD (capacity 0.25: 4 of 16 positions, 8 rows): 8*136 on the routed rows and
    # 32 * (8 + 1 + 4) for every token (output, router score, predictor hidden):
    # 4 * (1088 + 416 + 256) + 4096 = 11136.
    p = plan(_job(["mod"], ep=1))
    assert p.dense_activations == 22528
    assert p.memory.activations == 11136
    assert p.memory.total == p.memory.states + 11136


def test_all_to_all_bytes_by_hand() -> None:
    # Two MoE layers, T = 2*16 = 32 tokens, E 4, top-2, D 8, fp32, grad_accum 3.
    # Capacity 1.5: C = ceil(1.5 * 32 * 2 / 4) = 24, E*C = 96 buckets' rows per layer, but
    # the exchange sends kept rows only: k*T = 64 under balanced routing.
    # 4 exchanges (dispatch, combine; forward, backward): 4*64*8*4 B per layer per micro
    # step -> x 2 layers x 3 micro steps = 49152 B; half of it leaves the rank (ep 2).
    cap = plan(_job(["moe"] * 2, grad_accum=3))
    assert cap.a2a_bytes == 49152
    assert cap.a2a_link_bytes == 24576
    # Tight buckets (capacity 0.5: C = 8, E*C = 32 < 64) cap what is sent.
    tight_cfg = _job(["moe"] * 2, grad_accum=3)
    tight_cfg.model.moe.capacity_factor = 0.5
    assert plan(tight_cfg).a2a_bytes == 4 * 32 * 8 * 4 * 2 * 3
    # Dropless: k*T = 64 real rows per layer.
    dropless_cfg = _job(["moe"] * 2, grad_accum=3)
    dropless_cfg.model.moe.capacity_factor = None
    assert plan(dropless_cfg).a2a_bytes == 4 * 64 * 8 * 4 * 2 * 3
    # A MoD-routed MoE block exchanges only its chosen tokens: 8 of 32, k*8 = 16 rows
    # (its buckets, C = ceil(1.5*8*2/4) = 6, would hold 24).
    assert plan(_job(["mode"])).a2a_bytes == 4 * 16 * 8 * 4
    assert plan(_job(["moe"] * 2, ep=1)).a2a_bytes == 0


def test_step_time_bound_is_the_slower_of_compute_and_all_to_all() -> None:
    cfg = _job(["dense", "moe"], grad_accum=2)
    p = plan(cfg, gpu="a100")
    tokens = 4 * 2 * 16 * 2
    assert p.tokens_per_step == tokens
    fwd = forward_flops(cfg.model, 16, 2).per_token  # kept rows, at ep 2 as at ep 1
    assert p.train_flops_per_step == pytest.approx(3 * fwd * tokens)
    assert p.compute_s == pytest.approx(3 * fwd * tokens / 4 / 19.5e12)  # fp32 peak
    assert p.a2a_s == pytest.approx(p.a2a_link_bytes / 600e9)
    assert p.step_s == max(p.compute_s, p.a2a_s) > 0
    bf16 = plan(_job(["dense", "moe"], grad_accum=2, precision="bf16"), gpu="a100")
    assert bf16.compute_s == pytest.approx(p.compute_s * 19.5 / 312)


def test_gpus_default_and_bad_choices() -> None:
    cfg = _job(["dense", "moe"])
    assert plan(cfg).gpus == 4
    assert plan(cfg, gpus=8).expert_dp == 4
    with pytest.raises(ConfigError) as bad_gpu:
        plan(cfg, gpu="tpu")
    assert bad_gpu.value.key == "--gpu" and "h100" in str(bad_gpu.value)
    with pytest.raises(ConfigError) as bad_world:
        plan(cfg, gpus=3)
    assert bad_world.value.key == "parallel.ep_size"
    with pytest.raises(ConfigError, match="--gpus"):
        plan(cfg, gpus=0)
    assert set(DEVICES) >= {"h100", "h200", "a100"}


def test_format_shows_the_key_lines() -> None:
    cfg = load_config("mixtral-8x7b", ["model.vocab_size=32000"])
    text = format_plan(plan(cfg, gpu="h200"))
    assert "46.7B total, 12.9B active" in text
    for key in ("64 x NVIDIA H200", "ZeRO stage 2", "ep 8", "forward FLOPs", "training FLOPs"):
        assert key in text
    for key in ("weights", "gradients", "optimizer", "activations", "all-to-all", "step time"):
        assert any(line.strip().startswith(key) for line in text.splitlines()), key
    dense = format_plan(plan(_job(["dense"], ep=1)))
    assert "none (ep 1)" in dense and "experts:" not in dense


def test_cli_plan_prints_the_plan_and_refuses_unknown_devices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from turnout.launch.cli import main

    assert main(["plan", "mixtral-8x7b", "model.vocab_size=32000", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "46.7B total, 12.9B active" in out
    assert main(["plan", "tiny", "--gpu", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "turnout: error: --gpu: unknown device 'tpu'; expected one of h100, h200, a100"
    )
