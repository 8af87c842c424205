// Grouped products on AMX-BF16 tiles for prefill-sized groups: out rows [off[e], off[e+1]) =
// a_e @ b_e, every group in one pool of tasks (a chunk of up to 512 of a group's rows, a chunk of
// b's columns) taken by the threads from a shared counter in units that share a packed operand; no
// kernel generation per row count (a new routing costs what a seen one does).
//
// Each task packs its operands once into tile order in thread-local buffers that stay in L2: its
// rows of a (<= 1 MiB) and, for a row-major b, its column chunk of b (<= 1.5 MiB; or the tiles
// packed once per weight version, packed_weights.cpp, of either layout of b); then every 32 x 32 output block runs the
// whole inner dimension on four accumulator tiles (two A and two B tiles a step, each loaded tile
// used twice) and is written once, rounded, with non-temporal stores. Two layouts of b_e, by which
// one an A tile can be read from as it lies:
//  - b_e's columns contiguous (b_e = w[e]^T of an [N, K] weight, sb0 == 1: transformers' layout,
//    and the input gradient of a row-major weight): out^T = b_e^T @ a_e^T, 16 weight rows x 32 of K
//    are an A tile read in place, a's rows packed into VNNI pairs (a 16 x 16 transpose of 32-bit
//    words per 16 rows x 32 of K), the 32 x 32 transposed output block turned back on store;
//  - b_e row-major ([K, N], sb1 == 1): out = a_e @ b_e, a's rows copied into 16 x 32 tiles, b's
//    pairs of rows interleaved into VNNI tiles (one permute per 32 columns); K > 2048 in blocks of
//    1024 with fp32 sums between them.
// Measured on a 2-core Xeon (AMX-BF16, 2 MiB L2 a core), bf16, 2 threads, interleaved, TFLOP/s: a
// Qwen3-MoE-shaped gate / up product (64 groups x ~256 rows, K 1024, N 768) 2.2-2.5 transposed,
// 1.9-2.1 row-major (2.6 with its tiles cached) against 0.8-2.0 for oneDNN per group and 3.5-3.7
// for the dense matmul of the same FLOPs; a Mixtral-shaped down product (8 x 512 rows, K 3584,
// N 1024) 2.5-2.95 / 1.75-1.95 against 1.8-2.1 and 3.1-3.3. The tile instruction's own peak
// (TDPBF16PS on registers, `amx_work`) is 3.3 a core here; this loop with its operands in L2
// reached 3.8-4.7 on the two cores. What bounds the kernels is the weights' pass from memory per
// call: the same products with one weight shared by every group (cache-resident) ran 0.84-0.93x
// the time. Packing between the tile blocks and prefetching a whole next block at once did not
// overlap it (the packed operands and the prefetched lines share the L2); fetching the next
// block's weight lines a few per tile step does, in part (`LineFetch`). Gates computed in the
// product's epilogue (gate / up columns paired in a block, h made from the rounded sums) ran
// 1.15-1.5x the time of the product plus a separate pass, forward and backward alike: the vector
// work between the tile blocks stalls the tiles.
#pragma once

#include <atomic>

#include "common.h"

namespace pangu_cpu {

// Whether a grouped product is prefill-sized: some group has more rows than a decode step's
// kernels take (kFewRows); then grouped_amx takes every group, where it applies.
inline bool prefill_sized(const std::vector<int64_t>& off) {
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    if (off[e + 1] - off[e] > kFewRows) return true;
  }
  return false;
}

// Whether the grouped bf16 kernels take out = a_e @ b_e by its operands (b_e[k][n] at sb0 / sb1
// apart, a's elements sa1 apart in a row): bf16, K and N multiples of 32, a's rows contiguous, b_e
// with one unit stride (the CPU's part: grouped_amx_applies, grouped_pairs_applies).
inline bool grouped_operands_fit(at::ScalarType t, int64_t sa1, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  return t == at::kBFloat16 && K % 32 == 0 && N % 32 == 0 && K > 0 && N > 0 && sa1 == 1 && (sb0 == 1 || sb1 == 1);
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)

constexpr int64_t kChunkBytes = 1 << 20;         // a task's rows of a, in tile order (L2-resident)
constexpr int64_t kWeightChunkBytes = 3 << 19;   // a task's columns of b (1.5 MiB)

// 32 bf16 to out (a whole 64-byte line: non-temporal where `stream`, i.e. out is line-aligned).
inline void store_line(c10::BFloat16* out, __m512i v, bool stream) {
  if (stream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out), v);
  } else {
    _mm512_storeu_si512(out, v);
  }
}

// out[t][0:32] (rows ldo apart, t < rows) = bf16(c[n][t]) for c [32 n][32 t] (rows 32 apart): two
// rows of c converted and interleaved into 32-bit pairs (vpermw), 16 of them turned by a transpose.
inline void store_transposed(const float* c, c10::BFloat16* out, int64_t ldo, int64_t rows, bool stream) {
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t h = 0; h * 16 < rows; ++h) {
    __m512i r[16];
    for (int p = 0; p < 16; ++p) {
      const __m512 lo = _mm512_loadu_ps(c + 2 * p * 32 + h * 16), hi = _mm512_loadu_ps(c + (2 * p + 1) * 32 + h * 16);
      r[p] = _mm512_permutexvar_epi16(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
    transpose16x16_words(r);
    for (int64_t t = 0; t < std::min<int64_t>(16, rows - h * 16); ++t) store_line(out + (h * 16 + t) * ldo, r[t], stream);
  }
}

// out[t][0:32] = bf16(c[t][0:32]) for t < rows (c's rows ldc apart).
inline void store_rows(const float* c, int64_t ldc, c10::BFloat16* out, int64_t ldo, int64_t rows, bool stream) {
  for (int64_t t = 0; t < rows; ++t) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(c + t * ldc + 16), _mm512_loadu_ps(c + t * ldc));
    store_line(out + t * ldo, reinterpret_cast<__m512i>(v), stream);
  }
}

// Tiles 0-3 accumulate a 32 x 32 block of c (rows ldc apart; from zeros, or from c's values with
// `add`), and c gets the sums: K / 32 steps of two A tiles (a0, a0 + sa: 16 rows each, rows
// `lda_bytes` apart, step ka elements) and two B tiles (b0, b0 + sb: 64-byte rows, step kb).
// `rows_a` / `rows_b`: 16 where only the first A / B tile holds rows (the other one is then not
// read and its sums are not meaningful), else 32. `fetch`: lines to bring into L2 meanwhile, a few
// a step (or none; LineFetch).
inline void amx_block(float* c, int64_t ldc, bool add, const c10::BFloat16* a0, int64_t sa, int64_t lda_bytes,
                      int64_t ka, const c10::BFloat16* b0, int64_t sb, int64_t kb, int64_t steps, int rows_a,
                      int rows_b, LineFetch* fetch = nullptr) {
  const int64_t ldc_bytes = ldc * static_cast<int64_t>(sizeof(float));
  if (add) {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c + 16, ldc_bytes);
    _tile_loadd(2, c + 16 * ldc, ldc_bytes);
    _tile_loadd(3, c + 16 * ldc + 16, ldc_bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  if (rows_a == 32 && rows_b == 32) {
    for (int64_t s = 0; s < steps; ++s) {
      if (fetch) fetch->step();
      _tile_loadd(4, a0 + s * ka, lda_bytes);
      _tile_loadd(5, a0 + sa + s * ka, lda_bytes);
      _tile_loadd(6, b0 + s * kb, 64);
      _tile_loadd(7, b0 + sb + s * kb, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else if (rows_a == 32) {
    for (int64_t s = 0; s < steps; ++s) {
      if (fetch) fetch->step();
      _tile_loadd(4, a0 + s * ka, lda_bytes);
      _tile_loadd(5, a0 + sa + s * ka, lda_bytes);
      _tile_loadd(6, b0 + s * kb, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
    }
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      if (fetch) fetch->step();
      _tile_loadd(4, a0 + s * ka, lda_bytes);
      _tile_loadd(6, b0 + s * kb, 64);
      _tile_loadd(7, b0 + sb + s * kb, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c + 16, ldc_bytes);
  _tile_stored(2, c + 16 * ldc, ldc_bytes);
  _tile_stored(3, c + 16 * ldc + 16, ldc_bytes);
}

// Whether grouped_amx takes out = a_e @ b_e: its operands fit (grouped_operands_fit), with AMX.
inline bool grouped_amx_applies(at::ScalarType t, int64_t sa1, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  return grouped_operands_fit(t, sa1, sb0, sb1, K, N) && amx_ready();
}

// Columns [n0, n0 + nc) of the first K rows of a row-major b (rows sb0 apart; rows from `rows` on
// read as zeros) into B tiles: per 16 columns, [K / 2 pairs][16 columns x 2] (rows 2p and 2p + 1
// interleaved), walking b's rows in order.
inline const __m512i& interleave_words() {  // words 0-15 of x0 and of x1, alternating
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                             37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return lo;
}
inline void pack_columns(c10::BFloat16* dst, const c10::BFloat16* b, int64_t sb0, int64_t n0, int64_t nc, int64_t K,
                         int64_t rows) {
  const __m512i lo = interleave_words(), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < K / 2; ++p) {
    const c10::BFloat16 *r0 = b + 2 * p * sb0 + n0, *r1 = r0 + sb0;
    const bool v0 = 2 * p < rows, v1 = 2 * p + 1 < rows;
    for (int64_t j = 0; j < nc; j += 32) {
      const __m512i x0 = v0 ? _mm512_loadu_si512(r0 + j) : _mm512_setzero_si512();
      const __m512i x1 = v1 ? _mm512_loadu_si512(r1 + j) : _mm512_setzero_si512();
      _mm512_store_si512(dst + (j / 16) * K * 16 + p * 32, _mm512_permutex2var_epi16(x0, lo, x1));
      _mm512_store_si512(dst + (j / 16 + 1) * K * 16 + p * 32, _mm512_permutex2var_epi16(x0, hi, x1));
    }
  }
}

// Columns [c0, c0 + cn) of m rows of a (rows lda apart) as A tiles of a^T: per 16 columns,
// [M / 32 steps][16 columns][32 rows] (M: m rounded up to 32, rows past m zeros). Two rows' 16
// columns interleaved into 32-bit pairs, 16 such pairs of rows turned by a word transpose.
inline void pack_transposed(c10::BFloat16* dst, const c10::BFloat16* a, int64_t lda, int64_t m, int64_t c0,
                            int64_t cn) {
  const int64_t steps = (m + 31) / 32;
  const __m512i lo = interleave_words();
  for (int64_t cb = 0; cb < cn; cb += 16) {
    for (int64_t s = 0; s < steps; ++s) {
      __m512i r[16];
      for (int q = 0; q < 16; ++q) {
        const int64_t t = s * 32 + 2 * q;
        const __m512i x0 = t < m ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + t * lda + c0 + cb)))
                                 : _mm512_setzero_si512();
        const __m512i x1 = t + 1 < m ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + (t + 1) * lda + c0 + cb)))
                                     : _mm512_setzero_si512();
        r[q] = _mm512_permutex2var_epi16(x0, lo, x1);
      }
      transpose16x16_words(r);
      for (int f = 0; f < 16; ++f) _mm512_store_si512(dst + ((cb / 16) * steps + s) * 512 + f * 32, r[f]);
    }
  }
}

// out[t][0:nc] (rows ldo apart) = a[t] @ b for t < M (a's rows lda apart) with b's columns as
// packed tiles (16-column blocks K * 16 apart, each [K / 2 pairs][16 columns x 2]): a decode step's
// rows against prepacked weights, by VDPBF16PS on 16 columns at a time, Q blocks of them in
// lockstep (Q streams from memory), no tile work for one or two rows.
template <int M, int Q>
inline int64_t packed_dots(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                           int64_t K, int64_t blocks, int64_t c) {
  for (; c + Q <= blocks; c += Q) {
    __m512 acc[M][Q];
    for (int t = 0; t < M; ++t) {
      for (int q = 0; q < Q; ++q) acc[t][q] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < K / 2; ++p) {
      __m512bh x[M];
      for (int t = 0; t < M; ++t) {
        int32_t pair;
        std::memcpy(&pair, a + t * lda + 2 * p, sizeof pair);
        x[t] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      }
      for (int q = 0; q < Q; ++q) {
        const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + (c + q) * K * 16 + p * 32));
        for (int t = 0; t < M; ++t) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], w, x[t]);
      }
    }
    for (int t = 0; t < M; ++t) {
      for (int q = 0; q < Q; ++q) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * ldo + (c + q) * 16),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[t][q])));
      }
    }
  }
  return c;
}

template <int M>
inline void packed_rows(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                        int64_t K, int64_t nc) {
  const int64_t blocks = nc / 16;  // even: nc is a multiple of 32
  packed_dots<M, 2>(out, ldo, a, lda, b, K, blocks, packed_dots<M, 4>(out, ldo, a, lda, b, K, blocks, 0));
}

// Rows of a group that packed_rows takes (fewer than a tile's worth of work per weight byte).
constexpr int64_t kPackedDotRows = 2;

// A unit of grouped work: group e, the chunk whose packed operand its tasks share (its first row or
// column, and its extent where the caller needs one), and a run [first, last) of the other
// dimension's chunks.
struct Unit {
  int64_t e, shared, extent, first, last;
};

// The units of runs(push), which calls push(e, shared, extent, chunks) once per shared chunk: each
// run of chunks split into up to `split` parts, split doubled until there are 4 units a thread or
// every run is split into single chunks.
template <typename Runs>
std::vector<Unit> split_units(int64_t threads, const Runs& runs) {
  std::vector<Unit> units;
  for (int64_t split = 1;; split *= 2) {
    units.clear();
    bool whole = true;
    runs([&](int64_t e, int64_t shared, int64_t extent, int64_t chunks) {
      const int64_t parts = std::min(split, chunks);
      whole = whole && parts == chunks;
      for (int64_t q = 0; q < parts; ++q) units.push_back({e, shared, extent, chunks * q / parts, chunks * (q + 1) / parts});
    });
    if (static_cast<int64_t>(units.size()) >= 4 * threads || whole) return units;
  }
}

// out [S, N] (rows ldo apart) = per group e, a rows [off[e], off[e+1]) ([S, K], rows lda apart) @
// b_e, b_e[k][n] = b[e * sbe + k * sb0 + n * sb1]; grouped_amx_applies must hold.
// The work goes out in units that share a packed operand: for the transposed product a chunk of a
// group's rows and a run of column chunks (the rows packed once), for a row-major b a column chunk
// and a run of row chunks (the columns packed once; rows are copied per task); runs are split
// until there are 4 units a thread.
// `packed`: b's tiles for every group already (packed_weight: then the row-major product whatever
// b's layout), else packed per task.
inline void grouped_amx(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                        const std::vector<int64_t>& off, const c10::BFloat16* b, int64_t sbe, int64_t sb0, int64_t sb1,
                        int64_t K, int64_t N, const c10::BFloat16* packed = nullptr) {
  const bool trans = sb0 == 1 && !packed;  // b_e's columns contiguous: the transposed product
  const int64_t E = static_cast<int64_t>(off.size()) - 1, steps = K / 32, threads = at::get_num_threads();
  // A row-major b with K > 2048 runs K in blocks of 1024 (sums kept in fp32 between them): a task's
  // rows of a in L2 across all of K would be too few (a Mixtral-shaped dX, K 7168: 64 rows, copied
  // once per column chunk, 8 times in all); its columns are then all of b's, one unit per group.
  const bool blocked = !trans && K > 2048;
  const int64_t k_block = blocked ? 1024 : K;
  const int64_t rows_chunk = std::clamp<int64_t>(kChunkBytes / (2 * k_block) / 32 * 32, 32, 512);
  // column chunks of <= kWeightChunkBytes of b; a row-major b's groups of a decode step's rows on
  // packed tiles (packed_rows) split their columns so even where K is blocked (no fp32 sums there:
  // one unit for a group's whole weight kept a thread busy alone, 1.6-2x a Mixtral-shaped 2-token
  // step's time)
  const int64_t weight_chunks = std::max<int64_t>(1, (N * K * 2 + kWeightChunkBytes - 1) / kWeightChunkBytes);
  const int64_t col_chunks = blocked ? 1 : weight_chunks;
  const auto width = [N](int64_t chunks) { return ((N + chunks - 1) / chunks + 31) / 32 * 32; };
  const int64_t cols_chunk = width(col_chunks), dot_cols = width(weight_chunks);
  // a group's rows in chunks of equal size (multiples of 16, <= rows_chunk) rather than full ones
  // and a short rest (527 rows as 512 + 15): the transposed product 4-6% faster for 513-1100 rows
  // a group (16 groups, K 1024, N 512, paired in one process), the row-major one unchanged
  const auto group_chunk = [rows_chunk](int64_t m) {
    const int64_t chunks = (m + rows_chunk - 1) / rows_chunk;
    return chunks <= 1 ? rows_chunk : ((m + chunks - 1) / chunks + 15) / 16 * 16;
  };
  const std::vector<Unit> units = split_units(threads, [&](const auto& push) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t m = off[e + 1] - off[e], row_chunks = (m + rows_chunk - 1) / rows_chunk;
      if (row_chunks == 0) continue;
      const bool dots = !trans && packed && off[e + 1] - off[e] <= kPackedDotRows;
      const int64_t chunks = dots ? weight_chunks : col_chunks, cols = dots ? dot_cols : cols_chunk;
      const int64_t outer = trans ? row_chunks : chunks, inner = trans ? chunks : row_chunks;
      for (int64_t o = 0; o < outer; ++o) {  // (row-major: extent = the unit's columns)
        push(e, trans ? off[e] + o * group_chunk(m) : o * cols, trans ? 0 : std::min(cols, N - o * cols), inner);
      }
    }
  });
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0 && ldo % 32 == 0;
  const int64_t count = static_cast<int64_t>(units.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    load_tile_config();
    // a task's rows of a in tile order, row-major b's columns, the fp32 sums between K blocks
    thread_local std::vector<c10::BFloat16> rows_buf, cols_buf;
    thread_local std::vector<float> acc_buf;
    // (the sums' rows a whole number of lines apart but not a multiple of 4 KiB: 1024 columns of
    // fp32 put every row of a 16-row tile in one L1 set, 7% slower, measured)
    const int64_t ldacc = unaliased_stride(cols_chunk);
    float* acc = blocked ? line_aligned(acc_buf, rows_chunk * ldacc) : nullptr;
    // a row-major b's columns packed per task (all of K), or per 32 of them and K block (`slice`)
    thread_local std::vector<c10::BFloat16> slice_buf;
    c10::BFloat16 *ra = line_aligned(rows_buf, rows_chunk * k_block), *own = nullptr,
                  *slice = blocked && !packed ? line_aligned(slice_buf, 32 * k_block) : nullptr;
    alignas(64) float c[32 * 32];
    // The weight lines of the 32-column block after column n0 + j of b_e (columns contiguous: its
    // next 32 rows as they lie; row-major: the block's two columns of packed tiles), fetched into L2
    // a few a step over the `slots` steps of the current block's products: their first products
    // read the current block's weight from memory (32 rows at once, 2 KiB apart), a stall the
    // hardware prefetcher left (Qwen3-MoE- / Mixtral-shaped products 0.87-0.95x the time, paired).
    // None with K > 2048 (long rows the hardware prefetcher follows: 1.01-1.07x slower), for tiles
    // packed per task (in L2 already), or past the unit's columns.
    const auto next_block = [&](const c10::BFloat16* be, const c10::BFloat16* cb, int64_t n0, int64_t j, int64_t nc,
                                int64_t slots) {
      LineFetch f;
      if (K > 2048 || j + 32 >= nc || (!trans && !packed)) return f;
      if (trans) {
        f.base = reinterpret_cast<const char*>(be + (n0 + j + 32) * sb1);
        f.row_bytes = sb1 * 2;
        f.lines_per_row = K / 32;
        f.total = 32 * f.lines_per_row;
      } else {
        f.base = reinterpret_cast<const char*>(cb + (j + 32) / 16 * K * 16);
        f.lines_per_row = f.total = K;  // two tile columns of K x 16 words
      }
      f.per_step = std::min<int64_t>(8, (f.total + slots - 1) / slots);
      return f;
    };
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      const Unit u = units[i];
      const c10::BFloat16* be = b + u.e * sbe;
      const int64_t chunk = group_chunk(off[u.e + 1] - off[u.e]);
      if (trans) {
        pack_rows(ra, a + u.shared * lda, lda, std::min(chunk, off[u.e + 1] - u.shared), K, true);
      }
      // With K blocked and new weights, a unit of one row chunk packs b's 32 columns of a K block
      // just before their tiles run (64 KiB, in L1 / L2) instead of all its columns at once (K x N,
      // out of L2: written to memory and read back): Mixtral-shaped dX (K 7168) and K 4096 with a
      // new weight version every call 15-23% faster (paired in one process); with two or more row
      // chunks the columns would be packed once each, which measured slower than packing them once.
      const bool by_slice = blocked && !packed && u.last - u.first == 1;
      if (!trans && !packed && !by_slice) {
        own = line_aligned(cols_buf, cols_chunk * K);
        pack_columns(own, be, sb0, u.shared, std::min(cols_chunk, N - u.shared), K, K);
      }
      const c10::BFloat16* cb = packed ? packed + u.e * K * N + u.shared / 16 * K * 16 : own;
      for (int64_t q = u.first; q < u.last; ++q) {
        const int64_t r0 = trans ? u.shared : off[u.e] + q * chunk, n0 = trans ? q * cols_chunk : u.shared;
        const int64_t m = std::min(chunk, off[u.e + 1] - r0), nc = trans ? std::min(cols_chunk, N - n0) : u.extent;
        const int64_t blocks = (m + 15) / 16;
        c10::BFloat16* o = out + r0 * ldo + n0;
        if (packed && m <= kPackedDotRows) {  // a decode step's rows: dot products over the packed tiles
          if (m == 1) packed_rows<1>(o, ldo, a + r0 * lda, lda, cb, K, nc);
          if (m == 2) packed_rows<2>(o, ldo, a + r0 * lda, lda, cb, K, nc);
          continue;
        }
        for (int64_t k0 = 0; k0 < K; k0 += k_block) {  // one block (all of K) but for a row-major b with K > 2048
          const int64_t kn = std::min(k_block, K - k0);
          if (!trans) pack_rows(ra, a + r0 * lda + k0, lda, m, kn, false);
          for (int64_t j = 0; j < nc; j += 32) {
            LineFetch fetch = next_block(be, cb, n0, j, nc, (blocks + 1) / 2 * (K / 32));
            if (by_slice) pack_columns(slice, be + k0 * sb0, sb0, u.shared + j, 32, kn, kn);
            for (int64_t blk = 0; blk < blocks; blk += 2) {
              const int tokens = blk + 1 == blocks ? 16 : 32;
              const int64_t valid = std::min<int64_t>(32, m - blk * 16);
              if (trans) {  // A: b's rows n0 + j (+16) as they lie; B: the packed rows (k_block is K)
                amx_block(c, 32, false, be + (n0 + j) * sb1, 16 * sb1, sb1 * 2, 32, ra + blk * 16 * K, 16 * K, 512, steps, 32,
                          tokens, fetch.base ? &fetch : nullptr);
                store_transposed(c, o + blk * 16 * ldo + j, ldo, valid, stream);
              } else {  // A: the copied rows of this K block; B: the packed columns
                const int64_t ldc = blocked ? ldacc : 32;
                float* cc = blocked ? acc + blk * 16 * ldc + j : c;
                const c10::BFloat16* bt = by_slice ? slice : cb + (j / 16) * K * 16 + k0 * 16;
                amx_block(cc, ldc, k0 > 0, ra + blk * 16 * kn, 16 * kn, 64, 512, bt, by_slice ? kn * 16 : K * 16, 512,
                          kn / 32, tokens, 32, fetch.base ? &fetch : nullptr);
                if (k0 + kn == K) store_rows(cc, ldc, o + blk * 16 * ldo + j, ldo, valid, stream);
              }
            }
          }
        }
      }
    }
    _mm_sfence();  // the streamed stores, before other threads read them
    _tile_release();
  });
}


// The B tiles of every group of the weight w (w[e] as [K, N], strides sb0 / sb1, one of them 1), packed
// once per weight version (packed_weights.cpp); undefined where its cache is off, w is over the cap
// or this version is seen for the first time.
at::Tensor packed_weight(const at::Tensor& w, int64_t sbe, int64_t sb0, int64_t sb1, int64_t K, int64_t N);

// grouped_amx with b = w (3-D), w[e] as [K, N] with strides s: w's tiles from the cache where it has
// them (then the row-major product, whichever w's layout: with the same outputs, 0.87-0.94x the
// transposed product's time for weights with contiguous columns, transformers' forward, paired;
// the rows of x copied as they lie and the sums stored as rows, neither turned), else per task.
inline void grouped_amx(c10::BFloat16* out, int64_t ldo, const c10::BFloat16* a, int64_t lda,
                        const std::vector<int64_t>& off, const at::Tensor& w, const std::array<int64_t, 2>& s,
                        int64_t K, int64_t N) {
  const at::Tensor packed = packed_weight(w, w.stride(0), s[0], s[1], K, N);
  grouped_amx(out, ldo, a, lda, off, w.data_ptr<c10::BFloat16>(), w.stride(0), s[0], s[1], K, N,
              packed.defined() ? packed.data_ptr<c10::BFloat16>() : nullptr);
}

// The weight gradients of grouped_amx's products: out[e] [Ka, Nb] (rows Nb apart, groups Ka * Nb
// apart) = a_e^T @ b_e over group e's rows of a ([S, Ka], rows lda apart) and b ([S, Nb], rows
// ldb apart), for groups with rows (the caller zeroes the others). The inner dimension is the
// group's rows: a_e^T's tiles by pack_transposed, b_e's by pack_columns, both L2-resident per task
// (a range of out's rows sharing its a_e^T tiles, with a run of column ranges); every 32 x 32 block
// of out then runs all of the group's rows and is written once, rounded, streamed.
inline bool grouped_amx_wgrad_applies(at::ScalarType t, int64_t sa1, int64_t sb1, int64_t Ka, int64_t Nb) {
  return t == at::kBFloat16 && Ka % 32 == 0 && Nb % 32 == 0 && Ka > 0 && Nb > 0 && sa1 == 1 && sb1 == 1 && amx_ready();
}

inline void grouped_amx_wgrad(c10::BFloat16* out, const c10::BFloat16* a, int64_t lda, const std::vector<int64_t>& off,
                              const c10::BFloat16* b, int64_t ldb, int64_t Ka, int64_t Nb) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1, threads = at::get_num_threads();
  int64_t most = 32;  // rows of a group, rounded up to 32: the packed inner dimension
  auto range = [](int64_t padded, int64_t n) {  // columns per range: <= kChunkBytes of tiles
    return std::clamp<int64_t>(kChunkBytes / (2 * padded) / 32 * 32, 32, n);
  };
  // units: out[e]'s rows [shared, shared + extent) sharing a_e^T's tiles, a run of column ranges
  const std::vector<Unit> units = split_units(threads, [&](const auto& push) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t padded = (off[e + 1] - off[e] + 31) / 32 * 32;
      if (padded == 0) continue;
      most = std::max(most, padded);
      const int64_t kr = range(padded, Ka), nr = range(padded, Nb);
      for (int64_t k0 = 0; k0 < Ka; k0 += kr) push(e, k0, std::min(kr, Ka - k0), (Nb + nr - 1) / nr);
    }
  });
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0 && Nb % 32 == 0;
  const int64_t count = static_cast<int64_t>(units.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    load_tile_config();
    thread_local std::vector<c10::BFloat16> a_buf, b_buf;
    // a range's tiles: <= kChunkBytes, or 32 columns of the most rows
    const int64_t tiles = std::max(kChunkBytes / 2, 32 * most);
    c10::BFloat16 *ta = line_aligned(a_buf, tiles), *bt = line_aligned(b_buf, tiles);
    alignas(64) float c[32 * 32];
    int64_t have_e = -1, have_n = -1;  // b_e's columns packed in bt
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      const Unit u = units[i];
      const int64_t m = off[u.e + 1] - off[u.e], padded = (m + 31) / 32 * 32, steps = padded / 32, nr = range(padded, Nb);
      pack_transposed(ta, a + off[u.e] * lda, lda, m, u.shared, u.extent);
      for (int64_t q = u.first; q < u.last; ++q) {
        const int64_t n0 = q * nr, nc = std::min(nr, Nb - n0);
        if (have_e != u.e || have_n != n0) {
          pack_columns(bt, b + off[u.e] * ldb, ldb, n0, nc, padded, m);
          have_e = u.e, have_n = n0;
        }
        c10::BFloat16* o = out + u.e * Ka * Nb + u.shared * Nb + n0;
        for (int64_t j = 0; j < nc; j += 32) {
          for (int64_t k = 0; k < u.extent; k += 32) {
            amx_block(c, 32, false, ta + (k / 16) * steps * 512, steps * 512, 64, 512, bt + (j / 16) * padded * 16,
                      padded * 16, 512, steps, 32, 32);
            store_rows(c, 32, o + k * Nb + j, Nb, 32, stream);
          }
        }
      }
    }
    _mm_sfence();
    _tile_release();
  });
}

#else
inline bool grouped_amx_applies(at::ScalarType, int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
inline void grouped_amx(c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, const std::vector<int64_t>&,
                        const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16* = nullptr) {
  TORCH_CHECK(false, "grouped_amx: built without AMX");
}
inline void grouped_amx(c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, const std::vector<int64_t>&,
                        const at::Tensor&, const std::array<int64_t, 2>&, int64_t, int64_t) {
  TORCH_CHECK(false, "grouped_amx: built without AMX");
}
inline bool grouped_amx_wgrad_applies(at::ScalarType, int64_t, int64_t, int64_t, int64_t) { return false; }
inline void grouped_amx_wgrad(c10::BFloat16*, const c10::BFloat16*, int64_t, const std::vector<int64_t>&,
                              const c10::BFloat16*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "grouped_amx_wgrad: built without AMX");
}
#endif

}  // namespace pangu_cpu
