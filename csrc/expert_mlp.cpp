// expert_mlp: per expert, gate_up = x_e @ w_gate_up[e] in fp32, rounded to x's dtype (the output
// kept for the backward pass), h = silu(gate) * up from the rounded values in fp32, rounded, and
// y_e = h @ w_down[e] in fp32. Same fp32-BLAS-per-expert scheme as grouped_gemm.cpp.
#include <torch/library.h>

#include "common.h"

namespace pangu_cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_mlp(const at::Tensor& x, const at::Tensor& w_gate_up,
                                              const at::Tensor& w_down, const at::Tensor& group_sizes,
                                              c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "swiglu", "expert_mlp: activation must be 'swiglu'");
  TORCH_CHECK_VALUE(x.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3,
                    "expert_mlp: need x [S, K], w_gate_up [E, K, 2F], w_down [E, F, N]");
  TORCH_CHECK_TYPE(x.scalar_type() == w_gate_up.scalar_type() && x.scalar_type() == w_down.scalar_type(),
                   "expert_mlp: x, w_gate_up and w_down dtypes differ");
  const int64_t E = w_gate_up.size(0), F = w_gate_up.size(2) / 2, N = w_down.size(2);
  TORCH_CHECK_VALUE(w_gate_up.size(1) == x.size(1) && w_down.size(0) == E && w_down.size(1) == F &&
                        group_sizes.numel() == E,
                    "expert_mlp: inconsistent shapes");
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "expert_mlp");
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  at::Tensor gate_up = at::empty({x.size(0), 2 * F}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m == 0) continue;
    at::Tensor gu = gate_up.narrow(0, off[e], m);
    mm_fp32_into(gu, x.narrow(0, off[e], m), w_gate_up.select(0, e));
    gu = as_float(gu);
    at::Tensor h = at::silu(gu.narrow(1, 0, F)).mul_(gu.narrow(1, F, F));
    if (x.scalar_type() != at::kFloat) h = h.to(x.scalar_type());  // rounded like every backend
    mm_fp32_into(y.narrow(0, off[e], m), h, w_down.select(0, e));
  }
  return {y, gate_up};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor group_sizes, str activation)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) { m.impl("expert_mlp", &expert_mlp); }

}  // namespace pangu_cpu
