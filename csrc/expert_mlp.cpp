// expert_mlp: per expert, gate_up = x_e @ w_gate_up[e] (w_gate_up[e]^T with trans_b) in fp32,
// rounded to x's dtype (the output kept for the backward pass), h = act(gate) * up from the rounded
// values in fp32 (gate and up clamped first when `limit` is finite), rounded, and
// y_e = h @ w_down[e] (w_down[e]^T). Same one-BLAS-call-per-expert scheme as grouped_gemm.cpp.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "amx_grouped.h"
#include "common.h"

namespace pangu_cpu {
namespace {

// ---- the gates: act(gate) * up and its derivative, as plain vectorisable arithmetic ----

// exp(x) for x in float range to ~2 ulp, written as plain arithmetic so that loops over it
// vectorise (libm's expf does not): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// erf(x) to ~1.5e-7 absolute (Abramowitz & Stegun 7.1.26).
inline float erf_approx(float x) {
  const float a = std::fabs(x), t = 1.0f / (1.0f + 0.3275911f * a);
  const float y = 1.0f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t +
                          0.254829592f) * t * exp_approx(-a * a);
  return std::copysign(y, x);
}

enum class Act { kSwiglu, kGeglu, kGegluTanh };

// fn(std::integral_constant<Act, ...>) for the activation named `name`: the gate loops are
// compiled per activation, and the name is compared once per call, not per row.
template <typename Fn>
void with_activation(c10::string_view name, const char* op, const Fn& fn) {
  if (name == "swiglu") {
    fn(std::integral_constant<Act, Act::kSwiglu>{});
  } else if (name == "geglu") {
    fn(std::integral_constant<Act, Act::kGeglu>{});
  } else {
    TORCH_CHECK_VALUE(name == "geglu_tanh", op, ": unknown activation '", name, "'");
    fn(std::integral_constant<Act, Act::kGegluTanh>{});
  }
}

// The clamp bound in fp32: +inf (no clamp) where limit is not finite.
inline float clamp_bound(double limit) {
  return std::isfinite(limit) ? static_cast<float>(limit) : std::numeric_limits<float>::infinity();
}

struct ActGrad {
  float act, d_act;
};

// act(g) and its derivative in fp32.
template <Act kAct>
inline ActGrad activation(float g) {
  if constexpr (kAct == Act::kSwiglu) {
    const float s = sigmoid_approx(g);
    return {g * s, s * (1.0f + g * (1.0f - s))};
  } else if constexpr (kAct == Act::kGeglu) {
    const float cdf = 0.5f * (1.0f + erf_approx(g * 0.70710678f));
    return {g * cdf, cdf + g * exp_approx(-0.5f * g * g) * 0.39894228f};
  } else {
    constexpr float c2 = 1.5957691216f;  // 2 sqrt(2 / pi)
    const float s = sigmoid_approx(c2 * (g + 0.044715f * g * g * g));
    return {g * s, s + g * s * (1.0f - s) * c2 * (1.0f + 3.0f * 0.044715f * g * g)};
  }
}

constexpr int64_t kGateChunk = 256;  // elements of a row computed into fp32 buffers, then stored

// One row: d_gate, d_up (dh's dtype) and h (gate/up's dtype) from gate, up and dh, in chunks whose
// fp32 results go out through store_floats. kClamp: limit is finite (else the clamps and their
// masks are left out).
template <Act kAct, bool kClamp, typename in_t, typename grad_t>
void gated_backward_row(const in_t* __restrict gate, const in_t* __restrict up, const grad_t* __restrict d,
                        grad_t* __restrict d_gate, grad_t* __restrict d_up, in_t* __restrict h, int64_t F,
                        float limit) {
  alignas(64) float dg[kGateChunk], du[kGateChunk], hh[kGateChunk];
  for (int64_t c = 0; c < F; c += kGateChunk) {
    const int64_t n = std::min(kGateChunk, F - c);
    for (int64_t i = 0; i < n; ++i) {
      const float g0 = load_float(gate, c + i), u0 = load_float(up, c + i), di = load_float(d, c + i);
      const float g = kClamp ? std::min(g0, limit) : g0, u = kClamp ? std::min(std::max(u0, -limit), limit) : u0;
      const ActGrad a = activation<kAct>(g);
      const float pass_g = !kClamp || g0 <= limit ? 1.0f : 0.0f;
      const float pass_u = !kClamp || ((u0 >= -limit) & (u0 <= limit)) ? 1.0f : 0.0f;
      dg[i] = di * u * a.d_act * pass_g;
      du[i] = di * a.act * pass_u;
      hh[i] = a.act * u;
    }
    store_floats(d_gate + c, dg, n);
    store_floats(d_up + c, du, n);
    store_floats(h + c, hh, n);
  }
}

template <Act kAct, typename in_t, typename grad_t>
void gated_backward_rows(const in_t* gu, const grad_t* dh, grad_t* dgu, in_t* h, int64_t rows, int64_t F,
                         float limit) {
  const auto row = std::isfinite(limit) ? gated_backward_row<kAct, true, in_t, grad_t>
                                         : gated_backward_row<kAct, false, in_t, grad_t>;
  at::parallel_for(0, rows, row_grain(F * 12), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row(gu + r * 2 * F, gu + r * 2 * F + F, dh + r * F, dgu + r * 2 * F, dgu + r * 2 * F + F, h + r * F, F, limit);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& gate_up, const at::Tensor& dh,
                                                  c10::string_view activation_name, double limit) {
  TORCH_CHECK_VALUE(gate_up.dim() == 2 && dh.dim() == 2 && gate_up.size(0) == dh.size(0) &&
                        gate_up.size(1) == 2 * dh.size(1),
                    "gated_backward: need gate_up [S, 2F] and dh [S, F]");
  TORCH_CHECK_TYPE(gate_up.scalar_type() == dh.scalar_type(), "gated_backward: gate_up and dh dtypes differ");
  const at::Tensor gu = gate_up.contiguous(), d = dh.contiguous();
  at::Tensor dgu = empty_output(gu.sizes(), d.options()), h = empty_output(d.sizes(), gu.options());
  const int64_t rows = gu.size(0), F = d.size(1);
  PANGU_DISPATCH_FLOATS(gu.scalar_type(), "gated_backward", [&] {
    with_activation(activation_name, "gated_backward", [&](auto act) {
      gated_backward_rows<decltype(act)::value>(gu.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                                                dgu.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), rows, F,
                                                clamp_bound(limit));
    });
  });
  return {dgu, h};
}

// ---- the forward gate: h = act(gate) * up from the rounded gate_up, one vectorised pass ----

template <Act kAct, typename T>
void gated_forward_row(const T* __restrict gate, const T* __restrict up, T* __restrict h, int64_t F, float limit) {
  alignas(64) float hh[kGateChunk];
  for (int64_t c = 0; c < F; c += kGateChunk) {
    const int64_t n = std::min(kGateChunk, F - c);
    for (int64_t i = 0; i < n; ++i) {
      const float g = std::min(load_float(gate, c + i), limit);
      const float u = std::min(std::max(load_float(up, c + i), -limit), limit);
      hh[i] = activation<kAct>(g).act * u;
    }
    store_floats(h + c, hh, n);
  }
}

// h [m, F] in gu's dtype from gu = [gate | up] ([m, 2F], contiguous rows).
at::Tensor gated_forward(const at::Tensor& gu, int64_t F, c10::string_view name, double limit) {
  at::Tensor h = empty_output({gu.size(0), F}, gu.options());
  const float lim = clamp_bound(limit);
  PANGU_DISPATCH_FLOATS(gu.scalar_type(), "expert_mlp", [&] {
    const scalar_t* g = gu.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    with_activation(name, "expert_mlp", [&](auto act) {
      at::parallel_for(0, gu.size(0), row_grain(F * 6), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          gated_forward_row<decltype(act)::value>(g + r * 2 * F, g + r * 2 * F + F, out + r * F, F, lim);
        }
      });
    });
  });
  return h;
}

// A decode step: every expert's rows go to gemm_few_rows (few of them, x's rows and one dimension of
// each weight contiguous).
bool decode_step(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                 const std::vector<int64_t>& off, bool trans_b, int64_t F, int64_t N) {
  auto unit = [](const at::Tensor& w) { return w.stride(1) == 1 || w.stride(2) == 1; };
  if (x.stride(1) != 1 || !unit(w_gate_up) || !unit(w_down)) return false;
  // both products ([K, 2F] and [F, N]) with a few-row kernel up to kFewRows rows
  const auto [u0, u1] = kn_strides(w_gate_up, trans_b);
  const auto [d0, d1] = kn_strides(w_down, trans_b);
  const at::ScalarType t = x.scalar_type();
  const bool wide = few_rows_wide(t, u0, u1, x.size(1), 2 * F) && few_rows_wide(t, d0, d1, F, N);
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m > 0 && !few_rows_kernel(t, m, wide)) return false;
  }
  return true;
}

// expert_mlp's loop for a decode step on raw pointers: the per-expert tensor views and the gate's
// output tensor (~10 ATen calls per expert) cost 5-10% of a small expert's product (Qwen3-MoE-
// shaped, one token: 8 experts of 2.4 MB).
void few_rows_experts(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                      const std::vector<int64_t>& off, bool trans_b, c10::string_view activation, double limit,
                      at::Tensor& gate_up, at::Tensor& y) {
  const int64_t K = x.size(1), F = gate_up.size(1) / 2, N = y.size(1);
  // strides of expert e's [K, 2F] / [F, N] orientation (arrays: the lambdas below capture them)
  const std::array<int64_t, 2> u = kn_strides(w_gate_up, trans_b), d = kn_strides(w_down, trans_b);
  const float lim = clamp_bound(limit);
  PANGU_DISPATCH_FLOATS(x.scalar_type(), "expert_mlp", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wu = w_gate_up.data_ptr<scalar_t>(), *wd = w_down.data_ptr<scalar_t>();
    scalar_t *gp = gate_up.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    with_activation(activation, "expert_mlp", [&](auto act) {
      for_experts(off, [&](int64_t e0, int64_t e1) {
        std::vector<scalar_t> h;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t m = off[e + 1] - off[e];
          if (m == 0) continue;
          scalar_t* gu = gp + off[e] * 2 * F;
          gemm_few_rows(gu, 2 * F, xp + off[e] * x.stride(0), x.stride(0), m, wu + e * w_gate_up.stride(0), u[0], u[1], K,
                        2 * F);
          h.resize(m * F);
          for (int64_t r = 0; r < m; ++r) {
            gated_forward_row<decltype(act)::value>(gu + r * 2 * F, gu + r * 2 * F + F, h.data() + r * F, F, lim);
          }
          gemm_few_rows(yp + off[e] * N, N, h.data(), F, m, wd + e * w_down.stride(0), d[0], d[1], F, N);
        }
      });
    });
  });
}

// expert_mlp with prepacked weights (pangu_ops.prepack: [E, N / 16, K / 2, 32], the B tiles of
// every group of a row-major [E, K, N] weight, as packed_weight makes them): grouped_amx over the
// packed tiles for every group size, decode steps too (the tiles lie in the order the kernel reads
// them; a decode step's weights are then one contiguous pass).
std::tuple<at::Tensor, at::Tensor> expert_mlp_packed(const at::Tensor& x, const at::Tensor& w_gate_up,
                                                     const at::Tensor& w_down, const std::vector<int64_t>& off,
                                                     c10::string_view activation, double limit) {
  const auto kn = [](const at::Tensor& w) { return std::array<int64_t, 2>{2 * w.size(2), 16 * w.size(1)}; };
  const auto [K, F2] = kn(w_gate_up);
  const auto [F, N] = kn(w_down);
  TORCH_CHECK_VALUE(w_gate_up.size(3) == 32 && w_down.size(3) == 32 && w_gate_up.is_contiguous() &&
                        w_down.is_contiguous() && K == x.size(1) && F2 == 2 * F && w_down.size(0) == w_gate_up.size(0),
                    "expert_mlp: prepacked weights must be contiguous [E, 2F/16, K/2, 32] and [E, N/16, F/2, 32]");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "expert_mlp: prepacked weights are bfloat16");
  TORCH_CHECK(grouped_amx_applies(x.scalar_type(), 1, F2, 1, K, F2) && grouped_amx_applies(x.scalar_type(), 1, N, 1, F, N),
              "expert_mlp: prepacked weights need AMX-BF16 (this CPU or build has none) and K, F, N multiples of 32; "
              "pangu_ops.unprepack(model) restores the [E, K, N] weights");
  using bf16 = c10::BFloat16;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = empty_output({x.size(0), N}, x.options()), gate_up = empty_output({x.size(0), F2}, x.options());
  const bf16 *wu = w_gate_up.data_ptr<bf16>(), *wd = w_down.data_ptr<bf16>();
  grouped_amx(gate_up.data_ptr<bf16>(), F2, xc.data_ptr<bf16>(), K, off, wu, K * F2, F2, 1, K, F2, wu);
  const at::Tensor h = gated_forward(gate_up, F, activation, limit);
  grouped_amx(y.data_ptr<bf16>(), N, h.data_ptr<bf16>(), F, off, wd, F * N, N, 1, F, N, wd);
  return {y, gate_up};
}

std::tuple<at::Tensor, at::Tensor> expert_mlp(const at::Tensor& x, const at::Tensor& w_gate_up,
                                              const at::Tensor& w_down, const at::Tensor& group_sizes,
                                              c10::string_view activation, bool trans_b, double limit) {
  TORCH_CHECK_VALUE(activation == "swiglu" || activation == "geglu" || activation == "geglu_tanh",
                    "expert_mlp: activation must be 'swiglu', 'geglu' or 'geglu_tanh'");
  if (w_gate_up.dim() == 4 || w_down.dim() == 4) {
    TORCH_CHECK_VALUE(x.dim() == 2 && w_gate_up.dim() == 4 && w_down.dim() == 4 && !trans_b &&
                          group_sizes.numel() == w_gate_up.size(0),
                      "expert_mlp: prepacked weights: need x [S, K], both weights packed, trans_b false and "
                      "group_sizes [E]");
    return expert_mlp_packed(x, w_gate_up, w_down, group_offsets(group_sizes, x.size(0), "expert_mlp"), activation,
                             limit);
  }
  TORCH_CHECK_VALUE(x.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3,
                    "expert_mlp: need x [S, K], w_gate_up [E, K, 2F] ([E, 2F, K]), w_down [E, F, N] ([E, N, F])");
  TORCH_CHECK_TYPE(x.scalar_type() == w_gate_up.scalar_type() && x.scalar_type() == w_down.scalar_type(),
                   "expert_mlp: x, w_gate_up and w_down dtypes differ");
  // per-expert views in the [K, 2F] / [F, N] orientation
  auto up_w = [&](int64_t e) { return trans_b ? w_gate_up.select(0, e).t() : w_gate_up.select(0, e); };
  auto down_w = [&](int64_t e) { return trans_b ? w_down.select(0, e).t() : w_down.select(0, e); };
  const int64_t E = w_gate_up.size(0);
  const int64_t K = trans_b ? w_gate_up.size(2) : w_gate_up.size(1);
  const int64_t F2 = trans_b ? w_gate_up.size(1) : w_gate_up.size(2), F = F2 / 2;
  TORCH_CHECK_VALUE(F2 % 2 == 0, "expert_mlp: w_gate_up's 2F (gate | up) must be even, got ", F2);
  const int64_t N = trans_b ? w_down.size(1) : w_down.size(2);
  TORCH_CHECK_VALUE(K == x.size(1) && w_down.size(0) == E && (trans_b ? w_down.size(2) : w_down.size(1)) == F &&
                        group_sizes.numel() == E,
                    "expert_mlp: inconsistent shapes");
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "expert_mlp");
  at::Tensor y = empty_output({x.size(0), N}, x.options());
  at::Tensor gate_up = empty_output({x.size(0), 2 * F}, x.options());
  if (decode_step(x, w_gate_up, w_down, off, trans_b, F, N)) {
    few_rows_experts(x, w_gate_up, w_down, off, trans_b, activation, limit, gate_up, y);
    return {y, gate_up};
  }
  const std::array<int64_t, 2> u = kn_strides(w_gate_up, trans_b), d = kn_strides(w_down, trans_b);
  if (prefill_sized(off) && grouped_amx_applies(x.scalar_type(), x.stride(1), u[0], u[1], K, 2 * F) &&
      grouped_amx_applies(x.scalar_type(), 1, d[0], d[1], F, N)) {
    using bf16 = c10::BFloat16;
    grouped_amx(gate_up.data_ptr<bf16>(), 2 * F, x.data_ptr<bf16>(), x.stride(0), off, w_gate_up, u, K, 2 * F);
    const at::Tensor h = gated_forward(gate_up, F, activation, limit);
    grouped_amx(y.data_ptr<bf16>(), N, h.data_ptr<bf16>(), F, off, w_down, d, F, N);
    return {y, gate_up};
  }
  for_experts(off, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t m = off[e + 1] - off[e];
      if (m == 0) continue;
      at::Tensor gu = gate_up.narrow(0, off[e], m);
      mm_fp32_into(gu, x.narrow(0, off[e], m), up_w(e));
      const at::Tensor h = gated_forward(gu, F, activation, limit);  // rounded like every backend
      mm_fp32_into(y.narrow(0, off[e], m), h, down_w(e));
    }
  });
  return {y, gate_up};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("gated_backward(Tensor gate_up, Tensor dh, str activation, float limit) -> (Tensor, Tensor)");
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor group_sizes, str activation, bool trans_b,"
        " float limit) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("expert_mlp", &expert_mlp);
  m.impl("gated_backward", &gated_backward);
}

}  // namespace pangu_cpu
