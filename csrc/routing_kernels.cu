// CUDA kernels for turnout's routing ops (raw pointers; no torch headers).
//
// Shape legend: T tokens, E router columns, K top-k, D width, C capacity, B batch,
// S positions, M MoD-chosen positions per sequence, A = T * K assignments.
//
// moe plan: (1) one warp per token picks the top-k of its probability row, round r taking
// the best element strictly below round r-1's pick in the order (prob desc, index asc);
// the same block then ranks its kPlanTile tokens per choice and column (warp match + per-warp
// histograms in shared memory); (2) one block per column scans those tile counts in GShard
// order (choice-major, then tile); (3) slots = tile base + in-tile rank, keep = slot < C.
// MoD select: one block per sequence, radix select of the M-th largest 64-bit rank key
// (score desc, position asc, so keys are unique), then an in-order compaction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "routing.h"

namespace turnout {
namespace cuda {
namespace {

constexpr int kTile = static_cast<int>(kPlanTile);  // tokens (and threads) per plan block
constexpr int kLanes = static_cast<int>(kWarpSize);
constexpr int kWarps = kTile / kLanes;
constexpr int kWarpTokens = kTile / kWarps;  // tokens whose top-k one warp picks
constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp
constexpr int kNoIndex = 0x7fffffff;  // "no pick yet": loses every tie on the index
// Threads of the plan's scan blocks (one per column); part[] holds one partial each.
constexpr int kScanThreads = 256;
// MoD select: radix select on 8-bit digits of the 64-bit rank key, one bin per digit.
constexpr int kDigitBits = 8;
constexpr int kRadixBins = 1 << kDigitBits;
constexpr int kKeyBits = 64;  // bits of a rank key
constexpr int kSelectThreads = 256;  // threads per sequence block (also the compaction step)
// Row kernels: at most this many threads per block; grids capped at this many blocks
// (the loops stride over the rest).
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kLanes;
constexpr int64_t kMaxGrid = 65535;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("turnout CUDA ") + what + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ bool better(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

__global__ void plan_topk_kernel(const float* probs, int64_t T, int E, int K, bool normalize,
                                 int64_t* expert, float* gate, int64_t* slot, int64_t* hist) {
  extern __shared__ int whist[];  // [kWarps][E]
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int r = 0; r < kWarpTokens; ++r) {
    const int64_t t = t0 + warp * kWarpTokens + r;
    if (t >= T) break;  // warp-uniform
    const float* p = probs + t * E;
    float pv = 0.f, sum = 0.f;
    int pi = -1;
    for (int j = 0; j < K; ++j) {
      float bv = -INFINITY;
      int bi = kNoIndex;
      for (int e = lane; e < E; e += kLanes) {
        const float v = p[e];
        if ((j == 0 || better(pv, pi, v, e)) && better(v, e, bv, bi)) {
          bv = v;
          bi = e;
        }
      }
      for (int off = kLanes / 2; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, bv, off);
        const int oi = __shfl_xor_sync(kFullMask, bi, off);
        if (better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == 0) {
        expert[t * K + j] = bi;
        gate[t * K + j] = bv;
      }
      sum += bv;
      pv = bv;
      pi = bi;
    }
    if (normalize && lane == 0)
      for (int j = 0; j < K; ++j) gate[t * K + j] /= sum;
  }
  __syncthreads();
  const int64_t t = t0 + threadIdx.x;
  const bool valid = t < T;
  const unsigned below = (1u << lane) - 1u;
  for (int j = 0; j < K; ++j) {
    for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) whist[i] = 0;
    __syncthreads();
    const int e = valid ? static_cast<int>(expert[t * K + j]) : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    const int rank = __popc(same & below);
    if (valid && rank == 0) whist[warp * E + e] = __popc(same);
    __syncthreads();
    for (int c = threadIdx.x; c < E; c += blockDim.x) {
      int run = 0;
      for (int w = 0; w < kWarps; ++w) {
        const int n = whist[w * E + c];
        whist[w * E + c] = run;
        run += n;
      }
      hist[(static_cast<int64_t>(j) * gridDim.x + blockIdx.x) * E + c] = run;
    }
    __syncthreads();
    if (valid) slot[t * K + j] = whist[warp * E + e] + rank;
    __syncthreads();
  }
}

// One block per column: exclusive scan of hist[i][c] over i = (choice, tile).
__global__ void plan_scan_kernel(int64_t* hist, int64_t n, int E, int64_t* counts_all) {
  __shared__ int64_t part[kScanThreads];
  const int c = blockIdx.x;
  const int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const int64_t i0 = threadIdx.x * per;
  const int64_t i1 = i0 + per < n ? i0 + per : n;
  int64_t s = 0;
  for (int64_t i = i0; i < i1; ++i) s += hist[i * E + c];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {
    const int64_t v = threadIdx.x >= off ? part[threadIdx.x - off] : 0;
    __syncthreads();
    part[threadIdx.x] += v;
    __syncthreads();
  }
  int64_t run = threadIdx.x ? part[threadIdx.x - 1] : 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t m = hist[i * E + c];
    hist[i * E + c] = run;
    run += m;
  }
  if (threadIdx.x == blockDim.x - 1) counts_all[c] = part[blockDim.x - 1];
}

__global__ void plan_slot_kernel(const int64_t* expert, int64_t* slot, bool* keep,
                                 const int64_t* hist, int64_t T, int E, int K, int64_t nblk,
                                 int64_t capacity, int64_t num_real) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < T * K;
       a += stride) {
    const int64_t t = a / K, j = a % K, e = expert[a];
    const int64_t s = slot[a] + hist[(j * nblk + t / kTile) * E + e];
    slot[a] = s;
    keep[a] = e < num_real && (capacity < 0 || s < capacity);
  }
}

__global__ void mod_select_kernel(const float* scores, int64_t S, int64_t M, int64_t* idx,
                                  bool* chosen) {
  __shared__ unsigned cnt[kRadixBins];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ int warp_sums[kSelectThreads / kLanes];
  const int tid = threadIdx.x, lane = tid % kLanes, warp = tid / kLanes;
  const float* s = scores + blockIdx.x * S;
  uint64_t prefix = 0, pmask = 0;
  int64_t need = M;  // rank (1-based) of the wanted key among keys matching `prefix`
  constexpr uint64_t kDigitMask = kRadixBins - 1;
  for (int shift = kKeyBits - kDigitBits; shift >= 0 && M > 0; shift -= kDigitBits) {
    for (int i = tid; i < kRadixBins; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    for (int64_t i = tid; i < S; i += blockDim.x) {
      const uint64_t k = rank_key(s[i], static_cast<uint32_t>(i));
      if ((k & pmask) == prefix) atomicAdd(&cnt[(k >> shift) & kDigitMask], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t acc = 0;
      for (int d = kRadixBins - 1; d >= 0; --d) {
        if (acc + cnt[d] >= need) {
          s_prefix = prefix | (static_cast<uint64_t>(d) << shift);
          s_need = need - acc;
          break;
        }
        acc += cnt[d];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    pmask |= kDigitMask << shift;
  }
  const uint64_t thr = prefix;  // the M-th largest key (keys are unique)
  int64_t base = 0;
  for (int64_t start = 0; start < S; start += blockDim.x) {
    const int64_t i = start + tid;
    const bool f = M > 0 && i < S && rank_key(s[i], static_cast<uint32_t>(i)) >= thr;
    if (i < S) chosen[blockIdx.x * S + i] = f;
    const unsigned ballot = __ballot_sync(kFullMask, f);
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int off = 0, tot = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kLanes); ++w) {
      if (w < warp) off += warp_sums[w];
      tot += warp_sums[w];
    }
    if (f) idx[blockIdx.x * M + base + off + __popc(ballot & ((1u << lane) - 1u))] = i;
    base += tot;
    __syncthreads();
  }
}

template <typename T>
struct Cvt {
  using A = T;
  __device__ static A to(T v) { return v; }
  __device__ static T from(A v) { return v; }
};
template <>
struct Cvt<__half> {
  using A = float;
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  using A = float;
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16(v); }
};

template <typename T>
__global__ void permute_kernel(const T* x, const int64_t* expert, const int64_t* slot,
                               const bool* keep, const typename Cvt<T>::A* gate, int64_t A_,
                               int K, int64_t D, int64_t C, T* out) {
  using A = typename Cvt<T>::A;
  for (int64_t a = blockIdx.x; a < A_; a += gridDim.x) {
    if (!keep[a]) continue;
    const T* src = x + (a / K) * D;
    T* dst = out + (expert[a] * C + slot[a]) * D;
    if (gate == nullptr) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
    } else {
      const A g = gate[a];
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = Cvt<T>::from(g * Cvt<T>::to(src[d]));
    }
  }
}

template <typename T>
__global__ void combine_kernel(const T* y, const int64_t* expert, const int64_t* slot,
                               const bool* keep, const typename Cvt<T>::A* gate, int64_t T_,
                               int K, int64_t D, int64_t C, T* out) {
  using A = typename Cvt<T>::A;
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x)
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      A acc = 0;
      for (int j = 0; j < K; ++j) {
        const int64_t a = t * K + j;
        if (!keep[a]) continue;
        const A g = gate == nullptr ? A(1) : gate[a];
        acc += g * Cvt<T>::to(y[(expert[a] * C + slot[a]) * D + d]);
      }
      out[t * D + d] = Cvt<T>::from(acc);
    }
}

template <typename T>
__global__ void gate_dot_kernel(const T* a, const T* b, const int64_t* expert,
                                const int64_t* slot, const bool* keep, int64_t A_, int K,
                                int64_t D, int64_t C, typename Cvt<T>::A* out) {
  using A = typename Cvt<T>::A;
  const int lane = threadIdx.x % kLanes;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kLanes);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes; i < A_;
       i += warps) {
    if (!keep[i]) continue;  // warp-uniform; out was zeroed
    const T* x = a + (i / K) * D;
    const T* y = b + (expert[i] * C + slot[i]) * D;
    A s = 0;
    for (int64_t d = lane; d < D; d += kLanes) s += Cvt<T>::to(x[d]) * Cvt<T>::to(y[d]);
    for (int off = kLanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
    if (lane == 0) out[i] = s;
  }
}

int grid_for(int64_t n) { return static_cast<int>(n < kMaxGrid ? (n > 0 ? n : 1) : kMaxGrid); }
int threads_for(int64_t D) {
  return D >= kRowThreads ? kRowThreads : static_cast<int>(((D + kLanes - 1) / kLanes) * kLanes);
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF64: f(double{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
    default: throw std::runtime_error("turnout CUDA: unsupported dtype");
  }
}

}  // namespace

void moe_plan(const float* probs, int64_t T, int64_t E, int64_t K, int64_t capacity,
              bool normalize, int64_t num_real, int64_t* expert, float* gate, int64_t* slot,
              bool* keep, int64_t* hist, int64_t* counts_all, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t nblk = (T + kTile - 1) / kTile;
  const size_t smem = sizeof(int) * kWarps * E;
  plan_topk_kernel<<<nblk, kTile, smem, st>>>(probs, T, int(E), int(K), normalize, expert, gate,
                                              slot, hist);
  check(cudaGetLastError(), "plan_topk");
  plan_scan_kernel<<<E, kScanThreads, 0, st>>>(hist, K * nblk, int(E), counts_all);
  check(cudaGetLastError(), "plan_scan");
  plan_slot_kernel<<<grid_for((T * K + kRowThreads - 1) / kRowThreads), kRowThreads, 0, st>>>(
      expert, slot, keep, hist, T, int(E), int(K), nblk, capacity, num_real);
  check(cudaGetLastError(), "plan_slot");
}

void mod_select(const float* scores, int64_t B, int64_t S, int64_t M, int64_t* idx,
                bool* chosen, void* stream) {
  mod_select_kernel<<<B, kSelectThreads, 0, static_cast<cudaStream_t>(stream)>>>(scores, S, M,
                                                                                 idx, chosen);
  check(cudaGetLastError(), "mod_select");
}

void permute(int dtype, const void* x, const int64_t* expert, const int64_t* slot,
             const bool* keep, const void* gate, int64_t T, int64_t K, int64_t D, int64_t C,
             void* buckets, void* stream) {
  by_dtype(dtype, [&](auto v) {
    using T_ = decltype(v);
    using A = typename Cvt<T_>::A;
    permute_kernel<T_><<<grid_for(T * K), threads_for(D), 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T_*>(x), expert, slot, keep, static_cast<const A*>(gate), T * K,
        int(K), D, C, static_cast<T_*>(buckets));
  });
  check(cudaGetLastError(), "permute");
}

void combine(int dtype, const void* y, const int64_t* expert, const int64_t* slot,
             const bool* keep, const void* gate, int64_t T, int64_t K, int64_t D, int64_t C,
             void* out, void* stream) {
  by_dtype(dtype, [&](auto v) {
    using T_ = decltype(v);
    using A = typename Cvt<T_>::A;
    combine_kernel<T_><<<grid_for(T), threads_for(D), 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T_*>(y), expert, slot, keep, static_cast<const A*>(gate), T, int(K),
        D, C, static_cast<T_*>(out));
  });
  check(cudaGetLastError(), "combine");
}

void gate_dot(int dtype, const void* a, const void* b, const int64_t* expert, const int64_t* slot,
              const bool* keep, int64_t T, int64_t K, int64_t D, int64_t C, void* dot,
              void* stream) {
  by_dtype(dtype, [&](auto v) {
    using T_ = decltype(v);
    using A = typename Cvt<T_>::A;
    gate_dot_kernel<T_><<<grid_for((T * K + kRowWarps - 1) / kRowWarps), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T_*>(a), static_cast<const T_*>(b), expert, slot, keep, T * K, int(K),
        D, C, static_cast<A*>(dot));
  });
  check(cudaGetLastError(), "gate_dot");
}

}  // namespace cuda
}  // namespace turnout
