// turnout routing ops: schemas (namespace `turnout`) and the C++ CPU kernels.
//
// Shape legend: T tokens, E router columns (real + no-op experts), K top-k, D width,
// C capacity, B batch, S positions, M MoD-chosen positions per sequence, N = B * S rows.
//
// Semantics are those of models/routing.py (the oracle): top-k by softmax probability,
// ties to the lower index; GShard slots (choice-major, then token order); MoD top-k over
// positions, ties to the lower position, returned in position order. The probabilities
// come from ATen's own softmax on the same device, so the top-k order is bit-identical to
// the reference; everything after (selection, slots, counts, gates) is one pass here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "routing.h"

namespace turnout {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 2048;  // tokens per slot-counting chunk (fixed: result is chunk-free)
constexpr int64_t kTopkInsertMax = 16;  // top_k up to this: insertion into a k-list, else a sort
constexpr int64_t kRowGrain = 64;  // tokens per at::parallel_for task in the row kernels

// ---- MoE plan ----------------------------------------------------------------------------

// Top-k of one probability row, largest first, ties to the lower index.
inline void topk_row(const float* p, int64_t E, int64_t K, int64_t* e_out, float* g_out,
                     std::vector<int64_t>& order) {
  if (K <= kTopkInsertMax) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      const float v = p[e];
      if (n == K && !(v > g_out[K - 1])) continue;  // scan order already favours lower e
      int64_t pos = n < K ? n++ : K - 1;
      while (pos > 0 && v > g_out[pos - 1]) {
        g_out[pos] = g_out[pos - 1];
        e_out[pos] = e_out[pos - 1];
        --pos;
      }
      g_out[pos] = v;
      e_out[pos] = e;
    }
    return;
  }
  order.resize(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + K, order.end(),
                    [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  for (int64_t j = 0; j < K; ++j) {
    e_out[j] = order[j];
    g_out[j] = p[order[j]];
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> plan_from_probs(const Tensor& probs,
                                                                   int64_t K, int64_t capacity,
                                                                   bool normalize,
                                                                   int64_t num_real) {
  const int64_t T = probs.size(0), E = probs.size(1);
  auto long_opts = probs.options().dtype(at::kLong);
  Tensor expert = at::empty({T, K}, long_opts);
  Tensor gate = at::empty({T, K}, probs.options());
  Tensor slot = at::empty({T, K}, long_opts);
  Tensor keep = at::empty({T, K}, probs.options().dtype(at::kBool));
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  // hist[c][j][e]: assignments of chunk c, choice j to column e; becomes the chunk's base.
  std::vector<int64_t> hist(static_cast<size_t>(std::max<int64_t>(n_chunks, 1) * K * E), 0);
  const float* p = probs.data_ptr<float>();
  int64_t* ex = expert.data_ptr<int64_t>();
  float* gt = gate.data_ptr<float>();
  int64_t* sl = slot.data_ptr<int64_t>();
  bool* kp = keep.data_ptr<bool>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int64_t> order;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * K * E;
      for (int64_t t = c * kChunk; t < std::min(T, (c + 1) * kChunk); ++t) {
        int64_t* e_t = ex + t * K;
        float* g_t = gt + t * K;
        topk_row(p + t * E, E, K, e_t, g_t, order);
        if (normalize) {
          float s = 0.f;
          for (int64_t j = 0; j < K; ++j) s += g_t[j];
          for (int64_t j = 0; j < K; ++j) g_t[j] /= s;
        }
        for (int64_t j = 0; j < K; ++j) ++h[j * E + e_t[j]];
      }
    }
  });

  // Exclusive scan in GShard order: choice j major, then chunk, per column.
  std::vector<int64_t> run(E, 0);
  for (int64_t j = 0; j < K; ++j)
    for (int64_t c = 0; c < n_chunks; ++c) {
      int64_t* h = hist.data() + (c * K + j) * E;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t n = h[e];
        h[e] = run[e];
        run[e] += n;
      }
    }
  Tensor counts = at::empty({num_real}, long_opts);
  std::copy(run.begin(), run.begin() + num_real, counts.data_ptr<int64_t>());

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * K * E;  // running slot per (choice, column)
      for (int64_t t = c * kChunk; t < std::min(T, (c + 1) * kChunk); ++t)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t e = ex[t * K + j];
          const int64_t s = h[j * E + e]++;
          sl[t * K + j] = s;
          kp[t * K + j] = e < num_real && (capacity < 0 || s < capacity);
        }
    }
  });
  return {expert, gate, slot, keep, counts};
}

void check_plan_args(const Tensor& logits, int64_t K, int64_t num_real) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "turnout: router logits must be a float32 [T, E] tensor");
  TORCH_CHECK(K >= 1 && K <= logits.size(1), "turnout: top_k must be in [1, E], got ", K);
  TORCH_CHECK(num_real >= 0 && num_real <= logits.size(1),
              "turnout: num_real must be in [0, E], got ", num_real);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_plan_cpu(const Tensor& logits,
                                                                int64_t K, int64_t capacity,
                                                                bool normalize,
                                                                int64_t num_real) {
  check_plan_args(logits, K, num_real);
  return plan_from_probs(at::softmax(logits.contiguous(), -1), K, capacity, normalize, num_real);
}

// ---- MoD selection -----------------------------------------------------------------------

std::tuple<Tensor, Tensor> mod_select_cpu(const Tensor& scores_in, int64_t M) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.scalar_type() == at::kFloat,
              "turnout: MoD scores must be a float32 [B, S] tensor");
  const int64_t B = scores_in.size(0), S = scores_in.size(1);
  TORCH_CHECK(M >= 0 && M <= S, "turnout: MoD k must be in [0, S], got ", M);
  Tensor scores = scores_in.contiguous();
  Tensor idx = at::empty({B, M}, scores.options().dtype(at::kLong));
  Tensor chosen = at::zeros({B, S}, scores.options().dtype(at::kBool));
  const float* sc = scores.data_ptr<float>();
  int64_t* ix = idx.data_ptr<int64_t>();
  bool* ch = chosen.data_ptr<bool>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys(S);
    for (int64_t b = b0; b < b1; ++b) {
      const float* s = sc + b * S;
      bool* c = ch + b * S;
      for (int64_t i = 0; i < S; ++i) keys[i] = rank_key(s[i], static_cast<uint32_t>(i));
      if (M > 0 && M < S)
        std::nth_element(keys.begin(), keys.begin() + (M - 1), keys.end(),
                         std::greater<uint64_t>());
      for (int64_t m = 0; m < M; ++m) c[rank_position(keys[m])] = true;
      int64_t* out = ix + b * M;
      for (int64_t i = 0, m = 0; i < S && m < M; ++i)
        if (c[i]) out[m++] = i;
    }
  });
  return {idx, chosen};
}

// ---- fused MoDE plan ---------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mode_plan_cpu(
    const Tensor& scores, int64_t M, const Tensor& logits, int64_t K, int64_t capacity,
    bool normalize, int64_t num_real) {
  check_plan_args(logits, K, num_real);
  TORCH_CHECK(logits.size(0) == scores.numel(), "turnout: logits need one row per MoD position");
  auto [idx, chosen] = mod_select_cpu(scores, M);
  const int64_t S = scores.size(1);
  Tensor rows = idx + at::arange(scores.size(0), idx.options()).mul_(S).unsqueeze(1);
  Tensor probs = at::softmax(logits.index_select(0, rows.reshape(-1)), -1);
  auto [expert, gate, slot, keep, counts] = plan_from_probs(probs, K, capacity, normalize, num_real);
  return {idx, chosen, expert, gate, slot, keep, counts};
}

// ---- permute / combine / gate_dot --------------------------------------------------------

void check_index(const Tensor& expert, const Tensor& slot, const Tensor& keep) {
  TORCH_CHECK(expert.dim() == 2 && expert.scalar_type() == at::kLong, "turnout: expert must be long [T, K]");
  TORCH_CHECK(slot.sizes() == expert.sizes() && slot.scalar_type() == at::kLong, "turnout: slot must be long [T, K]");
  TORCH_CHECK(keep.sizes() == expert.sizes() && keep.scalar_type() == at::kBool, "turnout: keep must be bool [T, K]");
}

Tensor permute_cpu(const Tensor& x_in, const Tensor& expert, const Tensor& slot,
                   const Tensor& keep, const std::optional<Tensor>& gate_in, int64_t E,
                   int64_t C) {
  check_index(expert, slot, keep);
  const int64_t T = expert.size(0), K = expert.size(1), D = x_in.size(-1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == T, "turnout: permute needs x [T, D]");
  Tensor x = x_in.contiguous();
  Tensor out = at::zeros({E, C, D}, x.options());
  Tensor ec = expert.contiguous(), sc = slot.contiguous(), kc = keep.contiguous();
  Tensor gate = gate_in.has_value() ? gate_in->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "turnout_permute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t *ep = ec.data_ptr<int64_t>(), *sp = sc.data_ptr<int64_t>();
    const bool* kp = kc.data_ptr<bool>();
    const acc_t* gp = gate.defined() ? gate.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t a = t * K + j;
          if (!kp[a]) continue;
          TORCH_CHECK(ep[a] < E && sp[a] < C, "turnout: plan index out of bucket range");
          scalar_t* dst = op + (ep[a] * C + sp[a]) * D;
          const scalar_t* src = xp + t * D;
          if (gp == nullptr) {
            std::copy(src, src + D, dst);
          } else {
            const acc_t g = gp[a];
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(g * static_cast<acc_t>(src[d]));
          }
        }
    });
  });
  return out;
}

Tensor combine_cpu(const Tensor& y_in, const Tensor& expert, const Tensor& slot,
                   const Tensor& keep, const std::optional<Tensor>& gate_in) {
  check_index(expert, slot, keep);
  TORCH_CHECK(y_in.dim() == 3, "turnout: combine needs y [E, C, D]");
  const int64_t T = expert.size(0), K = expert.size(1);
  const int64_t E = y_in.size(0), C = y_in.size(1), D = y_in.size(2);
  Tensor y = y_in.contiguous();
  Tensor out = at::empty({T, D}, y.options());
  Tensor ec = expert.contiguous(), sc = slot.contiguous(), kc = keep.contiguous();
  Tensor gate = gate_in.has_value() ? gate_in->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "turnout_combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t *ep = ec.data_ptr<int64_t>(), *sp = sc.data_ptr<int64_t>();
    const bool* kp = kc.data_ptr<bool>();
    const acc_t* gp = gate.defined() ? gate.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < K; ++j) {
          const int64_t a = t * K + j;
          if (!kp[a]) continue;
          TORCH_CHECK(ep[a] < E && sp[a] < C, "turnout: plan index out of bucket range");
          const scalar_t* src = yp + (ep[a] * C + sp[a]) * D;
          const acc_t g = gp == nullptr ? acc_t(1) : gp[a];
          for (int64_t d = 0; d < D; ++d) acc[d] += g * static_cast<acc_t>(src[d]);
        }
        scalar_t* dst = op + t * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out;
}

Tensor gate_dot_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& expert,
                    const Tensor& slot, const Tensor& keep) {
  check_index(expert, slot, keep);
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 3, "turnout: gate_dot needs a [T, D], b [E, C, D]");
  const int64_t T = expert.size(0), K = expert.size(1);
  const int64_t E = b_in.size(0), C = b_in.size(1), D = b_in.size(2);
  Tensor a = a_in.contiguous(), b = b_in.contiguous();
  Tensor ec = expert.contiguous(), sc = slot.contiguous(), kc = keep.contiguous();
  const auto acc_type = at::toOpMathType(a.scalar_type());
  Tensor out = at::empty({T, K}, a.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "turnout_gate_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ap = a.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    const int64_t *ep = ec.data_ptr<int64_t>(), *sp = sc.data_ptr<int64_t>();
    const bool* kp = kc.data_ptr<bool>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t i = t * K + j;
          acc_t s = 0;
          if (kp[i]) {
            TORCH_CHECK(ep[i] < E && sp[i] < C, "turnout: plan index out of bucket range");
            const scalar_t* x = ap + t * D;
            const scalar_t* y = bp + (ep[i] * C + sp[i]) * D;
            for (int64_t d = 0; d < D; ++d) s += static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]);
          }
          op[i] = s;
        }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(turnout, m) {
  m.def("moe_plan(Tensor logits, int top_k, int capacity, bool normalize, int num_real)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mod_select(Tensor scores, int k) -> (Tensor, Tensor)");
  m.def("mode_plan(Tensor scores, int k, Tensor logits, int top_k, int capacity, bool normalize,"
        " int num_real) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("permute(Tensor x, Tensor expert, Tensor slot, Tensor keep, Tensor? gate,"
        " int num_experts, int capacity) -> Tensor");
  m.def("combine(Tensor y, Tensor expert, Tensor slot, Tensor keep, Tensor? gate) -> Tensor");
  m.def("gate_dot(Tensor a, Tensor b, Tensor expert, Tensor slot, Tensor keep) -> Tensor");
}

TORCH_LIBRARY_IMPL(turnout, CPU, m) {
  m.impl("moe_plan", &moe_plan_cpu);
  m.impl("mod_select", &mod_select_cpu);
  m.impl("mode_plan", &mode_plan_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("gate_dot", &gate_dot_cpu);
}

}  // namespace turnout
