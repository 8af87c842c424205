// permute: group the routed rows of x by expert (the fused counting sort of scatter_by_expert.h),
// the expert of slot t*k + j being expert_ids[t, j].
#include <torch/library.h>

#include "scatter_by_expert.h"

namespace pangu_cpu {
namespace {

template <typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_impl(const at::Tensor& x, const at::Tensor& expert_ids,
                                                          int64_t num_experts) {
  const int64_t k = expert_ids.size(1);
  const index_t* ids = expert_ids.data_ptr<index_t>();
  return scatter_by_expert(
      x, expert_ids.numel(), k, num_experts, [ids](int64_t s) { return static_cast<int64_t>(ids[s]); },
      [&](int64_t s) {
        TORCH_CHECK_VALUE(false, "permute: expert_ids[", s / k, ", ", s % k, "] = ", static_cast<int64_t>(ids[s]),
                          " is out of range: expected -1 (dropped) or an expert id in [0, num_experts=",
                          num_experts, ")");
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& expert_ids,
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
