// Shared declarations of turnout's routing kernels.
//
// Shape legend: T tokens, E router columns (real + no-op experts), K top-k, D width,
// C capacity, B batch, S positions, M MoD-chosen positions per sequence.
//
// The CUDA launchers take raw pointers and an opaque stream so that routing_kernels.cu
// needs no torch headers (it compiles with plain nvcc) and the glue in ops_cuda.cpp
// needs no CUDA headers (it compiles with the host compiler against any torch wheel).
#pragma once

#include <cstdint>

namespace turnout {

// ---- numbers both sides of the Python/C++ boundary rely on ------------------------------
// models/kernels.py reads every `constexpr int64_t kName = N;` line starting a line here
// (tests/unit/test_kernel_constants.py checks both sides); define each number only here.

// Tokens per block of the CUDA plan; the glue sizes the plan's histogram scratch in tiles.
constexpr int64_t kPlanTile = 256;
// Threads per warp (the warp-level shuffles, ballots and matches assume 32 lanes).
constexpr int64_t kWarpSize = 32;
// Router columns the CUDA plan takes: each block keeps one column histogram per warp in
// shared memory, (kPlanTile / kWarpSize) * E ints = 32 KiB at E = 1024, inside the 48 KiB
// a block gets without opting in. Wider routers use the reference (models/ops.py).
constexpr int64_t kMaxCudaColumns = 1024;

// Low word of a rank key: kLastPosition - position, so the lower position ranks higher.
constexpr uint32_t kLastPosition = 0xffffffffu;

// Order-preserving 64-bit key for "score descending, position ascending":
// a larger key means an earlier pick. -0.0 equals +0.0; NaN sorts above +inf.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint64_t rank_key(float score, uint32_t position) {
  float s = score + 0.0f;  // -0.0 -> +0.0
  uint32_t u;
  if (s != s) {
    u = 0x7fc00000u;
  } else {
    union {
      float f;
      uint32_t u;
    } cvt;
    cvt.f = s;
    u = cvt.u;
  }
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(kLastPosition - position);
}

// The position a rank key was made from.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t rank_position(uint64_t key) {
  return kLastPosition - static_cast<uint32_t>(key);
}

namespace cuda {

// Dtype codes for the raw-pointer row kernels.
enum Dtype : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// moe plan from softmax probabilities [T, E] (device pointers). `hist` is scratch of
// K * ceil(T / kPlanTile) * E int64 (any content); `counts_all` receives E int64 counts.
void moe_plan(const float* probs, int64_t T, int64_t E, int64_t K, int64_t capacity,
              bool normalize, int64_t num_real, int64_t* expert, float* gate, int64_t* slot,
              bool* keep, int64_t* hist, int64_t* counts_all, void* stream);

// MoD top-k over positions per row of scores [B, S]: idx [B, M] (position order), chosen [B, S].
void mod_select(const float* scores, int64_t B, int64_t S, int64_t M, int64_t* idx,
                bool* chosen, void* stream);

// buckets[e, s] += gate[t, j] * x[t] for kept (t, j) (buckets zeroed by the caller).
// gate may be null (weight 1); it has the accumulation type (fp64 for fp64, else fp32).
void permute(int dtype, const void* x, const int64_t* expert, const int64_t* slot,
             const bool* keep, const void* gate, int64_t T, int64_t K, int64_t D, int64_t C,
             void* buckets, void* stream);

// out[t] = sum_j gate[t, j] * y[e, s] over kept (t, j).
void combine(int dtype, const void* y, const int64_t* expert, const int64_t* slot,
             const bool* keep, const void* gate, int64_t T, int64_t K, int64_t D, int64_t C,
             void* out, void* stream);

// dot[t, j] = <a[t], b[e, s]> for kept (t, j), else 0 (accumulation type).
void gate_dot(int dtype, const void* a, const void* b, const int64_t* expert, const int64_t* slot,
              const bool* keep, int64_t T, int64_t K, int64_t D, int64_t C, void* dot,
              void* stream);

}  // namespace cuda
}  // namespace turnout
