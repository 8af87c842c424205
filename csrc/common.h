// Shared helpers of the pangu_ops CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pangu_cpu {

// Floating dtypes every op supports; the Python front end checks them first with nicer messages,
// these checks keep a direct torch.ops.pangu_cpu call from reading memory as the wrong type.
#define PANGU_DISPATCH_FLOATS(TYPE, NAME, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Rows per at::parallel_for task: enough bytes per task to amortise the scheduling.
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(row_bytes, 1));
}

// A contiguous CPU output for a kernel to fill: outputs of 1 MiB and more come from a caching pool
// of 2 MiB-aligned, huge-page-advised blocks (output_pool.cpp): a fresh multi-MB allocation pays a
// page fault per 4 KiB page on first write, which costs more than the copy that fills it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// t ([S, K]) itself where its rows are contiguous, else a contiguous copy: the products' kernels
// are chosen by their operands' strides, so an activation that is expanded (a loss's gradient:
// stride 0) or transposed would otherwise take another kernel than its contiguous equal, with
// other bits (eager autograd against a compiled graph that materialised it).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.dim() != 2 || t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

// The typed dispatcher handle of op `name` (e.g. "pangu_cpu::grouped_gemm"): for C++ calls of other
// ops' kernels (kept in a function-local static by the caller).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Sets `bytes` bytes at p to `value`. From 1 MiB on over torch's threads with non-temporal stores
// of whole 64-byte lines (memset at unaligned ends): for large outputs written once and not read
// back soon (zeros: the weight gradients of experts without rows); cached stores fetch every line
// before writing it: 132 MB of zeros in 7.3 ms against 3.7 streamed (fill_, 2 threads, measured).
// Below, one memset.
void fill_streaming(void* p, int64_t bytes, uint8_t value);

// Zeros for the [E, ...] weight gradient dw's experts without rows (off: the groups' row offsets),
// each run of such experts side by side by one fill_streaming.
inline void zero_empty_groups(const at::Tensor& dw, const std::vector<int64_t>& off) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  if (E <= 0) return;
  const int64_t expert_bytes = dw.numel() / E * static_cast<int64_t>(dw.element_size());
  for (int64_t e = 0, f = 0; e < E; e = f + 1) {
    for (f = e; f < E && off[f + 1] == off[f]; ++f) {
    }
    if (f > e) fill_streaming(static_cast<char*>(dw.data_ptr()) + e * expert_bytes, (f - e) * expert_bytes, 0);
  }
}

// Orders a thread's non-temporal stores before what follows (they bypass the cache's ordering):
// after a kernel's streamed writes, before other threads read them.
inline void streamed_stores_done() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

using Line = uint64_t __attribute__((vector_size(64)));  // one cache line's bytes

inline Line load_line(const char* p) {
  Line v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One line to p (64-byte aligned) with a non-temporal store (one 64-byte store where AVX-512 is
// built: two 32-byte ones took longer in move_work).
inline void stream_line(char* p, const Line& v) {
#if defined(__AVX512F__)
  __m512i line;
  std::memcpy(&line, &v, sizeof v);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), line);
#elif defined(__AVX__)
  __m256i half[2];
  std::memcpy(half, &v, sizeof v);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), half[0]);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p + 32), half[1]);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// Sets [begin, end) to value on this thread: its whole 64-byte lines with non-temporal stores, the
// bytes before and after them by memset (fill_streaming's shares, write_work's).
inline void stream_fill(char* begin, char* end, uint8_t value) {
  char* const first = begin + (64 - reinterpret_cast<uintptr_t>(begin) % 64) % 64;
  char* const last = end - reinterpret_cast<uintptr_t>(end) % 64;
  if (first >= last) {
    std::memset(begin, value, end - begin);
    return;
  }
  std::memset(begin, value, first - begin);
  std::memset(last, value, end - last);
  Line fill;
  std::memset(&fill, value, sizeof fill);
  for (char* q = first; q < last; q += 64) stream_line(q, fill);
  streamed_stores_done();
}

// Copies `bytes` bytes from src to dst, whole 64-byte lines of a 64-byte-aligned dst with
// non-temporal stores (no fetch of the line before it is written), the rest by memcpy: for rows of
// large outputs written once and read back only by the next op.
inline void copy_streaming(char* __restrict dst, const char* __restrict src, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    const int64_t lines = bytes / 64;
    for (int64_t l = 0; l < lines; ++l) stream_line(dst + 64 * l, load_line(src + 64 * l));
    dst += 64 * lines, src += 64 * lines, bytes -= 64 * lines;
  }
  std::memcpy(dst, src, bytes);
}

// Element conversions written so that loops over them vectorise: c10's bf16 rounding branches on
// NaN, which keeps GCC from vectorising the loops around it; the select below does not.
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float bf16_bits_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::BFloat16 v) { return bf16_bits_to_float(v.x); }

template <typename scalar_t>
inline scalar_t from_float(float f) {
  return static_cast<scalar_t>(f);
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;  // round to nearest even
  return c10::BFloat16(static_cast<uint16_t>(f != f ? UINT32_C(0x7FC0) : rounded),
                       c10::BFloat16::from_bits());
}

// Element loads / stores through the raw bits (bf16), so that GCC vectorises the loop around them.
inline float load_float(const float* p, int64_t i) { return p[i]; }
inline float load_float(const double* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_float(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_float(const c10::BFloat16* p, int64_t i) {
  return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
}
inline void store_float(float* p, int64_t i, float v) { p[i] = v; }
inline void store_float(double* p, int64_t i, float v) { p[i] = v; }
inline void store_float(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void store_float(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = from_float<c10::BFloat16>(v).x;
}

// n fp32 values to dst in its dtype: bf16 where built with AVX512-BF16 by VCVTNEPS2BF16 (16 at a
// time, round to nearest even; NaN stays NaN), else (and the tail) element by element.
template <typename T>
inline void store_floats(T* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
    }
  }
#endif
  for (; i < n; ++i) store_float(dst, i, src[i]);
}

// The first 64-byte-aligned element of a thread's buffer v, grown to hold n elements from there
// (kept by the thread between calls: a fresh 1-2.5 MiB buffer is page faults every call).
template <typename T>
T* line_aligned(std::vector<T>& v, int64_t n) {
  const int64_t slack = 64 / static_cast<int64_t>(sizeof(T));
  if (static_cast<int64_t>(v.size()) < n + slack) v.resize(n + slack);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

// y[0:n] += w * float(x[0:n]).
template <typename scalar_t>
inline void axpy_to_float(float* __restrict y, const scalar_t* __restrict x, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * to_float(x[i]);
}

// y[0:n] = scalar_t(w * x[0:n]) with x already in fp32.
template <typename scalar_t>
inline void scale_from_float(scalar_t* __restrict y, const float* __restrict x, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = from_float<scalar_t>(w * x[i]);
}

// sum(a[0:n] * float(b[0:n])) in fp32.
template <typename scalar_t>
inline float dot_float(const float* __restrict a, const scalar_t* __restrict b, int64_t n) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += a[i] * to_float(b[i]);
  return dot;
}

// ---- grouped GEMM helpers (grouped_gemm.cpp, expert_mlp.cpp) ----

// Row offsets of each group, validating the sizes against the number of rows.
inline std::vector<int64_t> group_offsets(const at::Tensor& group_sizes, int64_t rows, const char* op) {
  TORCH_CHECK_VALUE(group_sizes.dim() == 1, op, ": group_sizes must be 1-D [E]");
  const at::Tensor gs = group_sizes.to(at::kLong).contiguous();
  const int64_t* g = gs.data_ptr<int64_t>();
  std::vector<int64_t> offsets(gs.size(0) + 1, 0);
  for (int64_t e = 0; e < gs.size(0); ++e) {
    TORCH_CHECK_VALUE(g[e] >= 0, op, ": group_sizes[", e, "] = ", g[e], " is negative");
    offsets[e + 1] = offsets[e] + g[e];
  }
  TORCH_CHECK_VALUE(offsets.back() == rows, op, ": group_sizes sum to ", offsets.back(),
                    " but x has ", rows, " rows");
  return offsets;
}

// An fp32 view of t: t itself when it is fp32, else a converted copy, converted in t's memory order
// (a transposed view's conversion otherwise walks memory across its rows: 9.5 ms against 1.4 ms for
// a 7168 x 1024 expert weight on 2 threads here).
inline at::Tensor as_float(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  if (t.dim() == 2 && t.stride(0) == 1 && t.stride(1) != 1) return t.t().to(at::kFloat).t();
  return t.to(at::kFloat);
}

// Whether torch's CPU matmul in `dtype` (bf16/fp16) is about as fast as in fp32 or faster on this
// machine: from ~200x slower (AVX2 only) to several times faster (AMX-BF16), which CPU flags and
// oneDNN's "supported" answers do not tell apart. Probed once per dtype on first use: a
// 128 x 512 x 512 matmul after an untimed first call, best of 4, against fp32 (a few ms where it is
// fast; ~0.5 s once where not).
bool native_half_matmul(at::ScalarType dtype);

// Whether this CPU's bf16 dot products of few-row experts run on AVX512-BF16's VDPBF16PS (each
// 32-bit lane adds the products of one pair of adjacent bf16 elements: 32 products an instruction,
// neither operand widened: DotsPairs, few_rows_pairs) rather than on fp32 FMAs over widened halves
// (16 products an FMA, plus a shift or a mask per weight vector: Dots512, few_rows_stream). Its
// throughput decides, not its presence: on a 2-core Xeon (AMX) one VDPBF16PS issues per 2 cycles
// against two 16-lane FMAs a cycle, on a 2-core AMD EPYC Zen 4 one a cycle, as its one 16-lane FMA. Probed once on first use: 12
// register-resident chains of each, best of 5 (~1 ms); the pairs where they take under 1.5x the
// FMAs' time for as many instructions. False where the build has no AVX512-BF16.
bool bf16_pair_dots();

// Whether this CPU runs a 512-bit FMA at the rate of a 256-bit one (512-bit FMA units: AMD Zen 5,
// Xeons) rather than as two 256-bit halves (AMD Zen 4: half the rate). The few-row dot kernels
// (few_rows_dots) were tuned on one of each and take what each measured: their software prefetch and
// streams. Probed once on first use: 12 register-resident chains of 16- and of 8-lane FMAs, best of
// 5 (~1 ms); wide where the 16-lane ones take under 1.5x the 8-lane ones' time for as many
// instructions. False without AVX-512.
bool full_width_512();

// out[M, N] = a[M, K] @ b[K, N] for the few rows of a decode step's expert (M <= kFewRows), fp32
// accumulation, b read once from memory in its own 16-bit dtype (a's rows converted to fp32 once).
// b is a [K, N] view either of a row-major [N, K] matrix (stride(0) == 1: dot products of
// contiguous rows, several rows of b far apart at once: dots_lockstep with AVX-512, else
// dots_streams) or row-major itself
// (stride(1) == 1: up to kStreamRows rows, four quarters of b's rows at once by few_rows_stream, K
// split over the threads; more, register tiles over panels of b). A decode step is a pass over
// the touched experts' weights: converting them to fp32 first (the path of a CPU without native
// half-precision matmul) moves 5x the bytes, and oneDNN's one-row GEMV costs more per call (small
// experts: 30-70 us against 40-80 us). With native half-precision matmul (AMX-BF16, AVX512-BF16),
// oneDNN keeps 2+ rows, but for the kernels that measured faster there (few_rows_kernel).
constexpr int64_t kFewRows = 16;
constexpr int64_t kStreamRows = 8;  // row-major b up to this many rows: few_rows_stream (measured)
// fp32: BLAS's GEMV / small GEMM at 4 / 6 / 8 rows took 2.7-4.5x / 2.5-3.4x / 1.3-2.7x the time
// of the few-row kernels (8 experts' 1024 x 7168 weights, both layouts, measured)
constexpr int64_t kFewRowsFloat = 8;

// A row stride (in 4-byte elements) for n elements: whole 64-byte lines, and not a multiple of
// 4 KiB. Rows a multiple of 4 KiB apart (K or N a multiple of 1024: 1024, 7168) fall in one L1 set
// at each offset, so 8 rows of a, or of accumulators, filled all 8 ways of it: 8-row products 2-3x
// slower than 6-row ones (bf16, row-major weights, measured); one line more spreads them over 8 sets.
inline int64_t unaliased_stride(int64_t n) {
  const int64_t lines = (n + 15) / 16 * 16;
  return lines % 1024 == 0 ? lines + 16 : lines;
}

// Strides {s0, s1} of an expert's weight w[e] (w [E, K, N], or [E, N, K] with trans_b) as a [K, N]
// matrix.
inline std::array<int64_t, 2> kn_strides(const at::Tensor& w, bool trans_b) {
  return {w.stride(trans_b ? 2 : 1), w.stride(trans_b ? 1 : 2)};
}

// Runs fn(e0, e1) over experts [0, E) given their row offsets: split across the threads by cost,
// each expert's products then running single-threaded on one thread, when the split is even (no
// thread above 5/4 of an equal share, 2+ experts per thread); else fn(0, E) here, each product
// using every thread. Side by side, experts of a few hundred rows run 10-20% faster than one after
// another with each product's threads splitting so few rows, and each thread streams its own
// experts' weights. An expert's cost: its rows plus kRowsPerWeightPass for reading its weights once,
// which is what a decode step's 1-2-row experts cost. A decode step's experts (all of kFewRows rows
// or fewer) gain little side by side (a product's threads split its weight's columns, each
// streaming its share), so there the split must be within 1/20 of even (5 equal experts over 2
// threads, 3 against 2, kept one thread idle for a third of a Mixtral-shaped 4-token step), and
// one expert a thread is enough: without a parallel region per product and the serial gate between
// them, a Mixtral-shaped one-token step (2 experts) took 0.97-0.99x the time (paired). There each
// thread takes its own share's experts in order and then the others' last ones (ExpertRanges): the
// rows' cost differs by kernel (few_rows_kernel), which the split by rows does not see (a static
// split: Qwen3-MoE-shaped 16-token steps 1.03-1.15x the time of a shared counter's), and a thread
// that reads the same experts on every call where the routing repeats finds them in its own cache
// (on the 2-core Zen 5, where 2 threads read 32 MB at the L3's rate and one thread 16 MB: each core
// has its own): a Qwen3-MoE-shaped 4-token step with a fixed routing, while memory read fast,
// 1.3x as fast as with a shared counter, which handed the experts to either thread by the
// call's timing (median over interleaved rounds: 72% of a read pass against 55%; the same where
// memory read slow).
constexpr int64_t kRowsPerWeightPass = 32;

// The threads' shares of the experts, [first[t], first[t + 1]), each as one atomic word (its next
// expert in the low 32 bits, its end in the high ones): take(t) gives thread t its own next expert,
// else the last one left of another's share (t + 1's first, in turn), else -1.
class ExpertRanges {
 public:
  explicit ExpertRanges(const std::vector<int64_t>& first) : shares_(first.size() - 1) {
    for (size_t t = 0; t < shares_.size(); ++t) shares_[t].store(pack(first[t], first[t + 1]));
  }
  int64_t take(int64_t t) {
    const int64_t n = static_cast<int64_t>(shares_.size());
    for (int64_t i = 0; i < n; ++i) {
      std::atomic<uint64_t>& share = shares_[(t + i) % n];
      for (uint64_t v = share.load(); ;) {
        const int64_t next = static_cast<int64_t>(v & 0xFFFFFFFFu), end = static_cast<int64_t>(v >> 32);
        if (next >= end) break;
        const bool own = i == 0;
        if (share.compare_exchange_weak(v, own ? pack(next + 1, end) : pack(next, end - 1))) {
          return own ? next : end - 1;
        }
      }
    }
    return -1;
  }

 private:
  static uint64_t pack(int64_t next, int64_t end) {
    return static_cast<uint64_t>(next) | static_cast<uint64_t>(end) << 32;
  }
  std::vector<std::atomic<uint64_t>> shares_;
};

template <typename Fn>
void for_experts(const std::vector<int64_t>& off, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads < 2 || off.back() == 0) return fn(0, E);
  std::vector<int64_t> cost(E + 1, 0);  // prefix sums
  int64_t active = 0, most = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    cost[e + 1] = cost[e] + (m > 0 ? m + kRowsPerWeightPass : 0);
    active += m > 0;
    most = std::max(most, m);
  }
  // decided by the experts with rows only: an expert's result (oneDNN rounds differently on one
  // thread and on several) must not depend on how many empty experts sit beside it (a domain's
  // sub-model gives the full model's outputs bit for bit)
  if (active < (most <= kFewRows ? threads : 2 * threads)) return fn(0, E);
  const int64_t total = cost[E];
  std::vector<int64_t> first(threads + 1, E);
  first[0] = 0;
  for (int64_t t = 1, e = 0; t < threads; ++t) {
    while (e < E && cost[e] * threads < total * t) ++e;
    first[t] = e;
  }
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t share = (cost[first[t + 1]] - cost[first[t]]) * threads;
    if (most <= kFewRows ? share * 20 > total * 21 : share * 4 > total * 5) return fn(0, E);
  }
  const at::ThreadLocalState state;  // the caller's dispatch state (below autograd) for ATen calls
  if (most <= kFewRows) {  // a decode step: each thread its share's experts, then the others' left
    ExpertRanges shares(first);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t e; (e = shares.take(t)) >= 0;) {
          if (off[e + 1] > off[e]) fn(e, e + 1);
        }
      }
    });
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = t0; t < t1; ++t) fn(first[t], first[t + 1]);
  });
}

// Eight fp32 lanes as a GCC/Clang vector (one AVX register where -march has it), and stores of one
// into 8 elements of each dtype (fp16 and fp64 element by element; bf16: from_float's rounding to
// nearest even as 8-lane integer arithmetic).
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
// bf16(v) (from_float's rounding) in the high half of each 32-bit lane of v (F: f32x8 or f32x16);
// the low halves are garbage. kFinite: v holds no NaN (the select is skipped).
template <bool kFinite = false, typename F>
inline auto bf16_high_halves(F v) {
  using U = std::conditional_t<std::is_same_v<F, f32x8>, u32x8, u32x16>;
  U u;
  std::memcpy(&u, &v, sizeof u);
  const U rounded = u + 0x7FFFu + ((u >> 16) & 1u), canonical = U{} + 0x7FC00000u;
  if constexpr (kFinite) return rounded;
  return U((v != v) ? canonical : rounded);  // (a blend: 8.8 against 9.9 ms for and / andnot / or, 4-row dW)
}
inline void store8(c10::BFloat16* p, f32x8 v) {
  const u16x8 h = __builtin_convertvector(bf16_high_halves(v) >> 16, u16x8);
  std::memcpy(p, &h, sizeof h);
}
// 16 values held as even / odd lanes (element 2j in even[j], 2j + 1 in odd[j]) stored in order as
// bf16: the odd ones' bits are their lanes' high halves already, the even ones' shifted down, so
// a mask and an or interleave them (no cross-lane packing). `stream`: a non-temporal store (p
// 32-byte aligned), for outputs written once in whole 64-byte lines and not read back soon.
template <bool kFinite = false>
inline void store16_even_odd(c10::BFloat16* p, f32x8 even, f32x8 odd, bool stream = false) {
  const u32x8 w = (bf16_high_halves<kFinite>(odd) & 0xFFFF0000u) | (bf16_high_halves<kFinite>(even) >> 16);
#ifdef __AVX__
  if (stream) {
    __m256i x;
    std::memcpy(&x, &w, sizeof w);
    return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
  }
#endif
  std::memcpy(p, &w, sizeof w);
}
template <typename T>
inline void store8(T* p, f32x8 v) {
  for (int j = 0; j < 8; ++j) store_float(p, j, v[j]);
}

// The 16 (F = f32x8) or 32 (f32x16) bf16 at p as two vectors of fp32: the 32-bit lane j holds
// elements 2j (its low half) and 2j + 1 (its high half), so a shift and a mask give both without
// widening across lanes (GCC's element-order widening, vextracti128 + vpmovzxwd, kept the one-row
// dot at ~25 GB/s).
template <typename F>
inline void load_bf16_even_odd(const c10::BFloat16* p, F& even, F& odd) {
  using U = std::conditional_t<std::is_same_v<F, f32x8>, u32x8, u32x16>;
  U u;
  std::memcpy(&u, p, sizeof u);
  const U e = u << 16, o = u & 0xFFFF0000u;
  std::memcpy(&even, &e, sizeof e);
  std::memcpy(&odd, &o, sizeof o);
}

// fn(std::integral_constant<int, m>{}) for a row count 1 <= m <= kMax known at run time only (the
// kernels below take it as a template argument).
template <int kMax, typename Fn>
inline void with_rows(int64_t m, const Fn& fn) {
  if constexpr (kMax > 1) {
    if (m < kMax) return with_rows<kMax - 1>(m, fn);
  }
  fn(std::integral_constant<int, kMax>{});
}

// acc[0:MB, 0:len] += a[0:MB, 0:kl] (fp32, row stride lda) @ b[0:kl, n0:n0+len] (row k at b + k * sb0):
// MB x 16 fp32 accumulators that the compiler keeps in vector registers while b's rows stream by.
template <int MB, typename T>
inline void few_rows_tile(float* __restrict acc, int64_t ldacc, const float* __restrict a, int64_t lda,
                          const T* __restrict b, int64_t sb0, int64_t kl, int64_t n0, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (len == 16) {  // b's 16 columns as even / odd lanes (load_bf16_even_odd), interleaved once at the end
      f32x8 ce[MB], co[MB];
      for (int i = 0; i < MB; ++i) ce[i] = co[i] = f32x8{};
      for (int64_t k = 0; k < kl; ++k) {
        const T* row = b + k * sb0 + n0;
        __builtin_prefetch(row + 64);  // this row's columns two cache lines on (the tiles to come)
        f32x8 even, odd;
        load_bf16_even_odd(row, even, odd);
        for (int i = 0; i < MB; ++i) {
          const float aik = a[i * lda + k];
          ce[i] += aik * even;
          co[i] += aik * odd;
        }
      }
      for (int i = 0; i < MB; ++i) {
        for (int j = 0; j < 8; ++j) acc[i * ldacc + 2 * j] += ce[i][j], acc[i * ldacc + 2 * j + 1] += co[i][j];
      }
      return;
    }
  }
  float c[MB][16] = {};
  if (len == 16) {
    for (int64_t k = 0; k < kl; ++k) {
      const T* row = b + k * sb0 + n0;
      float bv[16];  // (a local copy: GCC keeps c in registers and vectorises over j only so)
      for (int j = 0; j < 16; ++j) bv[j] = load_float(row, j);
      for (int i = 0; i < MB; ++i) {
        const float aik = a[i * lda + k];
        for (int j = 0; j < 16; ++j) c[i][j] += aik * bv[j];
      }
    }
  } else {
    for (int64_t k = 0; k < kl; ++k) {
      const T* row = b + k * sb0 + n0;
      for (int i = 0; i < MB; ++i) {
        for (int64_t j = 0; j < len; ++j) c[i][j] += a[i * lda + k] * load_float(row, j);
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int64_t j = 0; j < len; ++j) acc[i * ldacc + j] += c[i][j];
  }
}

// a's rows (fp32, R x K) with each whole 16-element block reordered as its 8 even then its 8 odd
// elements: the order in which load_bf16_even_odd hands over b's values.
inline void split_even_odd(float* __restrict out, const float* __restrict a, int64_t K) {
  for (int64_t k = 0; k + 16 <= K; k += 16) {
    for (int j = 0; j < 8; ++j) out[k + j] = a[k + 2 * j], out[k + 8 + j] = a[k + 2 * j + 1];
  }
}

// 16 elements as two fp32 vectors: bf16 as even / odd lanes (load_bf16_even_odd), others in order.
template <typename T>
inline void load16(const T* p, f32x8& v0, f32x8& v1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    load_bf16_even_odd(p, v0, v1);
  } else if constexpr (std::is_same_v<T, float>) {
    v0 = load8(p), v1 = load8(p + 8);
  } else {
    for (int j = 0; j < 8; ++j) v0[j] = load_float(p, j), v1[j] = load_float(p, j + 8);
  }
}
// One of load16's two vectors (half 0: v0, 1: v1).
template <typename T>
inline f32x8 load16_half(const T* p, int half) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    u32x8 u;
    std::memcpy(&u, p, sizeof u);
    const u32x8 x = half ? (u & 0xFFFF0000u) : (u << 16);
    f32x8 v;
    std::memcpy(&v, &x, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return load8(p + 8 * half);
  } else {
    f32x8 v;
    for (int j = 0; j < 8; ++j) v[j] = load_float(p, 8 * half + j);
    return v;
  }
}
// v, kept in a vector register where it is used: GCC otherwise folds a loaded value into every
// instruction that uses it as a memory operand, loading it again each time.
inline f32x8 in_register(f32x8 v) {
#if defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}
// Where load16 puts element j (< 16) of its block: lane j of (v0, v1) in order, or even / odd.
template <typename T>
constexpr int load16_lane(int j) {
  return std::is_same_v<T, c10::BFloat16> ? j % 2 * 8 + j / 2 : j;
}
// Where load16 puts column j of a panel of whole 16-column blocks (load16_lane within each block).
template <typename T>
constexpr int64_t panel_lane(int64_t j) {
  return j / 16 * 16 + load16_lane<T>(static_cast<int>(j % 16));
}

// Blocks of W = 16 elements as two f32x8 (load16), or, for bf16 where the CPU has AVX-512, of W = 32
// as two 16-lane vectors (its even / odd elements): few_rows_stream's width.
template <int W>
using f32w = std::conditional_t<W == 16, f32x8, f32x16>;
template <int W>
inline f32w<W> loadw(const float* p) {
  f32w<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int W>
inline void storew(float* p, f32w<W> v) { std::memcpy(p, &v, sizeof v); }
template <int W, typename T>
inline void load_block(const T* p, f32w<W>& v0, f32w<W>& v1) {
  if constexpr (W == 16) {
    load16(p, v0, v1);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "32-element blocks: bf16 only");
    load_bf16_even_odd(p, v0, v1);
  }
}
// Where few_rows_pairs puts column j of a panel of whole 32-column blocks.
constexpr int64_t pair_lane(int64_t j) {
  return j / 32 * 32 + (j % 8 < 4 ? 0 : 16) + j % 32 / 8 * 4 + j % 4;
}
// Where load_block puts column j of a panel of whole W-column blocks (panel_lane for W = 16).
template <typename T, int W>
constexpr int64_t block_lane(int64_t j) {
  return W == 16 ? panel_lane<T>(j) : j / W * W + j % 2 * (W / 2) + j % W / 2;
}

// sums[r * S + q] = sum_k a_r[k] * b_q[k] for R of a's rows against S contiguous rows b_q of b,
// read in lockstep: rows far apart, so S streams from memory at once (one stream per thread left
// the memory bus idle: 1-row bf16 products 1.2-1.35x slower, measured). b's 16-element blocks come
// from load16, so `as` holds a's rows in load16's lane order (bf16: split by split_even_odd, else
// `a` itself); `a` in order gives the tail of K % 16. Both lanes of a block share an accumulator.
template <int R, int S, typename T>
inline void dots_streams(float* sums, const float* __restrict as, const float* __restrict a, int64_t lda, int64_t K,
                         const T* const* b) {
  constexpr int64_t kLine = 64 / sizeof(T), kAhead = 2048 / sizeof(T);  // prefetch each row 2 KiB ahead
  const int64_t whole = K / 16 * 16;
  f32x8 acc[R][S];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < S; ++q) acc[r][q] = f32x8{};
  }
  for (int64_t k = 0; k < whole; k += 16) {
    if constexpr (R == 1) {  // (one row: the hardware prefetchers alone were faster, measured)
      for (int q = 0; q < S; ++q) {
        f32x8 v0, v1;
        load16(b[q] + k, v0, v1);
        acc[0][q] += load8(as + k) * v0;  // (one expression would add a product: 3 ops, not 2 FMAs)
        acc[0][q] += load8(as + k + 8) * v1;
      }
    } else {
      if (k % kLine == 0) {
        for (int q = 0; q < S; ++q) __builtin_prefetch(b[q] + k + kAhead);
      }
      // each half of the block with a's R vectors of it held in registers across the S streams:
      // left to the compiler, every FMA loaded its a operand again (R + 1 loads per R FMAs), and
      // 2-4-row blocks ran 1.2-1.6x slower (one thread, L1 to L3, measured)
      for (int half = 0; half < 2; ++half) {
        f32x8 ar[R];
        for (int r = 0; r < R; ++r) ar[r] = in_register(load8(as + r * lda + k + 8 * half));
        for (int q = 0; q < S; ++q) {
          const f32x8 v = load16_half(b[q] + k, half);
          for (int r = 0; r < R; ++r) acc[r][q] += ar[r] * v;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < S; ++q) {
      const f32x8 t = acc[r][q];
      float sum = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
      for (int64_t j = whole; j < K; ++j) sum += a[r * lda + j] * load_float(b[q], j);
      sums[r * S + q] = sum;
    }
  }
}

// out[0:M, n] for the rows n = rows[0:S] of b (contiguous, row n at b + n * sb1): a's rows (row
// stride lda) 4 (2, 1) at a time against the S rows of b together (dots_streams).
template <int S, typename T>
inline void dots_rows(T* __restrict out, int64_t ldo, const float* as, const float* af, int64_t lda, int64_t M,
                      int64_t K, const T* b, int64_t sb1, const int64_t* rows) {
  const T* bq[S];
  for (int q = 0; q < S; ++q) bq[q] = b + rows[q] * sb1;
  float sums[4 * S];
  const auto put = [&](int64_t i, int R) {
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < S; ++q) store_float(out + (i + r) * ldo, rows[q], sums[r * S + q]);
    }
  };
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dots_streams<4, S>(sums, as + i * lda, af + i * lda, lda, K, bq), put(i, 4);
  for (; i + 2 <= M; i += 2) dots_streams<2, S>(sums, as + i * lda, af + i * lda, lda, K, bq), put(i, 2);
  if (i < M) dots_streams<1, S>(sums, as + i * lda, af + i * lda, lda, K, bq), put(i, 1);
}

// acc[0:MB, 0:N] (row stride ldacc) += a[0:MB, k0:k1] (fp32, row stride lda) @ b[k0:k1, 0:N] (row k at b + k * sb0):
// b's rows read once, four at a time, into fp32 accumulators that stay in L1 (each whole W-column
// block in load_block's lane order, the tail in order). Few of a's rows (a decode step's expert) use
// each of b's values a few times only: reading b is what bounds it, so the four rows come from the
// four quarters of [k0, k1), four streams from memory at once (against four adjacent rows: bf16 1
// / 4 rows 1.35x / 1.2-1.45x faster, measured), each prefetched two rows on.
template <int MB, int W, typename T>
void few_rows_stream(float* __restrict acc, int64_t ldacc, const float* __restrict a, int64_t lda,
                     const T* __restrict b, int64_t sb0, int64_t k0, int64_t k1, int64_t N) {
  using V = f32w<W>;
  constexpr int H = W / 2;  // lanes of V
  const int64_t whole = N / W * W;
  const int64_t L = (k1 - k0) / 4;  // rows k, k + L, k + 2L, k + 3L together
  for (int64_t k = k0; k < k0 + L; ++k) {
    const T* bk = b + k * sb0;
    for (int64_t n = 0; n < whole; n += W) {
      V v[4][2];
      if (n % (64 / sizeof(T)) == 0) {  // once per line
        for (int q = 0; q < 4; ++q) __builtin_prefetch(bk + (q * L + 2) * sb0 + n);
      }
      for (int q = 0; q < 4; ++q) load_block<W>(bk + q * L * sb0 + n, v[q][0], v[q][1]);
      for (int r = 0; r < MB; ++r) {
        const float* ar = a + r * lda + k;
        float* cr = acc + r * ldacc + n;
        V lo = loadw<W>(cr), hi = loadw<W>(cr + H);
        for (int q = 0; q < 4; ++q) lo += ar[q * L] * v[q][0], hi += ar[q * L] * v[q][1];
        storew<W>(cr, lo);
        storew<W>(cr + H, hi);
      }
    }
  }
  int64_t k = k0 + 4 * L;
  for (; k < k1; ++k) {
    const T* bk = b + k * sb0;
    for (int64_t n = 0; n < whole; n += W) {
      V v0, v1;
      load_block<W>(bk + n, v0, v1);
      for (int r = 0; r < MB; ++r) {
        float* cr = acc + r * ldacc + n;
        storew<W>(cr, loadw<W>(cr) + a[r * lda + k] * v0);
        storew<W>(cr + H, loadw<W>(cr + H) + a[r * lda + k] * v1);
      }
    }
  }
  for (int64_t n = whole; n < N; ++n) {
    for (int r = 0; r < MB; ++r) {
      float sum = 0.f;
      for (k = k0; k < k1; ++k) sum += a[r * lda + k] * load_float(b + k * sb0, n);
      acc[r * ldacc + n] += sum;
    }
  }
}

#if defined(__AVX512F__)
// In place: r[i] (16 32-bit words each) becomes column i of the 16 x 16 matrix of words r held.
inline void transpose16x16_words(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int s = 0; s < 4; ++s) {
      t[i + s] = _mm512_shuffle_i32x4(r[i + s], r[i + 4 + s], 0x88);
      t[i + 4 + s] = _mm512_shuffle_i32x4(r[i + s], r[i + 4 + s], 0xdd);
    }
  }
  for (int s = 0; s < 8; ++s) {
    r[s] = _mm512_shuffle_i32x4(t[s], t[8 + s], 0x88);
    r[8 + s] = _mm512_shuffle_i32x4(t[s], t[8 + s], 0xdd);
  }
}
#endif

#if defined(__AVX512BW__)
// With AVX-512: bf16 dot products 32 elements a step in 16-lane vectors. A weight block's 32 bf16
// values become fp32 as their even and odd elements (a shift, a mask), each multiplied into its
// rows' accumulators by 16-lane FMAs against a's rows split alike (split_even_odd32), or, where
// AVX512-BF16's own dot product is the faster (bf16_pair_dots: Zen 4), by VDPBF16PS on the bf16
// values as they lie. On the 2-core Xeon it issues at half the FMA rate (2 x 16-lane FMAs per cycle
// against one vdpbf16ps per 2, register-only loops, measured): the FMAs ran its 4-16-row products
// 1.25-1.4x faster from L2 (one thread, measured).
constexpr bool kDots512 = true;

// a's row (K bf16 elements) in fp32, each 32-element block as its 16 even then its 16 odd elements,
// zeros after K up to the next whole block.
inline void split_even_odd32(float* __restrict out, const c10::BFloat16* __restrict a, int64_t K) {
  for (int64_t k = 0; k < K; k += 32) {
    for (int j = 0; j < 16; ++j) {
      out[k + j] = k + 2 * j < K ? load_float(a, k + 2 * j) : 0.f;
      out[k + 16 + j] = k + 2 * j + 1 < K ? load_float(a, k + 2 * j + 1) : 0.f;
    }
  }
}

// One 32-element step k of dots_lockstep: R of a's rows and S of b's (rows ldb apart) loaded as
// Dots takes them (Masked: the tail of K by masked loads, zeros after it), their products added.
// With R >= From > 0, each of b's rows also fetched into L2 kDotsAhead bytes (8 KiB) ahead in its
// stream (the few-row kernels walk b's rows in order); From == kIntoL1: into L1, below.
// few_rows_dots picks From as measured on two 2-core AMD EPYCs, paired or interleaved:
// - Zen 4 (512-bit FMAs as two halves): Dots::kPrefetchRows, by block. VDPBF16PS, 8 experts of
//   7168 x 1024 / 1024 x 3584 from memory at 2-8 rows 0.77-0.96x the time with it;
//   transformers-layout decode steps 0.87-0.98x (Mixtral-shaped), 0.94-1.01x (Qwen3-MoE-shaped).
//   Not with one row of bf16: a prefetch a line beside one load and one VDPBF16PS cost more than it
//   hid, one-token bf16 decode steps 0.86-0.93x the time without it; fp32 one-row steps (DotsF32)
//   took 1.04-1.1x as long without it.
// - Zen 5 (full_width_512): kIntoL1 where the product has Dots::kWidePrefetchRows of a's rows or
//   more (bf16 pairs: 5), else none. From == kIntoL1: each of b's rows fetched into L1
//   kDotsAheadL1 bytes (2 KiB) ahead, in every block of rows. With 4+ rows of long weight rows a's
//   rows no longer stay in L1 beside the step's weight lines (session 39): each step loads them
//   from L2 while the weight's lines, fetched on demand, arrive in L1 late; fetched ahead they do
//   not (the likely reason; not profiled). expert_mlp on transformers-layout experts, every one
//   at m rows, read_work's time over the op's, median of per-round ratios over 9 interleaved
//   rounds, one build (session 40):
//   against the earlier choice (into L2 8 KiB ahead at 6+ rows), bf16 from memory 8
//   Mixtral-shaped m = 5 / 6 / 7 / 8 0.75-0.80 / 0.77-0.78 / 0.76 / 0.75-0.77 -> 0.86 / 0.84-0.86 /
//   0.82 / 0.80-0.83 of the read, 64 Qwen3-MoE-shaped 0.75-0.79 / 0.70-0.74 / 0.74 / 0.77-0.78 ->
//   0.85-0.88 / 0.83-0.84 / 0.82 / 0.81-0.85; 8 Qwen3-MoE-shaped from the L3 at 6-8 rows 1.11-1.18x
//   as fast, at 5 rows 0.97-1.02x. At 4 rows even (0.95-1.04x), at 2-3 rows 1.0-1.14x slower: not
//   there. Without any prefetch (measured before): bf16 at 2-5 rows 0.99-1.29x as fast as into L2
//   (the L3 cases the most); fp32 at 1-8 rows 1.0-1.42x as fast (1.0-1.1x from memory), and into L1
//   from 3 rows (3 KiB ahead) 4-16-token decode steps 0.97-1.05x the time (not taken).
// Into L1 on a Zen 4: 1-6 rows 1.05-1.26x slower. Dots512 (the AMX Xeon's): never (not measured
// there).
constexpr int64_t kDotsAhead = 8192;
constexpr int kIntoL1 = -1;  // From: b's rows into L1 kDotsAheadL1 bytes ahead, every block
constexpr int64_t kDotsAheadL1 = 2048;

// Whether the few-row dot kernels on Dots fetch b's rows into L1 (From == kIntoL1) for a product of
// M rows of a: on a Zen 5 (full_width_512) from Dots::kWidePrefetchRows rows (few_rows_dots; the
// products ceiling, dot_read_work, fetches as they do).
template <typename Dots>
inline bool dots_into_l1(int64_t M) {
  return Dots::kWidePrefetchRows > 0 && M >= Dots::kWidePrefetchRows && full_width_512();
}
template <typename Dots, int R, int S, bool Masked, int From>
__attribute__((always_inline)) inline void dots_step(__m512 (&acc)[R][S], const typename Dots::A* __restrict a,
                                                     int64_t lda, int64_t k, const typename Dots::B* b, int64_t ldb,
                                                     __mmask32 mask) {
  typename Dots::ARow ar[R];
  for (int r = 0; r < R; ++r) ar[r] = Dots::template load_a<Masked>(a + r * lda + k, mask);
  if constexpr (Dots::kPinRows) {  // a's rows kept in registers (dots_blocks)
    for (int r = 0; r < R; ++r) asm("" : "+v"(ar[r]));
  }
  for (int q = 0; q < S; ++q) {
    if constexpr (From == kIntoL1 && !Masked) {
      _mm_prefetch(reinterpret_cast<const char*>(b + q * ldb + k) + kDotsAheadL1, _MM_HINT_T0);
    } else if constexpr (From > 0 && R >= From && !Masked) {
      _mm_prefetch(reinterpret_cast<const char*>(b + q * ldb + k) + kDotsAhead, _MM_HINT_T1);
    }
    const typename Dots::BRow v = Dots::template load_b<Masked>(b + q * ldb + k, mask);
    for (int r = 0; r < R; ++r) acc[r][q] = Dots::madd(acc[r][q], ar[r], v);
  }
}

// sums[i] = _mm512_reduce_add_ps(v[i]) for i < N (1-16) bit for bit, as a tree over all N at once:
// the same adds in the same order as GCC's reduce (each lane i + 8, then + 4, + 2, + 1), its
// shuffles shared, so N = 16 sums take 15 adds, 30 shuffles and a permute in place of 16 times 4
// adds and 4 shuffles.
template <int N>
inline void reduce_sums(const __m512* v, float* sums) {
  static_assert(N >= 1 && N <= 16, "reduce_sums: 1-16 vectors");
  const __m512 zero = _mm512_setzero_ps();
  // each level pairs the vectors (an odd last one with zeros): 1: lanes i + 8 (two vectors' 8 lanes
  // side by side), 2: + 4, 3 and 4 within 128-bit lanes: + 2, + 1
  constexpr int n1 = (N + 1) / 2, n2 = (n1 + 1) / 2, n3 = (n2 + 1) / 2;
  __m512 s1[8], s2[4], s3[2];
  for (int p = 0; p < n1; ++p) {
    const __m512 a = v[2 * p], b = 2 * p + 1 < N ? v[2 * p + 1] : zero;
    s1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int p = 0; p < n2; ++p) {
    const __m512 a = s1[2 * p], b = 2 * p + 1 < n1 ? s1[2 * p + 1] : zero;
    s2[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int p = 0; p < n3; ++p) {
    const __m512 a = s2[2 * p], b = 2 * p + 1 < n2 ? s2[2 * p + 1] : zero;
    s3[p] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 a = s3[0], b = n3 > 1 ? s3[1] : zero;
  const __m512 all = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  // v[i]'s sum lies in lane 4 (i % 4) + i / 4
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(sums, _mm512_permutexvar_ps(order, all));
}

// sums[r * S + q] = sum_k a_r[k] * b_q[k] for R rows of a (row stride lda, as Dots takes them)
// against S rows b_q = b + q * ldb of b in lockstep (as dots_streams), 32 elements a step, whole
// steps by plain loads, the tail of K by masked ones; the sums by reduce_sums (sums has room for 16
// floats past the R * S); a step's rows of a forced into registers where Dots::kPinRows. Dots: its
// rows of a (`A`) and a step's registers of one (`load_a`), of one row of b (`load_b`) and their
// products added (`madd`). The plain loads and b's rows as one pointer and a stride (with S
// pointers GCC ran out of general registers and kept a's rows in stack slots) ran a 2-core Zen 4's
// VDPBF16PS products 1.04-1.2x as fast from L1 at 2-8 rows (one thread, rows of 1024 and 3584
// elements) and in 0.83-0.86x the time from L3 at 4-12 rows (4 experts of 1024 x 1024, 2 threads;
// as fast from memory, where the read bounds them).
template <typename Dots, int R, int S, int From>
inline void dots_lockstep(float* sums, const typename Dots::A* __restrict a, int64_t lda, int64_t K,
                          const typename Dots::B* b, int64_t ldb) {
  __m512 acc[R][S];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < S; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  const int64_t whole = K / 32 * 32;
  for (int64_t k = 0; k < whole; k += 32) dots_step<Dots, R, S, false, From>(acc, a, lda, k, b, ldb, 0);
  if (whole < K) {
    const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (K - whole)) - 1);
    dots_step<Dots, R, S, true, From>(acc, a, lda, whole, b, ldb, tail);
  }
  static_assert(R * S <= 32, "dots_lockstep: 32 accumulators at most");
  if constexpr (R * S == 1) {
    sums[0] = _mm512_reduce_add_ps(acc[0][0]);
  } else if constexpr (R * S <= 16) {
    reduce_sums<R * S>(&acc[0][0], sums);
  } else {
    reduce_sums<16>(&acc[0][0], sums);
    reduce_sums<R * S - 16>(&acc[0][0] + 16, sums + 16);
  }
}

// a's rows split by split_even_odd32 (fp32, whole 32-element blocks: read unmasked), each weight
// block widened into its even and odd elements (a shift, a mask), two 16-lane FMAs.
struct Dots512 {
  using A = float;
  using B = c10::BFloat16;
  static constexpr int kPrefetchRows = 0, kWidePrefetchRows = 0;  // never (dots_step)
  static constexpr bool kThreeRows = false;  // (row_blocks: with 8 streams 3 rows would spill)
  static constexpr int kWideTwoStreamRows = 0;  // (few_rows_dots: not measured)
  static constexpr bool kWideEightStreams = false;  // (few_rows_dots: not measured)
  static constexpr bool kPinRows = false;  // (dots_step: not measured)
  struct ARow {
    __m512 even, odd;
  };
  using BRow = ARow;
  template <bool>
  static ARow load_a(const float* p, __mmask32) {
    return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)};
  }
  template <bool Masked>
  static BRow load_b(const c10::BFloat16* p, __mmask32 mask) {
    const __m512i u = Masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
  static __m512 madd(__m512 acc, const ARow& a, const BRow& b) {
    return _mm512_fmadd_ps(a.odd, b.odd, _mm512_fmadd_ps(a.even, b.even, acc));
  }
};

#if defined(__AVX512BF16__)
// VDPBF16PS on a's rows as they lie (bf16), where bf16_pair_dots() holds. Against Dots512 on a
// 2-core Zen 4 (8 experts of 7168 x 1024, b's rows contiguous, 2 threads, paired): the same at 1
// row, 0.79x the time at 4, 0.73x at 6; software prefetch of b into L1 1-2 KiB ahead made it
// 1.05-1.18x slower (into L2 8 KiB ahead it is faster: dots_step).
struct DotsPairs {
  using A = c10::BFloat16;
  using B = c10::BFloat16;
  static constexpr int kPrefetchRows = 2, kWidePrefetchRows = 5;  // (dots_step)
  static constexpr bool kThreeRows = true;  // (row_blocks)
  static constexpr int kWideTwoStreamRows = 2;  // (few_rows_dots)
  static constexpr bool kWideEightStreams = false;  // (few_rows_dots: its S = 8 rule is the Zen 4's)
  static constexpr bool kPinRows = true;  // (dots_step, dots_blocks)
  using ARow = __m512bh;
  using BRow = __m512bh;
  template <bool Masked>
  static __m512bh load_a(const c10::BFloat16* p, __mmask32 mask) {
    return reinterpret_cast<__m512bh>(Masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p));
  }
  template <bool Masked>
  static __m512bh load_b(const c10::BFloat16* p, __mmask32 mask) {
    return load_a<Masked>(p, mask);
  }
  static __m512 madd(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// few_rows_stream by VDPBF16PS, where bf16_pair_dots() holds: acc[0:MB, 0:N] += a[0:MB, k0:k1] @
// b[k0:k1, 0:N] with a's rows as they lie (bf16, row stride lda) and b row-major (row k at b + k *
// sb0), k0 even. Each pair of b's rows (k, k + 1) is interleaved into VDPBF16PS's pairs 32 columns
// at a time (unpacklo / unpackhi within 128-bit lanes: the first vector holds columns 0-3, 8-11,
// 16-19, 24-27 of the block, the second the others: pair_lane), against a's pair (a[k], a[k + 1])
// broadcast; the four quarters of [k0, k1)'s pairs stream at once, as few_rows_stream's rows, each
// quarter's next pair prefetched. An odd last row pairs with zeros. On a 2-core Zen 4 (8 experts,
// K 1024, 2 threads, paired against few_rows_stream): N 7168 0.69-0.77x the time at 7 rows,
// 0.83-0.99x at 4, 0.87-1.09x at 2; N 3584 0.80-0.91x at 2-7 rows; but with rows of 1024 columns
// or fewer 1.1-1.27x slower at 1-2 rows and about even above (8 rows streaming at once against
// 4; prefetching 4-8 rows ahead or two halves instead of four quarters did not help): so only for
// rows of kPairRowsN columns or more, 2+ rows. On a Zen 5 (full_width_512) at 2+ rows whatever the
// width (expert_mlp on [E, K, N] experts, every one at m rows, 2 threads, median of per-round
// ratios over 8 interleaved rounds, against the FMA kernel on rows under kPairRowsN: 8
// Mixtral-shaped / 64 Qwen3-MoE-shaped from memory 0.87-0.96x / 0.70-0.94x the time at m = 2-8, 8
// Qwen3-MoE-shaped from the L3 0.82-1.07x; bench --hf's blocks in that layout 0.88-0.96x at 4-16
// tokens). One row stays with few_rows_stream (pairs 1.07-1.17x its time there).
constexpr int64_t kPairRowsN = 2048;
template <int MB>
void few_rows_pairs(float* __restrict acc, int64_t ldacc, const c10::BFloat16* __restrict a, int64_t lda,
                    const c10::BFloat16* __restrict b, int64_t sb0, int64_t k0, int64_t k1, int64_t N) {
  const int64_t whole = N / 32 * 32;
  const int64_t L = (k1 - k0) / 8;  // pairs per quarter: rows k, k + 2L, k + 4L, k + 6L (and each + 1)
  const auto pair_of = [&](int r, int64_t k, bool alone) {
    uint32_t v;
    std::memcpy(&v, a + r * lda + k, alone ? 2 : 4);
    if (alone) v &= 0xFFFFu;
    return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(v)));
  };
  const auto step = [&](int64_t k, int quarters, int64_t stride, bool alone) {
    __m512bh ap[MB][4];
    for (int r = 0; r < MB; ++r) {
      for (int q = 0; q < quarters; ++q) ap[r][q] = pair_of(r, k + q * stride, alone);
    }
    const c10::BFloat16* bk = b + k * sb0;
    for (int64_t n = 0; n < whole; n += 32) {
      __m512bh v[4][2];
      for (int q = 0; q < quarters; ++q) {
        const c10::BFloat16* row = bk + q * stride * sb0 + n;
        if (quarters > 1) {  // the quarter's next pair (a line of each row a step)
          __builtin_prefetch(row + 2 * sb0);
          __builtin_prefetch(row + 3 * sb0);
        }
        const __m512i lo = _mm512_loadu_si512(row);
        const __m512i hi = alone ? _mm512_setzero_si512() : _mm512_loadu_si512(row + sb0);
        v[q][0] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(lo, hi));
        v[q][1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(lo, hi));
      }
      for (int r = 0; r < MB; ++r) {
        float* cr = acc + r * ldacc + n;
        __m512 c0 = _mm512_loadu_ps(cr), c1 = _mm512_loadu_ps(cr + 16);
        for (int q = 0; q < quarters; ++q) c0 = _mm512_dpbf16_ps(c0, v[q][0], ap[r][q]), c1 = _mm512_dpbf16_ps(c1, v[q][1], ap[r][q]);
        _mm512_storeu_ps(cr, c0);
        _mm512_storeu_ps(cr + 16, c1);
      }
    }
  };
  for (int64_t k = k0; k < k0 + 2 * L; k += 2) step(k, 4, 2 * L, false);
  int64_t k = k0 + 8 * L;
  for (; k + 2 <= k1; k += 2) step(k, 1, 0, false);
  if (k < k1) step(k, 1, 0, true);
  for (int64_t n = whole; n < N; ++n) {
    for (int r = 0; r < MB; ++r) {
      float sum = 0.f;
      for (k = k0; k < k1; ++k) sum += load_float(a + r * lda, k) * load_float(b + k * sb0, n);
      acc[r * ldacc + n] += sum;
    }
  }
}
#endif

// fp32 rows of a and b as they lie, a step's 32 elements as two 16-lane vectors each, two FMAs
// (GCC folds b's loads into the FMAs: forced into registers, 1.05-1.2x slower at 2-8 rows). Against
// the 8-lane dots_rows it replaces with AVX-512 (2-core Zen 4, 2 threads, paired): 8 experts of
// 7168 x 1024 from memory 0.92-0.94x the time at 1 row, 0.64-0.82x at 2-8; transformers-layout fp32
// decode steps 0.80-0.95x (Mixtral-shaped, 1-16 tokens), 0.87-1.0x (Qwen3-MoE-shaped).
struct DotsF32 {
  using A = float;
  using B = float;
  static constexpr int kPrefetchRows = 1, kWidePrefetchRows = 0;  // (dots_step)
  static constexpr bool kThreeRows = false;  // (row_blocks: not measured)
  static constexpr int kWideTwoStreamRows = 0;  // (few_rows_dots: 2 streams at 1-4 rows 0.94-1.06x the time)
  static constexpr bool kWideEightStreams = true;  // (few_rows_dots)
  static constexpr bool kPinRows = false;  // (dots_step: its a rows are pairs of vectors; not measured)
  struct ARow {
    __m512 lo, hi;
  };
  using BRow = ARow;
  template <bool Masked>
  static ARow load_a(const float* p, __mmask32 mask) {
    if constexpr (Masked) {
      return {_mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), p),
              _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), p + 16)};
    }
    return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)};
  }
  template <bool Masked>
  static BRow load_b(const float* p, __mmask32 mask) {
    return load_a<Masked>(p, mask);
  }
  static __m512 madd(__m512 acc, const ARow& a, const BRow& b) {
    return _mm512_fmadd_ps(a.hi, b.hi, _mm512_fmadd_ps(a.lo, b.lo, acc));
  }
};

// a's M rows in the blocks the dot kernels take them against S of b's rows in lockstep: 4 at a time
// (S <= 4), then 3 where Dots::kThreeRows or with 8 streams where Dots::kWideEightStreams
// (few_rows_dots), then 2, then 1 (at most 16 accumulators and 8 of a's vectors, or 24 and 3: 27-28
// of 32 registers; DotsF32's 3 rows of 8 streams: 24 and 6, b's vectors folded into the FMAs):
// block(std::integral_constant<int, R>, i) for the block of R rows from row i. Three rows in one
// pass against 2 + 1 (VDPBF16PS pairs, 8 streams, 8 Qwen3-MoE-shaped experts from the L3, one
// thread, paired on a 2-core Zen 4): 0.77x the time; 5-6 rows in one pass of 4 streams against 4 +
// 1-2: the same (there the products bound them). On a Zen 5, 5-8 rows in one pass of 2 streams (16
// accumulators at most) against 4 + 1-4 of 4 (as dots_step's): 5 rows 1.1-1.2x as fast, 6-8 from
// 0.8x to 1.1x; again with dots_blocks (session 38) 0.66-1.08x: not taken.
template <typename Dots, int S, typename Block>
inline void row_blocks(int64_t M, const Block& block) {
  int64_t i = 0;
  const auto rows = [&](auto r_) {
    for (; i + decltype(r_)::value <= M; i += decltype(r_)::value) block(r_, i);
  };
  if constexpr (S <= 4) rows(std::integral_constant<int, 4>{});
  if constexpr (Dots::kThreeRows || (S == 8 && Dots::kWideEightStreams)) rows(std::integral_constant<int, 3>{});
  rows(std::integral_constant<int, 2>{});
  rows(std::integral_constant<int, 1>{});
}

// out[0:M, n] for one row n of b (as dots_rows; few_rows_dots's rows left over by dots_blocks),
// each output stored as it is summed. From: dots_step's.
template <typename Dots, int From = 0>
inline void dots_row512(typename Dots::B* __restrict out, int64_t ldo, const typename Dots::A* as, int64_t lda,
                        int64_t M, int64_t K, const typename Dots::B* b, int64_t sb1, int64_t n) {
  alignas(64) float sums[16];  // (reduce_sums stores 16 lanes)
  row_blocks<Dots, 1>(M, [&](auto r_, int64_t i) {
    constexpr int R = decltype(r_)::value;
    dots_lockstep<Dots, R, 1, From>(sums, as + i * lda, lda, K, b + n * sb1, 0);
    for (int r = 0; r < R; ++r) store_float(out + (i + r) * ldo, n, sums[r]);
  });
}

// out[r, n] for r < M of float sums (n = n0 + q * len + j0 + jj: sums[jj * ld + r * S + q], jj < nj)
// in out's dtype: 16 j at once, their sums transposed so that each (r, q) is one vector of its
// 16 adjacent outputs, converted as store_float converts (bf16: bf16_high_halves) and stored at
// once.
template <typename B, int S>
inline void store_sum_block(B* __restrict out, int64_t ldo, int64_t M, const float* sums, int64_t ld, int64_t n0,
                            int64_t len, int64_t j0, int nj) {
  const __mmask16 mask = static_cast<__mmask16>((1u << nj) - 1);
  for (int64_t c = 0; c < M * S; c += 16) {
    __m512i v[16];
    for (int jj = 0; jj < 16; ++jj) v[jj] = _mm512_loadu_si512(sums + jj * ld + c);
    transpose16x16_words(v);
    for (int64_t l = c; l < std::min<int64_t>(c + 16, M * S); ++l) {
      B* dst = out + (l / S) * ldo + n0 + (l % S) * len + j0;
      const __m512i u = v[l - c];
      if constexpr (std::is_same_v<B, float>) {
        _mm512_mask_storeu_ps(dst, mask, _mm512_castsi512_ps(u));
      } else {
        f32x16 f;
        std::memcpy(&f, &u, sizeof f);
        const u32x16 bits = bf16_high_halves(f) >> 16;
        __m512i h;
        std::memcpy(&h, &bits, sizeof h);
        _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(h));
      }
    }
  }
}

// out[0:M, n] for the rows n = n0 + q * len + j of b (j < len, q < S: S streams a share of b's rows
// apart), the S streams' rows j in lockstep against a's rows in row_blocks' blocks, 16 j at a
// time: each j's sums, every row block's, into a block of sums, then stored 16 outputs at once
// (store_sum_block) in place of a reduction and a scalar store per output (as every row was done
// before 2026-12-07, as dots_row512 does the rows left over: ~35% of a decode step's products went
// there, the stores' loads of their sums stalling). Same sums, same bits. 2-core Zen 5, expert_mlp on transformers-layout
// experts, every one at m rows, read_work's time over the op's (median of per-round ratios, 9-11
// interleaved rounds, against that loop in one build): bf16 from memory, 8 Mixtral-shaped
// experts m = 2 / 4 / 8 0.91 / 0.81 / 0.75 -> 0.94 / 0.90 / 0.80, 64 Qwen3-MoE-shaped 0.88 / 0.84 /
// 0.74 -> 0.90 / 0.91 / 0.77; 8 Qwen3-MoE-shaped from the L3 0.66 / 0.64 / 0.29 -> 0.81 / 0.77 /
// 0.40; fp32 m = 4 / 8 0.71 / 0.53 -> 0.91 / 0.67 (Mixtral-shaped), 0.68 / 0.47 -> 0.88 / 0.63
// (Qwen3-MoE-shaped), 0.42 / 0.24 -> 0.56 / 0.33 (L3); 1-2 rows within noise. Dots::kPinRows:
// without it GCC reloaded a's rows for every product here (16 loads a step in place of 4), and
// 8-row Qwen3-MoE-shaped steps lost (0.74 -> 0.58). The lockstep loop itself (R 4, S 4, one core) runs at 98-100%
// of the VDPBF16PS peak from L1 / L2 and ~80% from 4 MB of the L3. M * S <= kBlockSums.
constexpr int64_t kBlockSums = 64;
static_assert(4 * kFewRows <= kBlockSums, "dots_blocks: S = 4 up to kFewRows rows (S = 8 at 3 at most)");
template <typename Dots, int S, int From>
inline void dots_blocks(typename Dots::B* __restrict out, int64_t ldo, const typename Dots::A* as, int64_t lda,
                        int64_t M, int64_t K, const typename Dots::B* b, int64_t sb1, int64_t n0, int64_t len) {
  constexpr int64_t ld = kBlockSums + 16;  // a block's j apart (reduce_sums stores 16 lanes)
  alignas(64) float sums[16 * ld];
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int nj = static_cast<int>(std::min<int64_t>(16, len - j0));
    for (int jj = 0; jj < nj; ++jj) {
      const typename Dots::B* bj = b + (n0 + j0 + jj) * sb1;
      row_blocks<Dots, S>(M, [&](auto r_, int64_t i) {
        dots_lockstep<Dots, decltype(r_)::value, S, From>(sums + jj * ld + i * S, as + i * lda, lda, K, bj, len * sb1);
      });
    }
    store_sum_block<typename Dots::B, S>(out, ldo, M, sums, ld, n0, len, j0, nj);
  }
}

// gemm_few_rows with b's rows contiguous (sb0 == 1) by dots_blocks (a share's last rows that fill
// no S streams by dots_row512) with Dots on a's rows as it takes them (`as`, row stride lda), S of
// b's rows at once (a share of b's rows apart), b prefetched as dots_step says. S as measured on two 2-core AMD EPYCs: on a Zen 4 8 with 2-3 rows of bf16 a, 4
// with 1 or 4+ and with fp32 (fp32 at 2 rows: 8 streams 1.05x 4's time against a read pass, same
// runs; bf16: one row against 4 streams in place of 8, paired: one-token decode steps on
// transformers-layout experts 0.91-0.93x the time, 8 experts of 7168 x 1024 0.93x, of 1024 x 3584
// the same; 2-3 rows 1.04-1.08x slower on 4); on a Zen 5 (full_width_512) 2 with up to
// Dots::kWideTwoStreamRows rows (VDPBF16PS pairs: 2), else 4 (bf16 at 2-3 rows, 8 against 4, both
// without prefetch, as dots_step's: 2 rows 0.99-1.15x the time from memory, 1.14-1.29x from the L3;
// 3 rows 0.96-1.14x). bf16 pairs, 2 streams against 4 (expert_mlp on transformers-layout experts,
// every one with m rows, median of per-round ratios over 10 interleaved rounds, bit-identical):
// from memory, 8 Mixtral-shaped experts 0.98 / 0.98 / 0.96 / 1.03 / 0.99 / 0.96 / 1.12x the time at
// m = 1 / 2 / 3 / 4 / 5 / 6 / 8, 64 Qwen3-MoE-shaped 0.97 / 0.96 / 0.90 / 0.90 / 0.83 / 0.90 /
// 0.96x; from the L3 (8 Qwen3-MoE-shaped) 1.01 / 1.06 / 1.23 / 1.34 / 1.26 / 1.21 / 1.22x: taken
// up to 2 rows, where the L3 costs least (bench --hf's blocks' expert_mlp, 3 x 16 interleaved
// rounds: one-token steps 0.91-0.98x the time (Mixtral-shaped), 0.95-0.97x (Qwen3-MoE-shaped, cold),
// 1.0-1.01x (Qwen3-MoE-shaped, its 8 experts in the L3); 4 tokens 0.89-0.98x; 16 tokens 0.98-0.99x;
// 2 streams up to 4 rows: 16 tokens 0.94-0.97x, but the L3's 3-4 rows above). fp32 (DotsF32) on
// a Zen 5: 8 streams in 3-row blocks (one pass at 2-3 rows, 3 + 2 at 5, 3 + 3 at 6, 3 + 3 + 1-2 at
// 7-8) where 4 streams took 4-row blocks (2 + 1, 4 + 1-4), but 4 streams still at 1 and 4 rows
// (one pass either way; 8 streams there 0.92-1.01x / 0.88-0.97x as fast) and above 8 (kBlockSums;
// not measured). With fp32 a's rows and b's lines alike 64 bytes of 16 products, each pass of a
// block streams its S rows of b through L1 again, so the two kernels' L1 traffic is about even;
// the 8 streams keep twice the lines from memory (or the L3) in flight. The same op on
// transformers-layout experts, every one at m rows, read_work's time over the op's, median of 5-9
// interleaved rounds per run, old -> new in each run (bit-identical): 8 Mixtral-shaped experts from
// memory m = 2 / 3 / 5 / 6 / 7 / 8: 0.91-0.95 -> 0.95-0.97 / 0.84-0.87 -> 0.94-0.95 / 0.54-0.79 ->
// 0.58-0.81 / 0.65-0.67 -> 0.78-0.80 / 0.39-0.64 -> 0.53-0.73 / 0.43-0.69 -> 0.47-0.76 (the low
// ones where memory read fast); 64 Qwen3-MoE-shaped 0.91 -> 0.93-0.96 / 0.78 -> 0.91 / 0.76-0.79 ->
// 0.76-0.77 / 0.66-0.67 -> 0.74-0.75 / 0.60 -> 0.69 / 0.61-0.64 -> 0.67-0.70; 8 Qwen3-MoE-shaped
// (mostly the L3) 0.79 -> 0.81 / 0.59 -> 0.76 / 0.53 -> 0.54 / 0.42 -> 0.47 / - / 0.42 -> 0.45. bench
// --hf's fp32 forward, 3 interleaved runs each: Mixtral-shaped 16 tokens 55-73% -> 75-86% of the
// limit, the other decode rows within their noise. Fewer streams in one pass do worse (8 rows in
// one pass of 2 streams, 16-element steps: 0.53 against 0.70; 2 streams of 4-row blocks 0.41-0.59
// against 0.64-0.74), as does software prefetch at 5-8 rows (into L2 8 KiB ahead or into L1 2 KiB
// ahead: 0.58-0.72 against 0.65-0.76).
template <typename Dots>
inline void few_rows_dots(typename Dots::B* __restrict out, int64_t ldo, const typename Dots::A* as, int64_t lda,
                          int64_t M, const typename Dots::B* __restrict b, int64_t sb1, int64_t K, int64_t N) {
  const bool wide = full_width_512();
  const int from = !wide ? Dots::kPrefetchRows : dots_into_l1<Dots>(M) ? kIntoL1 : 0;
  // 8 streams: on a Zen 4 bf16 at 2-3 rows; on a Zen 5 where Dots::kWideEightStreams (fp32) at 2-3
  // and 5-8 rows (M * S within kBlockSums)
  const bool eight = wide ? Dots::kWideEightStreams && M != 1 && M != 4 && M * 8 <= kBlockSums
                          : !std::is_same_v<typename Dots::B, float> && M >= 2 && M <= 3;
  const auto run = [&](auto s_, auto from_) {
    constexpr int S = decltype(s_)::value, From = decltype(from_)::value;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      const int64_t len = (n1 - n0) / S;
      dots_blocks<Dots, S, From>(out, ldo, as, lda, M, K, b, sb1, n0, len);
      for (int64_t n = n0 + S * len; n < n1; ++n) dots_row512<Dots, From>(out, ldo, as, lda, M, K, b, sb1, n);
    });
  };
  const auto with_from = [&](auto s_) {
    if (from == 0) return run(s_, std::integral_constant<int, 0>{});
    if constexpr (Dots::kWidePrefetchRows > 0) {
      if (from == kIntoL1) return run(s_, std::integral_constant<int, kIntoL1>{});
    }
    if constexpr (Dots::kPrefetchRows > 1) {
      if (from == Dots::kPrefetchRows) return run(s_, std::integral_constant<int, Dots::kPrefetchRows>{});
    }
    run(s_, std::integral_constant<int, 1>{});
  };
  if (eight) return with_from(std::integral_constant<int, 8>{});
  if constexpr (Dots::kWideTwoStreamRows > 0) {
    if (wide && M <= Dots::kWideTwoStreamRows) return with_from(std::integral_constant<int, 2>{});
  }
  with_from(std::integral_constant<int, 4>{});
}

inline void gemm_few_rows512(c10::BFloat16* __restrict out, int64_t ldo, const c10::BFloat16* __restrict a,
                             int64_t lda, int64_t M, const c10::BFloat16* __restrict b, int64_t sb1, int64_t K,
                             int64_t N) {
#if defined(__AVX512BF16__)
  if (bf16_pair_dots()) return few_rows_dots<DotsPairs>(out, ldo, a, lda, M, b, sb1, K, N);
#endif
  const int64_t ka = unaliased_stride((K + 31) / 32 * 32);
  std::vector<float> as(M * ka);
  for (int64_t i = 0; i < M; ++i) split_even_odd32(&as[i * ka], a + i * lda, K);
  few_rows_dots<Dots512>(out, ldo, as.data(), ka, M, b, sb1, K, N);
}

#if defined(__AVX512F__)
// v with its NaN lanes as 0x7FC00000, which rounds to torch's bf16 NaN (0x7FC0; x86's own NaN from
// inf * 0 has the sign bit set).
inline __m512 canonical_nans(__m512 v) {
  return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}

// Lines to bring into L2 while a kernel works on others, a few a step of its loop: `total` 64-byte
// lines of `rows` of lines_per_row lines, row_bytes apart from base, per_step of them a step.
struct LineFetch {
  const char* base = nullptr;  // rows of lines_per_row 64-byte lines, row_bytes apart
  int64_t row_bytes = 0, lines_per_row = 1, total = 0, per_step = 0, next = 0;
  void step() {
    for (int64_t i = 0; i < per_step && next < total; ++i, ++next) {
      _mm_prefetch(base + (next / lines_per_row) * row_bytes + (next % lines_per_row) * 64, _MM_HINT_T1);
    }
  }
};

// m rows of a (rows lda apart) into 16-row blocks of dst (16 * K elements each; rows past m zeros):
// for the transposed product (`pairs`) as B tiles, [K / 2 pairs][16 rows] of 32-bit words (a 16 x 16
// word transpose per 32 of K), else as A tiles, [K / 32 steps][16 rows][32].
inline void pack_rows(c10::BFloat16* dst, const c10::BFloat16* a, int64_t lda, int64_t m, int64_t K, bool pairs) {
  for (int64_t blk = 0; blk * 16 < m; ++blk) {
    const int64_t valid = std::min<int64_t>(16, m - blk * 16);
    const c10::BFloat16* src = a + blk * 16 * lda;
    c10::BFloat16* d = dst + blk * 16 * K;
    for (int64_t k = 0; k < K; k += 32) {
      __m512i r[16];
      for (int64_t t = 0; t < 16; ++t) r[t] = t < valid ? _mm512_loadu_si512(src + t * lda + k) : _mm512_setzero_si512();
      if (pairs) transpose16x16_words(r);
      for (int t = 0; t < 16; ++t) _mm512_store_si512(d + k * 16 + t * 32, r[t]);
    }
  }
}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// AMX-BF16 for a decode step's few rows against a weight with contiguous rows, as the transposed
// product: out^T [N, M] = b [N, K] @ a^T, so that 16 rows of the weight x 32 of K are one A tile
// loaded from the weight as it lies (no packing), and a's rows (M <= 16, zeros after) are packed
// once per call into the B tile's layout (pairs of K: VNNI). One TDPBF16PS is 16 x 16 x 32 products
// in 16 cycles: 1 KiB of weight per 16 cycles, far above what memory or the L3 deliver, so the
// products of 3-16 rows read at about the pace of one (the 16-lane FMAs of Dots512 do 16 x 2
// products a cycle: compute-bound from 4 rows on). 8 Mixtral-shaped 7168 x 1024 bf16 experts, 2
// threads, two runs: 2.1-2.2 / 2.1-2.2 / 2.3-2.4 / 2.4-2.6 / 2.4-2.5 ms at 3 / 4 / 8 / 12 / 16 rows
// against 2.0 for `read_work` (Dots512: 2.7 / 2.4 / 3.8 / - / 8.5; oneDNN: 3.6-3.9 at any).
inline bool amx_ready() {  // Linux hands out AMX's tile state only on request (once per process)
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

// Configures this thread's tiles 0-7 as 16 rows of 64 bytes (every tile the kernels use).
inline void load_tile_config() {
  struct {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// out[0:M, n] for the 16-row blocks n in [n0, n1) of b: tiles 0-1 accumulate two blocks (32 rows)
// at a time, 3-4 hold their A tiles, 6 the packed a^T; tiles configured by the caller (load_tile_config).
// Two blocks in lockstep rather than three (fewer of the weight's rows streamed at once): 8 or 64
// experts at 3 / 8 / 16 rows, 0.86-1.0x the time (7168 x 1024, 768 x 1024, 1024 x 3584 and
// 1024 x 384 weights; 0.86-0.91x for the last), one block 0.84-1.07x (paired, bit-identical).
inline void amx_blocks(c10::BFloat16* __restrict out, int64_t ldo, const c10::BFloat16* packed, int64_t M,
                       const c10::BFloat16* b, int64_t sb1, int64_t K, int64_t n0, int64_t n1) {
  alignas(64) float c[2][16][16];
  const int64_t stride = sb1 * static_cast<int64_t>(sizeof(c10::BFloat16));
  const auto put = [&](int j, int64_t first) {  // c[j] turned by a word transpose: row m of r, token m's sums
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c[j][i]);
    transpose16x16_words(r);
    for (int64_t m = 0; m < M; ++m) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo + first),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(canonical_nans(_mm512_castsi512_ps(r[m])))));
    }
  };
  int64_t n = n0;
  for (; n + 32 <= n1; n += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(6, packed + k * 16, 64);
      _tile_loadd(3, b + n * sb1 + k, stride);
      _tile_loadd(4, b + (n + 16) * sb1 + k, stride);
      _tile_dpbf16ps(0, 3, 6);
      _tile_dpbf16ps(1, 4, 6);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    put(0, n), put(1, n + 16);
  }
  for (; n + 16 <= n1; n += 16) {
    _tile_zero(0);
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(6, packed + k * 16, 64);
      _tile_loadd(3, b + n * sb1 + k, stride);
      _tile_dpbf16ps(0, 3, 6);
    }
    _tile_stored(0, c[0], 64);
    put(0, n);
  }
}

// gemm_few_rows for bf16, b's rows contiguous, K a multiple of 32, by amx_blocks over whole 16-row
// blocks of b (split over the threads), the last N % 16 rows by Dots512. a's rows packed by 16 x 16
// word transposes and each block's sums stored by one (element by element before: 8 experts side
// by side, paired, 0.86-0.97x the time for 7168 x 1024 weights at 3-16 rows, 0.88-0.99x for
// 1024 x 3584 ones, the gain growing with the rows).
inline void gemm_few_rows_amx(c10::BFloat16* __restrict out, int64_t ldo, const c10::BFloat16* __restrict a,
                              int64_t lda, int64_t M, const c10::BFloat16* __restrict b, int64_t sb1, int64_t K,
                              int64_t N) {
  std::vector<c10::BFloat16> buf;
  c10::BFloat16* packed = line_aligned(buf, K * 16);  // [K / 2][16 rows][2]
  pack_rows(packed, a, lda, M, K, true);
  const int64_t blocks = N / 16;
  at::parallel_for(0, blocks, 2, [&](int64_t q0, int64_t q1) {
    load_tile_config();
    amx_blocks(out, ldo, packed, M, b, sb1, K, q0 * 16, q1 * 16);
    _tile_release();
  });
  if (N % 16 != 0) {
    const int64_t ka = unaliased_stride(K);
    std::vector<float> as(M * ka);
    for (int64_t i = 0; i < M; ++i) split_even_odd32(&as[i * ka], a + i * lda, K);
    for (int64_t n = blocks * 16; n < N; ++n) dots_row512<Dots512>(out, ldo, as.data(), ka, M, K, b, sb1, n);
  }
}

// The same for row-major b ([K, N], rows sb0 apart; K a multiple of 32, N of 64): out [M, N] = a @ b
// with a's rows (zeros after them) as the A tile and b's pairs of rows interleaved on the fly into
// two B tiles per 32 columns (the even / odd column groups of unpacklo / unpackhi within each
// 128-bit lane), 64 columns (four accumulator tiles) at a time; columns split over the threads.
// Tiles: 0-3 accumulators, 4 a, 5-6 b. 8 Mixtral-shaped 1024 x 7168 experts, 2 threads, two runs:
// 2.1-2.2 / 2.2-2.4 / 2.3-2.5 / 2.5 / 2.6-2.7 ms at 3 / 4 / 8 / 12 / 16 rows against 1.9-2.0 for
// `read_work` (few_rows_stream 2.9-3.1 / 3.4 at 3 / 4 rows, oneDNN 4.9-5.6 above). The sums stored
// a token's 32 columns at a time (element by element before: 0.93-0.99x the time, paired).
inline void gemm_few_rows_amx_rm(c10::BFloat16* __restrict out, int64_t ldo, const c10::BFloat16* __restrict a,
                                 int64_t lda, int64_t M, const c10::BFloat16* __restrict b, int64_t sb0, int64_t K,
                                 int64_t N) {
  std::vector<c10::BFloat16> rows(16 * K, c10::BFloat16(0.f));
  for (int64_t m = 0; m < M; ++m) std::memcpy(&rows[m * K], a + m * lda, K * sizeof(c10::BFloat16));
  at::parallel_for(0, N / 64, 1, [&](int64_t c0, int64_t c1) {
    load_tile_config();
    alignas(64) c10::BFloat16 pairs[4][16][32];  // [32-column half][lo / hi] x [pair][16 columns x 2]
    alignas(64) float c[4][16][16];
    // lanes of the lo / hi tiles (hi's from 16) holding columns 0-15 / 16-31 of a 32-column half
    const __m512i cols0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i cols16 = _mm512_add_epi32(cols0, _mm512_set1_epi32(8));
    for (int64_t blk = c0; blk < c1; ++blk) {
      const int64_t n0 = blk * 64;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K; k += 32) {
        for (int p = 0; p < 16; ++p) {
          const c10::BFloat16* r0 = b + (k + 2 * p) * sb0 + n0;
          for (int h = 0; h < 2; ++h) {
            const __m512i x0 = _mm512_loadu_si512(r0 + 32 * h), x1 = _mm512_loadu_si512(r0 + sb0 + 32 * h);
            _mm512_store_si512(pairs[2 * h][p], _mm512_unpacklo_epi16(x0, x1));
            _mm512_store_si512(pairs[2 * h + 1][p], _mm512_unpackhi_epi16(x0, x1));
          }
        }
        _tile_loadd(4, &rows[k], K * static_cast<int64_t>(sizeof(c10::BFloat16)));
        _tile_loadd(5, pairs[0], 64);
        _tile_loadd(6, pairs[1], 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, pairs[2], 64);
        _tile_loadd(6, pairs[3], 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_dpbf16ps(3, 4, 6);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      // tile t = 2h + lohi, lane d: column 32h + 8 (d / 4) + 4 lohi + d % 4
      // (per token and 32 columns: the two tiles' 4-column groups interleaved, rounded, one store)
      for (int64_t m = 0; m < M; ++m) {
        for (int h = 0; h < 2; ++h) {
          const __m512 lo = canonical_nans(_mm512_load_ps(c[2 * h][m])), hi = canonical_nans(_mm512_load_ps(c[2 * h + 1][m]));
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(lo, cols16, hi), _mm512_permutex2var_ps(lo, cols0, hi));
          _mm512_storeu_si512(out + m * ldo + n0 + 32 * h, reinterpret_cast<__m512i>(v));
        }
      }
    }
    _tile_release();
  });
}
#endif
#else
constexpr bool kDots512 = false;
#endif

// Whether gemm_few_rows takes AMX tiles, for bf16 with K (the inner dimension) a multiple of 32:
// b's rows contiguous (sb0 == 1, gemm_few_rows_amx) from kAmxRows rows on (2 rows: Dots512 2.1
// against 2.2-3.2 ms, 3: 2.7 against 2.1-2.2, as above), or b row-major with N a multiple of 64
// (sb1 == 1, gemm_few_rows_amx_rm) from kAmxRowsRowMajor on (2 rows: 2.24 against
// few_rows_stream's 2.52 ms, two runs).
constexpr int64_t kAmxRows = 3, kAmxRowsRowMajor = 2;
inline bool few_rows_amx(int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  return K % 32 == 0 && (sb0 == 1 || (sb1 == 1 && N % 64 == 0)) && amx_ready();
#else
  (void)sb0, (void)sb1, (void)K, (void)N;  // no AMX in this build
  return false;
#endif
}

template <typename T>
void gemm_few_rows(T* __restrict out, int64_t ldo, const T* __restrict a, int64_t lda, int64_t M,
                   const T* __restrict b, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
#if defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (M >= (sb0 == 1 ? kAmxRows : kAmxRowsRowMajor) && N >= 16 && few_rows_amx(sb0, sb1, K, N)) {
      if (sb0 == 1) return gemm_few_rows_amx(out, ldo, a, lda, M, b, sb1, K, N);
      return gemm_few_rows_amx_rm(out, ldo, a, lda, M, b, sb0, K, N);
    }
#endif
    if (sb0 == 1) return gemm_few_rows512(out, ldo, a, lda, M, b, sb1, K, N);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (sb0 == 1) return few_rows_dots<DotsF32>(out, ldo, a, lda, M, b, sb1, K, N);
  }
#endif
  const int64_t ka = unaliased_stride(K);  // a's rows in fp32
  std::vector<float> af(M * ka);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) af[i * ka + k] = load_float(a + i * lda, k);
  }
  if (sb0 == 1) {  // rows of b contiguous: dot products, each thread's rows of b as 4 (2) streams
    std::vector<float> as;  // bf16: a's rows split even / odd (load16's order)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      as.resize(M * ka);
      for (int64_t i = 0; i < M; ++i) split_even_odd(&as[i * ka], &af[i * ka], K);
    }
    const float* asp = std::is_same_v<T, c10::BFloat16> ? as.data() : af.data();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      // 6 streams with one row of a, 4 with 2-3, 2 with more (8 accumulators; 4 x 4 would spill):
      // measured (one row, one thread: 6 streams 1.3-1.6x faster than 4 from the L3, 1.1-1.2x from
      // memory; 8 in between)
      const int S = M == 1 ? 6 : M < 4 ? 4 : 2;
      const int64_t len = (n1 - n0) / S;
      for (int64_t j = 0; j < len; ++j) {
        int64_t rows[6];
        for (int q = 0; q < S; ++q) rows[q] = n0 + q * len + j;
        if (S == 6) {
          dots_rows<6>(out, ldo, asp, af.data(), ka, M, K, b, sb1, rows);
        } else if (S == 4) {
          dots_rows<4>(out, ldo, asp, af.data(), ka, M, K, b, sb1, rows);
        } else {
          dots_rows<2>(out, ldo, asp, af.data(), ka, M, K, b, sb1, rows);
        }
      }
      for (int64_t n = n0 + S * len; n < n1; ++n) dots_rows<1>(out, ldo, asp, af.data(), ka, M, K, b, sb1, &n);
    });
    return;
  }
  if (M <= kStreamRows) {  // b row-major, few rows: few_rows_stream, K split over the threads
    // (32-column blocks against 16 at 4 rows: 3.3-3.5 against 3.8 ms; the same at 2 and 6: AMX
    // Xeon, 8 Mixtral-shaped experts, 2 threads)
    constexpr int W = std::is_same_v<T, c10::BFloat16> && kDots512 ? 32 : 16;
    const int64_t parts = std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(), (K + 63) / 64);
    const int64_t ldacc = unaliased_stride(N);
    std::vector<float> acc(parts * M * ldacc, 0.f);
    bool pairs = false;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      pairs = M >= 2 && (N >= kPairRowsN || full_width_512()) && bf16_pair_dots();
    }
#endif
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k0 = K * p / parts / 2 * 2, k1 = p + 1 == parts ? K : K * (p + 1) / parts / 2 * 2;
        float* ap = &acc[p * M * ldacc];
        with_rows<kStreamRows>(M, [&](auto mb) {
          constexpr int MB = decltype(mb)::value;
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<T, c10::BFloat16> && MB >= 2) {
            if (pairs) return few_rows_pairs<MB>(ap, ldacc, a, lda, b, sb0, k0, k1, N);
          }
#endif
          few_rows_stream<MB, W>(ap, ldacc, af.data(), ka, b, sb0, k0, k1, N);
        });
      }
    });
    for (int64_t p = 1; p < parts; ++p) {
      for (int64_t i = 0; i < M * ldacc; ++i) acc[i] += acc[p * M * ldacc + i];
    }
    const int64_t whole = N / W * W;
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t lane = n >= whole ? n : pairs ? pair_lane(n) : block_lane<T, W>(n);
        store_float(out + r * ldo, n, acc[r * ldacc + lane]);
      }
    }
    return;
  }
  // b row-major: panels of up to 2048 columns (their M x width accumulators within 64 KiB), K in
  // blocks of 64 rows; (6 rows x 16 columns) tiles with their accumulators in registers over a
  // block, the block's piece of b (64 rows x 4 KiB at most) read from L2 after the first tile (6
  // rows against 4: 9-18% faster at 6-16 rows, bf16, measured)
  constexpr int64_t kBlock = 64;
  const int64_t panel_width = std::clamp<int64_t>(16384 / M / 16 * 16, 256, 2048);
  at::parallel_for(0, (N + panel_width - 1) / panel_width, 1, [&](int64_t p0, int64_t p1) {
    const int64_t ldacc = unaliased_stride(panel_width);
    std::vector<float> acc(M * ldacc);
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t first = panel * panel_width, width = std::min(panel_width, N - first);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
        const int64_t kl = std::min(kBlock, K - k0);
        const T* bk = b + k0 * sb0;
        for (int64_t c = 0; c < width; c += 16) {
          const int64_t len = std::min<int64_t>(16, width - c);
          for (int64_t i = 0; i < M; i += 6) {
            float* tile = &acc[i * ldacc + c];
            const float* ai = &af[i * ka + k0];
            with_rows<6>(M - i, [&](auto mb) {
              few_rows_tile<decltype(mb)::value>(tile, ldacc, ai, ka, bk, sb0, kl, first + c, len);
            });
          }
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < width; ++j) store_float(out + i * ldo, first + j, acc[i * ldacc + j]);
      }
    }
  });
}

// out[M, N] = a[M, m] @ b[m, N] for a short inner dimension m <= kFewRows: a weight gradient over
// a decode step's rows (a = x_e^T, b = dy_e), each output row a sum of m scaled rows of b. b is
// converted to fp32 once into panels of kCols columns (m x kCols contiguous: rows of b 14 KiB apart
// would share L1 sets; bf16: each 16 columns even then odd, for store16_even_odd), a's columns
// into rows (`ap`, padded by kRows rows: gemm_few_inner_tile packs both); out is written once, in
// its dtype, from (kRows x kCols) register tiles (gemm_few_inner picks them). BLAS instead writes an fp32 product (converted after
// where out is 16-bit) at a few GFLOP/s at such inner sizes: 8 bf16 1024 x 7168 expert gradients
// in 5.4 / 8.7 / 16.5 ms over 1 / 4 / 16 rows each against 34 / 38 / 35 ms (measured, 2 threads).
// kStream: whole 64-byte lines (bf16, kCols 32) stored non-temporally; kFinite: no sum can be NaN,
// so the bf16 rounding skips its NaN select.
template <int64_t kRows, int64_t kCols, bool kStream, bool kFinite, typename T>
void gemm_few_inner_tiles(T* __restrict out, int64_t ldo, const float* __restrict ap, const float* __restrict bp,
                          int64_t M, int64_t m, int64_t N) {
  constexpr int kVecs = kCols / 8;
  constexpr bool kEvenOdd = std::is_same_v<T, c10::BFloat16>;  // each 16 columns even then odd: store16_even_odd
  const int64_t panels = (N + kCols - 1) / kCols;
  at::parallel_for(0, (M + kRows - 1) / kRows, 16, [=](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kRows, rows = std::min(kRows, M - r0);
      const float* ag = ap + r0 * m;
      T* og = out + r0 * ldo;
      for (int64_t p = 0; p < panels; ++p) {
        f32x8 acc[kRows][kVecs];
        for (int r = 0; r < kRows; ++r) {
          for (int v = 0; v < kVecs; ++v) acc[r][v] = f32x8{};  // (an `= {}` compiles to rep stos: 40% of the time)
        }
        const float* bpp = bp + p * m * kCols;
        for (int64_t i = 0; i < m; ++i) {
          f32x8 bv[kVecs];
          for (int v = 0; v < kVecs; ++v) bv[v] = load8(bpp + i * kCols + 8 * v);
          for (int r = 0; r < kRows; ++r) {
            const float ar = ag[r * m + i];
            for (int v = 0; v < kVecs; ++v) acc[r][v] += ar * bv[v];
          }
        }
        const int64_t c = p * kCols, len = std::min(kCols, N - c);
        if (len == kCols && rows == kRows) {  // whole tile: a constant loop, the accumulators stay in registers
          for (int r = 0; r < kRows; ++r) {
            for (int v = 0; v < kVecs; v += 2) {
              if constexpr (kEvenOdd) {
                store16_even_odd<kFinite>(og + r * ldo + c + 8 * v, acc[r][v], acc[r][v + 1], kStream);
              } else {
                store8(og + r * ldo + c + 8 * v, acc[r][v]);
                store8(og + r * ldo + c + 8 * v + 8, acc[r][v + 1]);
              }
            }
          }
          continue;
        }
        float edge[kRows][kCols];  // an edge tile through memory (indexing acc would keep it out of registers)
        for (int r = 0; r < kRows; ++r) {
          for (int v = 0; v < kVecs; ++v) store8(&edge[r][8 * v], acc[r][v]);
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < len; ++j) store_float(og + r * ldo, c + j, edge[r][panel_lane<T>(j)]);
        }
      }
    }
#ifdef __AVX__
    if (kStream) _mm_sfence();
#endif
  });
}

// gemm_few_inner's operands in fp32: a's columns as rows (`ap`, padded by `pad` rows of zeros) and b
// in panels of kCols columns (m x kCols contiguous, column j of a panel at lane(j)). Returns whether
// no sum can be NaN: every operand finite and no m products adding up to anywhere near fp32's
// overflow (the bf16 rounding may then skip its NaN handling).
template <typename T, typename Lane>
bool pack_few_inner(std::vector<float>& ap, std::vector<float>& bp, const T* __restrict a, int64_t sa0, int64_t sa1,
                    const T* __restrict b, int64_t sb0, int64_t M, int64_t m, int64_t N, int64_t pad, int64_t kCols,
                    const Lane& lane) {
  ap.assign((M + pad) * m, 0.f);
  bp.assign((N + kCols - 1) / kCols * m * kCols, 0.f);
  float amax = 0.f, bmax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < M; ++r) {
      const float v = ap[r * m + i] = load_float(a + i * sa1, r * sa0);
      finite &= std::abs(v) <= std::numeric_limits<float>::max();
      amax = std::max(amax, std::abs(v));
    }
    for (int64_t n = 0; n < N; ++n) {
      const float v = bp[(n / kCols * m + i) * kCols + lane(n % kCols)] = load_float(b + i * sb0, n);
      finite &= std::abs(v) <= std::numeric_limits<float>::max();
      bmax = std::max(bmax, std::abs(v));
    }
  }
  return finite && static_cast<double>(amax) * bmax * m < 1e37;
}

// gemm_few_inner with its tile fixed: packs a and b for gemm_few_inner_tiles (b's panels of kCols
// columns, each 16 in panel_lane's order; a's columns as rows, padded by kRows rows) and runs it
// with its flags: kStream where out's rows are whole aligned lines (a bf16 32-column tile);
// kFinite where no sum can be NaN (pack_few_inner; the bf16 rounding then skips its NaN select,
// 1.15-1.2x at 1 row).
template <int64_t kRows, int64_t kCols, typename T>
void gemm_few_inner_tile(T* __restrict out, int64_t ldo, const T* __restrict a, int64_t sa0, int64_t sa1,
                         const T* __restrict b, int64_t sb0, int64_t M, int64_t m, int64_t N) {
  std::vector<float> ap, bp;
  const bool finite = pack_few_inner(ap, bp, a, sa0, sa1, b, sb0, M, m, N, kRows, kCols,
                                     [](int64_t j) { return panel_lane<T>(j); });
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if constexpr (kCols == 32) {
      if (reinterpret_cast<uintptr_t>(out) % 64 == 0 && ldo % 32 == 0) {
        return finite ? gemm_few_inner_tiles<kRows, kCols, true, true>(out, ldo, ap.data(), bp.data(), M, m, N)
                      : gemm_few_inner_tiles<kRows, kCols, true, false>(out, ldo, ap.data(), bp.data(), M, m, N);
      }
    }
    if (finite) return gemm_few_inner_tiles<kRows, kCols, false, true>(out, ldo, ap.data(), bp.data(), M, m, N);
  }
  gemm_few_inner_tiles<kRows, kCols, false, false>(out, ldo, ap.data(), bp.data(), M, m, N);
}

#if defined(__AVX512BF16__)
// gemm_few_inner for bf16 with AVX512-BF16 where no sum can be NaN: (kRows x 64) tiles of 16-lane
// fp32 accumulators over b's panels in order, each tile row rounded to bf16 by VCVTNE2PS2BF16 (to
// nearest even, as from_float: the same bits for finite sums) and stored a line at a time,
// non-temporally where out's rows are whole aligned lines (kStream). Against the 8-lane tiles with
// their integer rounding (2-core Zen 4, 2 threads, paired): 64 gradients of 768 x 1024 in 0.66 /
// 0.72 / 0.80 / 0.90 / 0.86x the time at 1 / 2 / 3 / 4 / 6 rows (at 1-4 rows as fast as lines of
// non-zero values stream out there), 0.98x at 8; 8 of 3584 x 1024 0.78-0.83x at 1-4 rows, 1.06x
// at 8. (4 x 64 tiles: 2 x 64 the same, 6 x 64 1.0-1.06x slower at 1-4 rows; cached stores
// 1.26-1.4x slower. fp32 on the same tiles was 1.1-1.5x slower than its 8-lane ones.)
template <int kRows, bool kStream>
void gemm_few_inner_bf16(c10::BFloat16* __restrict out, int64_t ldo, const float* __restrict ap,
                         const float* __restrict bp, int64_t M, int64_t m, int64_t N) {
  constexpr int64_t kCols = 64;
  const int64_t panels = (N + kCols - 1) / kCols;
  at::parallel_for(0, (M + kRows - 1) / kRows, 16, [=](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kRows, rows = std::min<int64_t>(kRows, M - r0);
      const float* ag = ap + r0 * m;
      c10::BFloat16* og = out + r0 * ldo;
      for (int64_t p = 0; p < panels; ++p) {
        __m512 acc[kRows][4];
        for (int r = 0; r < kRows; ++r) {
          for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
        }
        const float* bpp = bp + p * m * kCols;
        for (int64_t i = 0; i < m; ++i) {
          __m512 bv[4];
          for (int v = 0; v < 4; ++v) bv[v] = _mm512_loadu_ps(bpp + i * kCols + 16 * v);
          for (int r = 0; r < kRows; ++r) {
            const __m512 ar = _mm512_set1_ps(ag[r * m + i]);
            for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
          }
        }
        const int64_t c = p * kCols, len = std::min(kCols, N - c);
        for (int r = 0; r < kRows; ++r) {
          if (r >= rows) break;
          c10::BFloat16* o = og + r * ldo + c;
          for (int h = 0; h < 2; ++h) {
            const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(acc[r][2 * h + 1], acc[r][2 * h]));
            const int64_t n = std::min<int64_t>(32, len - 32 * h);
            if (n == 32 && kStream) {
              _mm512_stream_si512(reinterpret_cast<__m512i*>(o + 32 * h), v);
            } else if (n == 32) {
              _mm512_storeu_si512(o + 32 * h, v);
            } else if (n > 0) {
              _mm512_mask_storeu_epi16(o + 32 * h, static_cast<__mmask32>((uint64_t{1} << n) - 1), v);
            }
          }
        }
      }
    }
    if (kStream) _mm_sfence();
  });
}
#endif

#if defined(__AVX512BF16__)
// gemm_few_inner for bf16 by gemm_few_inner_bf16 where no sum can be NaN; false where one can
// (nothing written: the 8-lane tiles round NaNs as from_float does).
inline bool gemm_few_inner512(c10::BFloat16* __restrict out, int64_t ldo, const c10::BFloat16* __restrict a,
                              int64_t sa0, int64_t sa1, const c10::BFloat16* __restrict b, int64_t sb0, int64_t M,
                              int64_t m, int64_t N) {
  constexpr int kRows = 4;
  std::vector<float> ap, bp;
  if (!pack_few_inner(ap, bp, a, sa0, sa1, b, sb0, M, m, N, kRows, 64, [](int64_t j) { return j; })) return false;
  if (reinterpret_cast<uintptr_t>(out) % 64 == 0 && ldo % 32 == 0) {
    gemm_few_inner_bf16<kRows, true>(out, ldo, ap.data(), bp.data(), M, m, N);
  } else {
    gemm_few_inner_bf16<kRows, false>(out, ldo, ap.data(), bp.data(), M, m, N);
  }
  return true;
}
#endif

template <typename T>
void gemm_few_inner(T* __restrict out, int64_t ldo, const T* __restrict a, int64_t sa0, int64_t sa1,
                    const T* __restrict b, int64_t sb0, int64_t M, int64_t m, int64_t N) {
  // Measured (8 bf16 1024 x 7168 gradients, 2 threads): bf16 at 1-4 rows is bound by its writes:
  // 2 x 32 tiles streamed in whole lines, 1.1-1.4x over the cached 16-column ones (6.0 ms against
  // 7.6 at 1 row), which win from 6 rows on, where the FMAs bound it (16 rows: 16.5 against 19 ms);
  // 3 x 32 tiles (12 accumulators, 4 of b and its broadcast value: one more than the 16 registers)
  // took 1.3-1.6x as long as 2 x 32 at 2-4 rows; fp32's streamed lines were slower than cached
  // ones here (1.2-1.8x). With AVX512-BF16, bf16 takes gemm_few_inner_bf16 (not measured on the
  // Xeon) unless a sum may be NaN.
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
    if (gemm_few_inner512(out, ldo, a, sa0, sa1, b, sb0, M, m, N)) return;
#endif
    if (m <= 4) return gemm_few_inner_tile<2, 32>(out, ldo, a, sa0, sa1, b, sb0, M, m, N);
  } else if (m == 1) {
    return gemm_few_inner_tile<4, 16>(out, ldo, a, sa0, sa1, b, sb0, M, m, N);
  }
  gemm_few_inner_tile<6, 16>(out, ldo, a, sa0, sa1, b, sb0, M, m, N);
}

// Whether this CPU multiplies bf16 in AMX tiles (oneDNN's bf16 matmul then runs on them).
inline bool bf16_tiles() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  return amx_ready();
#else
  return false;
#endif
}

// Whether expert_mlp takes prepacked weights here (pangu_ops.prepack): AMX tiles, else VDPBF16PS on
// broadcast pairs where the few-row kernels multiply that way (bf16_pair_dots: a Zen 4).
inline bool packed_kernels() {
#if defined(__AVX512BF16__)
  if (bf16_pair_dots()) return true;
#endif
  return bf16_tiles();
}

// Whether M rows (>= 1) of dtype t go to gemm_few_rows (operands laid out for it). Where oneDNN's
// bf16 matmul is native (AMX-BF16) it takes 2+ rows, but for bf16 with AVX-512 (kDots512) up to
// kFewRowsNative rows, where the few-row kernels measured faster on such a CPU (a 2-core Xeon with
// AMX, 8 Mixtral-shaped 7168 x 1024 experts, 2 threads, two runs): b's rows contiguous (Dots512)
// 1.8-1.9 / 2.4 / 3.8 / 5.0-5.2 ms at 2 / 4 / 8 / 10 rows against oneDNN's 3.6-3.9 at any of them;
// row-major b (few_rows_stream, 32-column blocks) 2.4-2.6 / 3.3-3.5 / 4.2 / 4.7-5.2 / 5.0-5.1 ms at
// 2 / 4 / 6 / 7 / 8 rows against 5.2-5.6.
// Where that matmul has no tiles (AVX512-BF16 alone: a 2-core Zen 4, 2 threads, paired) up to
// kFewRowsNoTiles: row-major b (few_rows_stream / few_rows_pairs) 0.55-0.80x oneDNN's time at 8 rows,
// 0.89-1.0x at 10-12, 1.11-1.25x at 16 (8 experts of 7168 x 1024 and 1024 x 3584, 64 of 768 x 1024
// and 1024 x 384).
// Up to kFewRows rows where the product's kernel keeps its pace there (`wide`: few_rows_wide).
constexpr int64_t kFewRowsNative = 7, kFewRowsNoTiles = 12;
inline bool few_rows_kernel(at::ScalarType t, int64_t M, bool wide) {
  const bool half = t == at::kBFloat16 || t == at::kHalf;
  if (M < 1) return false;
  if (!half) return t == at::kFloat && (M <= kFewRowsFloat || (wide && M <= kFewRows));
  if (M == 1) return true;
  if (M > kFewRows) return false;
  return !native_half_matmul(t) ||
         (t == at::kBFloat16 && kDots512 && (M <= (bf16_tiles() ? kFewRowsNative : kFewRowsNoTiles) || wide));
}

// Whether a product of dtype t with b's [K, N] strides (sb0, sb1) has a few-row kernel as fast as
// oneDNN up to kFewRows rows. bf16: AMX tiles (few_rows_amx), or VDPBF16PS pairs (bf16_pair_dots)
// on b's contiguous rows (2-core Zen 4, 2 threads, paired: 0.56-0.75x oneDNN's time at 8 rows,
// 0.59-0.80x at 12, 0.70-0.88x at 16; 8 experts of 7168 x 1024 and 1024 x 3584, 64 of 768 x 1024).
// fp32: DotsF32 on b's contiguous rows (AVX-512; same machine: 0.44-0.78x oneDNN's time at 9 rows,
// 0.54-0.79x at 16, but 1.03x for 1024 x 384; 8 experts of 7168 x 1024, 1024 x 3584, 768 x 1024).
// Row-major fp32 b above kFewRowsFloat rows stays with oneDNN (its panel kernel took 5-7x as long).
inline bool few_rows_wide(at::ScalarType t, int64_t sb0, int64_t sb1, int64_t K, int64_t N) {
  if (t == at::kFloat) return sb0 == 1 && kDots512;
  return t == at::kBFloat16 && (few_rows_amx(sb0, sb1, K, N) || (sb0 == 1 && bf16_pair_dots()));
}

// out (rows ldo apart, each contiguous) = a [M, m] @ b [m, N] on raw pointers by the kernels above
// where one applies: a short inner dimension (weight gradients of decode-sized groups) by
// `gemm_few_inner` (up to kFewRows, in bf16 up to kFewInnerNative where this CPU's bf16 matmul is
// native, kFewInnerNoTiles where it is without AMX tiles); few rows by `gemm_few_rows` (where
// few_rows_kernel says: 16-bit operands one row always, more where this CPU's matmul is not native
// in the dtype or where the few-row kernels measured faster than it; fp32 up to kFewRowsFloat, or
// kFewRows where few_rows_wide).
// False where neither does (BLAS's turn: mm_blas_into).
// Per-expert loops call it before making any tensor views: those (~6 ATen calls per expert) cost
// ~5% of a 2-row Qwen3-MoE-shaped backward.
// bf16 weight gradients with AMX-BF16 (2-core Xeon, 8 Mixtral-shaped 1024 x 7168 gradients, 2
// threads, two runs): gemm_few_inner 2.5 / 3.7 / 4.4-4.6 / 4.5-5.6 ms at 1 / 2 / 3 / 4 rows against
// oneDNN's 5.0-6.0 at any of them; 6.6 against 5.4 at 8. Where that matmul has no tiles (AVX512-BF16
// alone: a 2-core Zen 4, 8 experts, 2 threads, paired) up to kFewInnerNoTiles: 0.72-0.97x oneDNN's
// time at 5-8 rows (1024 x 3584 and 7168 x 1024 gradients), 0.92-1.38x at 12-16.
constexpr int64_t kFewInnerNative = 4, kFewInnerNoTiles = 8;
template <typename T>
bool mm_few_into(T* out, int64_t ldo, const T* a, int64_t sa0, int64_t sa1, const T* b, int64_t sb0, int64_t sb1,
                 int64_t M, int64_t m, int64_t N) {
  constexpr at::ScalarType t = c10::CppTypeToScalarType<T>::value;
  constexpr bool half = t == at::kBFloat16 || t == at::kHalf;
  const bool inner = !(half && native_half_matmul(t)) ||
                     (t == at::kBFloat16 && m <= (bf16_tiles() ? kFewInnerNative : kFewInnerNoTiles));
  if (m >= 1 && m <= kFewRows && M > kFewRows && sb1 == 1 && inner) {
    gemm_few_inner(out, ldo, a, sa0, sa1, b, sb0, M, m, N);
    return true;
  }
  if (sa1 == 1 && (sb0 == 1 || sb1 == 1) && few_rows_kernel(t, M, few_rows_wide(t, sb0, sb1, m, N))) {
    gemm_few_rows(out, ldo, a, sa0, M, b, sb0, sb1, m, N);
    return true;
  }
  return false;
}

// Whether out = a @ b is one of the first kOwnKernelAfter - 1 oneDNN products of its shape, layouts
// and dtype in this process (mm_padded pads those).
bool first_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// Whether oneDNN's fp32 matmul is the faster here: BLAS's (MKL in torch's x86 wheels) runs AVX2
// code on AMD CPUs, half the FMA rate of a Zen 5's 512-bit units. 2-core AMD EPYC Zen 5, 2 threads:
// expert-sized products (64-517 rows, K 384-3584, N 512-1024, both weight layouts) at 264-468
// GFLOP/s against BLAS's 56-198 (1.4-5.6x; the FMA peak measures 533). Probed once on first use
// (a 256 x 1024 x 512 product after an untimed call of each, best of 4); oneDNN where it takes under
// 0.8x BLAS's time. False where torch is built without oneDNN.
bool onednn_fp32();
// out = a @ b (fp32) by oneDNN's matmul, as ATen's own (at::native::mkldnn_matmul).
void onednn_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// oneDNN generates a kernel for each new shape of a half-precision matmul: a Mixtral-shaped expert's
// product with a row count it has not seen took 7-10 ms against 2.7 warm (AMX-BF16, measured), and
// with a fresh routing every step most experts' row counts are new. A shape's first products run
// instead with the rows and the inner dimension padded by zeros to multiples of kPadRows (a few
// shapes, their kernels reused), the result copied out; a shape that recurs (a fixed routing, the
// usual sizes of a long run) gets its own kernel from its kOwnKernelAfter-th call on: the copies
// cost 5-10% of a warm call, a new kernel ~2 warm calls. Mixtral- / Qwen3-MoE-shaped bf16
// 2048-token `expert_mlp`, 2 threads, ms, fixed / fresh routing, as before -> padded always (two
// runs): 45-48 / 86-95 -> 52 / 51-59; 26-29 / 31-33 -> 29.5 / 28-30; first call 150 -> 82,
// 111-128 -> 49-52. The same for oneDNN's fp32 products (onednn_fp32): a Qwen3-MoE-shaped product
// (1024 x 768) at 300-359 rows, each row count new, 1.6x its warm time, padded 1.2x (2-core Zen 5).
// out = a @ b by product(o, a, b) (o = a @ b), padded as said where first_product.
constexpr int64_t kPadRows = 32, kOwnKernelAfter = 8;
template <typename Product>
inline void mm_padded(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const Product& product) {
  if (!first_product(out, a, b)) return product(out, a, b);
  const int64_t M = a.size(0), m = a.size(1);
  const int64_t Mp = (M + kPadRows - 1) / kPadRows * kPadRows, mp = (m + kPadRows - 1) / kPadRows * kPadRows;
  at::Tensor ap = a, bp = b;
  if (Mp != M || mp != m) {
    ap = at::zeros({Mp, mp}, a.options());
    ap.narrow(0, 0, M).narrow(1, 0, m).copy_(a);
  }
  if (mp != m) {
    bp = at::zeros({mp, b.size(1)}, b.options());
    bp.narrow(0, 0, m).copy_(b);
  }
  if (Mp == M) return product(out, ap, bp);
  const at::Tensor full = at::empty({Mp, out.size(1)}, out.options());
  product(full, ap, bp);
  out.copy_(full.narrow(0, 0, M));
}

// out = a @ b by BLAS with fp32 accumulation, rounded once to out's dtype: in the operands' own
// dtype where this CPU's matmul is native in it (a shape's first products padded: mm_padded),
// else through fp32 copies; fp32 by oneDNN where that is the faster (onednn_fp32).
inline void mm_blas_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  const auto t = out.scalar_type();
  if (t == at::kFloat) {
    const at::Tensor af = as_float(a), bf = as_float(b);
    if (onednn_fp32()) return mm_padded(out, af, bf, onednn_mm_out);
    at::mm_out(out, af, bf);
  } else if (a.scalar_type() == t && b.scalar_type() == t && native_half_matmul(t)) {
    // oneDNN / cpublas accumulate half-precision products in fp32
    mm_padded(out, a, b, [](at::Tensor o, const at::Tensor& x, const at::Tensor& y) { at::mm_out(o, x, y); });
  } else {
    out.copy_(at::mm(as_float(a), as_float(b)));
  }
}

// out = a @ b into out's storage with fp32 accumulation, rounded once to out's dtype: mm_few_into
// where one of its kernels applies, else mm_blas_into.
inline void mm_fp32_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  const auto t = out.scalar_type();
  bool done = false;
  if (a.scalar_type() == t && b.scalar_type() == t && out.stride(1) == 1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "mm_few_into", [&] {
      done = mm_few_into(out.data_ptr<scalar_t>(), out.stride(0), a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                         b.data_ptr<scalar_t>(), b.stride(0), b.stride(1), a.size(0), a.size(1), b.size(1));
    });
  }
  if (!done) mm_blas_into(out, a, b);
}

}  // namespace pangu_cpu
