"""The end-of-run summary the user reads: what the run reached, at what speed and cost.

Printed by the launcher (Ray) or by torchrun's rank 0, from the worker's result dict.
"""

from __future__ import annotations

import math
from typing import Any

from turnout.config import TurnoutConfig
from turnout.redact import redact


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(f, spec) if math.isfinite(f) else str(f)


def ui_hint(uri: str) -> str:
    """How to look at the MLflow store ``uri`` (its credentials left out)."""
    uri = redact(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, else None (absent, NaN, not a number)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compute_lines(cfg: TurnoutConfig, res: dict[str, Any]) -> list[str]:
    """The summary's compute lines: FLOPs per token against the equal-shape dense model,
    total training FLOPs, achieved TFLOP/s and MFU, peak memory per rank (each line only
    when the result carries it)."""
    lines = []
    fpt, dense = (
        finite_number(res.get("flops_per_token")),
        finite_number(res.get("dense_flops_per_token")),
    )
    per = res.get("unit") or "token"
    if fpt is not None and dense is not None and dense > 0:
        lines.append(
            f"  FLOPs per {per:<13}{fpt / 1e6:.2f} M train (3x forward), "
            f"{fpt / dense:.2f} of the equal-shape dense model's {dense / 1e6:.2f} M"
        )
    total = finite_number(res.get("train_flops"))
    if total is not None:
        lines.append(f"  training FLOPs         {total:.3e}")
    tflops, peak, util = (finite_number(res.get(k)) for k in ("tflops", "peak_tflops", "mfu"))
    if tflops is not None:
        world = cfg.launch.num_workers
        how = "measured" if res.get("peak_measured") else "train.peak_tflops"
        mfu = (
            f", MFU {100.0 * util:.1f}% of {world} x {peak:.3g} TFLOP/s ({how})"
            if util is not None and peak is not None
            else ""
        )
        lines.append(f"  achieved               {tflops:.3g} TFLOP/s{mfu}")
    memory = res.get("peak_memory_mb") or []
    if memory:
        per_rank = ", ".join(f"{m:,.0f}" for m in memory)
        kind = res.get("memory_kind") or "peak"
        lines.append(f"  peak memory per rank   {per_rank} MiB ({kind})")
    return lines


def format_summary(cfg: TurnoutConfig, res: dict[str, Any]) -> str:
    """The end-of-run summary the user reads (printed by the launcher or torchrun rank 0)."""
    if cfg.data.structure:
        return _structure_summary(cfg, res)
    val, ent = res.get("final_val_loss"), res.get("unigram_entropy")
    causal, bpb = res.get("final_val_loss_causal"), res.get("final_val_bpb")
    depth = res.get("final_depth_mean")
    rel = ""
    if val is not None and ent:
        rel = f"  ({100.0 * float(val) / float(ent):.0f}% of the unigram entropy)"
    unit = "byte" if cfg.data.tokenizer == "byte" else "token"
    lines = [
        *_head(res),
        f"  final train loss       {_fmt(res.get('final_train_loss'))} nats/{unit}",
        f"  final val loss         {_fmt(val)} nats/{unit}{rel}",
        *(
            [f"  val bits per byte      {_fmt(bpb)}  (comparable across tokenizers)"]
            if bpb is not None and math.isfinite(float(bpb))
            else []
        ),
        *(
            [f"  val loss, causal       {_fmt(causal)} nats/{unit}  (the decode-time decisions)"]
            if causal is not None and math.isfinite(float(causal))
            else []
        ),
        *(
            [f"  average depth used     {_fmt(depth, '.2f')} blocks per token  (decode rule)"]
            if depth is not None and math.isfinite(float(depth))
            else []
        ),
        f"  corpus unigram entropy {_fmt(ent)} nats/{unit}",
        f"  throughput             {_fmt(res.get('tokens_per_s'), ',.0f')} tokens/s",
        *compute_lines(cfg, res),
    ]
    return "\n".join([*lines, *_tail(cfg, res)])


def _head(res: dict[str, Any]) -> list[str]:
    return ["", "turnout: training finished", f"  steps                  {res.get('steps', 'n/a')}"]


def _structure_summary(cfg: TurnoutConfig, res: dict[str, Any]) -> str:
    """The summary of a function-name run (data.structure=ast)."""
    lines = [
        *_head(res),
        f"  task                   function names from the {cfg.model.structure.encoder} "
        "encoder" + (" with MoE FFNs" if cfg.model.structure.moe else ""),
        f"  final train loss       {_fmt(res.get('final_train_loss'))} nats/name position",
        f"  final val loss         {_fmt(res.get('final_val_loss'))} nats/name position",
        f"  val subtoken F1        {_fmt(res.get('final_val_f1'), '.3f')}",
        f"  val exact match        {_fmt(res.get('final_val_exact'), '.3f')}",
        f"  name entropy           {_fmt(res.get('unigram_entropy'))} nats/name position",
        f"  throughput             {_fmt(res.get('tokens_per_s'), ',.0f')} nodes/s",
        *compute_lines(cfg, res),
    ]
    return "\n".join([*lines, *_tail(cfg, res)])


def _tail(cfg: TurnoutConfig, res: dict[str, Any]) -> list[str]:
    lines = [f"  wall time              {_fmt(res.get('wall_s'), '.1f')} s"]
    if res.get("restarts"):
        lines.append(f"  restarts               {res['restarts']} (after worker failures)")
        lines.append(
            f"  steps redone           {res.get('steps_redone', 0)} "
            "(trained after the checkpoint a restart resumed from)"
        )
    if res.get("skipped_steps"):
        lines.append(f"  skipped steps          {res['skipped_steps']} (non-finite gradients)")
    if res.get("checkpoint"):
        lines.append(f"  checkpoint             {res['checkpoint']}")
    if cfg.tracking.enabled:
        lines.append(f"  MLflow run id          {res.get('run_id') or 'n/a'}")
        if res.get("model_uri"):
            lines.append(f"  MLflow model           {res['model_uri']}")
        lines.append(f"  MLflow UI              {ui_hint(cfg.tracking.uri)}")
    else:
        lines.append("  MLflow                 disabled (tracking.enabled=false)")
    return lines
