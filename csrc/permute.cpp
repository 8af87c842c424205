// permute: group the routed rows of x by expert in one fused pass.
//
// Stable counting sort over the T*k slots, split into one contiguous chunk of slots per thread:
//   1. count:   each chunk builds its own histogram of expert ids (and validates them);
//   2. scan:    group_sizes, then the first output row of every (expert, chunk) pair, so that
//               chunk c writes its rows of expert e after those of chunks < c: stable order;
//   3. scatter: each chunk walks its slots again, writing sorted_index and copying the token's row
//               straight to its final place (the row copy is fused into the index pass).
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common.h"

namespace pangu_cpu {
namespace {

template <typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_impl(const at::Tensor& x,
                                                          const at::Tensor& expert_ids,
                                                          int64_t num_experts) {
  const int64_t T = expert_ids.size(0), k = expert_ids.size(1), slots = T * k;
  const int64_t H = x.size(1), row_bytes = H * x.element_size();
  const index_t* ids = expert_ids.data_ptr<index_t>();

  const int64_t chunk = std::max<int64_t>(2048, (slots + at::get_num_threads() - 1) /
                                                    std::max(at::get_num_threads(), 1));
  const int64_t chunks = std::max<int64_t>(1, (slots + chunk - 1) / chunk);
  // counts[c * E + e]: rows chunk c sends to expert e; later its first output row.
  std::vector<int64_t> counts(chunks * num_experts, 0);
  std::vector<int64_t> bad_slot(chunks, -1);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * num_experts;
      for (int64_t s = c * chunk, end = std::min(slots, s + chunk); s < end; ++s) {
        const int64_t e = static_cast<int64_t>(ids[s]);
        if (e >= 0 && e < num_experts) {
          ++cnt[e];
        } else if (e != -1 && bad_slot[c] < 0) {
          bad_slot[c] = s;
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (bad_slot[c] >= 0) {
      const int64_t s = bad_slot[c];
      TORCH_CHECK_VALUE(false, "permute: expert_ids[", s / k, ", ", s % k, "] = ",
                        static_cast<int64_t>(ids[s]), " is out of range: expected -1 (dropped) or ",
                        "an expert id in [0, num_experts=", num_experts, ")");
    }
  }

  at::Tensor group_sizes = at::empty({num_experts}, expert_ids.options().dtype(at::kLong));
  int64_t* gs = group_sizes.data_ptr<int64_t>();
  int64_t row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t first = row;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = counts[c * num_experts + e];
      counts[c * num_experts + e] = row;
      row += n;
    }
    gs[e] = row - first;
  }
  const int64_t S = row;

  at::Tensor x_sorted = empty_output({S, H}, x.options());
  at::Tensor sorted_index = at::empty({S}, expert_ids.options().dtype(at::kLong));
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  int64_t* si = sorted_index.data_ptr<int64_t>();

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * num_experts;
      for (int64_t s = c * chunk, end = std::min(slots, s + chunk); s < end; ++s) {
        const int64_t e = static_cast<int64_t>(ids[s]);
        if (e < 0) continue;
        const int64_t r = next[e]++;
        si[r] = s;
        std::memcpy(dst + r * row_bytes, src + (s / k) * row_bytes, row_bytes);
      }
    }
  });
  return {x_sorted, group_sizes, sorted_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x,
                                                     const at::Tensor& expert_ids,
                                                     int64_t num_experts) {
  TORCH_CHECK_VALUE(x.dim() == 2, "permute: x must be 2-D [T, H]");
  TORCH_CHECK_VALUE(expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0),
                    "permute: expert_ids must be [T, k] with T = x.shape[0]");
  TORCH_CHECK_VALUE(num_experts > 0, "permute: num_experts must be positive");
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = expert_ids.contiguous();
  if (ids.scalar_type() == at::kInt) return permute_impl<int32_t>(xc, ids, num_experts);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "permute: expert_ids must be int32 or int64");
  return permute_impl<int64_t>(xc, ids, num_experts);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("permute(Tensor x, Tensor expert_ids, int num_experts) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) { m.impl("permute", &permute); }

}  // namespace pangu_cpu
