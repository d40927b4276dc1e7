"""Fused csrc/ routing kernels against the pure-PyTorch reference, side by side.

    python benchmarks/routing.py [--device cpu|cuda] [--repeats 5] [--threads N] [--quick]

Times the routing plan (token-choice top-k + GShard slots + capacity) for T in
{4096, 65536}, E in {8, 64, 256}, k in {1, 2}, without and with MoD in front (capacity
12.5 % of S = 2048 positions per sequence; the fused op does both in one call). Prints
the median of several runs after a warm-up, and the ratio reference / fused. On CUDA it
also prints the share of the routing (the plan and the rows' moves around the experts:
expert-major order, gather, combine) in a whole MoE layer forward at d = 4096.

Shape legend: T tokens, E experts, K top-k, D width, B batch, S positions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from turnout.models import kernels, ops
from turnout.models import routing as ref
from turnout.models.routing import expert_capacity, mod_capacity

SEQ = 2048
MOD_CAPACITY = 0.125


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan_case(T: int, E: int, k: int, mod: bool, device: torch.device, repeats: int):
    g = torch.Generator(device="cpu").manual_seed(T + E + k)
    logits = torch.randn(T, E, generator=g).to(device)
    norm = k > 1
    if not mod:
        cap = expert_capacity(T, E, k, 1.25, 4)

        def fused():
            return ops.moe_plan(logits, k, cap, norm, E)

        def reference():
            return ref.moe_plan(logits, k, cap, norm, E)

    else:
        B = T // SEQ
        scores = torch.randn(B, SEQ, generator=g).to(device)
        m = mod_capacity(SEQ, MOD_CAPACITY)
        cap = expert_capacity(B * m, E, k, 1.25, 4)

        def fused():
            return ops.mode_plan(scores, m, logits, k, cap, norm, E)

        def reference():
            idx, _ = ref.mod_select(scores, m)
            return ref.moe_plan(logits[ref.chosen_rows(idx, SEQ)], k, cap, norm, E)

    return timed(reference, device, repeats), timed(fused, device, repeats)


def layer_share(device: torch.device, repeats: int, T: int = 16384, E: int = 8, D: int = 4096):
    """Plan and row moves vs. the whole MoE layer forward (bf16 experts, d = 4096)."""
    from turnout.models.dispatch import LocalDispatcher, run_experts
    from turnout.models.experts import ExpertBank

    hidden = 2 * D
    experts = ExpertBank(E, D, hidden, 0.02).to(device=device, dtype=torch.bfloat16)
    router = torch.randn(D, E, device=device) * 0.02
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    cap = expert_capacity(T, E, 2, 1.25, 4)

    logits0 = x.float() @ router

    local = LocalDispatcher()

    def routing_only():  # the layer's path with the experts left out (rows pass through)
        plan = ops.moe_plan(logits0, 2, cap, True, E)  # the router GEMM is not part of it
        return run_experts(x, plan, experts, lambda rows_ND, counts_E, bank: rows_ND)

    def layer():
        logits = x.float() @ router
        plan = ops.moe_plan(logits, 2, cap, True, E)
        return local(x, plan, experts)

    with torch.no_grad():
        return timed(routing_only, device, repeats), timed(layer, device, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="T = 4096 only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    assert kernels.load(), "csrc/ kernels did not build; nothing to compare"
    print(
        f"device={device} threads={torch.get_num_threads()} backend={ops.backend()} "
        f"torch={torch.__version__} first-load={kernels.load_seconds():.1f}s"
    )
    print(
        f"{'T':>6} {'E':>4} {'k':>2} {'MoD':>4} {'reference ms':>13} {'fused ms':>9} {'ratio':>7}"
    )
    for T in (4096,) if args.quick else (4096, 65536):
        for mod in (False, True):
            for E in (8, 64, 256):
                for k in (1, 2):
                    r, f = plan_case(T, E, k, mod, device, args.repeats)
                    print(
                        f"{T:>6} {E:>4} {k:>2} {'yes' if mod else 'no':>4} "
                        f"{r * 1e3:>13.3f} {f * 1e3:>9.3f} {r / f:>6.1f}x"
                    )
    if device.type == "cuda":
        route, whole = layer_share(device, args.repeats)
        print(
            f"MoE layer T=16384 E=8 k=2 d=4096 bf16: plan + row moves {route * 1e3:.3f} ms "
            f"of {whole * 1e3:.3f} ms = {100 * route / whole:.1f}%"
        )


if __name__ == "__main__":
    main()
