#!/usr/bin/env bash
# GPU first contact, prepared (issue 18 item 4): everything turnout has never run on a GPU,
# in one command from the repo root, in under 8 minutes on one H100/H200:
#
#   bash benchmarks/gpu_wheels.sh      # here, with a network: the wheels into .whl/
#   bash benchmarks/gpu_check.sh       # there, .whl/ carried along: no network needed
#
# Set-up, the GPU and its published dense bf16 peak, then one verdict line per step
# ("gpu_check: PASS <step> (<detail>) <s> s" or "gpu_check: FAIL <step> (rc N, ...) <s> s"
# and the last 15 lines of its log):
#   tests/gpu           pytest tests/gpu (CUDA kernels vs the reference, the peak probe)
#   kernels             models/kernel_check.py on CUDA, then benchmarks/routing.py --quick
#   grouped_mm          torch._grouped_mm in bf16 vs a per-expert loop (models/experts.py)
#   train               the tiny preset, 100 steps, bf16, NCCL, --launcher torchrun, 1 GPU
#                       (2 GPUs: ep 2); no Ray, whose wheel is too large to carry
#   generate            turnout generate --device cuda from the checkpoint it wrote
#   bench moe_layer     benchmarks/moe_layer.py at d 2048 in bf16 (1 rank: NCCL, ep 1)
#   bench generate      benchmarks/generate.py at d 2048 in bf16
# A failing step does not stop the later ones; the summary repeats every verdict, and the
# exit status is 1 when any step failed. Each step's full log goes to $OUT when set (at
# most 8 files), else to a temp folder; runs, checkpoints and MLflow stores go to a temp
# folder that is removed at the end.
#
# Set-up, offline (when $GPU_CHECK_WHEELS holds wheels): $PYTHON's own torch; the wheels
# installed with --no-index --no-deps into a temp folder put on PYTHONPATH (removed at the
# end); this project installed editable (--no-deps, --no-build-isolation) into $PYTHON's
# environment, where it stays: setuptools' finder maps the folders models/ parallel/ ...
# to turnout.<folder>. Every requirement the carried wheels and turnout declare is then
# checked against what $PYTHON imports: unmet ones are printed (not a failure).
# Set-up, with a network (no wheels): .venv when its torch has CUDA (or in cpu mode), else
# the venv $GPU_CHECK_VENV with PyPI's torch and this project's dependencies.
#
# Environment:
#   GPU_CHECK_BUDGET_S  whole-run budget; a step's timeout is cut to what is left (470)
#   GPU_CHECK_WHEELS    the folder of wheels from gpu_wheels.sh (.whl); set it empty to
#                       use the venvs below even where .whl/ exists
#   PYTHON              the interpreter: offline, the one whose torch is used (python3)
#   GPU_CHECK_VENV      the venv to create when .venv has no CUDA torch (.venv-gpu)
#   GPU_CHECK_TORCH     pypi: pip install torch==$TORCH_VERSION (default; PyPI's Linux
#                       x86-64 build has CUDA); system: use the torch of $PYTHON instead
#   TORCH_VERSION       2.13.0, as the Makefile
#   GPU_CHECK_DEVICE    cuda (default); cpu rehearses the plumbing on a CPU machine, tiny
#                       shapes and 2 training steps (not a check of anything)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
WHEELS=${GPU_CHECK_WHEELS-.whl}
DEV=${GPU_CHECK_DEVICE:-cuda}

has_cuda_torch() { # PYTHON: torch imports, was built with CUDA and sees a GPU
  [[ -x $1 ]] && "$1" -c 'import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

has_project() { # PYTHON: this project and what the checks import
  "$1" -c 'import turnout.launch.cli, deepspeed, mlflow, omegaconf, pytest' 2>/dev/null
}

# ---- set-up (this script re-run as `gpu_check.sh --setup FILE SITE` under a timeout) ----
# FILE gets: the interpreter; the folder to put on PYTHONPATH (or nothing); a description.
if [[ ${1:-} == --setup ]]; then
  setup_file=$2 site=$3
  set -x
  if [[ -n $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    py=$(command -v "$PYTHON") || exit 1
    "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"available", torch.cuda.is_available())' || exit 1
    if [[ $DEV == cuda ]] && ! has_cuda_torch "$py"; then
      echo "gpu_check: the torch of $py cannot use a GPU" >&2
      exit 1
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    "$py" -c 'import turnout.launch.cli' 2>/dev/null ||
      "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    has_project "$py" || { "$py" -c 'import turnout.launch.cli, deepspeed, mlflow, omegaconf'; exit 1; }
    "$py" - "$site" <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

carried = list(md.distributions(path=[sys.argv[1]]))
unmet = 0
for dist in [md.distribution("turnout"), *carried]:
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(req.name) == "ray":  # not carried: training goes through torchrun
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet += 1
            print(f"unmet requirement: {dist.metadata['Name']} needs {req}, "
                  f"found {have or 'nothing'}")
print(f"requirements: {len(carried)} carried distribution(s), {unmet} unmet")
PY
    printf '%s\n%s\n%s\n' "$py" "$site" \
      "$py + $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from ${WHEELS%/}/" >"$setup_file"
    exit 0
  fi
  if [[ $DEV == cpu ]] || has_cuda_torch .venv/bin/python; then
    has_project .venv/bin/python || .venv/bin/python -m pip install -e '.[dev]' || exit 1
    printf '%s\n\n%s\n' "$REPO/.venv/bin/python" .venv >"$setup_file"
    exit 0
  fi
  py=$VENV/bin/python
  if has_cuda_torch "$py" && has_project "$py"; then
    printf '%s\n\n%s\n' "$REPO/$py" "$VENV" >"$setup_file"
    exit 0
  fi
  if [[ ! -x $py ]]; then
    if ! "$PYTHON" -m venv "$VENV"; then # an interpreter without ensurepip: borrow its pip
      rm -rf "$VENV"
      "$PYTHON" -m venv --without-pip "$VENV" || exit 1
      "$PYTHON" -m pip --python "$py" install pip || exit 1
    fi
  fi
  pip=("$py" -m pip install --progress-bar off --disable-pip-version-check)
  if ! "$py" -c 'import torch' 2>/dev/null; then
    if [[ ${GPU_CHECK_TORCH:-pypi} == system ]]; then
      # The venv sees $PYTHON's site-packages after its own: its torch, nothing installed.
      site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') || exit 1
      own=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 1
      echo "$site" >"$own/gpu_check_system_torch.pth"
    else
      "${pip[@]}" "torch==$TORCH_VERSION" || exit 1
    fi
  fi
  "${pip[@]}" -e '.[dev]' || exit 1
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"available", torch.cuda.is_available())'
  has_cuda_torch "$py" || { echo "gpu_check: the torch in $VENV cannot use a GPU" >&2; exit 1; }
  printf '%s\n\n%s\n' "$REPO/$py" "$VENV" >"$setup_file"
  exit 0
fi

# ---- bookkeeping -------------------------------------------------------------------------
T0=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/turnout-gpu-check.XXXXXX") || exit 2
RUN=$WORK/run # checkpoints, MLflow store, token cache: removed at exit
SITE=$WORK/site # the carried wheels, installed (offline set-up): removed at exit
LOGS=${OUT:-$WORK/logs}
mkdir -p "$RUN" "$LOGS" || exit 2
if [[ -n ${OUT:-} ]]; then
  trap 'rm -rf "$WORK"' EXIT
else # keep the logs
  trap 'rm -rf "$RUN" "$SITE"' EXIT
fi
export PYTHONUNBUFFERED=1

VERDICTS=()
FAILED=0
STEP_RC=0 STEP_S=0 STEP_NOTE=""

verdict() { # STATUS STEP DETAIL SECONDS
  local line="gpu_check: $1 $2${3:+ ($3)} $4 s"
  echo "$line"
  VERDICTS+=("$line")
  [[ $1 == PASS ]] || FAILED=1
}

info() { echo "gpu_check:   $*"; }

# run_step LOG LIMIT_S CMD...: CMD under `timeout` (cut to the budget left), its output to
# LOG; sets STEP_RC, STEP_S, STEP_NOTE. STEP_CWD: where it runs (default the repo).
run_step() {
  local log=$1 limit=$2 left
  shift 2
  left=$((BUDGET_S - (SECONDS - T0)))
  ((limit > left)) && limit=$left
  STEP_S=0 STEP_NOTE=""
  if ((limit < 15)); then
    echo "not run: ${left} s of the ${BUDGET_S} s budget left" >"$log"
    STEP_RC=125 STEP_NOTE="not run: out of the ${BUDGET_S} s budget"
    return
  fi
  local t=$SECONDS
  (cd "${STEP_CWD:-$REPO}" && exec timeout -k 10 "$limit" "$@") >"$log" 2>&1
  STEP_RC=$?
  STEP_S=$((SECONDS - t))
  ((STEP_RC == 124 || STEP_RC == 137)) && STEP_NOTE="timed out after ${limit} s"
  return 0
}

fail() { # STEP LOG [DETAIL]: the FAIL verdict and the end of the log
  if [[ $STEP_NOTE == "not run"* ]]; then
    verdict FAIL "$1" "$STEP_NOTE" 0
    return
  fi
  verdict FAIL "$1" "rc $STEP_RC${STEP_NOTE:+, $STEP_NOTE}${3:+, $3}" "$STEP_S"
  [[ -s $2 ]] && tail -n 15 "$2" | sed 's/^/  | /'
  return 0
}

skip() { verdict FAIL "$1" "not run: $2" 0; }

last_match() { grep -E "$1" "$2" 2>/dev/null | tail -n 1; }

mfu() { # TFLOPS [RANKS] -> " = MFU x% of [RANKS x ]PEAK" (nothing without a known peak)
  [[ -n $PEAK && -n $1 && $1 != "?" ]] || return 0
  awk -v a="$1" -v p="$PEAK" -v n="${2:-1}" 'BEGIN {
    printf " = MFU %.1f%% of %s%g", 100 * a / (n * p), (n > 1 ? n " x " : ""), p }'
}

# ---- 0. set-up ---------------------------------------------------------------------------
setup_file=$WORK/setup
log=$LOGS/setup.log
run_step "$log" 330 bash "$REPO/benchmarks/gpu_check.sh" --setup "$setup_file" "$SITE"
SETUP_OK=0
if ((STEP_RC == 0)) && [[ -s $setup_file ]]; then
  { read -r PY && read -r path && read -r what; } <"$setup_file"
  [[ -n $path ]] && export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
  TURNOUT=("$PY" -m turnout.launch.cli)
  SETUP_OK=1
  unmet=$(sed -n 's/^requirements: .*, \([0-9]*\) unmet$/\1/p' "$log")
  verdict PASS setup "$what${unmet:+, $unmet unmet requirement(s)}, set-up took ${STEP_S} s" "$STEP_S"
  grep '^unmet requirement' "$log" | while read -r line; do info "$line"; done
else
  fail setup "$LOGS/setup.log"
fi

# ---- the GPU and its peak ----------------------------------------------------------------
NGPU=0
SMI_NAME=""
if command -v nvidia-smi >/dev/null; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  SMI_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  info "nvidia-smi: $NGPU GPU(s): $(nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>/dev/null | head -n 1)"
else
  info "nvidia-smi: not found"
fi
TORCH_NAME=""
if ((SETUP_OK)); then
  desc=$("$PY" -c 'import torch
c = torch.cuda.is_available()
print(torch.cuda.get_device_name(0) if c else "")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + (
    f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
    f"bf16 {torch.cuda.is_bf16_supported()}" if c else "torch.cuda.is_available() False"))' 2>&1)
  TORCH_NAME=$(head -n 1 <<<"$desc")
  info "$(tail -n 1 <<<"$desc")"
fi
NAME=${TORCH_NAME:-$SMI_NAME}
# Published dense (no sparsity) bf16 tensor-core peaks, NVIDIA's datasheets.
case $NAME in
  *H100*PCIe*) PEAK=756 ;;
  *H100*NVL* | *H200*NVL*) PEAK=835 ;;
  *H100* | *H200*) PEAK=989 ;; # GH200 too
  *A100*) PEAK=312 ;;
  *) PEAK="" ;;
esac
if [[ -n $PEAK ]]; then
  info "peak for MFU: $PEAK TFLOP/s dense bf16 ($NAME, published)"
else
  info "peak for MFU: unknown for '${NAME:-no GPU}': MFU not computed"
fi
NVCC=$(command -v nvcc || true)
if [[ -z $NVCC && -z ${CUDA_HOME:-} ]]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [[ -x $c ]] && NVCC=$c && break
  done
  [[ -n $NVCC ]] && export CUDA_HOME=${NVCC%/bin/nvcc} PATH=${NVCC%/nvcc}:$PATH
fi
if [[ -n $NVCC ]]; then
  info "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
else
  info "nvcc: not found (CUDA_HOME=${CUDA_HOME:-unset}): the CUDA kernels cannot be built"
fi

# Shapes: the GPU check, or a tiny CPU rehearsal of the plumbing (GPU_CHECK_DEVICE=cpu).
WORKERS=1
((NGPU >= 2)) && WORKERS=2
if [[ $DEV == cuda ]]; then
  TRAIN_STEPS=100 PRECISION=bf16 BACKEND=nccl USE_GPU=true
  GROUPED=(8 2048 4096 16384)
  MOE_ARGS=(--dtype bf16 --d 2048 --ffn 4096 --tokens 8192 --experts 8 64 --iters 10 --warmup 2)
  GEN_ARGS=(--device cuda --dtype bf16 --d-model 2048 --layers 8 --heads 16 --ffn 8192
    --context 2048 --new-tokens 128 --batches 1 32 --repeats 3)
else
  TRAIN_STEPS=2 PRECISION=fp32 BACKEND=gloo USE_GPU=false WORKERS=1
  GROUPED=(4 64 128 512)
  MOE_ARGS=(--d 64 --ffn 128 --tokens 256 --experts 4 --iters 2 --warmup 1)
  GEN_ARGS=(--d-model 64 --layers 2 --heads 2 --ffn 128 --context 64 --new-tokens 8
    --batches 1 2 --repeats 2)
fi

# ---- 1. tests/gpu -------------------------------------------------------------------------
if ((SETUP_OK)); then
  log=$LOGS/tests_gpu.log
  run_step "$log" 240 "$PY" -m pytest tests/gpu -q -p no:cacheprovider
  passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n 1 | cut -d' ' -f1)
  skipped=$(grep -Eo '[0-9]+ skipped' "$log" | tail -n 1 | cut -d' ' -f1)
  if ((STEP_RC == 0)) && [[ -n $passed ]]; then
    verdict PASS tests/gpu "$passed passed${skipped:+, $skipped skipped}" "$STEP_S"
  else
    fail tests/gpu "$log" "${passed:-0} passed${skipped:+, $skipped skipped}"
  fi
else
  skip tests/gpu "set-up failed"
fi

# ---- 2. kernel self-check, then the routing benchmark ------------------------------------
cat >"$WORK/kernel_check.py" <<'PY'
"""The csrc/ kernels on this device: built with CUDA, self-check against the reference."""
import sys
import time

import torch
from torch.utils import cpp_extension

from turnout.models import kernels, ops
from turnout.models.kernel_check import mismatches

dev = torch.device(sys.argv[1])
t0 = time.perf_counter()
ok = kernels.load()
print(f"kernels.load() {ok} in {time.perf_counter() - t0:.1f} s (build, or the cache); "
      f"ops.backend() {ops.backend()}; CUDA_HOME {cpp_extension.CUDA_HOME}")
built = kernels._loaded["cuda"] if dev.type == "cuda" else ok
print(f"kernels built for {dev.type}: {built}")
found = mismatches(dev) if ok else ["kernels not loaded"]
print(f"kernel_check.mismatches({dev.type}): {found or 'none'}")
used = ok and kernels.supports(torch.empty(0, device=dev))
print(f"kernels.supports({dev.type}): {used}")
sys.exit(0 if built and not found and used else 1)
PY
if ((SETUP_OK)); then
  log=$LOGS/kernel_check.log
  # shellcheck disable=SC2016 # expanded by the inner bash
  run_step "$log" 120 bash -c '"$1" "$2" "$3" && echo && "$1" benchmarks/routing.py --device "$3" --quick' \
    _ "$PY" "$WORK/kernel_check.py" "$DEV"
  if ((STEP_RC == 0)); then
    verdict PASS kernels "self-check clean on $DEV, routing bench ran" "$STEP_S"
  else
    fail kernels "$log" "$(last_match '^kernel_check.mismatches' "$log")"
  fi
else
  skip kernels "set-up failed"
fi

# ---- 6 (run third: cheap). torch._grouped_mm vs the per-expert loop ----------------------
cat >"$WORK/grouped_mm.py" <<'PY'
"""torch._grouped_mm as models/experts.py calls it, against the per-expert loop."""
import sys
import time

import torch
import torch.nn.functional as F

from turnout.models.experts import ExpertBank, _grouped_mm_ok, grouped_reference

dev = torch.device(sys.argv[1])
E, D, Fh, N = (int(a) for a in sys.argv[2:6])
dtype = torch.bfloat16
torch.manual_seed(0)
bank = ExpertBank(E, D, Fh, init_std=0.02).to(dev, dtype)
shares = torch.rand(E)
shares[E // 2] = 0.0  # an expert with no rows takes part too
counts = (shares / shares.sum() * N).long()
counts[0] += N - int(counts.sum())
counts = counts.tolist()
offs = torch.tensor(counts).cumsum(0).to(device=dev, dtype=torch.int32)
print(f"E {E}, D {D}, F {Fh}, N {N} rows, counts {counts}, {dev.type} bf16, torch {torch.__version__}")
x = torch.randn(N, D, device=dev, dtype=dtype)
gy = torch.randn(N, D, device=dev, dtype=dtype)
used = _grouped_mm_ok(x, Fh)
print(f"experts.py uses torch._grouped_mm here: {used}")


def fused(b, x):  # the bank's forward's fused path, called directly
    g = torch._grouped_mm(x, b.w_gate_EDF, offs=offs)
    u = torch._grouped_mm(x, b.w_up_EDF, offs=offs)
    return torch._grouped_mm(F.silu(g) * u, b.w_down_EFD, offs=offs)


def loop(b, x):
    return grouped_reference(b, x, counts)


def step(fn, b, x):
    x = x.detach().requires_grad_()
    b.zero_grad(set_to_none=True)
    y = fn(b, x)
    y.backward(gy.to(y.dtype))
    return y, x


def run(fn, b, x):
    y, x = step(fn, b, x)
    return [t.detach().float() for t in (y, x.grad, *(p.grad for p in b.parameters()))]


names = ["y", "dx", "dw_gate", "dw_up", "dw_down"]
exact = run(loop, bank.float(), x.float())
bank.to(dtype)
got_f, got_l = run(fused, bank, x), run(loop, bank, x)
ok = True
for name, f, l, r in zip(names, got_f, got_l, exact):
    scale = r.abs().max().item()
    ef, el, fl = (f - r).abs().max().item(), (l - r).abs().max().item(), (f - l).abs().max().item()
    good = ef <= 2 * el + 1e-2 * scale
    ok &= good
    print(f"{name:8} max|grouped-loop| {fl:.3g}; vs fp32: grouped {ef:.3g}, loop {el:.3g} "
          f"(max |fp32| {scale:.3g}) {'ok' if good else 'TOO FAR'}")
if used:
    same = torch.equal(bank(x, counts), fused(bank, x))
    ok &= same
    print(f"ExpertBank.forward == torch._grouped_mm path: {same}")


def seconds(fn, reps=10):
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


flops = 3 * 2 * N * D * Fh  # three GEMMs of the SwiGLU over the N rows
with torch.no_grad():
    t_fwd, t_loop = seconds(lambda: fused(bank, x)), seconds(lambda: loop(bank, x))
t_step = seconds(lambda: step(fused, bank, x))
print(f"loop fwd {flops / t_loop / 1e12:.3g} TFLOP/s")
print(f"achieved TFLOP/s: fwd {flops / t_fwd / 1e12:.3g}, fwd+bwd {3 * flops / t_step / 1e12:.3g}")
sys.exit(0 if ok else 1)
PY
if ((SETUP_OK)); then
  log=$LOGS/grouped_mm.log
  run_step "$log" 90 "$PY" "$WORK/grouped_mm.py" "$DEV" "${GROUPED[@]}"
  tf=$(last_match '^achieved TFLOP/s' "$log" | sed -E 's/.*fwd ([0-9.e+-]+),.*/\1/')
  diff=$(last_match '^y ' "$log" | sed -E 's/.*grouped-loop\| ([^;]*);.*/\1/')
  if ((STEP_RC == 0)); then
    verdict PASS grouped_mm "max|grouped-loop| ${diff:-?}, fwd ${tf:-?} TFLOP/s$(mfu "$tf")" "$STEP_S"
  else
    fail grouped_mm "$log"
  fi
else
  skip grouped_mm "set-up failed"
fi

# ---- 3. train the tiny preset -------------------------------------------------------------
CKPT=""
if ((SETUP_OK)); then
  log=$LOGS/train.log
  keys=("launch.use_gpu=$USE_GPU" "launch.num_workers=$WORKERS" "parallel.ep_size=$WORKERS"
    "parallel.backend=$BACKEND" "train.precision=$PRECISION" "train.steps=$TRAIN_STEPS"
    train.ckpt_dir="$RUN/ckpt" data.cache_dir="$RUN/cache" tracking.uri="sqlite:///$RUN/mlflow.db")
  info "turnout train tiny ${keys[*]} --launcher torchrun"
  # In the run folder: MLflow puts a sqlite store's artifacts under ./mlruns.
  STEP_CWD=$RUN run_step "$log" 240 "${TURNOUT[@]}" train tiny "${keys[@]}" --launcher torchrun
  tps=$(last_match '^  throughput' "$log" | awk '{print $2}')
  tf=$(last_match '^  achieved' "$log" | awk '{print $2}')
  CKPT=$(last_match '^  checkpoint' "$log" | awk '{print $2}')
  [[ -z $CKPT ]] && CKPT=$(find "$RUN/ckpt" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)
  note=""
  grep -qE 'kernels (disagree|failed)|routing kernels failed' "$log" && note=", kernels fell back"
  if ((STEP_RC == 0)) && grep -q 'training finished' "$log"; then
    verdict PASS train "$TRAIN_STEPS steps $PRECISION, $WORKERS rank(s), ${tps:-?} tokens/s, ${tf:-?} TFLOP/s$(mfu "$tf" "$WORKERS")$note" "$STEP_S"
  else
    fail train "$log"
  fi
else
  skip train "set-up failed"
fi

# ---- 4. generate from its checkpoint -------------------------------------------------------
if ((SETUP_OK)) && [[ -n $CKPT && -d $CKPT ]]; then
  log=$LOGS/generate.log
  STEP_CWD=$RUN run_step "$log" 90 "${TURNOUT[@]}" generate "$CKPT" --prompt 'def main(' \
    --max-new-tokens 64 --device "$DEV"
  rate=$(last_match 'decode tokens/s' "$log" | sed -E 's/.* ([0-9.]+) decode tokens\/s.*/\1/')
  if ((STEP_RC == 0)); then
    verdict PASS generate "${rate:-?} decode tokens/s on $DEV" "$STEP_S"
  else
    fail generate "$log"
  fi
else
  skip generate "no checkpoint from train"
fi

# ---- 5. benchmarks at a GPU-sized shape ---------------------------------------------------
if ((SETUP_OK)); then
  log=$LOGS/bench_moe_layer.log
  run_step "$log" 150 "$PY" benchmarks/moe_layer.py --ranks "$WORKERS" "${MOE_ARGS[@]}"
  best=$(last_match '^best achieved TFLOP/s' "$log")
  ours=$(sed -E 's/.*ours ([0-9.]+).*/\1/' <<<"$best")
  ds=$(sed -E 's/.*deepspeed ([0-9.]+).*/\1/' <<<"$best")
  if ((STEP_RC == 0)) && [[ -n $best ]]; then
    verdict PASS "bench moe_layer" "$WORKERS rank(s); ours $ours TFLOP/s$(mfu "$ours"), DeepSpeed $ds TFLOP/s$(mfu "$ds")" "$STEP_S"
  else
    fail "bench moe_layer" "$log"
  fi

  log=$LOGS/bench_generate.log
  run_step "$log" 120 "$PY" benchmarks/generate.py "${GEN_ARGS[@]}"
  best=$(last_match '^best achieved TFLOP/s' "$log")
  pre=$(sed -E 's/.*prefill ([0-9.e+-]+),.*/\1/' <<<"$best")
  dec=$(sed -E 's/.*decode ([0-9.e+-]+).*/\1/' <<<"$best")
  ratio=$(last_match 'decode MoD/dense' "$log" | sed -E 's/.*decode MoD\/dense ([0-9.]+x).*/\1/')
  if ((STEP_RC == 0)) && [[ -n $best ]]; then
    verdict PASS "bench generate" "dense prefill $pre TFLOP/s$(mfu "$pre"), decode $dec TFLOP/s$(mfu "$dec"); MoD/dense decode $ratio at the last batch" "$STEP_S"
  else
    fail "bench generate" "$log"
  fi
else
  skip "bench moe_layer" "set-up failed"
  skip "bench generate" "set-up failed"
fi

# ---- summary -------------------------------------------------------------------------------
echo
echo "gpu_check: summary: ${NAME:-no GPU}${PEAK:+, peak $PEAK TFLOP/s}; $((SECONDS - T0)) s in all; logs in $LOGS"
printf '%s\n' "${VERDICTS[@]}"
fails=$(printf '%s\n' "${VERDICTS[@]}" | grep -vc '^gpu_check: PASS')
echo "gpu_check: $((${#VERDICTS[@]} - fails)) of ${#VERDICTS[@]} steps passed"
exit "$FAILED"
