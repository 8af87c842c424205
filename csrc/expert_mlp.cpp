// expert_mlp: per expert, gate_up = x_e @ w_gate_up[e] (w_gate_up[e]^T with trans_b) in fp32,
// rounded to x's dtype (the output kept for the backward pass), h = act(gate) * up from the rounded
// values in fp32 (gate and up clamped first when `limit` is finite), rounded, and
// y_e = h @ w_down[e] (w_down[e]^T). Same one-BLAS-call-per-expert scheme as grouped_gemm.cpp, and
// the same grouped bf16 kernels for prefill-sized groups (AMX tiles, or packed_pairs.h's).
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "amx_grouped.h"
#include "common.h"
#include "packed_pairs.h"

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
      // a clamped value's gradient is 0, whatever dh holds (NaN too: selected, not multiplied by 0)
      const bool pass_g = !kClamp || g0 <= limit, pass_u = !kClamp || ((u0 >= -limit) & (u0 <= limit));
      dg[i] = pass_g ? di * u * a.d_act : 0.0f;
      du[i] = pass_u ? di * a.act : 0.0f;
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
// them; a decode step's weights are then one contiguous pass); without AMX, where bf16_pair_dots()
// holds, grouped_packed_pairs for every group size. On a 2-core Zen 4 (2 threads, one run) that
// took 0.49-0.89x the time of the same weights unpacked ([E, K, N]: few-row kernels, oneDNN per
// expert at prefill sizes) at 1-2048 tokens, and 0.71-1.0x that of transformers' [E, 2F, H] layout
// (Qwen3-MoE- and Mixtral-shaped experts).
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
  TORCH_CHECK_VALUE(K % 32 == 0 && F % 32 == 0 && N % 32 == 0, "expert_mlp: prepacked weights need K, F and N ",
                    "multiples of 32, got ", K, ", ", F, ", ", N);
  const bool amx = grouped_amx_applies(x.scalar_type(), 1, F2, 1, K, F2) &&
                   grouped_amx_applies(x.scalar_type(), 1, N, 1, F, N);
  TORCH_CHECK(amx || packed_kernels(), "expert_mlp: prepacked weights need AMX-BF16 tiles or AVX512-BF16 products "
              "(packed_kernels(): this CPU or build has neither); pangu_ops.unprepack(model) restores the [E, K, N] "
              "weights");
  using bf16 = c10::BFloat16;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = empty_output({x.size(0), N}, x.options()), gate_up = empty_output({x.size(0), F2}, x.options());
  const bf16 *wu = w_gate_up.data_ptr<bf16>(), *wd = w_down.data_ptr<bf16>();
  const auto product = [&](bf16* out, int64_t ldo, const bf16* a, const bf16* w, int64_t k, int64_t n) {
    if (amx) return grouped_amx(out, ldo, a, k, off, w, k * n, n, 1, k, n, w);
#if defined(__AVX512BF16__)
    grouped_packed_pairs(out, ldo, a, k, off, w, k * n, k, n);  // (packed_kernels(): bf16_pair_dots())
#endif
  };
  product(gate_up.data_ptr<bf16>(), F2, xc.data_ptr<bf16>(), wu, K, F2);
  const at::Tensor h = gated_forward(gate_up, F, activation, limit);
  product(y.data_ptr<bf16>(), N, h.data_ptr<bf16>(), wd, F, N);
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
  if (prefill_sized(off) && grouped_bf16_applies(x.scalar_type(), x.stride(1), u[0], u[1], K, 2 * F) &&
      grouped_bf16_applies(x.scalar_type(), 1, d[0], d[1], F, N)) {
    using bf16 = c10::BFloat16;
    grouped_bf16(gate_up.data_ptr<bf16>(), 2 * F, x.data_ptr<bf16>(), x.stride(0), off, w_gate_up, u, K, 2 * F);
    const at::Tensor h = gated_forward(gate_up, F, activation, limit);
    grouped_bf16(y.data_ptr<bf16>(), N, h.data_ptr<bf16>(), F, off, w_down, d, F, N);
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

// ---- the backward of a decode step in one pass per weight ----
//
// A decode step's backward reads each touched expert's weights once more (dx = dgu @ w, dh = dy @
// w_down) and writes their gradients (dw = dgu^T x, dw_down = dy^T h): separately, a read pass and
// a write pass. With the weights in transformers' layout ([2F, K] / [N, F] per expert: row r of w
// and row r of its gradient both belong to output column r) one pass over the rows does both, the
// reads and the streamed writes overlapping (on a 2-core Zen 4 a read and a non-zero write pass
// one after the other took 1.6x a pass doing both, `move_work`).

#if defined(__AVX512BF16__)
// Rows of a weight per chunk of the one-pass backward (linear_backward_pairs at 5-8 rows,
// linear_backward_rows at 3-8; measured in bf16: 16 and 64 no faster).
constexpr int64_t kChunkRows = 32;

// A chunk's columns 32 at a time: for each, dx's sums (sums[i]: row i's 2 x 16, acc's rows ld apart)
// loaded, body(k, sums) over the chunk's rows, stored: once a chunk, not once a step of rows.
template <int MB, typename Body>
__attribute__((always_inline)) inline void chunk_columns(float* __restrict acc, int64_t ld, int64_t C,
                                                         const Body& body) {
  for (int64_t k = 0; k < C; k += 32) {
    __m512 sums[MB][2];
    for (int i = 0; i < MB; ++i) {
      sums[i][0] = _mm512_loadu_ps(acc + i * ld + k);
      sums[i][1] = _mm512_loadu_ps(acc + i * ld + k + 16);
    }
    body(k, sums);
    for (int i = 0; i < MB; ++i) {
      _mm512_storeu_ps(acc + i * ld + k, sums[i][0]);
      _mm512_storeu_ps(acc + i * ld + k + 16, sums[i][1]);
    }
  }
}

// 32 fp32 values of a weight's gradient row (two vectors), streamed (a whole aligned line each) or
// stored.
template <bool kStream>
__attribute__((always_inline)) inline void store_line(float* d, __m512 lo, __m512 hi) {
  if (kStream) {
    _mm512_stream_ps(d, lo);
    _mm512_stream_ps(d + 16, hi);
  } else {
    _mm512_storeu_ps(d, lo);
    _mm512_storeu_ps(d + 16, hi);
  }
}

// The one-pass backward's chunks read kChunkRows rows of w (rows [r, r + kChunkRows),
// C columns) across its rows: the 32 columns from k of each row, then the next 32 columns'. In that
// order it fetches into L2 the 32 columns (a line in bf16, two in fp32) kChunkAheadLines after row
// q's at column k (past the chunk's last columns, the next chunk's; none past row r1). bf16, two
// columns of lines ahead against half a column: 1.3-1.4x the time, 1 column 1.04-1.07x, 1.5 even,
// 2.5 and 4 1.03-1.06x (8 Mixtral-shaped experts of 5 and 8 rows each / 32 of 64 Qwen3-MoE-shaped,
// 2 threads, 2-core Zen 5, paired).
constexpr int64_t kChunkAheadLines = 2 * kChunkRows;
template <typename T>
__attribute__((always_inline)) inline void fetch_chunk_line(const T* w, int64_t C, int64_t r, int64_t r1, int64_t k,
                                                            int64_t q) {
  const int64_t j = k / 32 * kChunkRows + (q - r) + kChunkAheadLines;
  int64_t column = j / kChunkRows * 32, row = r + j % kChunkRows;
  for (; column >= C; column -= C) row += kChunkRows;  // (twice where C is 32)
  if (row >= r1) return;
  const char* line = reinterpret_cast<const char*>(w + row * C + column);
  for (size_t b = 0; b < 32 * sizeof(T); b += 64) _mm_prefetch(line + b, _MM_HINT_T1);
}

// fp32: rows [r0, r1) of one expert's weight w ([R, C], C a multiple of 32) against MB <= 8 of its
// rows: acc[i, :] += c[i, r] * w[r, :] (the input gradient's sums, row stride ld) and dw[r, :] =
// sum_i c[i, r] * a[i, :] (the weight's gradient, streamed a line at a time where dw's rows are
// aligned lines). c: [MB, R] (row stride ldc); a: [MB, C] (row stride ld). The sums over i run in
// gemm_few_inner's order; no sum may be NaN (pack_few_inner's bound: the caller checks).
template <int MB, bool kStream>
void linear_backward_rows(const float* __restrict w, int64_t C, int64_t r0, int64_t r1, const float* c,
                          int64_t ldc, const float* __restrict a, float* __restrict acc, int64_t ld,
                          float* __restrict dw) {
  // 1-2 rows: 4 of w's rows a step (the last R % 4 one at a time): the sums of dx loaded and stored
  // once for them (a step a row: 1.5-2.2x the time at 2-4 rows, 2 rows a step 1.1-1.3x)
  const auto step = [&](auto p_, int64_t r) {
    constexpr int P = decltype(p_)::value;
    __m512 cr[P][MB];
    for (int p = 0; p < P; ++p) {
      for (int i = 0; i < MB; ++i) cr[p][i] = _mm512_set1_ps(c[i * ldc + r + p]);
    }
    for (int64_t k = 0; k < C; k += 32) {
      __m512 wv[P][2], g[P][2];
      for (int p = 0; p < P; ++p) {
        const float* wr = w + (r + p) * C + k;
        _mm_prefetch(reinterpret_cast<const char*>(wr) + kDotsAhead, _MM_HINT_T1);
        wv[p][0] = _mm512_loadu_ps(wr);
        wv[p][1] = _mm512_loadu_ps(wr + 16);
        g[p][0] = g[p][1] = _mm512_setzero_ps();
      }
      for (int i = 0; i < MB; ++i) {
        float* ai = acc + i * ld + k;
        const __m512 x0 = _mm512_loadu_ps(a + i * ld + k), x1 = _mm512_loadu_ps(a + i * ld + k + 16);
        __m512 s0 = _mm512_loadu_ps(ai), s1 = _mm512_loadu_ps(ai + 16);
        for (int p = 0; p < P; ++p) {
          s0 = _mm512_fmadd_ps(cr[p][i], wv[p][0], s0);
          s1 = _mm512_fmadd_ps(cr[p][i], wv[p][1], s1);
          g[p][0] = _mm512_fmadd_ps(cr[p][i], x0, g[p][0]);
          g[p][1] = _mm512_fmadd_ps(cr[p][i], x1, g[p][1]);
        }
        _mm512_storeu_ps(ai, s0);
        _mm512_storeu_ps(ai + 16, s1);
      }
      for (int p = 0; p < P; ++p) store_line<kStream>(dw + (r + p) * C + k, g[p][0], g[p][1]);
    }
  };
  // 3-8 rows: kChunkRows of w's rows at a time in one pass over their columns, as
  // linear_backward_pairs' chunks (x's rows read from L1 for each of w's rows); the same sums in the
  // same order. Against the dx sums over the whole chunk, then its gradient's rows with x's rows in
  // registers, the next chunk fetched into L2 in order (at 5-8 rows until 2026-12-07; 8 Mixtral-shaped
  // experts of m rows each / 32 of 64 Qwen3-MoE-shaped, 2 threads, 2-core Zen 5, median over 5
  // interleaved rounds, bit-identical): 5-8 rows 0.78-0.84x / 0.86-0.90x the time; against the steps
  // at 3-4 rows 0.80-1.05x (0.9x the median over 6 runs: slower only while the memory read slowly),
  // at 1-2 rows 1.06-1.14x (not taken).
  const auto chunk = [&](int64_t r, int64_t rows) {
    chunk_columns<MB>(acc, ld, C, [&](int64_t k, __m512(&sums)[MB][2]) {
      for (int64_t q = r; q < r + rows; ++q) {
        fetch_chunk_line(w, C, r, r1, k, q);
        const __m512 w0 = _mm512_loadu_ps(w + q * C + k), w1 = _mm512_loadu_ps(w + q * C + k + 16);
        __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
        for (int i = 0; i < MB; ++i) {
          const __m512 ci = _mm512_set1_ps(c[i * ldc + q]);
          sums[i][0] = _mm512_fmadd_ps(ci, w0, sums[i][0]);
          sums[i][1] = _mm512_fmadd_ps(ci, w1, sums[i][1]);
          g0 = _mm512_fmadd_ps(ci, _mm512_loadu_ps(a + i * ld + k), g0);
          g1 = _mm512_fmadd_ps(ci, _mm512_loadu_ps(a + i * ld + k + 16), g1);
        }
        store_line<kStream>(dw + q * C + k, g0, g1);
      }
    });
  };
  int64_t r = r0;
  if constexpr (MB > 2) {
    for (; r < r1; r += kChunkRows) chunk(r, std::min(kChunkRows, r1 - r));
  } else {
    for (; r + 4 <= r1; r += 4) step(std::integral_constant<int, 4>{}, r);
    for (; r < r1; ++r) step(std::integral_constant<int, 1>{}, r);
  }
  if (kStream) _mm_sfence();
}

// Whether all of a bf16 / fp32 [m, n] block (row stride ld) is finite, and its largest magnitude
// (pack_few_inner's NaN bound); with `out`, its values in fp32 too, packed [m, n] (the FMA pass's
// operands; the pairs read the bf16 values themselves). 16 values a step (zeros past n).
template <typename T>
bool finite_rows(const T* p, int64_t ld, int64_t m, int64_t n, float& amax, std::vector<float>* out,
                 int64_t ldout) {
  if (out) out->resize(m * ldout);
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 top = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
      __m512 v;
      if constexpr (std::is_same_v<T, float>) {
        v = _mm512_maskz_loadu_ps(mask, p + i * ld + j);
      } else {  // (bf16: the high half of an fp32 value)
        const __m256i bits = _mm256_maskz_loadu_epi16(mask, p + i * ld + j);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      }
      if (out) _mm512_mask_storeu_ps(out->data() + i * ldout + j, mask, v);
      const __m512 a = _mm512_abs_ps(v);
      finite &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);  // (false for NaN)
      top = _mm512_max_ps(top, a);
    }
  }
  amax = _mm512_reduce_max_ps(top);
  return finite == 0xFFFF;
}

// One line (32 columns) of a weight's gradient row on VDPBF16PS pairs: sum over j of dyt[j] (a
// pair of the expert's dy values, broadcast) times x2's pairs (xa, xb: the line's 16 lo and 16 hi
// columns), rounded to bf16 and stored (streamed: a whole aligned line).
template <int MB2, bool kStream>
__attribute__((always_inline)) inline void store_dw_line(c10::BFloat16* d, const uint32_t* dyt, const __m512bh* xa,
                                                         const __m512bh* xb) {
  __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
  for (int j = 0; j < MB2; ++j) {
    const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(dyt[j]));
    g0 = _mm512_dpbf16_ps(g0, xa[j], b);
    g1 = _mm512_dpbf16_ps(g1, xb[j], b);
  }
  const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(g1, g0));
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), v);
  } else {
    _mm512_storeu_si512(d, v);
  }
}

// The 32 columns from k of x2's MB2 rows of pairs (rows ld apart), as store_dw_line takes them: the
// 16 lo columns' pairs in xa, the 16 hi ones' in xb.
template <int MB2>
__attribute__((always_inline)) inline void load_x_pairs(const uint32_t* x2, int64_t ld, int64_t k, __m512bh* xa,
                                                        __m512bh* xb) {
  for (int j = 0; j < MB2; ++j) {
    xa[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x2 + j * ld + k));
    xb[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x2 + j * ld + k + 16));
  }
}

// The bf16 one pass on VDPBF16PS, which multiplies pairs of bf16 values: dx's sums take w's rows two
// by two (rows r, r+1 interleaved by VPUNPCK{L,H}WD, so acc holds each 32 columns in that order: 16
// "lo" then 16 "hi" ones, unpermuted by the caller), dw's sums the expert's rows two by two. Its
// pairs add the odd element's product first, then the even one's, each rounded like an FMA (products
// of bf16 values are exact in fp32), so with x2's pair j = (x[2j+1, c] low, x[2j, c] high) and
// dyt[r, j] = (dy[2j+1, r], dy[2j, r]) dw's sums run i = 0, 1, 2, ... as gemm_few_inner_bf16's FMAs
// do: its bits, but for subnormal inputs and sums, which VDPBF16PS flushes to 0. Rows [r0, r1) of
// w, in pairs (an odd count's last row alone, paired with zeros); m <= MB rows; dy's rows (row
// stride ldy) give dx's pairs as 32-bit words; acc's and x2's rows lie ld apart.
template <int MB, bool kStream>
void linear_backward_pairs(const c10::BFloat16* __restrict w, int64_t C, int64_t r0, int64_t r1,
                           const c10::BFloat16* __restrict dy, int64_t ldy, const uint32_t* __restrict dyt,
                           const uint32_t* __restrict x2, float* __restrict acc, int64_t ld,
                           c10::BFloat16* __restrict dw) {
  constexpr int MB2 = (MB + 1) / 2;
  const auto word = [](const c10::BFloat16* p) {  // two bf16 values as one 32-bit word
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  };
  const auto load_row = [](const c10::BFloat16* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + kDotsAhead, _MM_HINT_T1);
    return _mm512_loadu_si512(p);
  };
  // NP pairs of w's rows from r (kAlone: the last row alone, paired with zeros)
  const auto step = [&](auto np_, auto alone_, int64_t r) {
    constexpr int NP = decltype(np_)::value;
    constexpr bool kAlone = decltype(alone_)::value;
    constexpr int NR = kAlone ? 1 : 2 * NP;
    for (int64_t k = 0; k < C; k += 32) {
      __m512bh lo[NP], hi[NP];
      for (int q = 0; q < NP; ++q) {
        const __m512i a = load_row(w + (r + 2 * q) * C + k);
        const __m512i b = kAlone ? _mm512_setzero_si512() : load_row(w + (r + 2 * q + 1) * C + k);
        lo[q] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
        hi[q] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      }
      for (int i = 0; i < MB; ++i) {
        float* ai = acc + i * ld + k;
        __m512 s0 = _mm512_loadu_ps(ai), s1 = _mm512_loadu_ps(ai + 16);
        for (int q = 0; q < NP; ++q) {
          const c10::BFloat16* d = dy + i * ldy + r + 2 * q;
          const __m512bh b = reinterpret_cast<__m512bh>(
              _mm512_set1_epi32(kAlone ? static_cast<uint32_t>(c10::bit_cast<uint16_t>(d[0])) : word(d)));
          s0 = _mm512_dpbf16_ps(s0, lo[q], b);
          s1 = _mm512_dpbf16_ps(s1, hi[q], b);
        }
        _mm512_storeu_ps(ai, s0);
        _mm512_storeu_ps(ai + 16, s1);
      }
      __m512bh xa[MB2], xb[MB2];
      load_x_pairs<MB2>(x2, ld, k, xa, xb);
      for (int p = 0; p < NR; ++p) store_dw_line<MB2, kStream>(dw + (r + p) * C + k, dyt + (r + p) * MB2, xa, xb);
    }
  };
  // kChunkRows of w's rows at a time from 5 rows, in one pass over their columns: for each 32
  // columns dx's sums stay in registers over all the chunk's pairs (loaded and stored once a chunk,
  // not once a step) and each pair's two gradient lines are written as it goes, so the reads and the
  // streamed writes overlap; the chunk's lines, read across its rows, fetched ahead (fetch_chunk_line).
  // The same sums in the same order as the steps below. Bound by VDPBF16PS there, where the steps
  // loaded and stored dx's sums 4 times as often: single-threaded, paired, bit-identical, 8 rows
  // 0.62-0.74x the time of 4-pair steps (a [1024, 3584] or [7168, 1024] weight from memory, a
  // [128, 1024] one from L2), 7 rows 0.6-0.73x, 5-6 rows 0.79-0.94x; from 1-2 rows the chunk's
  // few sums (long chains of VDPBF16PS) made it 1.3-1.7x slower, at 3-4 rows even. One pass against
  // the dx sums over the whole chunk, then its gradient's rows, the next chunk fetched into L2 in
  // address order meanwhile (until 2026-12-07; 8 Mixtral-shaped experts of m rows each / 32 of 64
  // Qwen3-MoE-shaped, 2 threads, 2-core Zen 5, median over 5 interleaved rounds, bit-identical): 5-8
  // rows 0.85-0.89x / 0.89-0.92x the time (71-74% -> 80-86% / 74-80% -> 83-89% of `move_work` over
  // the same weights); the two passes with this fetch 1.24-1.36x (the gradient pass read nothing).
  int64_t r = r0;
  if constexpr (MB > 4) {
    for (; r + kChunkRows <= r1; r += kChunkRows) {
      chunk_columns<MB>(acc, ld, C, [&](int64_t k, __m512(&sums)[MB][2]) {
        __m512bh xa[MB2], xb[MB2];
        load_x_pairs<MB2>(x2, ld, k, xa, xb);
        for (int64_t q = r; q < r + kChunkRows; q += 2) {
          fetch_chunk_line(w, C, r, r1, k, q);
          fetch_chunk_line(w, C, r, r1, k, q + 1);
          const __m512i a = _mm512_loadu_si512(w + q * C + k), b = _mm512_loadu_si512(w + (q + 1) * C + k);
          const __m512bh lo = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
          const __m512bh hi = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
          for (int i = 0; i < MB; ++i) {
            const __m512bh d = reinterpret_cast<__m512bh>(_mm512_set1_epi32(word(dy + i * ldy + q)));
            sums[i][0] = _mm512_dpbf16_ps(sums[i][0], lo, d);
            sums[i][1] = _mm512_dpbf16_ps(sums[i][1], hi, d);
          }
          store_dw_line<MB2, kStream>(dw + q * C + k, dyt + q * MB2, xa, xb);
          store_dw_line<MB2, kStream>(dw + (q + 1) * C + k, dyt + (q + 1) * MB2, xa, xb);
        }
      });
    }
    // then 4 pairs of w's rows a step (dx's sums loaded and stored once a step; 2-core Zen 4,
    // paired, 8 Mixtral-shaped experts: 4 pairs 0.85-0.94x the time of 2 at 5-8 rows, 1.05-1.1x
    // at 1-3)
    for (; r + 8 <= r1; r += 8) step(std::integral_constant<int, 4>{}, std::false_type{}, r);
  }
  for (; r + 4 <= r1; r += 4) step(std::integral_constant<int, 2>{}, std::false_type{}, r);
  for (; r + 2 <= r1; r += 2) step(std::integral_constant<int, 1>{}, std::false_type{}, r);
  if (r < r1) step(std::integral_constant<int, 1>{}, std::true_type{}, r);
  if (kStream) _mm_sfence();
}

// One expert's linear backward over its m rows, its weight w [R, C] in transformers' layout (y = x
// @ w^T): dx (m x C, row stride ldx) = dy @ w and dw (R x C) = dy^T @ x, from dy (m x R) and x (m x
// C), all in T (bf16 or fp32; row strides ldy, ldxin): one pass over w's rows where no sum can be
// NaN (bf16 up to kOnePassRowsPairs rows on VDPBF16PS pairs, linear_backward_pairs; fp32 up to
// kOnePassRows on FMAs, linear_backward_rows), else the few-row kernels one product at a time
// (mm_fp32_into: those of the grouped ops, which round NaNs as from_float does). The whole bf16
// backward of 8 Mixtral-shaped experts against a `move_work` pass over their weights (2-core Zen 4,
// same runs): the FMA pass 1.02 / 1.05 / 1.21 / 1.48x its time at 1 / 2 / 3 / 4 rows an expert, the
// products 1.39 / 1.55 / 1.62 / 1.70x; 32 of 64 Qwen3-MoE-shaped (the others' zero gradients
// included) 1.23 / 1.21 / 1.38 / 1.65x against 1.53 / 1.83 / 2.34 / 2.37x; the pairs 0.7-0.9x the
// FMA pass's time at 3-4 rows and the products' at 5-8 (the FMA pass was bound by its multiplies
// there, and from 5 rows it took 1.3-2x the products' time). fp32 decode steps' forward + backward:
// 0.79-0.98x the time of the products. fp32 at 5-8 rows in kChunkRows chunks (since session 27; 3-8 since 2026-12-07):
// 8 Mixtral-shaped experts' backward 0.79-0.97x the products' time at 5-8 rows, 32 of 64
// Qwen3-MoE-shaped 0.79-0.81x (paired); Mixtral-shaped 16-token forward + backward 0.97x.
constexpr int64_t kOnePassRows = 8, kOnePassRowsPairs = 8;
template <typename T>
void linear_backward(T* dx, int64_t ldx, T* dw, const T* w, int64_t R, int64_t C, const T* dy, int64_t ldy,
                     const T* x, int64_t ldxin, int64_t m) {
  constexpr bool kPairs = std::is_same_v<T, c10::BFloat16>;
  std::vector<float> cf, af;
  // rows of dx's sums (and of x's pairs / fp32 values) not a multiple of 4 KiB apart: at K 1024 the
  // 8 rows' loads and stores of a step fell in one L1 set, and 4-pair steps took 1.6x as long
  // (single-threaded, 8 rows, a [7168, 1024] weight)
  const int64_t ld = unaliased_stride(C);
  float cmax, amax;
  // (the operands are checked only for the one pass, and converted only for the FMA one)
  const bool one_pass = m <= (kPairs ? kOnePassRowsPairs : kOnePassRows) &&
                        finite_rows(dy, ldy, m, R, cmax, kPairs ? nullptr : &cf, R) &&
                        finite_rows(x, ldxin, m, C, amax, kPairs ? nullptr : &af, ld) &&
                        static_cast<double>(cmax) * amax * m < 1e37 && static_cast<double>(cmax) * m < 1e37;
  if (!one_pass) {
    const auto view = [](const T* p, int64_t rows, int64_t cols, int64_t stride) {
      return at::from_blob(const_cast<T*>(p), {rows, cols}, {stride, 1}, c10::CppTypeToScalarType<T>::value);
    };
    mm_fp32_into(view(dx, m, C, ldx), view(dy, m, R, ldy), view(w, R, C, C));
    mm_fp32_into(view(dw, R, C, C), view(dy, m, R, ldy).t(), view(x, m, C, ldxin));
    return;
  }
  // w's rows split over the threads where this runs outside a parallel region (an expert alone), each
  // part with its own sums of dx, added in order
  const int64_t parts =
      at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / 64));
  const auto first_row = [&](int64_t p) { return R * p / parts; };
  std::vector<float> acc(parts * m * ld, 0.f);
  const bool stream = reinterpret_cast<uintptr_t>(dw) % 64 == 0 && C % 32 == 0;
  if constexpr (kPairs) {
    // the pairs as 32-bit words, the even row's value high (zeros past m): dyt [R, m2] (dy[2j, r],
    // dy[2j + 1, r]) and x2 [m2, C] (x[2j, c], x[2j + 1, c])
    const int64_t m2 = (m + 1) / 2;
    const auto bits = [m](const T* p, int64_t ld, int64_t i, int64_t j) -> uint32_t {
      return i < m ? c10::bit_cast<uint16_t>(p[i * ld + j]) : 0u;
    };
    std::vector<uint32_t> dyt(R * m2), x2(m2 * ld);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < m2; ++j) dyt[r * m2 + j] = bits(dy, ldy, 2 * j, r) << 16 | bits(dy, ldy, 2 * j + 1, r);
    }
    for (int64_t j = 0; j < m2; ++j) {
      for (int64_t c = 0; c < C; ++c) x2[j * ld + c] = bits(x, ldxin, 2 * j, c) << 16 | bits(x, ldxin, 2 * j + 1, c);
    }
    with_rows<kOnePassRowsPairs>(m, [&](auto mb) {
      constexpr int MB = decltype(mb)::value;
      const auto rows = stream ? linear_backward_pairs<MB, true> : linear_backward_pairs<MB, false>;
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          rows(w, C, first_row(p), first_row(p + 1), dy, ldy, dyt.data(), x2.data(), acc.data() + p * m * ld, ld, dw);
        }
      });
    });
  } else {
    with_rows<kOnePassRows>(m, [&](auto mb) {
      constexpr int MB = decltype(mb)::value;
      const auto rows = stream ? linear_backward_rows<MB, true> : linear_backward_rows<MB, false>;
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          rows(w, C, first_row(p), first_row(p + 1), cf.data(), R, af.data(), acc.data() + p * m * ld, ld, dw);
        }
      });
    });
  }
  for (int64_t p = 1; p < parts; ++p) {
    for (int64_t j = 0; j < m * ld; ++j) acc[j] += acc[p * m * ld + j];
  }
  std::vector<float> row(kPairs ? C : 0);
  for (int64_t i = 0; i < m; ++i) {
    const float* a = acc.data() + i * ld;
    if constexpr (kPairs) {  // each 32 columns from the pairs' order (4 "lo", 4 "hi" per 128-bit lane)
      const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      for (int64_t k = 0; k < C; k += 32) {
        const __m512 lo = _mm512_loadu_ps(a + k), hi = _mm512_loadu_ps(a + k + 16);
        _mm512_storeu_ps(row.data() + k, _mm512_permutex2var_ps(lo, first, hi));
        _mm512_storeu_ps(row.data() + k + 16, _mm512_permutex2var_ps(lo, second, hi));
      }
      a = row.data();
    }
    store_floats(dx + i * ldx, a, C);
  }
}
#endif

// Whether expert_mlp_backward takes the one-pass path: bf16 or fp32 where built with AVX512-BF16,
// transformers' layout, every expert kFewInnerNoTiles rows or fewer (where one pass keeps up with the
// memory, each expert's sums in L1/L2), widths multiples of 32, contiguous operands of one dtype.
bool fused_backward(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                    const at::Tensor& gate_up, const at::Tensor& dy, const std::vector<int64_t>& off, bool trans_b) {
#if defined(__AVX512BF16__)
  const auto dtype = x.scalar_type();
  if (!trans_b || (dtype != at::kBFloat16 && dtype != at::kFloat) || w_gate_up.dim() != 3 || w_down.dim() != 3) {
    return false;
  }
  for (const at::Tensor* t : {&x, &w_gate_up, &w_down, &gate_up, &dy}) {
    if (!t->is_contiguous() || t->scalar_type() != dtype) return false;
  }
  if (x.size(1) % 32 || w_down.size(2) % 32) return false;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    if (off[e + 1] - off[e] > kFewInnerNoTiles) return false;
  }
  return true;
#else
  return false;
#endif
}

// (dx, dw_gate_up, dw_down) of expert_mlp, as its autograd formula computes them from the op kernels
// (pangu_ops/ops/expert_mlp.py: dh = dy @ w_down^T, the gate's backward, dx, both weight gradients
// by grouped_gemm_wgrad), in one call; a decode step in transformers' layout (fused_backward) by one
// pass over each touched expert's weights per product, the experts over the threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward(
    const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& group_sizes,
    const at::Tensor& gate_up, const at::Tensor& dy_in, c10::string_view activation, bool trans_b, double limit) {
  const at::Tensor dy = rows_contiguous(dy_in);  // (a loss's gradient may come expanded)
  TORCH_CHECK_VALUE(x.dim() == 2 && dy.dim() == 2 && gate_up.dim() == 2 && x.size(0) == dy.size(0) &&
                        gate_up.size(0) == x.size(0),
                    "expert_mlp_backward: need x [S, K], gate_up [S, 2F] and dy [S, N] with the same S");
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "expert_mlp_backward");
  if (!fused_backward(x, w_gate_up, w_down, gate_up, dy, off, trans_b)) {
    using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
    static const auto gemm =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("pangu_cpu::grouped_gemm");
    static const auto wgrad =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("pangu_cpu::grouped_gemm_wgrad");
    static const auto gated = op_handle<Tensors2(const at::Tensor&, const at::Tensor&, c10::string_view, double)>(
        "pangu_cpu::gated_backward");
    const at::Tensor dh = gemm.call(dy, w_down, group_sizes, !trans_b);
    const auto [dgu, h] = gated.call(gate_up, dh, activation, limit);
    at::Tensor dx = gemm.call(dgu, w_gate_up, group_sizes, !trans_b);
    at::Tensor dw_gate_up = trans_b ? wgrad.call(dgu, x, group_sizes) : wgrad.call(x, dgu, group_sizes);
    at::Tensor dw_down = trans_b ? wgrad.call(dy, h, group_sizes) : wgrad.call(h, dy, group_sizes);
    return {dx, dw_gate_up, dw_down};
  }
#if defined(__AVX512BF16__)
  const int64_t E = w_gate_up.size(0), F2 = w_gate_up.size(1), K = w_gate_up.size(2), N = w_down.size(1);
  const int64_t F = F2 / 2;
  TORCH_CHECK_VALUE(F2 % 2 == 0 && x.size(1) == K && gate_up.size(1) == F2 && dy.size(1) == N &&
                        w_down.size(0) == E && w_down.size(2) == F && group_sizes.numel() == E,
                    "expert_mlp_backward: inconsistent shapes");
  at::Tensor dx = empty_output({x.size(0), K}, x.options());
  at::Tensor dw_gate_up = empty_output({E, F2, K}, x.options()), dw_down = empty_output({E, N, F}, x.options());
  zero_empty_groups(dw_gate_up, off);
  zero_empty_groups(dw_down, off);
  const float lim = clamp_bound(limit);
  const auto run = [&](auto* type) {  // (a null T*: the dtype)
    using T = std::remove_pointer_t<decltype(type)>;
    const T *xp = x.data_ptr<T>(), *wu = w_gate_up.data_ptr<T>(), *wd = w_down.data_ptr<T>();
    const T *gup = gate_up.data_ptr<T>(), *dyp = dy.data_ptr<T>();
    T *dxp = dx.data_ptr<T>(), *dwu = dw_gate_up.data_ptr<T>(), *dwd = dw_down.data_ptr<T>();
    with_activation(activation, "expert_mlp_backward", [&](auto act) {
      constexpr Act kAct = decltype(act)::value;
      for_experts(off, [&](int64_t e0, int64_t e1) {
        std::vector<T> h, dh, dgu;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t m = off[e + 1] - off[e], s = off[e];
          if (m == 0) continue;
          h.resize(m * F), dh.resize(m * F), dgu.resize(m * F2);
          for (int64_t r = 0; r < m; ++r) {  // the forward's h, as it rounded it
            gated_forward_row<kAct>(gup + (s + r) * F2, gup + (s + r) * F2 + F, h.data() + r * F, F, lim);
          }
          linear_backward(dh.data(), F, dwd + e * N * F, wd + e * N * F, N, F, dyp + s * N, N, h.data(), F, m);
          const auto gated = std::isfinite(limit) ? gated_backward_row<kAct, true, T, T>
                                                  : gated_backward_row<kAct, false, T, T>;
          for (int64_t r = 0; r < m; ++r) {
            const T* g = gup + (s + r) * F2;
            gated(g, g + F, dh.data() + r * F, dgu.data() + r * F2, dgu.data() + r * F2 + F, h.data() + r * F, F,
                  lim);
          }
          linear_backward(dxp + s * K, K, dwu + e * F2 * K, wu + e * F2 * K, F2, K, dgu.data(), F2, xp + s * K, K,
                          m);
        }
      });
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return {dx, dw_gate_up, dw_down};
#else
  TORCH_CHECK(false, "expert_mlp_backward: unreachable");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("gated_backward(Tensor gate_up, Tensor dh, str activation, float limit) -> (Tensor, Tensor)");
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor group_sizes, str activation, bool trans_b,"
        " float limit) -> (Tensor, Tensor)");
  m.def("expert_mlp_backward(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor group_sizes, Tensor gate_up,"
        " Tensor dy, str activation, bool trans_b, float limit) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("expert_mlp", &expert_mlp);
  m.impl("expert_mlp_backward", &expert_mlp_backward);
  m.impl("gated_backward", &gated_backward);
}

}  // namespace pangu_cpu
