// The bf16 grouped products by VDPBF16PS on broadcast pairs of a's rows against weights in prepack's
// layout ([N / 16][K / 2][32]: each 64-byte line 16 columns x a pair of K, VDPBF16PS's own operand),
// for the CPUs whose bf16 products are VDPBF16PS's (bf16_pair_dots: AMD Zen 4, no AMX): on
// prepacked weights (packed_pairs, pangu_ops.prepack) and on weights as they lie, a few column
// blocks at a time packed into L2 (unpacked_pairs: prefill-sized groups of expert_mlp and
// grouped_gemm, whichever layout, both directions).
#pragma once

#include "amx_grouped.h"
#include "common.h"

namespace pangu_cpu {

#if defined(__AVX512BF16__)
// out[0:R, the 16-column blocks c0 + v * gap (v < CV)] = a[0:R] @ w, w one expert's packed weight
// ([N / 16][K / 2][32]: a 16-column block's pairs of K, each pair of rows interleaved, as prepack
// makes it), P = K / 2: each pair's CV vectors against a's R pairs broadcast, VDPBF16PS into R x CV
// accumulators (Sets of them: the even and odd pairs' apart where Sets is 2, added at the end),
// stored once (rounded to bf16; no horizontal sums). Ahead: each line is also fetched into L2
// kDotsAhead on (packed_pairs says where).
template <int R, int CV, bool Ahead, int Sets>
inline void packed_pairs_pass(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                              const c10::BFloat16* w, int64_t P, int64_t c0, int64_t gap, LineFetch* fetch) {
  __m512 acc[Sets][R][CV];
  for (int h = 0; h < Sets; ++h) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < CV; ++v) acc[h][r][v] = _mm512_setzero_ps();
    }
  }
  const c10::BFloat16* blocks[CV];
  for (int v = 0; v < CV; ++v) blocks[v] = w + (c0 + v * gap) * P * 32;
  const auto pair_step = [&](int64_t p, __m512(&sums)[R][CV]) {
    if (fetch) fetch->step();
    __m512bh wv[CV];
    for (int v = 0; v < CV; ++v) {
      const c10::BFloat16* line = blocks[v] + 32 * p;
      if constexpr (Ahead) _mm_prefetch(reinterpret_cast<const char*>(line) + kDotsAhead, _MM_HINT_T1);
      wv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(line));
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof pair);
      const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int v = 0; v < CV; ++v) sums[r][v] = _mm512_dpbf16_ps(sums[r][v], wv[v], ar);
    }
  };
  int64_t p = 0;
  for (; p + Sets <= P; p += Sets) {
    for (int h = 0; h < Sets; ++h) pair_step(p + h, acc[h]);
  }
  for (; p < P; ++p) pair_step(p, acc[0]);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < CV; ++v) {
      __m512 sum = acc[0][r][v];
      if constexpr (Sets == 2) sum = _mm512_add_ps(sum, acc[1][r][v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 16 * (c0 + v * gap)),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(canonical_nans(sum))));
    }
  }
}

// Passes of at most this many accumulators (R x CV) take two sets of them (packed_pairs_pass): one
// VDPBF16PS chain each kept 1-2-row passes against 2 blocks waiting on its latency where the
// weights come from the L3 (the Zen 5, 2 threads, median of per-round ratios over 10-14
// interleaved rounds: expert_mlp on 8 Qwen3-MoE-shaped prepacked experts in the L3 at 1-2 rows
// 0.83-0.87x the time, from memory 0.91-0.98x; bench --hf's prepacked blocks 0.85-0.97x at 1-4
// tokens). At 3-4 rows (6-8 accumulators) 0.93-1.0x and 1.4-2.0x slower: not taken.
constexpr int kPairsTwoSetsMax = 4;

// out[0:M, the blocks c + v * gap (v < CV)] = a[0:M] @ w (as packed_pairs_pass): the rows in as
// few passes over those blocks as the 32 vector registers hold (R x CV accumulators + CV weight
// vectors; the next passes find the blocks in L2): 5-8 rows in one pass where CV allows it (4
// blocks: 6 rows a pass, then 5; 3 blocks: 7-8; 2 blocks: 5-8), else 4 at a time, then the 1-3
// left.
template <int CV, bool Ahead = true>
inline void pair_rows(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda, int64_t M,
                      const c10::BFloat16* w, int64_t P, int64_t c, int64_t gap, LineFetch* fetch = nullptr) {
  int64_t i = 0;
  const auto pass = [&](auto r) {
    constexpr int R = decltype(r)::value;
    packed_pairs_pass<R, CV, Ahead, R * CV <= kPairsTwoSetsMax ? 2 : 1>(out + i * ldo, ldo, a + i * lda, lda, w, P, c,
                                                                         gap, fetch);
    i += R;
  };
  if constexpr (CV == 4) {
    while (M - i >= 6) pass(std::integral_constant<int, 6>{});
    if (M - i == 5) pass(std::integral_constant<int, 5>{});
  }
  if constexpr (CV == 3 || CV == 2) {
    if (M == 8) pass(std::integral_constant<int, 8>{});
    if (M == 7) pass(std::integral_constant<int, 7>{});
  }
  if constexpr (CV == 2) {
    if (M == 6) pass(std::integral_constant<int, 6>{});
    if (M == 5) pass(std::integral_constant<int, 5>{});
  }
  for (; i + 4 <= M;) pass(std::integral_constant<int, 4>{});
  if (M - i == 3) pass(std::integral_constant<int, 3>{});
  if (M - i == 2) pass(std::integral_constant<int, 2>{});
  if (M - i == 1) pass(std::integral_constant<int, 1>{});
}

// Where packed_pairs fetches lines ahead on a Zen 5 (full_width_512): from this many rows on.
constexpr int64_t kWidePairsAheadRows = 6;
// Up to this many rows packed_pairs takes 2 blocks at a time on a Zen 5 (the rows in one pass).
constexpr int64_t kWideTwoBlockRows = 8;

// out[0:M, blocks [b0, b1) x 16] = a[0:M] @ w (as packed_pairs_pass): CV blocks at a time spread
// over the range (blocks c, c + gap, ...: adjacent blocks lie P * 64 bytes apart, and 4 of them in
// flight ran 1.4x slower from the L3, one thread), the blocks left over one by one, the rows by
// pair_rows: 1-2 rows against 8 blocks (against 4: 0.72-0.9x the time at the op), 3 against 6,
// 7-8 against 3, else 4 blocks, 6 rows at a time, then the 1-5 left (against 4 rows at a time, 2
// threads, 8 experts: 5-8 rows 0.79-0.91x the time, 12 rows 0.85-0.98x, 64-256 0.94-1.0x). One
// thread against the few-row dot kernels on transformers' layout (8 experts from the L3 / from
// memory), at 4 rows a pass: 1 row 0.79x / 0.96x the time, 2 rows 0.76x / 0.86x, 4 rows 0.69x /
// 0.84x, 8 rows 0.73x / 0.73x (2-core Zen 4). Each line fetched ahead (packed_pairs_pass) there.
// On a Zen 5 (full_width_512), as its few-row dot kernels (few_rows_dots, dots_step): 1-2 rows
// against 2 blocks and lines fetched ahead only from kWidePairsAheadRows rows on. Measured on a
// 2-core Zen 5 (expert_mlp on prepacked weights, 2 threads, interleaved, bit-identical): without
// the fetch, every expert at m rows, from memory (8 Mixtral-shaped / 64 Qwen3-MoE-shaped experts)
// 0.92-0.95x the time at m = 3-4, even at 5, 0.99-1.07x at 6, 1.04-1.2x at 7-8; from the L3 (8
// Qwen3-MoE-shaped) 0.82-0.94x at 3-10. bench --hf's blocks (the same 2-core Zen 5, median of
// per-round ratios over 12 interleaved rounds), 2 blocks without the fetch against 8 with it at 1-2
// rows: one token 0.66-0.74x the time (Qwen3-MoE-shaped, cold: 88-91% of a plain read of the same
// bytes, against 59-65%), 0.73-0.85x (Mixtral-shaped, cold), 0.63-0.75x (Mixtral-shaped, fixed
// routing), 0.96-1.07x (Qwen3-MoE-shaped, fixed: its 8 experts in the L3, where 4 or 8 blocks
// without the fetch took 0.80-0.83x: not taken, a decode step's weights come from memory); 4
// tokens 0.73-0.79x, 16 tokens 0.78-0.91x. 3-8 rows against 2 blocks too, in one pass (up to
// kWideTwoBlockRows), against 6 / 4 / 3 blocks at 3 / 4-6 / 7-8 rows (bit-identical; the same
// machine, every expert at m rows, median of per-round ratios over 10 interleaved rounds, the
// read at 50-120 GB/s): from memory, 8 Mixtral-shaped experts 0.78-0.89x the time at m = 3-4,
// 0.97-1.03x at 5-7, 0.89-0.99x at 8; 64 Qwen3-MoE-shaped 0.76-0.95x at 3-8; from the L3 (8
// Qwen3-MoE-shaped) 1.06-1.11x slower at 3-4, 0.90-1.0x at 5-8; bench --hf's prepacked blocks
// at 16 tokens (12 rounds) 0.91x (Mixtral-shaped: 70 -> 82% of a plain read) and 0.93x
// (Qwen3-MoE-shaped: 74 -> 88%). Lines fetched ahead from 6 rows as before (without: 1.22-1.38x
// slower at 8).
inline void packed_pairs(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda, int64_t M,
                         const c10::BFloat16* w, int64_t K, int64_t b0, int64_t b1) {
  const int64_t P = K / 2;
  const bool wide = full_width_512();
  const bool ahead = !wide || M >= kWidePairsAheadRows;
  const auto spread = [&](auto cv) {
    constexpr int CV = decltype(cv)::value;
    const int64_t gap = (b1 - b0) / CV;
    const auto blocks = [&](auto ahead_) {
      constexpr bool A = decltype(ahead_)::value;
      for (int64_t c = b0; c < b0 + gap; ++c) pair_rows<CV, A>(out, ldo, a, lda, M, w, P, c, gap);
      for (int64_t c = b0 + CV * gap; c < b1; ++c) pair_rows<1, A>(out, ldo, a, lda, M, w, P, c, 1);
    };
    if (ahead) return blocks(std::true_type{});
    blocks(std::false_type{});
  };
  if (wide && M <= kWideTwoBlockRows) {
    spread(std::integral_constant<int, 2>{});
  } else if (M <= 2) {
    spread(std::integral_constant<int, 8>{});
  } else if (M == 3) {
    spread(std::integral_constant<int, 6>{});
  } else if (M == 7 || M == 8) {
    spread(std::integral_constant<int, 3>{});
  } else {
    spread(std::integral_constant<int, 4>{});
  }
}

// fn(e, b0, b1) for each expert e with rows and each thread's share [b0, b1) of its N / 16 column
// blocks, as tasks share-major: torch's static split gives each thread its share of every expert,
// whatever the experts' rows.
template <typename Fn>
void for_expert_shares(const std::vector<int64_t>& off, int64_t N, const Fn& fn) {
  std::vector<int64_t> experts;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    if (off[e + 1] > off[e]) experts.push_back(static_cast<int64_t>(e));
  }
  const int64_t shares = at::get_num_threads(), nb = N / 16, n = static_cast<int64_t>(experts.size());
  at::parallel_for(0, n * shares, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = experts[t % n], s = t / n;
      fn(e, nb * s / shares, nb * (s + 1) / shares);
    }
  });
}

// grouped_amx's work without AMX, where bf16_pair_dots() holds: each group's rows of a against its
// expert's packed weight (expert e at w + e * wstride), by for_expert_shares.
inline void grouped_packed_pairs(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                                 const std::vector<int64_t>& off, const c10::BFloat16* w, int64_t wstride, int64_t K,
                                 int64_t N) {
  for_expert_shares(off, N, [&](int64_t e, int64_t b0, int64_t b1) {
    packed_pairs(out + off[e] * ldo, ldo, a + off[e] * lda, lda, off[e + 1] - off[e], w + e * wstride, K, b0, b1);
  });
}

// The 16-column blocks [c, c + n) of b (b[k][j] at k * sb0 + j * sb1, one of the strides 1, K a
// multiple of 32) into buf ([n][K / 2][32], line-aligned) as prepack lays them out: b's columns as
// rows of the weight (sb0 == 1: transformers' forward, pangu_ops' input gradient) 16 at a time by a
// word transpose per 32 of K (pack_rows), else each pair of b's rows' 16 columns interleaved.
inline void pack_pair_blocks(c10::BFloat16* buf, const c10::BFloat16* b, int64_t sb0, int64_t sb1, int64_t K,
                             int64_t c, int64_t n) {
  if (sb0 == 1) return pack_rows(buf, b + 16 * c * sb1, sb1, 16 * n, K, true);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t P = K / 2;
  for (int64_t p = 0; p < P; ++p) {
    const c10::BFloat16 *r0 = b + 2 * p * sb0 + 16 * c, *r1 = r0 + sb0;
    for (int64_t j = 0; j < n; ++j) {
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 16 * j))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 16 * j)), 1);
      _mm512_store_si512(buf + j * P * 32 + p * 32, _mm512_permutexvar_epi16(pairs, v));
    }
  }
}

// out[0:M, blocks [b0, b1) x 16] = a[0:M] @ b for a weight as it lies (strides sb0 / sb1, as
// pack_pair_blocks takes it): kUnpackedBlocks adjacent blocks at a time packed into a thread's
// buffer (L2-resident: each of b's lines read once, whole), then all M rows against them
// (pair_rows), as on prepacked weights. Against oneDNN per expert (2-core Zen 4, 2 threads,
// interleaved; expert_mlp, both layouts): Qwen3-MoE-shaped 128-2048 tokens 0.71-0.90x the time,
// Mixtral-shaped 64-2048 0.54-0.89x (prepacked: 0.65-1.0x this one's time); groups of 512 rows
// (the default bench's grouped_gemm) 0.98-1.02x.
constexpr int64_t kUnpackedBlocks = 4;
inline void unpacked_pairs(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda, int64_t M,
                           const c10::BFloat16* b, int64_t sb0, int64_t sb1, int64_t K, int64_t b0, int64_t b1) {
  thread_local std::vector<c10::BFloat16> storage;
  c10::BFloat16* buf = line_aligned(storage, kUnpackedBlocks * 16 * K);
  const int64_t P = K / 2, passes = std::max<int64_t>(1, M / 6);
  // the lines of blocks [c, c + n): 16 n rows of K (sb0 == 1), else K rows of 16 n columns
  const auto lines = [&](int64_t c, int64_t n) {
    const auto* base = reinterpret_cast<const char*>(b + 16 * c * (sb0 == 1 ? sb1 : 1));
    const int64_t rows = sb0 == 1 ? 16 * n : K, per_row = (sb0 == 1 ? K : 16 * n) * 2 / 64;
    const int64_t total = rows * per_row;
    return LineFetch{base, 2 * (sb0 == 1 ? sb1 : sb0), per_row, total, (total + P * passes - 1) / (P * passes)};
  };
  int64_t c = b0;
  if (c + kUnpackedBlocks <= b1) pack_pair_blocks(buf, b, sb0, sb1, K, c, kUnpackedBlocks);
  for (; c + kUnpackedBlocks <= b1; c += kUnpackedBlocks) {
    // the next blocks' lines fetched into L2 meanwhile (without: 1.1-1.45x the time at 64-256 tokens)
    const int64_t next = std::min(kUnpackedBlocks, b1 - c - kUnpackedBlocks);
    LineFetch fetch = next > 0 ? lines(c + kUnpackedBlocks, next) : LineFetch{};
    pair_rows<kUnpackedBlocks>(out + 16 * c, ldo, a, lda, M, buf, P, 0, 1, &fetch);
    if (next == kUnpackedBlocks) pack_pair_blocks(buf, b, sb0, sb1, K, c + kUnpackedBlocks, kUnpackedBlocks);
  }
  if (c < b1) {
    pack_pair_blocks(buf, b, sb0, sb1, K, c, b1 - c);
    for (int64_t j = 0; j < b1 - c; ++j) pair_rows<1>(out + 16 * c, ldo, a, lda, M, buf, P, j, 1);
  }
}

// Whether grouped_unpacked_pairs takes out = a_e @ b_e: its operands fit (grouped_operands_fit), on
// a CPU whose bf16 products are VDPBF16PS's (bf16_pair_dots: a Zen 4).
inline bool grouped_pairs_applies(at::ScalarType t, int64_t sa1, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  return grouped_operands_fit(t, sa1, sb0, sb1, K, N) && bf16_pair_dots();
}

// grouped_amx's work on a weight as it lies (w[e] as [K, N] at w + e * sbe, strides sb0 / sb1),
// where grouped_pairs_applies: each group's rows of a against its expert's weight by
// unpacked_pairs, tasks by for_expert_shares.
inline void grouped_unpacked_pairs(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                                   const std::vector<int64_t>& off, const c10::BFloat16* w, int64_t sbe, int64_t sb0,
                                   int64_t sb1, int64_t K, int64_t N) {
  for_expert_shares(off, N, [&](int64_t e, int64_t b0, int64_t b1) {
    unpacked_pairs(out + off[e] * ldo, ldo, a + off[e] * lda, lda, off[e + 1] - off[e], w + e * sbe, sb0, sb1, K, b0,
                   b1);
  });
}
#else
inline bool grouped_pairs_applies(at::ScalarType, int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
inline void grouped_unpacked_pairs(c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, const std::vector<int64_t>&,
                                   const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "grouped_unpacked_pairs: built without AVX512-BF16");
}
#endif

// The grouped bf16 kernels of prefill-sized groups (expert_mlp's and grouped_gemm's): where they
// take out = a_e @ b_e here, and the product, AMX tiles where the CPU has them, else VDPBF16PS on
// blocks packed per call (w[e] as [K, N] with strides s).
inline bool grouped_bf16_applies(at::ScalarType t, int64_t sa1, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  return grouped_amx_applies(t, sa1, sb0, sb1, K, N) || grouped_pairs_applies(t, sa1, sb0, sb1, K, N);
}
inline void grouped_bf16(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                         const std::vector<int64_t>& off, const at::Tensor& w, const std::array<int64_t, 2>& s,
                         int64_t K, int64_t N) {
  if (grouped_amx_applies(at::kBFloat16, 1, s[0], s[1], K, N)) return grouped_amx(out, ldo, a, lda, off, w, s, K, N);
  grouped_unpacked_pairs(out, ldo, a, lda, off, w.data_ptr<c10::BFloat16>(), w.stride(0), s[0], s[1], K, N);
}

}  // namespace pangu_cpu
