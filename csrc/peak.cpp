// fma_work(flops): the machine's compute limit for the benchmarks' "of limit" columns. Runs `flops`
// floating-point operations as fp32 fused multiply-adds on register-resident vectors (12 independent
// 8-lane chains per thread, enough to cover the FMA latency), split over torch's threads: its time
// is what the same FLOPs cost at this CPU's vector peak, which no kernel beats (a dense matmul can
// be beaten: its operands stream through memory). Returns a checksum so the work is kept.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace pangu_cpu {
namespace {

constexpr int kChains = 12, kLanes = 8;

double fma_work(int64_t flops) {
  TORCH_CHECK_VALUE(flops >= 0, "fma_work: flops must be >= 0");
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = flops / threads / (2 * kChains * kLanes) + 1;  // iterations
  std::vector<double> sums(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float acc[kChains][kLanes];
      for (int c = 0; c < kChains; ++c) {
        for (int l = 0; l < kLanes; ++l) acc[c][l] = 1e-3f * static_cast<float>(c * kLanes + l + t);
      }
      const float scale = 0.999f, shift = 1e-4f;  // a contraction: values stay finite and normal
      for (int64_t i = 0; i < per_thread; ++i) {
        for (int c = 0; c < kChains; ++c) {
          for (int l = 0; l < kLanes; ++l) acc[c][l] = acc[c][l] * scale + shift;
        }
      }
      double sum = 0.0;
      for (int c = 0; c < kChains; ++c) {
        for (int l = 0; l < kLanes; ++l) sum += acc[c][l];
      }
      sums[t] = sum;
    }
  });
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("fma_work(int flops) -> float", &fma_work);
}

}  // namespace pangu_cpu
