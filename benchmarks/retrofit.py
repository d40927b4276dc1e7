"""Benchmark: retrofit MoD onto a trained dense model, train the routers only, and compare.

    python benchmarks/retrofit.py --out /tmp/retrofit                       # full table
    python benchmarks/retrofit.py --out /tmp/retrofit --smoke               # a few steps
    python benchmarks/retrofit.py --out /tmp/r --capacities 0.125 -- data.max_bytes=300000

1. ``turnout train tiny`` with ``model.layer_pattern=[dense]`` for ``--dense-steps``
   (one worker, ZeRO 0, no MLflow): the source model.
2. For each ``--capacities`` value: a new run with ``layer_pattern=[dense, mod]`` (every
   other block MoD-routed), ``train.init_from`` = the source, ``train.trainable=routers``
   (MoD routers and causal predictors only), for ``--router-steps``.
3. Each model's validation loss (``turnout eval``'s :func:`evaluate_model`: top-k and
   causal routing, in nats/token and nats/byte) and its cached decode tokens/s, measured
   as ``benchmarks/generate.py`` measures it (prefill a prompt of held-out tokens, decode
   ``--new-tokens`` one by one, best of ``--repeats``, source and retrofit alternating;
   the ratio is against the source timed in the same call),
   with the processed fraction of the routed blocks' decode work.

The table: capacity, router steps, val loss (top-k / causal), nats/byte and its difference
to the source, decode tokens/s and its ratio to the source, processed fraction.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import prefill, routed_decode_work, time_decodes  # noqa: E402

from turnout.launch.cli import main as turnout  # noqa: E402
from turnout.models.lm import TransformerLM  # noqa: E402
from turnout.trainer.data.batches import open_tokens, prepare_corpus  # noqa: E402
from turnout.trainer.eval.inference import evaluate_model  # noqa: E402
from turnout.trainer.weights.from_checkpoint import load_for_inference  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints")
    p.add_argument("--dense-steps", type=int, default=1000)
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--capacities", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="4 dense steps, 2 router steps")
    p.add_argument("items", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    if args.smoke:
        args.dense_steps, args.router_steps, args.repeats, args.eval_batches = 4, 2, 1, 2
    return args


def _train(out: Path, items: list[str]) -> Path:
    """One ``turnout train tiny`` run into ``out``; its run folder."""
    common = [
        "parallel.ep_size=1",
        "parallel.zero_stage=0",
        "launch.num_workers=1",
        "tracking.enabled=false",
        f"train.ckpt_dir={out}",
    ]
    code = turnout(["train", "tiny", *common, *items])
    if code != 0:
        raise SystemExit(f"turnout train exited {code} for {items}")
    runs = [p for p in out.iterdir() if p.is_dir()]
    if len(runs) != 1:
        raise SystemExit(f"expected one run folder in {out}, found {len(runs)}")
    return runs[0]


def _prompt(model_cfg_run: Path, batch: int, length: int) -> torch.Tensor:
    """Held-out tokens of the run's corpus: ``batch`` windows of ``length``."""
    _, cfg, _ = load_for_inference(model_cfg_run)
    data = open_tokens(prepare_corpus(cfg.data, cfg.model.vocab_size), cfg.data.val_fraction)
    val = torch.from_numpy(data.val.astype("int64"))
    step = max((len(val) - length) // batch, 1)
    return torch.stack([val[i * step : i * step + length] for i in range(batch)])


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [f"train.steps={args.dense_steps}", f"train.ckpt_every={args.dense_steps}"]
    source_run = _train(args.out / "dense", ["model.layer_pattern=[dense]", *steps, *args.items])
    rows = []
    for c in args.capacities:
        run = _train(
            args.out / f"mod-{c}",
            [
                "model.layer_pattern=[dense,mod]",
                f"model.mod.capacity={c}",
                f"train.init_from={source_run}",
                "train.trainable=routers",
                f"train.steps={args.router_steps}",
                f"train.ckpt_every={args.router_steps}",
                *args.items,
            ],
        )
        rows.append((c, run))
    source, cfg, _ = load_for_inference(source_run)
    S = cfg.model.max_seq_len
    prompt_BP = _prompt(source_run, args.batch, S)[:, : S - args.new_tokens]
    stream_BN = _prompt(source_run, args.batch, S)[:, S - args.new_tokens :]
    ev0 = evaluate_model(source, cfg, batches=args.eval_batches)
    nb0 = ev0.bits_per_byte * math.log(2)
    (tps0,) = _tokens_per_s([source], prompt_BP, stream_BN, args.repeats)
    print(f"source: {args.dense_steps} dense steps, {source_run}")
    print(
        f"{'capacity':>8} {'steps':>6} {'val top-k':>9} {'val causal':>10} {'nats/byte':>9} "
        f"{'d nats/B':>8} {'tok/s':>8} {'x source':>8} {'processed':>9}"
    )
    print(
        f"{'source':>8} {args.dense_steps:>6} {ev0.loss:>9.4f} {'':>10} {nb0:>9.4f} {'':>8} "
        f"{tps0:>8.1f} {1.0:>8.2f} {'':>9}"
    )
    for c, run in rows:
        model, mcfg, _ = load_for_inference(run)
        ev = evaluate_model(model, mcfg, batches=args.eval_batches)
        nb = ev.bits_per_byte * math.log(2)  # bits_per_byte is the top-k loss's
        tps, tps_src = _tokens_per_s([model, source], prompt_BP, stream_BN, args.repeats)
        _, state = prefill(model, prompt_BP, stream_BN.shape[1])
        processed, _ = routed_decode_work(model, state, stream_BN)
        print(
            f"{c:>8.3f} {args.router_steps:>6} {ev.loss:>9.4f} {ev.loss_causal:>10.4f} "
            f"{nb:>9.4f} {nb - nb0:>+8.4f} {tps:>8.1f} {tps / tps_src:>8.2f} {processed:>9.1%}"
        )


def _tokens_per_s(
    models: list[TransformerLM], prompt_BP: torch.Tensor, stream_BN: torch.Tensor, repeats: int
) -> list[float]:
    """Decode tokens/s of each model as benchmarks/generate.py measures it (best of
    ``repeats``, the models alternating within each repeat: the same machine load)."""
    states = [prefill(m, prompt_BP, stream_BN.shape[1])[1] for m in models]
    times = time_decodes(models, states, stream_BN, repeats)
    return [stream_BN.numel() / min(t) for t in times]


if __name__ == "__main__":
    main()
