// The machine's limits for the benchmarks' "of limit" columns.
//
// fma_work(flops): the compute limit. Runs `flops`
// floating-point operations as fp32 fused multiply-adds on register-resident vectors (12 independent
// chains per thread, enough to cover the FMA latency, each one vector of the widest width: 16 lanes
// with AVX-512, else 8; GCC's own loops kept 8 lanes on AVX-512, and the fp32 dense matmul then ran
// at 1.3x this "peak"), split over torch's threads: its time
// is what the same FLOPs cost at this CPU's vector peak, which no kernel beats (a dense matmul can
// be beaten: its operands stream through memory). Returns a checksum so the work is kept.
//
// read_work(ts, ahead=0): the memory-read limit. Reads every byte of the contiguous tensors ts once,
// as 32-bit (little-endian) words xor-folded into vector accumulators, in one parallel region: each
// thread its contiguous share of all their words (in list order), each tensor's part of it as 4
// streams read in lockstep a line at a time, each into a register (one stream per thread read
// 10-25% slower here: fewer misses in flight; 8 streams 1.0-1.1x slower; accumulators in a stack
// array, a store a line, as before 2026-12-06: up to 1.26x slower than dot_read_work's pass at one
// row, 2-core Zen 4); nothing else, so its time is this machine's read bandwidth for those bytes
// wherever they sit (memory, the L3). torch's sum is no such limit: the few-row kernels beat it by
// up to 10% (fp32); nor is a call per tensor: a decode step's 14 touched weight slices
// (Qwen3-MoE-shaped, one token) took 194 us that way against 163 in one call, and the step's
// expert_mlp 164. ahead > 0: every other line of each stream also fetched into L2 `ahead` bytes on,
// as the fp32 few-row kernels' software prefetch does on a Zen 4 (a line of 2 a step, kDotsAhead on;
// their choices per CPU: dots_step): from memory they read a little faster than the plain pass
// (fp32 Mixtral-shaped one-token decode steps at 102-104% of it, 2-core Zen 4), from the L3 the
// plain pass is the faster (the prefetching one 1.1-1.2x its time; a prefetch on every line:
// 1.45x), so the benchmarks' read limit is the faster of the two. Returns the xor of every tensor's
// words (each one's trailing 1-3 bytes zero-padded to a word), so the reads are kept.
//
// dot_read_work(ts, rows, ahead=0): the decode ceiling: what reading the touched experts' weights
// costs with the few-row kernels' products done on them. Reads every byte of the contiguous
// tensors ts once, as read_work splits them over the threads, and multiplies each 64-byte line of
// ts[i] into rows[i] (1-16: a decode step's rows of that expert) register-resident accumulators, one
// vector product a row and a line as those kernels do it: VDPBF16PS on bf16 (AVX512-BF16), an FMA
// on fp32 (AVX-512); nothing else (no reduction, no store, the other operand in registers: less work
// than any kernel of those products does). A bound the read limit misses: on a 2-core Zen 4 one
// thread streaming from memory with 4 such products a line reached 80-90% of its plain read rate,
// with 8 60-70% (the same loop from L2 runs at the VDPBF16PS peak): reading and multiplying
// overlap only in part there, so its time, not the larger of the read's and the products', is what
// the best kernel of those products takes. Streams in lockstep by row count (24 accumulators at most: 8 streams at 1-3
// rows, 6 at 4, 4 at 5-6, 3 at 7-8, 2 at 9-12, 1 above); ahead > 0: every line of each stream also
// fetched ahead, as the kernels' software prefetch does: into L2 `ahead` bytes on (from memory it
// helped at 5+ rows, 1.08-1.27x, and cost 0-10% at 1-4; the benchmarks take the faster), but for
// bf16 where the few-row kernels fetch into L1 (dots_into_l1: a Zen 5 from 5 rows) into L1
// kDotsAheadL1 bytes on as they do (2-core Zen 5: 8 Qwen3-MoE-shaped experts from the L3 at 5-6
// rows 1.2x as fast as into L2, at 8 even; from memory 0.95-1.13x). Returns the sum of
// every row's products, each row's other operand the constant (row + 1) / 1024 in every lane: the
// sum of all the values (a line's tail beyond its tensor read as zeros) times sum_r (r + 1) / 1024,
// to fp32 accumulation.
//
// amx_work(flops): the bf16 compute limit where the CPU has AMX-BF16 (has_amx). Runs `flops` as
// TDPBF16PS on tiles that stay in the tile registers (four accumulators from two A and two B tiles,
// as the grouped kernels' inner loop, nothing loaded), split over torch's threads: what the same
// FLOPs cost at this CPU's tile peak (3.3 TFLOP/s a core on the 2-core Xeon measured here; the
// dense bf16 matmul reaches ~55% of it). Returns a checksum so the work is kept.
//
// bf16_dot_work(flops): the bf16 compute limit where the CPU multiplies bf16 pairs in its vectors
// (AVX512-BF16, has_avx512_bf16) but has no AMX tiles. Runs `flops` as VDPBF16PS (16 fp32 lanes, each
// adding two bf16 products: 64 FLOPs an instruction) on kChains register-resident accumulators a
// thread, nothing loaded, split over torch's threads: what the same FLOPs cost at this CPU's bf16
// vector peak. fma_work is no bf16 limit there: the dense bf16 matmul ran at 1.8x it (AMD EPYC
// Zen 4: 418 against 232 GFLOP/s on 2 cores). Returns a checksum so the work is kept.
//
// move_work(srcs, dsts): the memory limit of an op that reads src and writes dst (permute, unpermute),
// for each pair (src, dst) of the lists. Reads every whole 64-byte line of src once and writes every
// whole line of dst once, both in order, interleaved line by line (dst line d takes src lines
// [S d / D, S (d + 1) / D), S and D their line counts: their xor, or where that range is empty, the
// last src line before it, zeros before any), the writes non-temporal (dst starts on a line), in one
// parallel region: every thread its share of all the dsts' lines (in list order; a call per pair
// cost the benchmarks' decode limits ~3-5 us a pair outside the memory work). A copy (reading as
// much as it writes) and a read_work pass then a write_work pass each took 1.1-1.3x its time: the
// reads and the streamed writes overlap. Returns the xor of the 64-bit words written; a tail of
// either under 64 bytes is neither read nor written.
//
// write_work(ts, value): the memory-write limit. Sets every byte of the contiguous tensors ts to
// `value` as the kernels write large outputs at their fastest (fill_streaming: whole lines,
// non-temporal), in one parallel region, every thread its share of all their bytes: the fastest
// write measured here (fill_ / memset / cached vector stores: 1.3-2.5x its time). On this machine
// the value matters: lines of zeros stream at ~40 GB/s, any other lines at ~21 (constant or varying
// alike, measured): zeros bound what a kernel writes as zeros (an expert without rows' gradient), a
// non-zero byte what it writes as values.
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "vector_chains.h"

namespace pangu_cpu {
namespace {

bool has_amx() { return bf16_tiles(); }

bool has_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// Whether dot_read_work runs here for this dtype's tensors.
bool dot_read_ready(at::ScalarType dtype) {
  return dtype == at::kFloat ? has_avx512() : dtype == at::kBFloat16 && has_avx512_bf16();
}

// `flops` split over torch's threads as steps of step_flops each: work(t, steps) on thread t returns
// its checksum; the sum of them.
template <typename Work>
double on_every_thread(int64_t flops, int64_t step_flops, const Work& work) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = flops / threads / step_flops + 1;
  std::vector<double> sums(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) sums[t] = work(t, per_thread);
  });
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

double fma_work(int64_t flops) {
  TORCH_CHECK_VALUE(flops >= 0, "fma_work: flops must be >= 0");
  return on_every_thread(flops, 2 * kChains * kLanes, fma_chains<>);
}

// A pass over the contiguous tensors ts in one parallel region: their units (units(t) each, in list
// order) split into contiguous shares, one a thread and at most one per min_units units; each
// share's result starts at R{} and becomes work(result, k, u0, u1) for each tensor k's units
// [u0, u1) in it. The shares' results.
template <typename R, typename Units, typename Work>
std::vector<R> per_share(at::TensorList ts, const Units& units, int64_t min_units, const Work& work) {
  std::vector<int64_t> first{0};  // the units before each tensor's
  for (const at::Tensor& t : ts) first.push_back(first.back() + units(t));
  const int64_t n = first.back();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / min_units));
  std::vector<R> results(threads, R{});
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t g0 = n * i / threads, g1 = n * (i + 1) / threads;
      for (size_t k = 0; k < ts.size(); ++k) {
        if (first[k + 1] <= g0 || first[k] >= g1) continue;
        results[i] = work(results[i], k, std::max(g0, first[k]) - first[k], std::min(g1, first[k + 1]) - first[k]);
      }
    }
  });
  return results;
}

inline uint64_t fold_line(const Line& v) {
  uint64_t f = 0;
  for (int j = 0; j < 8; ++j) f ^= v[j];
  return f;
}

// The xor of words[w0, w1): 4 streams read in lockstep a line at a time, each into one register
// (every other line of each prefetched `ahead` bytes on where ahead > 0), the rest one by one.
uint32_t fold_words(const uint32_t* words, int64_t w0, int64_t w1, int64_t ahead) {
  constexpr int kStreams = 4, kLine = 16;  // words
  const int64_t len = std::max<int64_t>(0, w1 - w0) / kStreams / kLine * kLine;  // each stream's words
  const char* base = reinterpret_cast<const char*>(words + w0);
  Line f[kStreams] = {};
  for (int64_t w = 0; w < len; w += kLine) {
    for (int s = 0; s < kStreams; ++s) {
      const char* line = base + 4 * (s * len + w);
      if (ahead > 0 && w % (2 * kLine) == 0) __builtin_prefetch(line + ahead, 0, 2);
      f[s] ^= load_line(line);
    }
  }
  Line all = {};
  for (int s = 0; s < kStreams; ++s) all ^= f[s];
  const uint64_t x = fold_line(all);
  uint32_t fold = static_cast<uint32_t>(x) ^ static_cast<uint32_t>(x >> 32);
  for (int64_t w = w0 + kStreams * len; w < w1; ++w) fold ^= words[w];
  return fold;
}

int64_t read_work(at::TensorList ts, int64_t ahead) {
  TORCH_CHECK_VALUE(ahead >= 0, "read_work: ahead must be >= 0");
  for (const at::Tensor& t : ts) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "read_work: contiguous CPU tensors");
  }
  const auto words = [](const at::Tensor& t) { return static_cast<int64_t>(t.nbytes() / 4); };
  const std::vector<uint32_t> folds =
      per_share<uint32_t>(ts, words, 4096, [&](uint32_t fold, size_t k, int64_t w0, int64_t w1) {
        return fold ^ fold_words(static_cast<const uint32_t*>(ts[k].data_ptr()), w0, w1, ahead);
      });
  uint32_t total = 0;
  for (uint32_t f : folds) total ^= f;
  for (const at::Tensor& t : ts) {  // each one's tail of 1-3 bytes, as a low word
    const int64_t whole = static_cast<int64_t>(t.nbytes() / 4 * 4);
    for (int64_t b = whole; b < static_cast<int64_t>(t.nbytes()); ++b) {
      total ^= static_cast<uint32_t>(static_cast<const uint8_t*>(t.data_ptr())[b]) << (8 * (b - whole));
    }
  }
  return total;
}

#if defined(__AVX512F__)
// Products of lines [l0, l1) of the tensor at p (`bytes` long) with R rows: S streams of whole lines
// in lockstep, the lines left one by one (a last partial one masked to the tensor's end); the sum of
// the accumulators. ahead > 0: each stream's line `ahead` bytes on fetched into L2, < 0: -ahead
// bytes on into L1.
template <typename T, int R>
double dot_lines(const char* p, int64_t bytes, int64_t l0, int64_t l1, int64_t ahead) {
  constexpr int S = R <= 3 ? 8 : R == 4 ? 6 : R <= 6 ? 4 : R <= 8 ? 3 : R <= 12 ? 2 : 1;
  const auto vec = [](__m512i v) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_castsi512_ps(v);
    } else {
      return reinterpret_cast<__m512bh>(v);
    }
  };
  using Vec = decltype(vec(_mm512_setzero_si512()));  // __m512 or __m512bh
  const auto madd = [](__m512 acc, Vec a, Vec b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_fmadd_ps(a, b, acc);
    } else {
      return _mm512_dpbf16_ps(acc, a, b);
    }
  };
  Vec other[R];
  for (int r = 0; r < R; ++r) {
    const float v = static_cast<float>(r + 1) / 1024;
    other[r] = std::is_same_v<T, float> ? vec(_mm512_castps_si512(_mm512_set1_ps(v)))
                                        : vec(_mm512_set1_epi16(static_cast<int16_t>(c10::BFloat16(v).x)));
  }
  __m512 acc[S][R];
  for (int s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) acc[s][r] = _mm512_setzero_ps();
  }
  const int64_t len = std::max<int64_t>(0, std::min(l1, bytes / 64) - l0) / S;  // each stream's whole lines
  const char* base = p + 64 * l0;
  for (int64_t l = 0; l < len; ++l) {
    for (int s = 0; s < S; ++s) {
      const char* line = base + 64 * (s * len + l);
      if (ahead > 0) _mm_prefetch(line + ahead, _MM_HINT_T1);
      if (ahead < 0) _mm_prefetch(line - ahead, _MM_HINT_T0);  // (into L1: dot_read_work)
      const Vec v = vec(_mm512_loadu_si512(line));
      for (int r = 0; r < R; ++r) acc[s][r] = madd(acc[s][r], v, other[r]);
    }
  }
  for (int64_t l = l0 + S * len; l < l1; ++l) {
    const int64_t left = std::min<int64_t>(64, bytes - 64 * l);
    const Vec v = vec(_mm512_maskz_loadu_epi8(left == 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1, p + 64 * l));
    for (int r = 0; r < R; ++r) acc[0][r] = madd(acc[0][r], v, other[r]);
  }
  double sum = 0.0;
  for (int s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) sum += _mm512_reduce_add_ps(acc[s][r]);
  }
  return sum;
}

template <typename T, int... Rs>
double dot_lines_for(int64_t rows, const char* p, int64_t bytes, int64_t l0, int64_t l1, int64_t ahead,
                     std::integer_sequence<int, Rs...>) {
  double sum = 0.0;
  ((rows == Rs + 1 ? (sum = dot_lines<T, Rs + 1>(p, bytes, l0, l1, ahead), 0) : 0), ...);
  return sum;
}
#endif

double dot_read_work(at::TensorList ts, at::IntArrayRef rows, int64_t ahead) {
  TORCH_CHECK_VALUE(ahead >= 0, "dot_read_work: ahead must be >= 0");
  TORCH_CHECK_VALUE(rows.size() == ts.size(), "dot_read_work: one row count per tensor (", ts.size(), " tensors, ",
                    rows.size(), " row counts)");
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "dot_read_work: contiguous CPU tensors");
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                      "dot_read_work: float32 or bfloat16 tensors, got ", t.scalar_type());
    TORCH_CHECK_VALUE(rows[i] >= 1 && rows[i] <= kFewRows, "dot_read_work: rows must be in [1, ", kFewRows, "], got ",
                      rows[i]);
    TORCH_CHECK(dot_read_ready(t.scalar_type()), "dot_read_work: this build or CPU has no ",
                t.scalar_type() == at::kFloat ? "AVX-512" : "AVX512-BF16", " (dot_read_ready(", t.scalar_type(),
                ") is false)");
  }
  const auto lines = [](const at::Tensor& t) { return (static_cast<int64_t>(t.nbytes()) + 63) / 64; };
  const std::vector<double> sums =
      per_share<double>(ts, lines, 256, [&](double sum, size_t k, int64_t l0, int64_t l1) {
#if defined(__AVX512F__)  // (else no tensor passed the checks)
        const auto* p = static_cast<const char*>(ts[k].data_ptr());
        const auto bytes = static_cast<int64_t>(ts[k].nbytes());
        const auto all = std::make_integer_sequence<int, kFewRows>{};
        if (ts[k].scalar_type() == at::kFloat) return sum + dot_lines_for<float>(rows[k], p, bytes, l0, l1, ahead, all);
#if defined(__AVX512BF16__)
        const bool into_l1 = ahead > 0 && dots_into_l1<DotsPairs>(rows[k]);
        return sum + dot_lines_for<c10::BFloat16>(rows[k], p, bytes, l0, l1, into_l1 ? -kDotsAheadL1 : ahead, all);
#endif
#endif
        (void)k, (void)l0, (void)l1;
        return sum;
      });
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

void write_work(at::TensorList ts, int64_t value) {
  for (const at::Tensor& t : ts) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "write_work: contiguous CPU tensors");
  }
  TORCH_CHECK_VALUE(value >= 0 && value <= 255, "write_work: value must be a byte (0-255), got ", value);
  const auto lines = [](const at::Tensor& t) { return (static_cast<int64_t>(t.nbytes()) + 63) / 64; };
  per_share<int>(ts, lines, 64, [&](int, size_t k, int64_t l0, int64_t l1) {
    char* const data = static_cast<char*>(ts[k].data_ptr());
    stream_fill(data + 64 * l0, data + std::min<int64_t>(64 * l1, ts[k].nbytes()), static_cast<uint8_t>(value));
    return 0;
  });
}

int64_t move_work(at::TensorList srcs, at::TensorList dsts) {
  TORCH_CHECK_VALUE(srcs.size() == dsts.size(), "move_work: one dst per src (", srcs.size(), " srcs, ", dsts.size(),
                    " dsts)");
  for (size_t k = 0; k < srcs.size(); ++k) {
    const at::Tensor &src = srcs[k], &dst = dsts[k];
    TORCH_CHECK_VALUE(src.device().is_cpu() && src.is_contiguous() && dst.device().is_cpu() && dst.is_contiguous(),
                      "move_work: contiguous CPU tensors");
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(dst.data_ptr()) % 64 == 0,
                      "move_work: each dst must start on a 64-byte line");
  }
  const auto lines = [](const at::Tensor& t) { return static_cast<int64_t>(t.nbytes()) / 64; };  // whole
  const std::vector<uint64_t> folds =
      per_share<uint64_t>(dsts, lines, 64, [&](uint64_t folded, size_t k, int64_t d0, int64_t d1) {
        const auto* const in = static_cast<const char*>(srcs[k].data_ptr());
        auto* const out = static_cast<char*>(dsts[k].data_ptr());
        const int64_t S = lines(srcs[k]), D = lines(dsts[k]);
        // source lines [0, s) go with destination lines [0, d): s = floor(S * d / D), the remainder in acc
        int64_t s = S * d0 / D, acc = S * d0 - s * D;
        Line line = s > 0 ? load_line(in + 64 * (s - 1)) : Line{}, fold{};
        for (int64_t d = d0; d < d1; ++d) {
          acc += S;
          if (acc >= D) line = Line{};
          for (; acc >= D; acc -= D, ++s) line ^= load_line(in + 64 * s);
          stream_line(out + 64 * d, line);
          fold ^= line;
        }
        streamed_stores_done();
        return folded ^ fold_line(fold);
      });
  uint64_t total = 0;
  for (uint64_t f : folds) total ^= f;
  return static_cast<int64_t>(total);
}


double bf16_dot_work(int64_t flops) {
  TORCH_CHECK_VALUE(flops >= 0, "bf16_dot_work: flops must be >= 0");
  TORCH_CHECK(has_avx512_bf16(), "bf16_dot_work: this build or CPU has no AVX512-BF16 (has_avx512_bf16() is false)");
#if defined(__AVX512BF16__)
  return on_every_thread(flops, kChains * 16 * 2 * 2, bf16_pair_chains);  // kChains VDPBF16PS
#else
  return 0.0;
#endif
}

double amx_work(int64_t flops) {
  TORCH_CHECK_VALUE(flops >= 0, "amx_work: flops must be >= 0");
  TORCH_CHECK(has_amx(), "amx_work: this CPU, this build or the kernel gives no AMX-BF16 tiles (has_amx() is false)");
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  return on_every_thread(flops, 4 * 16 * 16 * 32 * 2, [](int64_t t, int64_t per_thread) {  // four TDPBF16PS
    load_tile_config();
    alignas(64) c10::BFloat16 operand[16 * 32];
    for (int i = 0; i < 16 * 32; ++i) operand[i] = c10::BFloat16(1e-3f * static_cast<float>(i % 7 + t));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, operand, 64);
    _tile_loadd(5, operand, 64);
    _tile_loadd(6, operand, 64);
    _tile_loadd(7, operand, 64);
    for (int64_t i = 0; i < per_thread; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    alignas(64) float c[16 * 16];
    _tile_stored(0, c, 64);
    _tile_release();
    return static_cast<double>(c[0]);
  });
#else
  return 0.0;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("fma_work(int flops) -> float", &fma_work);
  m.def("amx_work(int flops) -> float", &amx_work);
  m.def("has_amx() -> bool", &has_amx);
  m.def("bf16_dot_work(int flops) -> float", &bf16_dot_work);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
  m.def("read_work(Tensor[] ts, int ahead=0) -> int", &read_work);
  m.def("write_work(Tensor(a!)[] ts, int value) -> ()", &write_work);
  m.def("move_work(Tensor[] srcs, Tensor(a!)[] dsts) -> int", &move_work);
  m.def("dot_read_work(Tensor[] ts, int[] rows, int ahead=0) -> float", &dot_read_work);
  m.def("dot_read_ready(ScalarType dtype) -> bool", &dot_read_ready);
}

}  // namespace pangu_cpu
