#!/usr/bin/env bash
# Compile-only check of the CUDA sources, so CUDA code cannot rot on CPU-only CI.
#   1. every csrc/*.cu with nvcc -c for sm_80 and sm_90 (torch include paths on -I);
#   2. the CUDA op glue (csrc/ops_cuda.cpp, host compiler) with -fsyntax-only.
# Needs no GPU. Exits non-zero on any compile error; exits 0 with a note if nvcc is absent
# unless TURNOUT_REQUIRE_NVCC=1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" ]]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [[ -x "$c" ]] && nvcc_bin="$c" && break
  done
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_nvcc: nvcc not found; CUDA sources NOT compiled" >&2
  [[ "${TURNOUT_REQUIRE_NVCC:-0}" == "1" ]] && exit 1
  exit 0
fi
python_bin="${PYTHON:-python}"
mapfile -t incs < <("$python_bin" -c 'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')
iflags=(-I "$here")
for d in "${incs[@]}"; do iflags+=(-I "$d"); done
cuda_inc="$(dirname "$(dirname "$nvcc_bin")")/include"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
shopt -s nullglob
for cu in "$here"/*.cu; do
  for arch in 80 90; do
    if "$nvcc_bin" -c -std=c++20 -O3 "${iflags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" \
      "$cu" -o "$out/$(basename "$cu").sm${arch}.o"; then
      echo "check_nvcc: ok   $(basename "$cu") sm_${arch}"
    else
      echo "check_nvcc: FAIL $(basename "$cu") sm_${arch}" >&2
      status=1
    fi
  done
done
if "${CXX:-c++}" -std=c++20 -fsyntax-only "${iflags[@]}" -I "$cuda_inc" "$here/ops_cuda.cpp"; then
  echo "check_nvcc: ok   ops_cuda.cpp (host glue, syntax)"
else
  echo "check_nvcc: FAIL ops_cuda.cpp" >&2
  status=1
fi
exit $status
