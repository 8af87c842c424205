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

// Weights as a contiguous fp32 [T * k] tensor (they are small), or undefined when absent.
at::Tensor weights_as_float(const c10::optional<at::Tensor>& weights, int64_t T, int64_t k) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(weights->dim() == 2 && weights->size(0) == T && weights->size(1) == k,
                    "unpermute: weights must be [num_tokens, topk] = [", T, ", ", k, "]");
  return weights->to(at::kFloat).contiguous();
}

at::Tensor unpermute(const at::Tensor& y_sorted, const at::Tensor& sorted_index,
                     const c10::optional<at::Tensor>& weights, int64_t num_tokens, int64_t topk) {
  TORCH_CHECK_VALUE(y_sorted.dim() == 2, "unpermute: y_sorted must be 2-D [S, N]");
  TORCH_CHECK_VALUE(num_tokens >= 0 && topk > 0, "unpermute: need num_tokens >= 0 and topk > 0");
  check_index(sorted_index, y_sorted.size(0), "y_sorted");
  const int64_t N = y_sorted.size(1), k = topk;
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor si = sorted_index.contiguous();
  const at::Tensor w = weights_as_float(weights, num_tokens, k);
  const std::vector<int64_t> row_of = invert_sorted_index(si, num_tokens * k);
  at::Tensor y = empty_output({num_tokens, N}, ys.options());

  PANGU_DISPATCH_FLOATS(ys.scalar_type(), "pangu_unpermute", [&] {
    const scalar_t* src = ys.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    at::parallel_for(0, num_tokens, row_grain(N * k * sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(N);
      for (int64_t t = t0; t < t1; ++t) {
        // The rows are gathered from anywhere in y_sorted: start fetching the next token's rows
        // while this one is summed, so the row starts do not each wait on memory.
        if (t + 1 < t1) {
          for (int64_t j = 0; j < k; ++j) {
            const int64_t r = row_of[(t + 1) * k + j];
            if (r < 0) continue;
            const char* row = reinterpret_cast<const char*>(src + r * N);
            for (int64_t b = 0; b < N * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(row + b);
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of[t * k + j];
          if (r < 0) continue;
          axpy_to_float(acc.data(), src + r * N, wp ? wp[t * k + j] : 1.f, N);
        }
        scale_from_float(dst + t * N, acc.data(), 1.f, N);
      }
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
  const at::Tensor w = weights_as_float(weights, T, k);
  const bool want_wgrad = y_sorted.has_value() && y_sorted->defined();
  TORCH_CHECK_VALUE(!want_wgrad || w.defined(),
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
  PANGU_DISPATCH_FLOATS(g.scalar_type(), "pangu_unpermute_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = grad_ys.data_ptr<scalar_t>();
    const scalar_t* yp = want_wgrad ? ys.data_ptr<scalar_t>() : nullptr;
    const int64_t* idx = si.data_ptr<int64_t>();
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    float* gw = want_wgrad ? grad_w.data_ptr<float>() : nullptr;
    at::parallel_for(0, S, row_grain(N * sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      std::vector<float> row(N);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t s = idx[r];
        const scalar_t* gt = gp + (s / k) * N;
        for (int64_t i = 0; i < N; ++i) row[i] = to_float(gt[i]);
        scale_from_float(out + r * N, row.data(), wp ? wp[s] : 1.f, N);
        if (gw) {
          gw[s] = dot_float(row.data(), yp + r * N, N);  // one row per slot: no race
        }
      }
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
