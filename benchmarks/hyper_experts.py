"""Benchmark: what hyper-experts cost a MoE layer, time against FLOPs.

    python benchmarks/hyper_experts.py             # d 512, expert ffn 1024, E 8 top-2, T 2048
    python benchmarks/hyper_experts.py --quick     # small smoke run (~10 s)
    python benchmarks/hyper_experts.py --device cuda --dtype bf16

One process. The same ``MoELayer`` (dropless, SwiGLU experts, the local kept-rows
dispatcher) is built three times from one seed: without hyper-experts (the baseline),
with the default adapter (rank 4, hypernetwork width 16, embeddings 16), and with a
larger one (rank 8, width 32, embeddings 32); each hyper layer gets its own
``HyperNet`` with non-zero up maps (a fresh one adds exact zeros, which would time a
multiply by zero only). A step is forward + backward of ``sum(y * gy)`` for a fixed
input and output gradient, parameter gradients reset to None before each. Contenders
are timed in interleaved rounds (one step of each per round, so load from other
processes hits all alike); a time is the median over ``--iters`` rounds, ``noise`` the
IQR over the median. For each hyper contender the table prints its time over the
baseline's next to its FLOPs over the baseline's (``models/flops.py``: router, the
experts' kept rows, the adapter), so an adapter that runs slower than its FLOPs
say shows as the gap between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from turnout.config.hyper import HyperConfig
from turnout.config.model import ModelConfig, MoEConfig
from turnout.models.flops import SWIGLU_MATMULS, hyper_flops
from turnout.models.hyper import HyperNet
from turnout.models.moe import MoELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = {
    "moe": HyperConfig(),
    "moe + hyper r4 H16": HyperConfig(enabled=True),
    "moe + hyper r8 H32": HyperConfig(enabled=True, rank=8, hidden=32, embed_dim=32),
}


def _layer(args: argparse.Namespace, hyper: HyperConfig, dev: torch.device) -> MoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=args.experts, top_k=args.k, capacity_factor=None, hyper=hyper)
    layer = MoELayer(args.d, args.ffn, moe)
    if hyper.enabled:
        net = HyperNet(args.d, hyper, init_std=0.02)
        with torch.no_grad():
            net.up_HrD.normal_(std=0.02)
        layer.attach_hyper(net)
        layer.hyper_net_for_benchmark = net  # registered here so .to() and params see it
    return layer.to(dev, DTYPES[args.dtype])


def _flops(args: argparse.Namespace, hyper: HyperConfig) -> float:
    """Forward FLOPs per token of the layer (dropless: k rows per token)."""
    cfg = ModelConfig(d_model=args.d, moe=MoEConfig(num_experts=args.experts, hyper=hyper))
    router = 2 * args.d * args.experts
    experts = args.k * SWIGLU_MATMULS * 2 * args.d * args.ffn
    return router + experts + hyper_flops(cfg)


def _step(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        y, _ = layer(x)
        (y * gy).sum().backward()

    return step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d 128, ffn 256, T 512, 5 rounds")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024, help="hidden width of each expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = p.parse_args()
    if args.quick:
        args.d, args.ffn, args.tokens, args.iters = 128, 256, 512, 5
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.d, generator=gen).to(dev, DTYPES[args.dtype])
    gy = torch.randn(args.tokens, args.d, generator=gen).to(dev, DTYPES[args.dtype])
    steps = {name: _step(_layer(args, h, dev), x, gy) for name, h in CONTENDERS.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    print(
        f"MoE layer fwd+bwd: d {args.d}, expert ffn {args.ffn}, E {args.experts} top-{args.k} "
        f"dropless, T {args.tokens}, {args.dtype} on {args.device}, {args.threads} thread(s), "
        f"median of {args.iters} interleaved rounds"
    )
    base_t = statistics.median(times["moe"])
    base_f = _flops(args, CONTENDERS["moe"])
    print(f"{'contender':<22}{'ms':>9}{'noise':>8}{'time ratio':>12}{'FLOP ratio':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med] * 3
        flops = _flops(args, CONTENDERS[name])
        print(
            f"{name:<22}{1e3 * med:>9.2f}{(q[2] - q[0]) / q[1]:>8.2f}"
            f"{med / base_t:>12.3f}{flops / base_f:>12.3f}"
        )


if __name__ == "__main__":
    main()
