// Shared helpers of the pangu_ops CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pangu_cpu {

// Floating dtypes every op supports; the Python front end checks them first with nicer messages,
// these checks keep a direct torch.ops.pangu_cpu call from reading memory as the wrong type.
#define PANGU_DISPATCH_FLOATS(TYPE, NAME, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Rows per at::parallel_for task: enough bytes per task to amortise the scheduling.
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(row_bytes, 1));
}

// A contiguous CPU output for a kernel to fill: outputs of 1 MiB and more come from a caching pool
// of 2 MiB-aligned, huge-page-advised blocks (output_pool.cpp): a fresh multi-MB allocation pays a
// page fault per 4 KiB page on first write, which costs more than the copy that fills it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Element conversions written so that loops over them vectorise: c10's bf16 rounding branches on
// NaN, which keeps GCC from vectorising the loops around it; the select below does not.
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float bf16_bits_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::BFloat16 v) { return bf16_bits_to_float(v.x); }

template <typename scalar_t>
inline scalar_t from_float(float f) {
  return static_cast<scalar_t>(f);
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;  // round to nearest even
  return c10::BFloat16(static_cast<uint16_t>(f != f ? UINT32_C(0x7FC0) : rounded),
                       c10::BFloat16::from_bits());
}

// Element loads / stores through the raw bits (bf16), so that GCC vectorises the loop around them.
inline float load_float(const float* p, int64_t i) { return p[i]; }
inline float load_float(const double* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_float(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_float(const c10::BFloat16* p, int64_t i) {
  return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline void store_float(float* p, int64_t i, float v) { p[i] = v; }
inline void store_float(double* p, int64_t i, float v) { p[i] = v; }
inline void store_float(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void store_float(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = from_float<c10::BFloat16>(v).x;
}

// y[0:n] += w * float(x[0:n]).
template <typename scalar_t>
inline void axpy_to_float(float* __restrict y, const scalar_t* __restrict x, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * to_float(x[i]);
}

// y[0:n] = scalar_t(w * x[0:n]) with x already in fp32.
template <typename scalar_t>
inline void scale_from_float(scalar_t* __restrict y, const float* __restrict x, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = from_float<scalar_t>(w * x[i]);
}

// sum(a[0:n] * float(b[0:n])) in fp32.
template <typename scalar_t>
inline float dot_float(const float* __restrict a, const scalar_t* __restrict b, int64_t n) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += a[i] * to_float(b[i]);
  return dot;
}

// ---- grouped GEMM helpers (grouped_gemm.cpp, expert_mlp.cpp) ----

// Row offsets of each group, validating the sizes against the number of rows.
inline std::vector<int64_t> group_offsets(const at::Tensor& group_sizes, int64_t rows, const char* op) {
  TORCH_CHECK_VALUE(group_sizes.dim() == 1, op, ": group_sizes must be 1-D [E]");
  const at::Tensor gs = group_sizes.to(at::kLong).contiguous();
  const int64_t* g = gs.data_ptr<int64_t>();
  std::vector<int64_t> offsets(gs.size(0) + 1, 0);
  for (int64_t e = 0; e < gs.size(0); ++e) {
    TORCH_CHECK_VALUE(g[e] >= 0, op, ": group_sizes[", e, "] = ", g[e], " is negative");
    offsets[e + 1] = offsets[e] + g[e];
  }
  TORCH_CHECK_VALUE(offsets.back() == rows, op, ": group_sizes sum to ", offsets.back(),
                    " but x has ", rows, " rows");
  return offsets;
}

// An fp32 view of t: t itself when it is fp32, else a converted copy.
inline at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// Runs fn(e0, e1) over experts [0, E) given their row offsets: split across the threads by cost,
// each expert's products then running single-threaded on one thread, when the split is even (no
// thread above 5/4 of an equal share, 2+ experts per thread); else fn(0, E) here, each product
// using every thread. Side by side, experts of a few hundred rows run 10-20% faster than one after
// another with each product's threads splitting so few rows, and each thread streams its own
// experts' weights. An expert's cost: its rows plus kRowsPerWeightPass for reading its weights once,
// which is what a decode step's 1-2-row experts cost.
constexpr int64_t kRowsPerWeightPass = 32;

template <typename Fn>
void for_experts(const std::vector<int64_t>& off, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads < 2 || off.back() == 0) return fn(0, E);
  std::vector<int64_t> cost(E + 1, 0);  // prefix sums
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    cost[e + 1] = cost[e] + (m > 0 ? m + kRowsPerWeightPass : 0);
    active += m > 0;
  }
  // decided by the experts with rows only: an expert's result (oneDNN rounds differently on one
  // thread and on several) must not depend on how many empty experts sit beside it (a domain's
  // sub-model gives the full model's outputs bit for bit)
  if (active < 2 * threads) return fn(0, E);
  const int64_t total = cost[E];
  std::vector<int64_t> first(threads + 1, E);
  first[0] = 0;
  for (int64_t t = 1, e = 0; t < threads; ++t) {
    while (e < E && cost[e] * threads < total * t) ++e;
    first[t] = e;
  }
  for (int64_t t = 0; t < threads; ++t) {
    if ((cost[first[t + 1]] - cost[first[t]]) * threads * 4 > total * 5) return fn(0, E);
  }
  const at::ThreadLocalState state;  // the caller's dispatch state (below autograd) for ATen calls
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = t0; t < t1; ++t) fn(first[t], first[t + 1]);
  });
}

// Whether torch's CPU matmul in `dtype` (bf16/fp16) is about as fast as in fp32 or faster on this
// machine: from ~200x slower (AVX2 only) to several times faster (AMX-BF16), which CPU flags and
// oneDNN's "supported" answers do not tell apart. Probed once per dtype on first use: a
// 128 x 512 x 512 matmul after an untimed first call, best of 4, against fp32 (a few ms where it is
// fast; ~0.5 s once where not).
bool native_half_matmul(at::ScalarType dtype);

// out[1, N] = a[1, K] @ b[K, N] (one row: decode), fp32 accumulation, b read once in its own 16-bit
// dtype. b is a [K, N] view either of a row-major [N, K] matrix (stride(0) == 1: dot products of
// contiguous rows) or row-major itself (stride(1) == 1: rows of b scaled and summed). Beats
// oneDNN's GEMV here by its per-call cost (small experts: 30-70 us against 40-80 us); with 2+ rows
// oneDNN wins (it stays at the weight-streaming time up to 4 rows, where a loop of dot products
// like this one grows with the rows: measured), so it keeps those.
template <typename T>
inline float dot_rows(const T* __restrict x, const T* __restrict y, int64_t K) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) sum += load_float(x, k) * load_float(y, k);
  return sum;
}

template <typename T>
void gemv(T* __restrict out, const T* __restrict a, const T* __restrict b, int64_t sb0, int64_t sb1, int64_t K,
          int64_t N) {
  if (sb0 == 1) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) store_float(out, n, dot_rows(a, b + n * sb1, K));
    });
    return;
  }
  constexpr int64_t kCols = 512;  // out[cols] += a[k] * b[k, cols], in a cache-resident fp32 block
  at::parallel_for(0, (N + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kCols, len = std::min(kCols, N - n0);
      float acc[kCols] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* row = b + k * sb0 + n0;
        const float ak = load_float(a, k);
        for (int64_t j = 0; j < len; ++j) acc[j] += ak * load_float(row, j);
      }
      for (int64_t j = 0; j < len; ++j) store_float(out, n0 + j, acc[j]);
    }
  });
}

// out = a @ b into out's storage with fp32 accumulation, rounded once to out's dtype: one row of
// 16-bit operands by `gemv`; else in the operands' own dtype where this CPU's matmul is native in
// it, else through fp32 copies.
inline void mm_fp32_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  const auto t = out.scalar_type();
  const bool half = t == at::kBFloat16 || t == at::kHalf;
  if (half && a.scalar_type() == t && b.scalar_type() == t && a.size(0) == 1 && a.stride(1) == 1 &&
      out.stride(1) == 1 && (b.stride(0) == 1 || b.stride(1) == 1)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(t, "gemv", [&] {
      gemv(out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), b.stride(0), b.stride(1),
           a.size(1), b.size(1));
    });
  } else if (t == at::kFloat) {
    at::mm_out(out, as_float(a), as_float(b));
  } else if (a.scalar_type() == t && b.scalar_type() == t && native_half_matmul(t)) {
    at::mm_out(out, a, b);  // oneDNN / cpublas accumulate half-precision products in fp32
  } else {
    out.copy_(at::mm(as_float(a), as_float(b)));
  }
}

}  // namespace pangu_cpu
