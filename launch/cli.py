"""The ``turnout`` command.

    turnout train [PRESET|file.yaml] [key=value ...] [--address ADDR] [--launcher ray|torchrun]
    turnout submit [PRESET|file.yaml] [key=value ...] --address http://HEAD:8265 [--no-wait]
    turnout sweep SPEC.yaml [--address ADDR] [--report]
    turnout presets
    turnout show [PRESET|file.yaml] [key=value ...]
    turnout keys [--markdown]
    turnout metrics [--markdown]
    turnout plan [PRESET|file.yaml] [key=value ...] [--gpus N] [--gpu h100|h200|a100]
    turnout generate CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--seed S] [--device cpu|cuda] [--exit-threshold P] [--halt-threshold P]
    turnout eval CHECKPOINT [--corpus PATH] [--batches N] [--device cpu|cuda]
    turnout export CHECKPOINT OUT [--format turnout|hf] [--allow-dropless]
                   [--mlflow [--tracking-uri URI] [--register-as NAME]]
    turnout replay-tracking FILE [--uri URI]

Everything that can be wrong with a config is found here, on the launcher, before a
worker starts: one line ``turnout: error: <key>: <message>`` on stderr, exit code 2.
Ray, DeepSpeed, MLflow and torch.distributed are imported only after validation, so a
bad config fails in about a second.

SIGTERM to ``turnout train`` stops the job after a step with a checkpoint, marks the
MLflow run KILLED, prints one line naming the checkpoint and the command that resumes
it, and exits 143 (:mod:`turnout.launch.preempt`); Ctrl-C does the same and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from turnout.config import TurnoutConfig
from turnout.config.load import (
    DEFAULT_PRESET,
    load_config,
    preset_dir,
    preset_names,
    split_source,
    to_yaml,
)
from turnout.config.train import TrackingConfig
from turnout.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    RunError,
    WorkerError,
    error_line,
)
from turnout.launch.cli_checkpoint import add_checkpoint_commands
from turnout.redact import redact

if TYPE_CHECKING:
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (and exit 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(error_line(f"{message} (see turnout {self._sub_name()}--help)"), file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    def _sub_name(self) -> str:
        parts = self.prog.split()
        return f"{parts[-1]} " if len(parts) > 1 else ""


def _preset_blurb(name: str) -> str:
    """The first sentence of a preset file's leading comment, as its description."""
    try:
        text = (preset_dir() / f"{name}.yaml").read_text()
    except OSError:
        return ""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    blurb = " ".join(words)
    end = blurb.find(". ")
    return (blurb[:end] if end >= 0 else blurb).rstrip(".")


def _load(items: list[str], address: str | None = None) -> TurnoutConfig:
    source, overrides = split_source(items)
    if address:
        overrides = [*overrides, f"launch.address={address}"]
    return load_config(source, overrides)


def cmd_presets(_: argparse.Namespace) -> int:
    names = preset_names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name.ljust(width)}  {_preset_blurb(name)}{mark}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from turnout.launch import keys

    return _print_reference(keys, args.markdown)


def cmd_metrics(args: argparse.Namespace) -> int:
    from turnout.launch import metrics_doc

    return _print_reference(metrics_doc, args.markdown)


def _print_reference(page: ModuleType, markdown: bool) -> int:
    """A reference module's plain listing, or with ``markdown`` its docs/ page verbatim."""
    if markdown:
        sys.stdout.write(page.markdown_page())
    else:
        print(page.plain_listing())
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    cfg = _load(args.items)
    print(to_yaml(cfg), end="")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from turnout.trainer.planner.plan import plan
    from turnout.trainer.planner.text import format_plan

    cfg = _load(args.items)
    if cfg.data.structure:
        raise ConfigError(
            "data.structure",
            "turnout plan sizes language models; a function-name model's cost depends on "
            "its batches: its run reports FLOPs per node and peak memory",
        )
    print(format_plan(plan(cfg, gpus=args.gpus, gpu=args.gpu)))
    return EXIT_OK


def cmd_replay_tracking(args: argparse.Namespace) -> int:
    from turnout.trainer.tracking.records import replay

    done = replay(args.file, args.uri)
    print(
        f"turnout: sent {done.records} tracking record(s) of run(s) {', '.join(done.run_ids)} "
        f"to {redact(args.uri)}; the file is now {done.done_file}"
    )
    return EXIT_OK


def _resolve_resume(cfg: TurnoutConfig) -> TurnoutConfig:
    """``train.resume=auto`` as the checkpoint it finds, said in one line."""
    from turnout.config.train import RESUME_AUTO
    from turnout.trainer.resume.auto import resolve_auto

    if cfg.train.resume != RESUME_AUTO:
        return cfg
    cfg = resolve_auto(cfg)
    found = f"resuming {cfg.train.resume}" if cfg.train.resume else "starting fresh"
    print(
        f"turnout: train.resume=auto: {found} (checkpoints of this config in {cfg.train.ckpt_dir})",
        flush=True,
    )
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from turnout.launch.torchrun import launcher_overrides

    cfg = _load([*args.items, *launcher_overrides()], args.address)
    from turnout.launch.paths import resolve_paths
    from turnout.launch.preempt import DriverStop, check_grace
    from turnout.launch.preflight import preflight

    stop = DriverStop(grace_s=0.0)
    stop.install()  # until the job runs, a signal ends the launcher at once (exit 143/130)
    cfg = _resolve_resume(resolve_paths(cfg))
    if args.launcher == "ray":
        from turnout.launch.ray.auth import require_token_auth
        from turnout.launch.ray.cluster import KEY, check_reachable, cluster_address

        address = cluster_address(cfg)
        if address:  # no token, or an address nobody answers on: one line, at once
            require_token_auth(address, cfg.launch.allow_unauthenticated, KEY)
            check_reachable(address)
    stop.grace_s = check_grace(cfg)  # measures the checkpoint folder's write speed
    data_path = preflight(cfg)  # validation ends here: Ray, DeepSpeed, MLflow not imported
    if args.launcher == "torchrun":
        from turnout.launch.torchrun import train_torchrun

        return train_torchrun(cfg, stop)

    from turnout.launch.ray.run import run_ray
    from turnout.launch.summary import format_summary
    from turnout.launch.tracked_run import open_tracked_run

    tracked = open_tracked_run(cfg)
    where = cfg.launch.address or os.environ.get("RAY_ADDRESS") or "an embedded local Ray cluster"
    print(
        f"turnout: {cfg.launch.num_workers} worker(s) on {where}; "
        f"tracking {redact(cfg.tracking.uri) if cfg.tracking.enabled else 'off'}",
        flush=True,
    )
    try:
        res = run_ray(cfg, data_path, tracked.run_id, stop)
    except WorkerError as e:  # a config error only a worker could find still exits 2
        if stop.signum:  # the stop went wrong: still the signal's ending
            return stop.finish(tracked, {})
        tracked.end("FAILED")
        print(error_line(e.text()), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if stop.signum:  # a second signal, or the grace ran out
            return stop.finish(tracked, {})
        tracked.end("KILLED")
        run = f"; MLflow run {tracked.run_id} marked KILLED" if tracked.run_id else ""
        print(f"turnout: interrupted: every worker stopped{run}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BaseException:
        tracked.end("FAILED")
        raise
    if stop.signum and res.get("stopped_at"):
        return stop.finish(tracked, res)
    tracked.end("FINISHED")
    print(format_summary(cfg, res), flush=True)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from turnout.launch.ray.submit import submit

    return submit(args.items, args.address, wait=not args.no_wait)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.report:
        from turnout.launch.sweep.driver import report_sweep

        return report_sweep(args.spec)
    from turnout.launch.sweep.driver import run_sweep

    return run_sweep(args.spec, args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="turnout",
        description="Train transformers with input-dependent compute (MoE, MoD, MoDE).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    items_help = (
        f"a preset name (default {DEFAULT_PRESET!r}; see `turnout presets`) or a YAML file, "
        "then key=value overrides (e.g. train.steps=50 model.moe.num_experts=8)"
    )

    p = sub.add_parser("train", help="train a model (embedded Ray cluster by default)")
    p.add_argument(
        "items", nargs="*", metavar="[PRESET|FILE.yaml] [key=value ...]", help=items_help
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. ray://head:10001); default RAY_ADDRESS, else a local one",
    )
    p.add_argument(
        "--launcher",
        choices=("ray", "torchrun"),
        default="ray",
        help="ray (default): Ray Train workers; torchrun: plain torchrun on this machine",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "submit", help="run `turnout train` as a job on a Ray cluster (Ray's job API)"
    )
    p.add_argument(
        "items", nargs="*", metavar="[PRESET|FILE.yaml] [key=value ...]", help=items_help
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's job server, its dashboard (http://HEAD:8265); "
        "default RAY_API_SERVER_ADDRESS",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="return once the job is queued; do not follow it"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "sweep",
        help="train a grid of configs at fixed FLOP budgets as Ray Tune trials (resumable)",
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="the sweep spec (see docs/sweeps.md)")
    p.add_argument(
        "--address", default=None, help="Ray cluster to run the trials on; default a local one"
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="fit and plot the finished trials (JSON, Markdown, PNG) instead of running",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("presets", help="list the presets in configs/")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("keys", help="list every config key with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as the Markdown page docs/config.md")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "metrics", help="list the aux-loss and per-layer MLflow metrics and what they mean"
    )
    p.add_argument("--markdown", action="store_true", help="as the Markdown page docs/metrics.md")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("show", help="print the resolved, validated config as YAML")
    p.add_argument(
        "items", nargs="*", metavar="[PRESET|FILE.yaml] [key=value ...]", help=items_help
    )
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "plan", help="size, FLOPs, memory per rank and a step-time bound, without running"
    )
    p.add_argument(
        "items", nargs="*", metavar="[PRESET|FILE.yaml] [key=value ...]", help=items_help
    )
    p.add_argument(
        "--gpus", type=int, default=None, help="world size to plan for (default launch.num_workers)"
    )
    p.add_argument(
        "--gpu", default="h100", help="device whose peak and link bandwidth bound the step time"
    )
    p.set_defaults(func=cmd_plan)

    add_checkpoint_commands(sub)

    p = sub.add_parser(
        "replay-tracking",
        help="send a fallback file of tracking records (left by an MLflow outage) to the store",
    )
    p.add_argument("file", metavar="FILE", help="the .jsonl file the outage warning named")
    p.add_argument("--uri", default=TrackingConfig().uri, help="the MLflow store (tracking.uri)")
    p.set_defaults(func=cmd_replay_tracking)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow an option (`train tiny --launcher torchrun a.b=c`): argparse
    # hands those back as extras; they join the items in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if any(e.startswith("-") for e in extra) or not hasattr(args, "items"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items = [*args.items, *extra]
    try:
        return args.func(args)
    except ConfigError as e:
        print(error_line(str(e)), file=sys.stderr)
        return EXIT_CONFIG
    except RunError as e:
        print(error_line(str(e)), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # launch.preempt.Terminated: SIGTERM
        code = int(getattr(e, "exit_code", EXIT_INTERRUPTED))
        what = "interrupted" if code == EXIT_INTERRUPTED else "terminated (SIGTERM)"
        print(f"turnout: {what}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
