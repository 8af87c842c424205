// unpermute: y[t] = sum_j weights[t, j] * y_sorted[row of slot (t, j)], accumulated in fp32;
// and its backward, fused: grad_y_sorted[r] = w[slot] * grad_y[t] and
// grad_weights[slot] = <grad_y[t], y_sorted[r]> in one pass over the sorted rows.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace pangu_cpu {
namespace {

// Inverts sorted_index: row_of[slot] = sorted row holding that slot, -1 for dropped slots.
std::vector<int64_t> invert_sorted_index(const at::Tensor& sorted_index, int64_t slots) {
  std::vector<int64_t> row_of(slots, -1);
  const int64_t* si = sorted_index.data_ptr<int64_t>();
  for (int64_t r = 0, S = sorted_index.size(0); r < S; ++r) {
    const int64_t s = si[r];
    TORCH_CHECK_VALUE(s >= 0 && s < slots, "unpermute: sorted_index[", r, "] = ", s,
                      " is out of range [0, num_tokens * topk = ", slots, ")");
    TORCH_CHECK_VALUE(row_of[s] < 0, "unpermute: sorted_index holds slot ", s,
                      " twice (rows ", row_of[s], " and ", r, ")");
    row_of[s] = r;
  }
  return row_of;
}

void check_index(const at::Tensor& sorted_index, int64_t rows, const char* rows_name) {
  TORCH_CHECK_VALUE(sorted_index.dim() == 1 && sorted_index.size(0) == rows,
                    "unpermute: sorted_index must be 1-D with ", rows_name, ".shape[0] = ", rows,
                    " entries");
  TORCH_CHECK_TYPE(sorted_index.scalar_type() == at::kLong, "unpermute: sorted_index must be int64");
}

// Weights as fp32 [T * k] (they are small), or empty when absent. Read in place, in their dtype and
// strides: a conversion by `to` (an ATen op, its output allocated) cost ~6 us a one-token decode
// step, as much as unpermute's own work there.
std::vector<float> weights_as_float(const c10::optional<at::Tensor>& weights, int64_t T, int64_t k) {
  if (!weights.has_value() || !weights->defined()) return {};
  TORCH_CHECK_VALUE(weights->dim() == 2 && weights->size(0) == T && weights->size(1) == k,
                    "unpermute: weights must be [num_tokens, topk] = [", T, ", ", k, "]");
  TORCH_CHECK_VALUE(weights->device().is_cpu(), "unpermute: weights must be on the CPU");
  std::vector<float> out(T * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights->scalar_type(), "unpermute_weights", [&] {
    const scalar_t* p = weights->data_ptr<scalar_t>();
    const int64_t s0 = weights->stride(0), s1 = weights->stride(1);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) out[t * k + j] = static_cast<float>(p[t * s0 + j * s1]);
    }
  });
  return out;
}

// y[0:n] = w * x[0:n] in y's dtype; with `stream` (a large output) through the thread's staging
// row and non-temporal stores to y (copy_streaming).
template <typename scalar_t>
void store_row(scalar_t* y, const float* x, float w, int64_t n, scalar_t* staging, bool stream) {
  if (!stream) return scale_from_float(y, x, w, n);
  scale_from_float(staging, x, w, n);
  copy_streaming(reinterpret_cast<char*>(y), reinterpret_cast<const char*>(staging), n * sizeof(scalar_t));
}

// Rows in registers, 32 columns at a time, where built with AVX-512 (bf16: AVX512-BF16 too) and the
// width is a multiple of 32: fp32 sums and products, rounded once (bf16: VCVTNE2PS2BF16, to nearest
// even) and written whole 64-byte lines, non-temporal where `stream` and the row starts on a line
// (unpermute bf16, 4096 tokens x 512, top-2: 0.70x the time of the element loops; 4096 x 2048:
// 0.69x; the backward 0.48-0.58x; fp32 0.66-0.82x, the backward 0.57-0.67x). The functions return
// false (nothing done) elsewhere.
#if defined(__AVX512F__)
inline void load32(const float* p, __m512& lo, __m512& hi) { lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16); }
inline void store32(float* p, __m512 lo, __m512 hi, bool line) {
  if (line) return _mm512_stream_ps(p, lo), _mm512_stream_ps(p + 16, hi);
  _mm512_storeu_ps(p, lo), _mm512_storeu_ps(p + 16, hi);
}
template <typename T>
constexpr bool kInRegisters = std::is_same_v<T, float>;
#if defined(__AVX512BF16__)
// the 32 bf16 at p as fp32: columns 0-15 in lo, 16-31 in hi
inline void load32(const c10::BFloat16* p, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}
inline void store32(c10::BFloat16* p, __m512 lo, __m512 hi, bool line) {
  const __m512i out = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  if (line) return _mm512_stream_si512(reinterpret_cast<__m512i*>(p), out);
  _mm512_storeu_si512(p, out);
}
template <>
constexpr bool kInRegisters<c10::BFloat16> = true;
#endif
#endif

// y[0:N] = sum_j w[j] * rows[j][0:N] (the forward)
template <typename T>
bool sum_rows_in_registers(T* y, const T* const* rows, const float* w, int64_t n, int64_t N, bool stream) {
#if defined(__AVX512F__)
  if constexpr (kInRegisters<T>) {
    if (N % 32 != 0) return false;
    const bool line = stream && reinterpret_cast<uintptr_t>(y) % 64 == 0;
    for (int64_t c = 0; c < N; c += 32) {
      __m512 lo = _mm512_setzero_ps(), hi = lo;
      for (int64_t j = 0; j < n; ++j) {
        __m512 a, b;
        load32(rows[j] + c, a, b);
        const __m512 wj = _mm512_set1_ps(w[j]);
        lo = _mm512_fmadd_ps(wj, a, lo), hi = _mm512_fmadd_ps(wj, b, hi);
      }
      store32(y + c, lo, hi, line);
    }
    return true;
  }
#endif
  return false;
}

// out[0:N] = w * g[0:N] and, where y is given, *dot = <g, y> in fp32 (the backward)
template <typename T>
bool scale_row_in_registers(T* out, const T* g, float w, const T* y, int64_t N, bool stream, float* dot) {
#if defined(__AVX512F__)
  if constexpr (kInRegisters<T>) {
    if (N % 32 != 0) return false;
    const bool line = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
    const __m512 wv = _mm512_set1_ps(w);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0;
    for (int64_t c = 0; c < N; c += 32) {
      __m512 lo, hi;
      load32(g + c, lo, hi);
      store32(out + c, _mm512_mul_ps(wv, lo), _mm512_mul_ps(wv, hi), line);
      if (y) {
        __m512 a, b;
        load32(y + c, a, b);
        d0 = _mm512_fmadd_ps(lo, a, d0), d1 = _mm512_fmadd_ps(hi, b, d1);
      }
    }
    if (y) *dot = _mm512_reduce_add_ps(_mm512_add_ps(d0, d1));
    return true;
  }
#endif
  return false;
}

at::Tensor unpermute(const at::Tensor& y_sorted, const at::Tensor& sorted_index,
                     const c10::optional<at::Tensor>& weights, int64_t num_tokens, int64_t topk) {
  TORCH_CHECK_VALUE(y_sorted.dim() == 2, "unpermute: y_sorted must be 2-D [S, N]");
  TORCH_CHECK_VALUE(num_tokens >= 0 && topk > 0, "unpermute: need num_tokens >= 0 and topk > 0");
  check_index(sorted_index, y_sorted.size(0), "y_sorted");
  const int64_t N = y_sorted.size(1), k = topk;
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor si = sorted_index.contiguous();
  const std::vector<float> w = weights_as_float(weights, num_tokens, k);
  const std::vector<int64_t> row_of = invert_sorted_index(si, num_tokens * k);
  at::Tensor y = empty_output({num_tokens, N}, ys.options());

  // a large output is written with non-temporal stores (4096 tokens x 512, top-2, element loops:
  // 0.57x the time in fp32, 0.94x in bf16, paired)
  const bool stream = y.nbytes() >= (size_t{1} << 20);
  PANGU_DISPATCH_FLOATS(ys.scalar_type(), "pangu_unpermute", [&] {
    const scalar_t* src = ys.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const float* wp = w.empty() ? nullptr : w.data();
    at::parallel_for(0, num_tokens, row_grain(N * k * sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(N);
      std::vector<scalar_t> staging(stream ? N : 0);
      std::vector<const scalar_t*> rows(k);
      std::vector<float> ws(k);
      for (int64_t t = t0; t < t1; ++t) {
        // The rows are gathered from anywhere in y_sorted: start fetching the next token's row
        // starts while this one is summed, so they do not each wait on memory (the hardware
        // prefetcher follows a row from there; fetching whole rows ran 1.1-1.3x the time at 2048
        // bf16 columns).
        if (t + 1 < t1) {
          for (int64_t j = 0; j < k; ++j) {
            const int64_t r = row_of[(t + 1) * k + j];
            if (r < 0) continue;
            const char* row = reinterpret_cast<const char*>(src + r * N);
            __builtin_prefetch(row);
            __builtin_prefetch(row + 64);
          }
        }
        int64_t n = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of[t * k + j];
          if (r < 0) continue;
          rows[n] = src + r * N, ws[n++] = wp ? wp[t * k + j] : 1.f;
        }
        if (sum_rows_in_registers(dst + t * N, rows.data(), ws.data(), n, N, stream)) continue;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy_to_float(acc.data(), rows[j], ws[j], N);
        store_row(dst + t * N, acc.data(), 1.f, N, staging.data(), stream);
      }
      if (stream) streamed_stores_done();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_y,
                                                      const at::Tensor& sorted_index,
                                                      const c10::optional<at::Tensor>& weights,
                                                      const c10::optional<at::Tensor>& y_sorted,
                                                      int64_t topk) {
  TORCH_CHECK_VALUE(grad_y.dim() == 2, "unpermute_backward: grad_y must be 2-D [T, N]");
  TORCH_CHECK_VALUE(topk > 0, "unpermute_backward: topk must be positive");
  TORCH_CHECK_VALUE(sorted_index.dim() == 1, "unpermute_backward: sorted_index must be 1-D");
  const int64_t T = grad_y.size(0), N = grad_y.size(1), k = topk, S = sorted_index.size(0);
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor si = sorted_index.contiguous();
  const std::vector<float> w = weights_as_float(weights, T, k);
  const bool want_wgrad = y_sorted.has_value() && y_sorted->defined();
  TORCH_CHECK_VALUE(!want_wgrad || (weights.has_value() && weights->defined()),
                    "unpermute_backward: y_sorted is only needed for the weights' gradient");
  const at::Tensor ys = want_wgrad ? y_sorted->contiguous() : at::Tensor();
  if (want_wgrad) check_index(si, ys.size(0), "y_sorted");
  // Validates the indices (range, duplicates) exactly as the forward does.
  invert_sorted_index(si, T * k);

  TORCH_CHECK_TYPE(!want_wgrad || ys.scalar_type() == g.scalar_type(),
                   "unpermute_backward: grad_y and y_sorted must have the same dtype");
  at::Tensor grad_ys = empty_output({S, N}, g.options());
  at::Tensor grad_w = want_wgrad ? at::empty({T, k}, g.options().dtype(at::kFloat))
                                 : at::empty({0}, g.options().dtype(at::kFloat));
  if (want_wgrad) grad_w.zero_();  // dropped slots get no gradient
  // a large output with non-temporal stores (8192 rows x 512, fp32, element loops: 0.33x the time)
  const bool stream = grad_ys.nbytes() >= (size_t{1} << 20);
  PANGU_DISPATCH_FLOATS(g.scalar_type(), "pangu_unpermute_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = grad_ys.data_ptr<scalar_t>();
    const scalar_t* yp = want_wgrad ? ys.data_ptr<scalar_t>() : nullptr;
    const int64_t* idx = si.data_ptr<int64_t>();
    const float* wp = w.empty() ? nullptr : w.data();
    float* gw = want_wgrad ? grad_w.data_ptr<float>() : nullptr;
    at::parallel_for(0, S, row_grain(N * sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      std::vector<float> row(N);
      std::vector<scalar_t> staging(stream ? N : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t s = idx[r];
        const scalar_t* gt = gp + (s / k) * N;
        float dot = 0.f;
        if (scale_row_in_registers(out + r * N, gt, wp ? wp[s] : 1.f, gw ? yp + r * N : nullptr, N, stream, &dot)) {
          if (gw) gw[s] = dot;
          continue;
        }
        for (int64_t i = 0; i < N; ++i) row[i] = to_float(gt[i]);
        store_row(out + r * N, row.data(), wp ? wp[s] : 1.f, N, staging.data(), stream);
        if (gw) {
          gw[s] = dot_float(row.data(), yp + r * N, N);  // one row per slot: no race
        }
      }
      if (stream) streamed_stores_done();
    });
  });
  if (want_wgrad && weights->scalar_type() != at::kFloat) grad_w = grad_w.to(weights->scalar_type());
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("unpermute(Tensor y_sorted, Tensor sorted_index, Tensor? weights, int num_tokens, int topk)"
        " -> Tensor");
  m.def("unpermute_backward(Tensor grad_y, Tensor sorted_index, Tensor? weights, Tensor? y_sorted,"
        " int topk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("unpermute", &unpermute);
  m.impl("unpermute_backward", &unpermute_backward);
}

}  // namespace pangu_cpu
