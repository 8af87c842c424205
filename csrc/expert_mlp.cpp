// expert_mlp: per expert, gate_up = x_e @ w_gate_up[e] (w_gate_up[e]^T with trans_b) in fp32,
// rounded to x's dtype (the output kept for the backward pass), h = act(gate) * up from the rounded
// values in fp32 (gate and up clamped first when `limit` is finite), rounded, and
// y_e = h @ w_down[e] (w_down[e]^T). Same one-BLAS-call-per-expert scheme as grouped_gemm.cpp.
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace pangu_cpu {
namespace {

// act(gate) * up in fp32 for gu = [gate | up] (fp32, [m, 2F]).
at::Tensor gated(const at::Tensor& gu, int64_t F, c10::string_view activation, double limit) {
  at::Tensor gate = gu.narrow(1, 0, F), up = gu.narrow(1, F, F);
  if (std::isfinite(limit)) {
    gate = gate.clamp_max(limit);
    up = up.clamp(-limit, limit);
  }
  if (activation == "swiglu") return at::silu(gate).mul_(up);
  return at::gelu(gate, activation == "geglu_tanh" ? "tanh" : "none").mul_(up);
}

std::tuple<at::Tensor, at::Tensor> expert_mlp(const at::Tensor& x, const at::Tensor& w_gate_up,
                                              const at::Tensor& w_down, const at::Tensor& group_sizes,
                                              c10::string_view activation, bool trans_b, double limit) {
  TORCH_CHECK_VALUE(activation == "swiglu" || activation == "geglu" || activation == "geglu_tanh",
                    "expert_mlp: activation must be 'swiglu', 'geglu' or 'geglu_tanh'");
  TORCH_CHECK_VALUE(x.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3,
                    "expert_mlp: need x [S, K], w_gate_up [E, K, 2F] ([E, 2F, K]), w_down [E, F, N] ([E, N, F])");
  TORCH_CHECK_TYPE(x.scalar_type() == w_gate_up.scalar_type() && x.scalar_type() == w_down.scalar_type(),
                   "expert_mlp: x, w_gate_up and w_down dtypes differ");
  // per-expert views in the [K, 2F] / [F, N] orientation
  auto up_w = [&](int64_t e) { return trans_b ? w_gate_up.select(0, e).t() : w_gate_up.select(0, e); };
  auto down_w = [&](int64_t e) { return trans_b ? w_down.select(0, e).t() : w_down.select(0, e); };
  const int64_t E = w_gate_up.size(0);
  const int64_t K = trans_b ? w_gate_up.size(2) : w_gate_up.size(1);
  const int64_t F = (trans_b ? w_gate_up.size(1) : w_gate_up.size(2)) / 2;
  const int64_t N = trans_b ? w_down.size(1) : w_down.size(2);
  TORCH_CHECK_VALUE(K == x.size(1) && w_down.size(0) == E && (trans_b ? w_down.size(2) : w_down.size(1)) == F &&
                        group_sizes.numel() == E,
                    "expert_mlp: inconsistent shapes");
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "expert_mlp");
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  at::Tensor gate_up = at::empty({x.size(0), 2 * F}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m == 0) continue;
    at::Tensor gu = gate_up.narrow(0, off[e], m);
    mm_fp32_into(gu, x.narrow(0, off[e], m), up_w(e));
    at::Tensor h = gated(as_float(gu), F, activation, limit);
    if (x.scalar_type() != at::kFloat) h = h.to(x.scalar_type());  // rounded like every backend
    mm_fp32_into(y.narrow(0, off[e], m), h, down_w(e));
  }
  return {y, gate_up};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor group_sizes, str activation, bool trans_b,"
        " float limit) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) { m.impl("expert_mlp", &expert_mlp); }

}  // namespace pangu_cpu
