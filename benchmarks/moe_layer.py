"""Benchmark: turnout's expert-parallel MoE layer vs DeepSpeed's ``deepspeed.moe.layer.MoE``.

Two ranks (gloo on CPU, NCCL with one GPU per rank), identical settings (d, ffn, E, k,
capacity factor, tokens per rank), forward + backward, SwiGLU experts on both sides.
For each point it prints our time, DeepSpeed's, their ratio, and the limit measured in
the same run: a dense SwiGLU FFN over ``T * k * cf`` rows (the active FLOPs times the
capacity factor) plus four raw ``all_to_all_single`` calls of the bucket bytes (two
forward, two backward). Times are the median per-iteration wall time, max over ranks.

    python benchmarks/moe_layer.py --quick
    python benchmarks/moe_layer.py --d 512 --ffn 1024 --experts 8 --tokens 8192 --modes capacity
    python benchmarks/moe_layer.py            # full sweep: E in {8,32,128}, T in {2048,8192}
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from turnout.models.layers import SwiGLU
from turnout.parallel.dist import free_port, init_distributed


def _time(fn: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _point(args: argparse.Namespace, E: int, T: int, mode: str, dev: torch.device) -> dict:
    import deepspeed
    from deepspeed.moe.layer import MoE

    from turnout.config.model import MoEConfig
    from turnout.models.moe import MoELayer
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups

    d, ffn, k, cf = args.d, args.ffn, args.k, args.cf
    groups = args._groups if hasattr(args, "_groups") else build_groups(2)
    args._groups = groups
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, requires_grad=True)
    gy = torch.randn(T, d, device=dev)

    ours = MoELayer(d, ffn, MoEConfig(E, k, cf if mode == "capacity" else None, 4)).to(dev)
    install_expert_parallel(ours, groups)

    def run_ours() -> None:
        y, aux = ours(x)
        torch.autograd.backward([y, aux.load_balance], [gy, torch.ones((), device=dev)])

    t_ours = _time(run_ours, args.iters, args.warmup)
    rows = ours.dispatcher.rows_sent

    ds = MoE(
        hidden_size=d,
        expert=SwiGLU(d, ffn),
        num_experts=E,
        ep_size=2,
        k=k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=4,
        drop_tokens=mode == "capacity",
        use_rts=False,
    ).to(dev)
    ds.set_deepspeed_parallelism()

    def run_ds() -> None:
        y, l_aux, _ = ds(x)
        torch.autograd.backward([y, l_aux], [gy, torch.ones((), device=dev)])

    t_ds = _time(run_ds, args.iters, args.warmup)
    _ = deepspeed  # imported for its side effects (accelerator, comm)

    C = max(4, math.ceil(cf * T * k / E - 1e-9))
    dense = SwiGLU(d, ffn).to(dev)
    xr = torch.randn(E * C, d, device=dev, requires_grad=True)
    gr = torch.randn(E * C, d, device=dev)

    def run_dense() -> None:
        dense(xr).backward(gr)

    t_dense = _time(run_dense, args.iters, args.warmup)
    buf = torch.randn(E * C, d, device=dev)
    out = torch.empty_like(buf)

    def run_a2a() -> None:
        for _ in range(4):
            dist.all_to_all_single(out, buf, group=groups.ep_group)

    t_a2a = _time(run_a2a, args.iters, args.warmup)
    return dict(E=E, T=T, mode=mode, ours=t_ours, ds=t_ds, dense=t_dense, a2a=t_a2a, rows=rows, C=C)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if not cuda:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    init_distributed(backend)  # also selects this rank's GPU under NCCL
    import deepspeed

    # DeepSpeed's MoE layer talks through deepspeed.comm: let it adopt our process group.
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False, verbose=False)
    if rank == 0:
        print(
            f"d={args.d} ffn={args.ffn} k={args.k} cf={args.cf} ranks={world} "
            f"backend={dist.get_backend()} device={dev.type} threads/rank={torch.get_num_threads()}"
        )
        print(
            f"{'mode':9} {'E':>4} {'T/rank':>6} {'ours s':>8} {'ds s':>8} {'ds/ours':>7} "
            f"{'limit s':>8} {'ours/lim':>8} {'(dense':>8} {'a2a)':>7}"
        )
    for mode in args.modes:
        for T in args.tokens:
            for E in args.experts:
                r = _point(args, E, T, mode, dev)
                lim = r["dense"] + r["a2a"]
                if rank == 0:
                    print(
                        f"{mode:9} {E:>4} {T:>6} {r['ours']:8.3f} {r['ds']:8.3f} "
                        f"{r['ds'] / r['ours']:7.2f} {lim:8.3f} {r['ours'] / lim:8.2f} "
                        f"{r['dense']:8.3f} {r['a2a']:7.3f}",
                        flush=True,
                    )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (d=256, T=2048, E 8/32)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--cf", type=float, default=1.25)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--modes", nargs="+", default=["capacity", "dropless"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    args = p.parse_args()
    if args.quick:
        args.d, args.ffn, args.tokens, args.experts = 256, 512, [2048], [8, 32]
    mp.spawn(_worker, args=(2, free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
