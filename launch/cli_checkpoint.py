"""The ``turnout`` commands that read a checkpoint: generate, eval, export (``--mlflow``:
:mod:`turnout.launch.export_mlflow`), and import, which reads a Hugging Face folder into a
turnout export folder.

Each loads the checkpoint on one process (``trainer.export``), whatever layout wrote it;
a bad path, flag or prompt is one line naming it (exit 2) before the weights are read
where it can be.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.errors import EXIT_OK, ConfigError


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{name} requested, but CUDA is not available here")
    return name


def _load_checkpoint(args: argparse.Namespace, structure_ok: bool = False) -> tuple:
    from turnout.trainer.weights.from_checkpoint import load_for_inference

    model, cfg, info = load_for_inference(args.checkpoint, _device(args.device))
    if cfg.data.structure and not structure_ok:
        raise ConfigError(
            "checkpoint",
            f"{info.folder} is a function-name model (data.structure={cfg.data.structure}): "
            "it generates no text; `turnout eval` scores it",
        )
    from turnout.trainer.data import tokenizer_files

    tokenizer = tokenizer_files.load(info.folder, cfg)
    print(
        f"turnout: {info.folder} (step {info.step}, {info.num_params:,} parameters, "
        f"ZeRO-{info.zero_stage}, ep {info.ep_size}, saved in {str(info.saved_dtype)[6:]}, "
        f"tokenizer {tokenizer.name}) on {args.device}",
        file=sys.stderr,
        flush=True,
    )
    return model, cfg, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from turnout.trainer.eval.inference import encode, sample_text

    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", f"must be >= 0, got {args.max_new_tokens}")
    from turnout.trainer.data import tokenizer_files
    from turnout.trainer.weights.from_checkpoint import checkpoint_config, step_folder

    # A prompt that cannot fit fails before the weights are read.
    folder = step_folder(args.checkpoint)
    saved = checkpoint_config(folder)
    encode(args.prompt, saved.model.max_seq_len, tokenizer_files.load(folder, saved))
    threshold = _threshold(args, saved.model.depth_kind())
    model, cfg, tok = _load_checkpoint(args)
    out = sample_text(
        model, args.prompt, args.max_new_tokens, args.temperature, args.seed, threshold, tok
    )
    print(out.text, flush=True)
    skipped = (
        f"{out.skipped_fraction:.1%} of routed-block work skipped"
        if out.skipped_fraction == out.skipped_fraction
        else "no routed blocks"
    )
    cut = (
        f" (cut to fit max_seq_len {cfg.model.max_seq_len})"
        if out.new_tokens < args.max_new_tokens
        else ""
    )
    depth = ""
    if out.mean_depth == out.mean_depth:
        what = "exit layer" if cfg.model.uses_exit() else "depth (ponder)"
        depth = f", mean {what} {out.mean_depth:.2f} of {_full_depth(cfg)} blocks"
        if cfg.model.uses_recursion():
            rc = cfg.model.recursion
            recursions = (out.mean_depth - (cfg.model.n_layers - 1)) / rc.group
            depth = (
                f", mean recursion depth {recursions:.2f} of {rc.max_recursions} "
                f"({out.mean_depth:.2f} of {_full_depth(cfg)} blocks)"
            )
    print(
        f"turnout: {out.new_tokens} new tokens{cut}, {out.tokens_per_s:.1f} decode tokens/s, "
        f"{skipped}{depth}",
        file=sys.stderr,
    )
    return EXIT_OK


def _full_depth(cfg: TurnoutConfig) -> int:
    """Block applications of a token that never exits / halts."""
    if cfg.model.depth_kind() not in ("ponder", "recursion"):
        return cfg.model.n_layers
    steps, per_step = cfg.model.depth_steps()
    return cfg.model.n_layers - 1 + steps * per_step


def _threshold(args: argparse.Namespace, kind: str | None) -> float | None:
    """The --exit-threshold / --halt-threshold given (checked against the model kind)."""
    for flag, value, wants in (
        ("--exit-threshold", args.exit_threshold, "exit"),
        ("--halt-threshold", args.halt_threshold, "ponder"),
    ):
        if value is None:
            continue
        if kind != wants:
            what = "early exits (model.exit.layers)" if wants == "exit" else "'ponder' block"
            raise ConfigError(flag, f"the checkpoint's model has no {what}")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(flag, f"must be in [0, 1], got {value}")
        return float(value)
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from turnout.trainer.eval.inference import evaluate_model

    model, cfg, tok = _load_checkpoint(args, structure_ok=True)
    if cfg.data.structure:
        return _eval_names(model, cfg, args)
    ev = evaluate_model(model, cfg, args.corpus, args.batches, tokenizer=tok)
    print(f"corpus           {ev.corpus} ({ev.windows} held-out windows of {ev.seq_len} tokens)")
    print(f"val_loss         {ev.loss:.4f}  (top-k routing, nats/token)")
    if ev.loss_causal == ev.loss_causal:
        print(f"val_loss_causal  {ev.loss_causal:.4f}  (causal routing, as when sampling)")
    if ev.depth_mean == ev.depth_mean:
        print(f"depth_mean       {ev.depth_mean:.2f}  (blocks per token, decode rule)")
    print(f"bits_per_byte    {ev.bits_per_byte:.4f}  (val_loss in bits per UTF-8 byte)")
    print(f"unigram_entropy  {ev.unigram_entropy:.4f}  (unigram baseline, nats/token)")
    return EXIT_OK


def _eval_names(model: object, cfg: object, args: argparse.Namespace) -> int:
    """``turnout eval`` of a function-name checkpoint: held-out names, scored."""
    from turnout.trainer.checkpointing.files import read_meta
    from turnout.trainer.structure.validation import evaluate_names
    from turnout.trainer.weights.from_checkpoint import step_folder

    targets = read_meta(step_folder(args.checkpoint)).get("client", {}).get("name_targets")
    ev = evaluate_names(model, cfg, args.corpus, args.batches, targets)  # type: ignore[arg-type]
    s = ev.score
    print(f"corpus           {ev.corpus} ({s.examples} held-out functions scored)")
    print(f"val_loss         {ev.loss:.4f}  (nats per name position)")
    print(f"f1               {s.f1:.4f}  (subtoken F1; precision {s.precision:.4f}, "
          f"recall {s.recall:.4f})")  # fmt: skip
    print(f"exact_match      {s.exact:.4f}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from turnout.trainer.weights.export import export

    if args.mlflow:
        from turnout.launch.export_mlflow import check_flags

        check_flags(args.format, args.tracking_uri, args.register_as)
    elif args.tracking_uri is not None or args.register_as is not None:
        raise ConfigError("--mlflow", "--tracking-uri and --register-as need --mlflow")
    if args.mlflow:
        from turnout.models.pretrained import is_export
        from turnout.trainer.weights.from_checkpoint import checkpoint_config, step_folder

        source = args.checkpoint
        folder = Path(source).expanduser() if is_export(source) else step_folder(source)
        if checkpoint_config(folder).data.structure:
            raise ConfigError(
                "--mlflow",
                "a function-name model has no MLflow model form (it generates no text)",
            )
    done = export(args.checkpoint, args.out, args.format, args.allow_dropless)
    print(
        f"turnout: exported step {done.step} ({done.kind}, {done.num_tensors} tensors, "
        f"{str(done.dtype).removeprefix('torch.')}) to {done.folder}",
        flush=True,
    )
    if args.mlflow:
        from turnout.launch.export_mlflow import log_export

        out = done.folder.resolve()
        print(log_export(args.checkpoint, out, done.step, args.tracking_uri, args.register_as))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from turnout.trainer.weights.hf_import import import_hf

    done = import_hf(args.hf_dir, args.out)
    print(
        f"turnout: imported {done.arch} ({done.num_tensors} tensors, "
        f"{str(done.dtype).removeprefix('torch.')}, tokenizer: {done.tokenizer}) to {done.folder}"
    )
    return EXIT_OK


def add_checkpoint_commands(sub: Any) -> None:
    """Add ``generate``, ``eval``, ``export`` and ``import`` to the ``turnout`` subcommands."""
    ckpt_help = "a checkpoint run folder (its latest step) or one step<N> folder"
    device_help = "cpu (default) or cuda[:i]: one process, one device"
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV-cached decoding)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=ckpt_help)
    p.add_argument(
        "--prompt", required=True, help="text to continue (encoded with the checkpoint's tokenizer)"
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (200)")
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0: greedy (0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument(
        "--exit-threshold",
        type=float,
        default=None,
        help="early-exit models: exit when the max softmax probability is above this "
        "(default model.exit.threshold; 1 never exits)",
    )
    p.add_argument(
        "--halt-threshold",
        type=float,
        default=None,
        help="ponder models: halt when the cumulative halting probability is above this "
        "(default model.ponder.threshold; 1 never halts early)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="validation loss of a checkpoint (top-k and causal routing; a function-name "
        "model: F1)",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=ckpt_help)
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus as data.corpus takes it (default: the run's data.corpus)",
    )
    p.add_argument(
        "--batches", type=int, default=None, help="validation batches (default train.eval_batches)"
    )
    p.add_argument("--device", default="cpu", help=device_help)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", help="write a checkpoint's whole model as safetensors + config (or HF)"
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help=ckpt_help + ", or a turnout export folder"
    )
    p.add_argument("out", metavar="OUT", help="a new or empty folder to write into")
    p.add_argument(
        "--format",
        choices=("turnout", "hf"),
        default="turnout",
        help="turnout (default): for TransformerLM.from_pretrained and train.init_from; "
        "hf: a Hugging Face Llama or Qwen3 (dense), Mixtral or Qwen3-MoE folder",
    )
    p.add_argument(
        "--allow-dropless",
        action="store_true",
        help="--format hf of a capacity-mode MoE: accept HF's dropless routing",
    )
    p.add_argument(
        "--mlflow",
        action="store_true",
        help="also log OUT as an MLflow logged model (pyfunc, generates text) of the run "
        "that wrote the checkpoint (else a new run)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="--mlflow: the store (default the checkpoint's tracking.uri)",
    )
    p.add_argument(
        "--register-as",
        default=None,
        metavar="NAME",
        help="--mlflow: register the model under NAME in the MLflow model registry",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a Hugging Face folder into a turnout export folder")
    p.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="config.json + model.safetensors (or shards and their index); "
        "Llama, Mistral, Qwen3, Mixtral or Qwen3-MoE",
    )
    p.add_argument("out", metavar="OUT", help="a new or empty folder to write into")
    p.set_defaults(func=cmd_import)
