// moe_experts: a MoE layer's routed experts for inference in one call from Python: permute, the
// fused expert MLP and the weighted combine (unpermute), the three CPU kernels called through their
// dispatcher handles. The kernels are the ops' own (same outputs, bit for bit); what goes is two
// crossings from Python and the front ends around them, which at one decode token cost more than
// their kernels: each of permute and unpermute took 45-55 us after a layer's weight stream had
// left the interpreter's data out of the caches, against ~5 us for its kernel (Qwen3-MoE-shaped
// block, 2 threads).
#include <torch/library.h>

#include "common.h"

namespace pangu_cpu {
namespace {

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;

// (y [T, N], group_sizes [E]) as permute -> expert_mlp -> unpermute give them.
Tensors2 moe_experts(const at::Tensor& x, const at::Tensor& expert_ids, const c10::optional<at::Tensor>& weights,
                     const at::Tensor& w_gate_up, const at::Tensor& w_down, c10::string_view activation, bool trans_b,
                     double limit) {
  static const auto permute = op_handle<Tensors3(const at::Tensor&, const at::Tensor&, int64_t)>("pangu_cpu::permute");
  static const auto expert_mlp =
      op_handle<Tensors2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                      bool, double)>("pangu_cpu::expert_mlp");
  static const auto unpermute =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t)>(
          "pangu_cpu::unpermute");
  TORCH_CHECK_VALUE(expert_ids.dim() == 2 && w_gate_up.dim() >= 3, "moe_experts: need expert_ids [T, k] and stacked weights");
  const auto [x_sorted, sizes, index] = permute.call(x, expert_ids, w_gate_up.size(0));
  const at::Tensor y = std::get<0>(expert_mlp.call(x_sorted, w_gate_up, w_down, sizes, activation, trans_b, limit));
  return {unpermute.call(y, index, weights, x.size(0), expert_ids.size(1)), sizes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("moe_experts(Tensor x, Tensor expert_ids, Tensor? weights, Tensor w_gate_up, Tensor w_down, str activation,"
        " bool trans_b, float limit) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) { m.impl("moe_experts", &moe_experts); }

}  // namespace pangu_cpu
