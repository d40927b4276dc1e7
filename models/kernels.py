"""Loader for the csrc/ routing kernels: JIT build on first use, custom-op registration.

The C++ (and, when torch has CUDA, the CUDA) sources in ``csrc/`` are compiled with
``torch.utils.cpp_extension.load`` the first time a routing op runs, into torch's
extension cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), under a
lock of ours that concurrent ranks wait on, at most ``TURNOUT_KERNEL_BUILD_WAIT_S``
seconds, and that heals a build killed half-way (:mod:`turnout.models.build_lock`). They
register the ``torch.ops.turnout`` custom ops; this module adds their fake (meta) kernels
and autograd formulas.

``TURNOUT_KERNELS=0`` (or ``reference``/``off``) forces the pure-PyTorch reference. A
failed build falls back to the reference with one warning, and so does a device whose
kernels fail the self-check of :mod:`turnout.models.kernel_check` at first use (the
CUDA kernels are compiled in CI but may never have run on the user's GPU model).
``TURNOUT_KERNELS=1`` (or ``strict``), set explicitly, makes that self-check failure an
error instead (:class:`KernelMismatchError`): for a user who wants the fused kernels or
nothing. Unset, the fallback applies.

Shape legend: T tokens, E router columns, K top-k, D width, C capacity, B batch,
S positions, M MoD-chosen positions per sequence, N = B * S rows.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from turnout.models.build_lock import BuildLockTimeout, build_lock
from turnout.models.routing import chosen_rows


def csrc_dir() -> Path:
    """The folder holding the C++/CUDA sources (package data of ``turnout.csrc``)."""
    return Path(str(resources.files("turnout.csrc")))


HEADER = "routing.h"
#: ``constexpr int64_t kName = 123;`` at the start of a line of the header.
_CONSTANT = re.compile(r"^constexpr\s+int64_t\s+(k\w+)\s*=\s*(\d+)\s*;", re.MULTILINE)


@functools.cache
def header_constants() -> dict[str, int]:
    """The numbers csrc/routing.h defines for both sides of the Python/C++ boundary."""
    text = (csrc_dir() / HEADER).read_text()
    return {name: int(value) for name, value in _CONSTANT.findall(text)}


def header_constant(name: str) -> int:
    """One number from csrc/routing.h; KeyError naming it when the header lacks it."""
    try:
        return header_constants()[name]
    except KeyError:
        raise KeyError(f"csrc/{HEADER} defines no constexpr int64_t {name}") from None


CPU_SOURCES = ["ops_cpu.cpp"]
CUDA_SOURCES = ["ops_cuda.cpp", "routing_kernels.cu"]
_OFF = {"0", "off", "reference", "false", "no"}

_lock = threading.Lock()
# The one loaded library per process (a cache of an import, not training state).
_loaded: dict[str, Any] = {"tried": False, "ok": False, "cuda": False, "seconds": None}
# Per device type: did the kernels pass their self-check against the reference there.
_checked: dict[str, bool] = {}


class KernelMismatchError(RuntimeError):
    """The fused kernels disagree with the reference and ``TURNOUT_KERNELS`` is strict."""


def strict() -> bool:
    """True when ``TURNOUT_KERNELS`` is explicitly ``1``/``strict``/``on``: a self-check
    failure raises instead of falling back to the reference."""
    return os.environ.get("TURNOUT_KERNELS", "").strip().lower() in {"1", "strict", "on"}


def forced_reference() -> bool:
    """True when ``TURNOUT_KERNELS`` asks for the reference implementation."""
    return os.environ.get("TURNOUT_KERNELS", "1").strip().lower() in _OFF


def cuda_wanted() -> bool:
    """Build the CUDA sources too: torch has CUDA and nvcc is found."""
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def build_directory(name: str) -> Path:
    """The folder torch builds extension ``name`` in (``$TORCH_EXTENSIONS_DIR/<name>``, or
    under torch's default root); the build lock lives there too."""
    from torch.utils import cpp_extension

    torch_own = getattr(cpp_extension, "_get_build_directory", None)
    if torch_own is not None:  # torch's own layout, so an existing cache is reused
        return Path(torch_own(name, False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def build(name: str, sources: list[Path], with_cuda: bool, verbose: bool = False) -> bool:
    """Compile and load ``sources`` as a torch op library under the build lock
    (:mod:`turnout.models.build_lock`); False (one warning) on failure, or when another
    process's build still holds the lock after ``TURNOUT_KERNEL_BUILD_WAIT_S``."""
    from torch.utils import cpp_extension

    flags = ["-O3"]
    try:
        folder = build_directory(name)
        with build_lock(folder):
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=flags,
                extra_cuda_cflags=["-O3", "--use_fast_math"] if with_cuda else None,
                extra_include_paths=[str(csrc_dir())],
                build_directory=str(folder),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
    except Exception as err:  # noqa: BLE001 - any build or load failure means: reference
        first = str(err).strip().splitlines()
        reason = first[-1] if first else type(err).__name__
        what = "waited long enough for" if isinstance(err, BuildLockTimeout) else "failed"
        warnings.warn(
            f"turnout: building the csrc/ routing kernels {what} ({reason}); "
            "using the pure-PyTorch reference (set TURNOUT_KERNELS=0 to silence)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def load() -> bool:
    """Build (first call) and register the kernels; True when ``torch.ops.turnout`` is usable."""
    if forced_reference():
        return False
    if _loaded["tried"]:
        return bool(_loaded["ok"])
    with _lock:
        if not _loaded["tried"]:
            with_cuda = cuda_wanted()
            sources = [csrc_dir() / s for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
            name = "turnout_kernels_cuda" if with_cuda else "turnout_kernels_cpu"
            start = time.perf_counter()
            ok = build(name, sources, with_cuda)
            _loaded["seconds"] = time.perf_counter() - start
            if ok:
                _register_python_parts()
            _loaded.update(tried=True, ok=ok, cuda=ok and with_cuda)
    return bool(_loaded["ok"])


def supports(t: torch.Tensor) -> bool:
    """True when the fused kernels handle tensors on ``t``'s device (and passed its check)."""
    if not load():
        return False
    kind = t.device.type
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not _loaded["cuda"]):
        return False
    verdict = _checked.get(kind)
    if verdict is None:
        verdict = _check_device(t.device)
    return verdict


def _check_device(device: torch.device, ops: Any = None) -> bool:
    """Compare every fused op with the reference on ``device`` once; False on any difference
    (KernelMismatchError under a strict ``TURNOUT_KERNELS``). ``ops``: the op namespace to
    check (default ``torch.ops.turnout``; tests pass one with a broken op)."""
    from turnout.models.kernel_check import mismatches

    with _lock:
        if device.type not in _checked:
            with torch.no_grad():
                found = mismatches(device, ops)
            if found and strict():
                raise KernelMismatchError(
                    f"turnout: the csrc/ kernels disagree with the reference on {device.type} "
                    f"({'; '.join(found[:3])}) and TURNOUT_KERNELS={os.environ['TURNOUT_KERNELS']}"
                    " asks for them: unset it to fall back to the reference"
                )
            if found:
                warnings.warn(
                    f"turnout: the csrc/ kernels disagree with the reference on {device.type} "
                    f"({'; '.join(found[:3])}); using the pure-PyTorch reference there",
                    RuntimeWarning,
                    stacklevel=4,
                )
            _checked[device.type] = not found
    return _checked[device.type]


def load_seconds() -> float | None:
    """Seconds the first ``load()`` took (build or cache check), None before it ran."""
    return _loaded["seconds"]


# ---- fake kernels and autograd -----------------------------------------------------------


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and gate) type for ``dtype``: fp64 for fp64, else fp32.

    The Python side of ATen's ``at::opmath_type`` for the dtypes the kernels dispatch on.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan_fake(logits, top_k, capacity, normalize, num_real):
    T = logits.shape[0]
    long_TK = logits.new_empty((T, top_k), dtype=torch.long)
    return (
        long_TK,
        logits.new_empty((T, top_k)),
        torch.empty_like(long_TK),
        logits.new_empty((T, top_k), dtype=torch.bool),
        logits.new_empty((num_real,), dtype=torch.long),
    )


def gate_grad_rows(logits_TE, expert_TK, gate_TK, grad_TK, normalize):
    """d(sum grad * gate)/d logits for gate = softmax(logits)[expert] (renormalised or not)."""
    g_TK = grad_TK * gate_TK
    if normalize:
        # gate_k = softmax over the chosen logits only: d/dl_{e_m} = g_m (G_m - sum_k G_k g_k).
        d_TK = gate_TK * (grad_TK - g_TK.sum(-1, keepdim=True))
        return torch.zeros_like(logits_TE).scatter_add_(1, expert_TK, d_TK)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    out_TE = torch.zeros_like(logits_TE).scatter_add_(1, expert_TK, g_TK)
    return out_TE - probs_TE * g_TK.sum(-1, keepdim=True)


def _plan_setup(ctx, inputs, output):
    logits, _, _, normalize, _ = inputs
    ctx.normalize = normalize
    ctx.save_for_backward(logits, output[0], output[1])


def _plan_backward(ctx, g_expert, g_gate, g_slot, g_keep, g_counts):
    logits, expert, gate = ctx.saved_tensors
    if g_gate is None:
        return None, None, None, None, None
    return gate_grad_rows(logits, expert, gate, g_gate, ctx.normalize), None, None, None, None


def _mod_fake(scores, k):
    B, S = scores.shape
    return scores.new_empty((B, k), dtype=torch.long), scores.new_empty((B, S), dtype=torch.bool)


def _mode_fake(scores, k, logits, top_k, capacity, normalize, num_real):
    idx, chosen = _mod_fake(scores, k)
    rows = logits.new_empty((scores.shape[0] * k, logits.shape[1]))
    return (idx, chosen, *_plan_fake(rows, top_k, capacity, normalize, num_real))


def _mode_setup(ctx, inputs, output):
    scores, _, logits, _, _, normalize, _ = inputs
    ctx.normalize = normalize
    ctx.S = scores.shape[1]
    ctx.save_for_backward(logits, output[0], output[2], output[3])


def _mode_backward(ctx, g_idx, g_chosen, g_expert, g_gate, *rest):
    logits_NE, idx_BM, expert, gate = ctx.saved_tensors
    if g_gate is None:
        return (None,) * 7
    rows = chosen_rows(idx_BM, ctx.S)
    grad_rows = gate_grad_rows(logits_NE[rows], expert, gate, g_gate, ctx.normalize)
    grad_NE = torch.zeros_like(logits_NE).index_copy_(0, rows, grad_rows)
    return None, None, grad_NE, None, None, None, None


def _permute_fake(x, expert, slot, keep, gate, num_experts, capacity):
    return x.new_empty((num_experts, capacity, x.shape[1]))


def _combine_fake(y, expert, slot, keep, gate):
    return y.new_empty((expert.shape[0], y.shape[2]))


def _gate_dot_fake(a, b, expert, slot, keep):
    return a.new_empty(expert.shape, dtype=opmath(a.dtype))


def _index_setup(ctx, inputs, output):
    # permute(x, e, s, k, gate, E, C) / combine(y, e, s, k, gate) / gate_dot(a, b, e, s, k)
    ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs[:5]])
    ctx.shape = tuple(inputs[0].shape)


def _permute_backward(ctx, grad_ECD):
    x, expert, slot, keep, gate = ctx.saved_tensors
    ops = torch.ops.turnout
    grad_x = ops.combine(grad_ECD, expert, slot, keep, gate)
    grad_gate = None
    if gate is not None and ctx.needs_input_grad[4]:
        grad_gate = ops.gate_dot(x, grad_ECD, expert, slot, keep)
    return grad_x, None, None, None, grad_gate, None, None


def _combine_backward(ctx, grad_TD):
    y, expert, slot, keep, gate = ctx.saved_tensors
    ops = torch.ops.turnout
    grad_y = None
    if ctx.needs_input_grad[0]:
        grad_y = ops.permute(grad_TD, expert, slot, keep, gate, y.shape[0], y.shape[1])
    grad_gate = None
    if gate is not None and ctx.needs_input_grad[4]:
        grad_gate = ops.gate_dot(grad_TD, y, expert, slot, keep)
    return grad_y, None, None, None, grad_gate


def _gate_dot_backward(ctx, grad_TK):
    a, b, expert, slot, keep = ctx.saved_tensors
    ops = torch.ops.turnout
    g = grad_TK.to(opmath(a.dtype))
    grad_a = ops.combine(b, expert, slot, keep, g) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.needs_input_grad[1]:
        grad_b = ops.permute(a, expert, slot, keep, g, b.shape[0], b.shape[1])
    return grad_a, grad_b, None, None, None


def _register_python_parts() -> None:
    lib = torch.library
    lib.register_fake("turnout::moe_plan", _plan_fake)
    lib.register_fake("turnout::mod_select", _mod_fake)
    lib.register_fake("turnout::mode_plan", _mode_fake)
    lib.register_fake("turnout::permute", _permute_fake)
    lib.register_fake("turnout::combine", _combine_fake)
    lib.register_fake("turnout::gate_dot", _gate_dot_fake)
    lib.register_autograd("turnout::moe_plan", _plan_backward, setup_context=_plan_setup)
    lib.register_autograd("turnout::mode_plan", _mode_backward, setup_context=_mode_setup)
    lib.register_autograd("turnout::permute", _permute_backward, setup_context=_index_setup)
    lib.register_autograd("turnout::combine", _combine_backward, setup_context=_index_setup)
    lib.register_autograd("turnout::gate_dot", _gate_dot_backward, setup_context=_index_setup)
