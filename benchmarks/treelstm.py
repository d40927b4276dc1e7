"""Benchmark: the level-batched Tree-LSTM against the node-at-a-time reference, nodes/s.

    python benchmarks/treelstm.py            # 8 batches of 32 stdlib functions, d 128
    python benchmarks/treelstm.py --quick    # 2 batches of 8 (~10 s)

The functions are the first of this Python's standard library as the structure dataset
builds them (``trainer/data/structure``, byte labels, the default ``data.ast`` options),
batched in file order. Both encoders are the same module with the same weights
(``models/treelstm.py``): ``TreeLSTM.forward`` runs one step per level of the batch
(nodes of equal height of all its trees at once, lists padded to power-of-two buckets),
``reference_encode`` one cell per node in post-order. Each is timed forward only and
forward + backward (of the sum of the root states), best of ``--repeats``, after a
warm-up; nodes/s counts the batch's real nodes (not padding). The outputs are compared
too: the largest absolute difference is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from turnout.config.structure import AstConfig
from turnout.models.treelstm import TreeBatch, TreeLSTM, reference_encode, tree_batch
from turnout.trainer.data.structure.dataset import StructureData
from turnout.trainer.data.structure.examples import build
from turnout.trainer.data.tokenizer import ByteTokenizer


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="functions per batch")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.batches, args.batch, args.repeats = 2, 8, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        folder, _ = build("stdlib", ByteTokenizer(), AstConfig(), cache, 0.0, max_bytes=2_000_000)
        data = StructureData(folder)
    split = data.splits["train"]
    batches: list[TreeBatch] = []
    for b in range(args.batches):
        trees = []
        for f in range(b * args.batch, (b + 1) * args.batch):
            e = split.example(f)
            trees.append((e.types_N, e.tokens_NL, e.parent_N, e.height_N))
        batches.append(tree_batch(trees))
    nodes = sum(b.num_nodes for b in batches)
    levels = sum(len(b.levels) for b in batches)
    torch.manual_seed(0)
    model = TreeLSTM(len(data.node_types), 256, args.d)
    with torch.no_grad():
        diff = max(float((model(b) - reference_encode(model, b)).abs().max()) for b in batches)
    print(
        f"Tree-LSTM d {args.d}: {args.batches} batches of {args.batch} stdlib functions, "
        f"{nodes} nodes, {levels} levels in all, {args.threads} thread(s), best of "
        f"{args.repeats}; largest |batched - reference| {diff:.1e}"
    )

    def run(encode, backward: bool):  # type: ignore[no-untyped-def]
        def go() -> None:
            for b in batches:
                h = encode(b)
                if backward:
                    h[b.roots_B].sum().backward()

        return go

    print(f"{'':<26}{'batched':>14}{'reference':>14}{'ratio':>8}")
    for name, backward in (("forward", False), ("forward + backward", True)):
        grad = torch.enable_grad() if backward else torch.no_grad()
        with grad:
            fast = _time(run(model, backward), args.repeats)
            slow = _time(run(lambda b: reference_encode(model, b), backward), args.repeats)
        print(
            f"{name + ' nodes/s':<26}{nodes / fast:>14,.0f}{nodes / slow:>14,.0f}"
            f"{slow / fast:>7.1f}x"
        )


if __name__ == "__main__":
    main()
