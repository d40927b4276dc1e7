// CUDA implementations of the turnout ops: ATen glue around the raw kernels in
// routing_kernels.cu. Compiled only when torch has CUDA. It uses only device-generic
// c10 headers (the current stream comes from the CUDA guard implementation as a native
// handle), so it builds with the host compiler against any torch wheel.
//
// Shape legend: T tokens, E router columns, K top-k, D width, C capacity, B batch,
// S positions, M MoD-chosen positions per sequence.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "routing.h"

namespace turnout {
namespace {

using at::Tensor;

void* stream_of(const Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return cuda::kF32;
    case at::kDouble: return cuda::kF64;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    default: TORCH_CHECK(false, "turnout: unsupported dtype ", s);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> plan_from_probs(const Tensor& probs,
                                                                   int64_t K, int64_t capacity,
                                                                   bool normalize,
                                                                   int64_t num_real) {
  const int64_t T = probs.size(0), E = probs.size(1);
  auto lo = probs.options().dtype(at::kLong);
  Tensor expert = at::empty({T, K}, lo), slot = at::empty({T, K}, lo);
  Tensor gate = at::empty({T, K}, probs.options());
  Tensor keep = at::empty({T, K}, probs.options().dtype(at::kBool));
  Tensor counts_all = at::zeros({E}, lo);
  if (T > 0) {
    Tensor hist = at::empty({K * ((T + kPlanTile - 1) / kPlanTile) * E}, lo);
    cuda::moe_plan(probs.data_ptr<float>(), T, E, K, capacity, normalize, num_real,
                   expert.data_ptr<int64_t>(), gate.data_ptr<float>(), slot.data_ptr<int64_t>(),
                   keep.data_ptr<bool>(), hist.data_ptr<int64_t>(),
                   counts_all.data_ptr<int64_t>(), stream_of(probs));
  }
  return {expert, gate, slot, keep, counts_all.narrow(0, 0, num_real).clone()};
}

void check_plan_args(const Tensor& logits, int64_t K, int64_t num_real) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "turnout: router logits must be a float32 [T, E] tensor");
  TORCH_CHECK(K >= 1 && K <= logits.size(1), "turnout: top_k must be in [1, E], got ", K);
  TORCH_CHECK(num_real >= 0 && num_real <= logits.size(1), "turnout: bad num_real ", num_real);
  TORCH_CHECK(logits.size(1) <= kMaxCudaColumns, "turnout: the CUDA plan supports at most ",
              kMaxCudaColumns, " columns");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_plan_cuda(const Tensor& logits,
                                                                 int64_t K, int64_t capacity,
                                                                 bool normalize,
                                                                 int64_t num_real) {
  check_plan_args(logits, K, num_real);
  c10::DeviceGuard guard(logits.device());
  return plan_from_probs(at::softmax(logits.contiguous(), -1), K, capacity, normalize, num_real);
}

std::tuple<Tensor, Tensor> mod_select_cuda(const Tensor& scores_in, int64_t M) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.scalar_type() == at::kFloat,
              "turnout: MoD scores must be a float32 [B, S] tensor");
  const int64_t B = scores_in.size(0), S = scores_in.size(1);
  TORCH_CHECK(M >= 0 && M <= S, "turnout: MoD k must be in [0, S], got ", M);
  c10::DeviceGuard guard(scores_in.device());
  Tensor scores = scores_in.contiguous();
  Tensor idx = at::empty({B, M}, scores.options().dtype(at::kLong));
  Tensor chosen = at::empty({B, S}, scores.options().dtype(at::kBool));
  if (B > 0 && S > 0)
    cuda::mod_select(scores.data_ptr<float>(), B, S, M, idx.data_ptr<int64_t>(),
                     chosen.data_ptr<bool>(), stream_of(scores));
  return {idx, chosen};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mode_plan_cuda(
    const Tensor& scores, int64_t M, const Tensor& logits, int64_t K, int64_t capacity,
    bool normalize, int64_t num_real) {
  check_plan_args(logits, K, num_real);
  TORCH_CHECK(logits.size(0) == scores.numel(), "turnout: logits need one row per MoD position");
  c10::DeviceGuard guard(logits.device());
  auto [idx, chosen] = mod_select_cuda(scores, M);
  Tensor rows = idx + at::arange(scores.size(0), idx.options()).mul_(scores.size(1)).unsqueeze(1);
  Tensor probs = at::softmax(logits.index_select(0, rows.reshape(-1)), -1);
  auto [expert, gate, slot, keep, counts] = plan_from_probs(probs, K, capacity, normalize, num_real);
  return {idx, chosen, expert, gate, slot, keep, counts};
}

struct Index {
  Tensor e, s, k;
  Index(const Tensor& expert, const Tensor& slot, const Tensor& keep)
      : e(expert.contiguous()), s(slot.contiguous()), k(keep.contiguous()) {
    TORCH_CHECK(e.dim() == 2 && e.scalar_type() == at::kLong && s.sizes() == e.sizes() &&
                    k.sizes() == e.sizes() && k.scalar_type() == at::kBool,
                "turnout: expert/slot must be long [T, K] and keep bool [T, K]");
  }
};

const void* gate_ptr(const std::optional<Tensor>& gate, Tensor& holder) {
  if (!gate.has_value()) return nullptr;
  holder = gate->contiguous();
  return holder.data_ptr();
}

Tensor permute_cuda(const Tensor& x_in, const Tensor& expert, const Tensor& slot,
                    const Tensor& keep, const std::optional<Tensor>& gate, int64_t E, int64_t C) {
  Index ix(expert, slot, keep);
  c10::DeviceGuard guard(x_in.device());
  Tensor x = x_in.contiguous(), g;
  const int64_t T = ix.e.size(0), K = ix.e.size(1), D = x.size(1);
  Tensor out = at::zeros({E, C, D}, x.options());
  if (T * K * D > 0)
    cuda::permute(dtype_code(x.scalar_type()), x.data_ptr(), ix.e.data_ptr<int64_t>(),
                  ix.s.data_ptr<int64_t>(), ix.k.data_ptr<bool>(), gate_ptr(gate, g), T, K, D,
                  C, out.data_ptr(), stream_of(x));
  return out;
}

Tensor combine_cuda(const Tensor& y_in, const Tensor& expert, const Tensor& slot,
                    const Tensor& keep, const std::optional<Tensor>& gate) {
  Index ix(expert, slot, keep);
  c10::DeviceGuard guard(y_in.device());
  Tensor y = y_in.contiguous(), g;
  const int64_t T = ix.e.size(0), K = ix.e.size(1), C = y.size(1), D = y.size(2);
  Tensor out = at::zeros({T, D}, y.options());
  if (T * D > 0)
    cuda::combine(dtype_code(y.scalar_type()), y.data_ptr(), ix.e.data_ptr<int64_t>(),
                  ix.s.data_ptr<int64_t>(), ix.k.data_ptr<bool>(), gate_ptr(gate, g), T, K, D,
                  C, out.data_ptr(), stream_of(y));
  return out;
}

Tensor gate_dot_cuda(const Tensor& a_in, const Tensor& b_in, const Tensor& expert,
                     const Tensor& slot, const Tensor& keep) {
  Index ix(expert, slot, keep);
  c10::DeviceGuard guard(a_in.device());
  Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t T = ix.e.size(0), K = ix.e.size(1), C = b.size(1), D = b.size(2);
  Tensor out = at::zeros({T, K}, a.options().dtype(at::toOpMathType(a.scalar_type())));
  if (T * K > 0)
    cuda::gate_dot(dtype_code(a.scalar_type()), a.data_ptr(), b.data_ptr(),
                   ix.e.data_ptr<int64_t>(), ix.s.data_ptr<int64_t>(), ix.k.data_ptr<bool>(), T,
                   K, D, C, out.data_ptr(), stream_of(a));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(turnout, CUDA, m) {
  m.impl("moe_plan", &moe_plan_cuda);
  m.impl("mod_select", &mod_select_cuda);
  m.impl("mode_plan", &mode_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("gate_dot", &gate_dot_cuda);
}

}  // namespace turnout
