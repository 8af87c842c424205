// adamw_experts: the fused host optimizer step of ECSS (pangu_ops.ecss). For each listed expert
// (a row of every state tensor), in one pass over its elements: decoupled weight decay, the Adam
// moments, bias correction by the expert's own step count ("lazy" Adam: an expert that got no
// gradient is not listed and not touched), the fp32 master update, and its compute-dtype copy.
// torch.optim.AdamW's arithmetic (non-amsgrad): p *= 1 - lr*wd; m = b1 m + (1-b1) g;
// v = b2 v + (1-b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "common.h"

namespace pangu_cpu {
namespace {

template <bool kWriteOut, typename grad_t, typename out_t>
void adamw_row(float* __restrict p, float* __restrict m, float* __restrict v, const grad_t* __restrict g,
               out_t* __restrict out, int64_t n, float decay, float b1, float b2, float step_size,
               float inv_bc2_sqrt, float eps) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load_float(g, i);
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    const float pi = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_bc2_sqrt + eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if constexpr (kWriteOut) store_float(out, i, pi);
  }
}

void adamw_experts(at::Tensor master, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor steps,
                   const at::Tensor& grads, const at::Tensor& expert_ids, const std::optional<at::Tensor>& compute,
                   double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK_VALUE(master.dim() == 2 && master.scalar_type() == at::kFloat && master.is_contiguous(),
                    "adamw_experts: master must be a contiguous fp32 [E, n]");
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK_VALUE(t->sizes() == master.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                      "adamw_experts: exp_avg / exp_avg_sq must be contiguous fp32 like master");
  }
  const int64_t E = master.size(0), n = master.size(1), S = expert_ids.numel();
  TORCH_CHECK_VALUE(steps.dim() == 1 && steps.size(0) == E && steps.scalar_type() == at::kLong,
                    "adamw_experts: steps must be int64 [E]");
  TORCH_CHECK_VALUE(grads.dim() == 2 && grads.size(0) == S && grads.size(1) == n && grads.is_contiguous(),
                    "adamw_experts: grads must be contiguous [len(expert_ids), n]");
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == at::kLong, "adamw_experts: expert_ids must be int64");
  const auto floats = {at::kFloat, at::kBFloat16, at::kHalf};
  TORCH_CHECK_TYPE(std::count(floats.begin(), floats.end(), grads.scalar_type()),
                   "adamw_experts: grads must be fp32, bf16 or fp16");
  if (compute.has_value()) {
    TORCH_CHECK_VALUE(compute->sizes() == master.sizes() && compute->is_contiguous(),
                      "adamw_experts: compute must be contiguous [E, n]");
    TORCH_CHECK_TYPE(std::count(floats.begin(), floats.end(), compute->scalar_type()),
                     "adamw_experts: compute must be fp32, bf16 or fp16");
  }
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* step = steps.data_ptr<int64_t>();
  // validate everything before touching anything: nothing half updated after an error
  std::vector<char> seen(E, 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(id[s] >= 0 && id[s] < E, "adamw_experts: expert_ids[", s, "] = ", id[s],
                      " is out of range [0, ", E, ")");
    TORCH_CHECK_VALUE(!seen[id[s]], "adamw_experts: expert ", id[s], " is listed twice");
    seen[id[s]] = 1;
  }
  // per listed expert: its step count and bias corrections
  std::vector<float> step_size(S), inv_bc2_sqrt(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = ++step[id[s]];
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
    step_size[s] = static_cast<float>(lr / bc1);
    inv_bc2_sqrt[s] = static_cast<float>(1.0 / std::sqrt(bc2));
  }
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  constexpr int64_t kChunk = 16384;  // elements per task: 192 KiB of fp32 state
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  float* P = master.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), eps_f = static_cast<float>(eps);
  auto with_grads = [&](auto* G) {
    auto run = [&](auto* out_base) {
      at::parallel_for(0, S * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t s = t / chunks, c0 = (t % chunks) * kChunk, len = std::min(kChunk, n - c0);
          const int64_t row = id[s] * n + c0;
          const auto out = out_base != nullptr ? out_base + row : nullptr;
          auto update = [&](auto write_out) {
            adamw_row<decltype(write_out)::value>(P + row, M + row, V + row, G + s * n + c0, out, len, decay, b1, b2,
                                                  step_size[s], inv_bc2_sqrt[s], eps_f);
          };
          if (out != nullptr) {
            update(std::true_type{});
          } else {
            update(std::false_type{});
          }
        }
      });
    };
    if (!compute.has_value()) {
      run(static_cast<float*>(nullptr));
    } else if (compute->scalar_type() == at::kFloat) {
      run(compute->data_ptr<float>());
    } else if (compute->scalar_type() == at::kBFloat16) {
      run(compute->data_ptr<c10::BFloat16>());
    } else {
      run(compute->data_ptr<c10::Half>());
    }
  };
  if (grads.scalar_type() == at::kFloat) {
    with_grads(grads.data_ptr<float>());
  } else if (grads.scalar_type() == at::kBFloat16) {
    with_grads(grads.data_ptr<c10::BFloat16>());
  } else {
    with_grads(grads.data_ptr<c10::Half>());
  }
}

// The memory traffic of an all-experts adamw_experts pass (master, m, v read and written, a bf16
// gradient read, a bf16 copy written) with one multiply-add per value in place of AdamW's arithmetic:
// the bandwidth limit of that access pattern on this machine, for `pangu-ops bench --ecss` (a plain
// copy is no limit for it: read-modify-write streams run faster than copies here).
void adamw_traffic(at::Tensor master, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grads,
                   at::Tensor compute) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&master, &exp_avg, &exp_avg_sq, &grads, &compute}) {
    TORCH_CHECK_VALUE(t->is_contiguous() && t->numel() == master.numel(), "adamw_traffic: contiguous, same sizes");
  }
  TORCH_CHECK_TYPE(master.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
                       exp_avg_sq.scalar_type() == at::kFloat && grads.scalar_type() == at::kBFloat16 &&
                       compute.scalar_type() == at::kBFloat16,
                   "adamw_traffic: fp32 master / exp_avg / exp_avg_sq, bf16 grads and compute");
  float* P = master.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  const c10::BFloat16* G = grads.data_ptr<c10::BFloat16>();
  c10::BFloat16* C = compute.data_ptr<c10::BFloat16>();
  at::parallel_for(0, master.numel(), 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float g = load_float(G, i);
      M[i] = 0.5f * M[i] + g;
      V[i] = 0.5f * V[i] + g;
      P[i] = 0.5f * P[i] + g;
      store_float(C, i, P[i]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("adamw_traffic(Tensor(a!) master, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grads,"
        " Tensor(d!) compute) -> ()");
  m.def("adamw_experts(Tensor(a!) master, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) steps, Tensor grads,"
        " Tensor expert_ids, Tensor(e!)? compute, float lr, float beta1, float beta2, float eps,"
        " float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("adamw_experts", &adamw_experts);
  m.impl("adamw_traffic", &adamw_traffic);
}

}  // namespace pangu_cpu
