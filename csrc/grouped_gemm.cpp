// grouped_gemm: y[rows of group e] = x[rows of group e] @ w[e] (w[e]^T with trans_b), and the
// weight gradient dw[e] = x_e^T @ dy_e, both accumulated in fp32.
//
// Each expert's product runs on raw pointers by the few-row kernels where they apply (decode sizes:
// mm_few_into), else as one BLAS call on the expert's slices (mm_blas_into): in the operands' own
// dtype where this CPU's matmul is native in it (AMX-BF16, AVX512-BF16; probed once per process
// below), else through fp32 copies of x_e and w[e] (O(m*K + K*N) conversions against O(m*K*N)
// flops). Experts side by side on the threads where they split evenly (for_experts). Experts with
// no rows cost no FLOPs; their dw[e] = 0 are written run by run, streamed (fill_streaming).
// Prefill-sized bf16 products (a group over kFewRows rows) run in one pool of tasks instead: AMX
// tiles (amx_grouped.h), or VDPBF16PS on column blocks packed into L2 where the CPU's bf16
// products are those (packed_pairs.h: a Zen 4; the forward and, with the other layout, dX).
#include <ATen/Config.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <vector>

#include "amx_grouped.h"
#include "common.h"
#include "packed_pairs.h"
#include "vector_chains.h"

#if AT_MKLDNN_ENABLED()
namespace at::native {
// ATen's oneDNN matmul (ATen/native/mkldnn/Matmul.h: exported by libtorch_cpu, not among the
// headers torch installs): result = alpha * mat1 @ mat2 + beta * result.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace pangu_cpu {

namespace {
// The best of `repeats` timed calls fn(0), fn(1), ..., in seconds: the CPU probes below.
template <typename Fn>
double best_seconds(int repeats, const Fn& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn(i);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

double best_mm_seconds(const at::Tensor& a, const at::Tensor& b, int repeats) {
  return best_seconds(repeats, [&](int) { at::mm(a, b); });
}

bool probe_half_matmul(at::ScalarType dtype) {
  const at::Tensor a = at::randn({128, 512}), b = at::randn({512, 512});
  const at::Tensor ah = a.to(dtype), bh = b.to(dtype);
  // Untimed first calls: oneDNN generates its kernels on the first call of a shape, which can take
  // longer than 20 fp32 calls even where the half-precision path is the fast one.
  at::mm(a, b);
  at::mm(ah, bh);
  const double fp32 = best_mm_seconds(a, b, 4);
  if (best_mm_seconds(ah, bh, 1) > 20 * fp32) return false;  // a slow emulation: stop early
  // 25% slack: a busy machine must not flip the answer where both are equally fast (then the
  // half path still wins, as it converts nothing).
  return best_mm_seconds(ah, bh, 4) <= 1.25 * fp32;
}
}  // namespace

bool first_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // a shape and its layouts, as oneDNN's kernels differ by them
  const std::array<int64_t, 10> key = {a.size(0), a.size(1), b.size(1), a.stride(0), a.stride(1), b.stride(0),
                                       b.stride(1), out.stride(0), out.stride(1), static_cast<int64_t>(a.scalar_type())};
  static std::mutex mutex;
  static std::map<std::array<int64_t, 10>, int64_t> calls;
  const std::lock_guard<std::mutex> lock(mutex);
  return ++calls[key] < kOwnKernelAfter;
}

bool native_half_matmul(at::ScalarType dtype) {
  if (dtype == at::kFloat) return true;
  TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kHalf, "native_half_matmul: bfloat16 or float16");
  static std::once_flag once_bf16, once_fp16;
  static bool bf16 = false, fp16 = false;
  if (dtype == at::kBFloat16) {
    std::call_once(once_bf16, [] { bf16 = probe_half_matmul(at::kBFloat16); });
    return bf16;
  }
  std::call_once(once_fp16, [] { fp16 = probe_half_matmul(at::kHalf); });
  return fp16;
}

namespace {
std::atomic<int> forced_pair_dots{-1};  // force_bf16_pair_dots: -1 the probe decides, 0 / 1 forced
std::atomic<int> forced_wide{-1};  // force_full_width_512: the same
std::atomic<int> forced_onednn{-1};  // force_onednn_fp32: the same

// The best of 5 timed runs of chains (vector_chains.h) of 20000 steps (240k instructions: ~0.1 ms),
// in seconds.
template <typename Chains>
double probe_seconds(const Chains& chains) {
  return best_seconds(5, [&](int i) {
    volatile double keep = chains(i, 20000);
    (void)keep;
  });
}
}  // namespace

bool bf16_pair_dots() {
#if defined(__AVX512BF16__)
  const int forced = forced_pair_dots.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  static const bool pairs = probe_seconds(bf16_pair_chains) < 1.5 * probe_seconds(fma_chains<>);
  return pairs;
#else
  return false;
#endif
}

bool full_width_512() {
#if defined(__AVX512F__)
  const int forced = forced_wide.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  static const bool wide = probe_seconds(fma_chains<f32x16>) < 1.5 * probe_seconds(fma_chains<f32x8>);
  return wide;
#else
  return false;
#endif
}

void onednn_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#if AT_MKLDNN_ENABLED()
  at::native::mkldnn_matmul(a, b, out, 0.f, 1.f);
#else
  at::Tensor o = out;
  at::mm_out(o, a, b);
#endif
}

bool onednn_fp32() {
#if AT_MKLDNN_ENABLED()
  const int forced = forced_onednn.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  static const bool faster = [] {
    const at::Tensor a = at::randn({256, 1024}), b = at::randn({1024, 512}), out = at::empty({256, 512});
    const auto seconds = [&](auto product) {
      product(0);  // untimed: oneDNN generates its kernel on a shape's first call
      return best_seconds(4, product);
    };
    at::Tensor o = out;
    return seconds([&](int) { onednn_mm_out(out, a, b); }) < 0.8 * seconds([&](int) { at::mm_out(o, a, b); });
  }();
  return faster;
#else
  return false;
#endif
}

namespace {

at::Tensor grouped_gemm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& group_sizes,
                        bool trans_b) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && w.dim() == 3, "grouped_gemm: need x [S, K] and w [E, K, N]");
  const at::Tensor x = rows_contiguous(x_in);
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "grouped_gemm: x and w dtypes differ");
  const int64_t E = w.size(0), K = x.size(1), N = trans_b ? w.size(1) : w.size(2);
  TORCH_CHECK_VALUE((trans_b ? w.size(2) : w.size(1)) == K, "grouped_gemm: w's K differs from x's");
  TORCH_CHECK_VALUE(group_sizes.numel() == E, "grouped_gemm: group_sizes must have E = ", E, " entries");
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "grouped_gemm");
  at::Tensor y = empty_output({x.size(0), N}, x.options());
  const std::array<int64_t, 2> s = kn_strides(w, trans_b);  // w[e] as [K, N]
  if (prefill_sized(off) && grouped_bf16_applies(x.scalar_type(), x.stride(1), s[0], s[1], K, N)) {
    grouped_bf16(y.data_ptr<c10::BFloat16>(), N, x.data_ptr<c10::BFloat16>(), x.stride(0), off, w, s, K, N);
    return y;
  }
  PANGU_DISPATCH_FLOATS(x.scalar_type(), "grouped_gemm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_experts(off, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t m = off[e + 1] - off[e];
        if (m == 0 || mm_few_into(yp + off[e] * N, N, xp + off[e] * x.stride(0), x.stride(0), x.stride(1),
                                  wp + e * w.stride(0), s[0], s[1], m, K, N)) {
          continue;
        }
        mm_blas_into(y.narrow(0, off[e], m), x.narrow(0, off[e], m), trans_b ? w.select(0, e).t() : w.select(0, e));
      }
    });
  });
  return y;
}

at::Tensor grouped_gemm_wgrad(const at::Tensor& x_in, const at::Tensor& dy_in,
                              const at::Tensor& group_sizes) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && dy_in.dim() == 2 && x_in.size(0) == dy_in.size(0),
                    "grouped_gemm_wgrad: need x [S, K] and dy [S, N] with the same S");
  const at::Tensor x = rows_contiguous(x_in), dy = rows_contiguous(dy_in);
  TORCH_CHECK_TYPE(x.scalar_type() == dy.scalar_type(), "grouped_gemm_wgrad: x and dy dtypes differ");
  const int64_t E = group_sizes.numel(), K = x.size(1), N = dy.size(1);
  const std::vector<int64_t> off = group_offsets(group_sizes, x.size(0), "grouped_gemm_wgrad");
  at::Tensor dw = empty_output({E, K, N}, x.options());
  zero_empty_groups(dw, off);
  if (prefill_sized(off) && grouped_amx_wgrad_applies(x.scalar_type(), x.stride(1), dy.stride(1), K, N)) {
    grouped_amx_wgrad(dw.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), x.stride(0), off,
                      dy.data_ptr<c10::BFloat16>(), dy.stride(0), K, N);
    return dw;
  }
  PANGU_DISPATCH_FLOATS(x.scalar_type(), "grouped_gemm_wgrad", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>();
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    for_experts(off, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {  // dw[e] = x_e^T @ dy_e
        const int64_t m = off[e + 1] - off[e];
        if (m == 0 || mm_few_into(dwp + e * K * N, N, xp + off[e] * x.stride(0), x.stride(1), x.stride(0),
                                  dyp + off[e] * dy.stride(0), dy.stride(0), dy.stride(1), K, m, N)) {
          continue;
        }
        mm_blas_into(dw.select(0, e), x.narrow(0, off[e], m).t(), dy.narrow(0, off[e], m));
      }
    });
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor group_sizes, bool trans_b) -> Tensor");
  m.def("grouped_gemm_wgrad(Tensor x, Tensor dy, Tensor group_sizes) -> Tensor");
  m.def("native_half_matmul(ScalarType dtype) -> bool", [](at::ScalarType dtype) { return native_half_matmul(dtype); });
  m.def("bf16_pair_dots() -> bool", [] { return bf16_pair_dots(); });
  m.def("full_width_512() -> bool", [] { return full_width_512(); });
  m.def("onednn_fp32() -> bool", [] { return onednn_fp32(); });
  // for tests: both few-row bf16 dot kernels on any CPU with AVX512-BF16 (-1: the probe decides again)
  m.def("force_bf16_pair_dots(int mode) -> ()", [](int64_t mode) {
    TORCH_CHECK_VALUE(mode >= -1 && mode <= 1, "force_bf16_pair_dots: mode must be -1, 0 or 1, got ", mode);
#if !defined(__AVX512BF16__)
    TORCH_CHECK(mode != 1, "force_bf16_pair_dots: this build has no AVX512-BF16");
#endif
    forced_pair_dots.store(static_cast<int>(mode), std::memory_order_relaxed);
  });
  // for tests: the few-row dot kernels as tuned for either kind of AVX-512 unit, on any CPU with AVX-512
  m.def("force_full_width_512(int mode) -> ()", [](int64_t mode) {
    TORCH_CHECK_VALUE(mode >= -1 && mode <= 1, "force_full_width_512: mode must be -1, 0 or 1, got ", mode);
    forced_wide.store(static_cast<int>(mode), std::memory_order_relaxed);
  });
  // for tests: fp32 products on oneDNN's matmul or on BLAS's, where torch has oneDNN
  m.def("force_onednn_fp32(int mode) -> ()", [](int64_t mode) {
    TORCH_CHECK_VALUE(mode >= -1 && mode <= 1, "force_onednn_fp32: mode must be -1, 0 or 1, got ", mode);
#if !AT_MKLDNN_ENABLED()
    TORCH_CHECK(mode != 1, "force_onednn_fp32: this torch has no oneDNN");
#endif
    forced_onednn.store(static_cast<int>(mode), std::memory_order_relaxed);
  });
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad);
}

}  // namespace pangu_cpu
