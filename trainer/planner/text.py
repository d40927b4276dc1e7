"""``turnout plan``'s text: a :class:`~turnout.trainer.planner.plan.Plan` as aligned lines."""

from __future__ import annotations

from turnout.trainer.planner.memory import GIB
from turnout.trainer.planner.plan import Plan


def _si(value: float, unit: str) -> str:
    """``value`` with a decimal prefix: 27.4 GFLOP, 68.7 GB."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _count(n: int) -> str:
    """A parameter count as published: 46.7B, 12.9B, 0.9M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _bytes(value: float) -> str:
    for scale, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def format_plan(p: Plan) -> str:
    """A readable multi-line table of the plan."""
    mem, n = p.memory, p.params
    frac = p.flops.fraction_of(p.dense_flops)
    act_frac = mem.activations / p.dense_activations
    bound = "compute" if p.compute_s >= p.a2a_s else "all-to-all"
    compute = f"compute {_seconds(p.compute_s)} at {p.peak_flops / 1e12:g} TFLOP/s"
    if p.ep > 1:
        compute += f", all-to-all {_seconds(p.a2a_s)} at {p.device.link_gb_s:g} GB/s"
    layout = f"data-parallel {p.gpus}, ZeRO stage {p.zero_stage}"
    if n.experts:
        layout += f", experts: ep {p.ep} x expert data-parallel {p.expert_dp}"
    rows = [
        ("device", f"{p.gpus} x {p.device.name} ({p.gpu}), {p.precision}"),
        ("layout", layout),
        (
            "batch",
            f"{p.micro_batch} x {p.seq_len} tokens per micro step, grad_accum {p.grad_accum}, "
            f"{p.tokens_per_step:,} tokens per step",
        ),
        ("parameters", f"{_count(n.total)} total, {_count(n.active)} active"),
        ("", f"({n.total:,} total, {n.active:,} active, {n.experts:,} in experts)"),
        (
            "forward FLOPs",
            f"{_si(p.flops.per_token, 'FLOP')} per token, "
            f"{frac:.3f} of the equal-shape dense model",
        ),
        ("training FLOPs", f"{_si(p.train_flops_per_step, 'FLOP')} per step (all ranks)"),
        ("memory per rank", ""),
        ("  weights", _bytes(mem.weights)),
        ("  gradients", _bytes(mem.grads)),
        ("  optimizer", _bytes(mem.optimizer)),
        (
            "  activations",
            f"{_bytes(mem.activations)} per micro batch "
            f"({act_frac:.3f} of the equal-shape dense model; "
            f"activation checkpointing {p.checkpointing})",
        ),
        ("  total", _bytes(mem.total)),
        (
            "all-to-all",
            f"{_si(p.a2a_bytes, 'B')} per rank per step, {_si(p.a2a_link_bytes, 'B')} off-rank"
            if p.ep > 1
            else "none (ep 1)",
        ),
        (
            "step time >=",
            f"{_seconds(p.step_s)} ({bound}-bound; {compute})",
        ),
        ("tokens/s <=", f"{p.tokens_per_step / p.step_s:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)
