// Register-resident chains of one vector instruction, nothing loaded: the compute limits of the
// benchmarks (peak.cpp) and the probe that picks the few-row bf16 dot kernel (bf16_pair_dots).
// Each returns a checksum of its accumulators so the work is kept.
#pragma once

#include "common.h"

namespace pangu_cpu {

constexpr int kChains = 12;  // independent accumulators: enough to cover the latency
#if defined(__AVX512F__)
using Chain = f32x16;
#else
using Chain = f32x8;
#endif
constexpr int kLanes = sizeof(Chain) / sizeof(float);

// steps x kChains fp32 FMAs of the widest vector (peak.cpp's fma_work says why that width) or of V;
// `seed` varies the values.
template <typename V = Chain>
inline double fma_chains(int64_t seed, int64_t steps) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) {
    for (int l = 0; l < kLanes; ++l) acc[c][l] = 1e-3f * static_cast<float>(c * kLanes + l + seed);
  }
  const float scale = 0.999f, shift = 1e-4f;  // a contraction: values stay finite and normal
  for (int64_t i = 0; i < steps; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * scale + shift;
  }
  double sum = 0.0;
  for (int c = 0; c < kChains; ++c) {
    for (int l = 0; l < kLanes; ++l) sum += acc[c][l];
  }
  return sum;
}

#if defined(__AVX512BF16__)
// steps x kChains VDPBF16PS (16 fp32 lanes, each adding two bf16 products: 64 FLOPs): products of
// 2^-10 x 2^-10 (seed + 1) added to lanes starting at 1 + chain, so they stay finite and normal
// (and exact at the step counts the tests use).
inline double bf16_pair_chains(int64_t seed, int64_t steps) {
  const auto splat = [](float v) {
    return reinterpret_cast<__m512bh>(_mm512_set1_epi16(static_cast<int16_t>(c10::BFloat16(v).x)));
  };
  const __m512bh a = splat(0x1p-10f), b = splat(0x1p-10f * static_cast<float>(seed + 1));
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + c);
  for (int64_t i = 0; i < steps; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  double sum = 0.0;
  for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_ps(acc[c]);
  return sum;
}
#endif

}  // namespace pangu_cpu
