// The stable counting sort shared by permute and rre_dispatch: group the slots of x's rows by
// expert in one fused pass, whatever decides a slot's expert.
//
// The slots are split into one contiguous chunk per thread:
//   1. count:   each chunk builds its own histogram of experts (and notes its first bad slot);
//   2. scan:    group_sizes, then the first output row of every (expert, chunk) pair, so that
//               chunk c writes its rows of expert e after those of chunks < c: stable order;
//   3. scatter: each chunk walks its slots again, writing sorted_index and copying the token's row
//               straight to its final place (the row copy is fused into the index pass).
#pragma once

#include <cstring>
#include <vector>

#include "common.h"

namespace pangu_cpu {

// expert_of(slot) -> expert id in [0, E), -1 for a dropped slot, anything else is bad;
// on_bad(slot) must throw. Slot s belongs to token s / k.
template <typename ExpertOf, typename OnBad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_by_expert(const at::Tensor& x, int64_t slots, int64_t k,
                                                               int64_t num_experts, ExpertOf expert_of,
                                                               OnBad on_bad) {
  const int64_t H = x.size(1), row_bytes = H * x.element_size();
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t chunk = std::max<int64_t>(2048, (slots + threads - 1) / threads);
  const int64_t chunks = std::max<int64_t>(1, (slots + chunk - 1) / chunk);
  // counts[c * E + e]: rows chunk c sends to expert e; after the scan, its next output row.
  std::vector<int64_t> counts(chunks * num_experts, 0);
  std::vector<int64_t> bad_slot(chunks, -1);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * num_experts;
      for (int64_t s = c * chunk, end = std::min(slots, s + chunk); s < end; ++s) {
        const int64_t e = expert_of(s);
        if (e >= 0 && e < num_experts) {
          ++cnt[e];
        } else if (e != -1 && bad_slot[c] < 0) {
          bad_slot[c] = s;
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (bad_slot[c] >= 0) on_bad(bad_slot[c]);
  }

  at::Tensor group_sizes = at::empty({num_experts}, x.options().dtype(at::kLong));
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

  at::Tensor x_sorted = empty_output({row, H}, x.options());
  at::Tensor sorted_index = at::empty({row}, x.options().dtype(at::kLong));
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  int64_t* si = sorted_index.data_ptr<int64_t>();

  // a large output is written with non-temporal stores: its lines are not fetched before being
  // written (permute of 4096 x 1024 bf16 rows, top-2: 0.56x the time; followed by the grouped GEMM
  // that reads it: 0.88-0.94x, paired)
  const bool stream = row * row_bytes >= (int64_t{1} << 20);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * num_experts;
      for (int64_t s = c * chunk, end = std::min(slots, s + chunk); s < end; ++s) {
        const int64_t e = expert_of(s);
        if (e < 0) continue;
        const int64_t r = next[e]++;
        si[r] = s;
        if (stream) copy_streaming(dst + r * row_bytes, src + (s / k) * row_bytes, row_bytes);
        else std::memcpy(dst + r * row_bytes, src + (s / k) * row_bytes, row_bytes);
      }
    }
    if (stream) streamed_stores_done();
  });
  return {x_sorted, group_sizes, sorted_index};
}

}  // namespace pangu_cpu
