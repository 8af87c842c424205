// rre_dispatch: table-routed dispatch in one pass. The experts of token (b, s) are
// table[domain_ids[b], token_ids[b, s]] (RRE: a [D, V] table, k = 1; hash routing: [D, V, k]),
// looked up inside the counting sort of scatter_by_expert.h, so no expert-id tensor is ever written.
#include <torch/library.h>

#include <string>

#include "scatter_by_expert.h"

namespace pangu_cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rre_dispatch(const at::Tensor& x, const at::Tensor& token_ids,
                                                          const at::Tensor& domain_ids, const at::Tensor& table,
                                                          int64_t num_experts) {
  TORCH_CHECK_VALUE(token_ids.dim() == 2 && domain_ids.dim() == 1 && (table.dim() == 2 || table.dim() == 3),
                    "rre_dispatch: need token_ids [B, S], domain_ids [B], table [D, V] or [D, V, k]");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == token_ids.numel(), "rre_dispatch: x must be [B * S, H]");
  TORCH_CHECK_VALUE(domain_ids.size(0) == token_ids.size(0), "rre_dispatch: domain_ids must have B entries");
  const at::Tensor tok = token_ids.to(at::kLong).contiguous(), dom = domain_ids.to(at::kLong).contiguous();
  const at::Tensor tab = table.to(at::kLong).contiguous();
  const int64_t S = token_ids.size(1), D = table.size(0), V = table.size(1);
  const int64_t k = table.dim() == 3 ? table.size(2) : 1;
  const int64_t *tp = tok.data_ptr<int64_t>(), *dp = dom.data_ptr<int64_t>(), *table_p = tab.data_ptr<int64_t>();
  for (int64_t b = 0; b < dom.numel(); ++b) {
    TORCH_CHECK_VALUE(dp[b] >= 0 && dp[b] < D, "rre_dispatch: domain_ids[", b, "] = ", dp[b],
                      " is out of range [0, num_domains=", D, ")");
  }
  // Slot s = token i * k + j. A token id outside the vocabulary is reported as bad (expert -2) by
  // the lookup itself.
  auto expert_of = [=](int64_t s) -> int64_t {
    const int64_t i = s / k, t = tp[i];
    return (t >= 0 && t < V) ? table_p[(dp[i / S] * V + t) * k + s % k] : -2;
  };
  return scatter_by_expert(x.contiguous(), token_ids.numel() * k, k, num_experts, expert_of, [&](int64_t s) {
    const int64_t i = s / k, t = tp[i];
    TORCH_CHECK_VALUE(t >= 0 && t < V, "rre_dispatch: token_ids[", i / S, ", ", i % S, "] = ", t,
                      " is out of range [0, vocab_size=", V, ")");
    TORCH_CHECK_VALUE(false, "rre_dispatch: table[", dp[i / S], ", ", t, k > 1 ? ", " + std::to_string(s % k) : "",
                      "] = ", table_p[(dp[i / S] * V + t) * k + s % k], " is not an expert id in [0, num_experts=",
                      num_experts, ")");
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("rre_dispatch(Tensor x, Tensor token_ids, Tensor domain_ids, Tensor table, int num_experts)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) { m.impl("rre_dispatch", &rre_dispatch); }

}  // namespace pangu_cpu
