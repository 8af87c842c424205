// router_logits: a learned router's fp32 logits x @ w^T for x and w of any float dtype (the MoE
// layer's router runs in fp32 whatever the model's dtype), and its backward's two products,
// without fp32 copies of x.
//
// F.linear(x.float(), w.float()) writes an fp32 copy of x (twice a bf16 x's bytes), keeps it for
// the backward, runs three skinny fp32 GEMMs (E of 8-256 columns, or an inner dimension of E, shapes
// BLAS serves poorly: 43-126 GFLOP/s here) and converts dx from fp32 once more: ~8 ms of an ~77 ms
// bf16 training step of the default bench's layer (4096 tokens, H 1024, E 16) on 2 cores. Here x
// and w are converted to fp32 in cache-sized blocks (exact), every product and sum is fp32 as
// there (only the order of the sums differs), dx is rounded once to x's dtype and dw comes out in
// fp32 and is rounded once to w's dtype, as autograd does for w.float(). Every output element
// is summed by one thread in a fixed order: results do not depend on the number of threads. fp32 x
// and w (nothing to convert) go to BLAS; bf16 x and w (H a multiple of 32) run the forward and dx
// on AMX-BF16 tiles where the CPU has them (below).
#include <torch/library.h>

#include "amx_grouped.h"

namespace pangu_cpu {
namespace {

#if defined(__AVX512F__)
using V = f32x16;
constexpr int kRegisters = 32;
#else
using V = f32x8;
constexpr int kRegisters = 16;
#endif
constexpr int64_t kW = sizeof(V) / sizeof(float);

inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, V v) { std::memcpy(p, &v, sizeof v); }
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// rows [0, R) x columns [c0, c0 + n) of src (rows ld apart) as fp32 rows of `width` (>= n; the rest
// zeros) at dst
template <typename T>
void rows_to_float(float* __restrict dst, int64_t width, const T* __restrict src, int64_t ld, int64_t R, int64_t c0,
                   int64_t n) {
  for (int64_t r = 0; r < R; ++r) {
    const T* s = src + r * ld + c0;
    float* d = dst + r * width;
    for (int64_t i = 0; i < n; ++i) d[i] = load_float(s, i);
    for (int64_t i = n; i < width; ++i) d[i] = 0.f;
  }
}

// m [R, C] (rows ld apart, any float dtype) as fp32 rows of `width` >= C (zero-padded): [R, width]
at::Tensor float_rows(const at::Tensor& m, int64_t width) {
  const at::Tensor mc = m.contiguous();
  const int64_t R = m.size(0), C = m.size(1);
  at::Tensor out = at::empty({R, width}, m.options().dtype(at::kFloat));
  PANGU_DISPATCH_FLOATS(mc.scalar_type(), "router_logits", [&] {
    rows_to_float(out.data_ptr<float>(), width, mc.data_ptr<scalar_t>(), C, R, 0, C);
  });
  return out;
}

// Register blocks: R rows of broadcast values x G vectors of the other operand's row, R * G
// accumulators (of 32 vector registers with AVX-512: 24, the rest for G loads and a broadcast).
constexpr int kAccumulators = kRegisters == 32 ? 24 : 12;
constexpr int rows_for(int G) { return std::min(12, kAccumulators / G); }

// acc[r][g] (+)= sum over i < n of a[r * lda + i] * b[i * ldb + g * kW], for r < R, g < G: the
// register block of every product here (rows of a broadcast, b's rows in vectors), from c (rows
// ldc apart) or zeros, back to c.
template <int R, int G>
inline void block(float* __restrict c, int64_t ldc, bool add, const float* __restrict a, int64_t lda,
                  const float* __restrict b, int64_t ldb, int64_t n) {
  V acc[R][G];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) acc[r][g] = add ? loadv(c + r * ldc + g * kW) : V{};
  }
  for (int64_t i = 0; i < n; ++i) {
    V bv[G];
    for (int g = 0; g < G; ++g) bv[g] = loadv(b + i * ldb + g * kW);
    for (int r = 0; r < R; ++r) {
      const float ab = a[r * lda + i];
      for (int g = 0; g < G; ++g) acc[r][g] += ab * bv[g];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) storev(c + r * ldc + g * kW, acc[r][g]);
  }
}

// Rows [0, m) of c (+)= a @ b for cols = G vectors of columns: register blocks of rows_for(G) rows,
// the last one of the rows left.
template <int G, int R = rows_for(G)>
inline void rows_block(float* c, int64_t ldc, bool add, const float* a, int64_t lda, const float* b, int64_t ldb,
                       int64_t m, int64_t n) {
  if constexpr (R == rows_for(G)) {
    for (; m >= R; m -= R, c += R * ldc, a += R * lda) block<R, G>(c, ldc, add, a, lda, b, ldb, n);
  }
  if constexpr (R > 1) {
    if (m < R) return rows_block<G, R - 1>(c, ldc, add, a, lda, b, ldb, m, n);
  }
  if (m == R) block<R, G>(c, ldc, add, a, lda, b, ldb, n);
}

// c [m, cols] (+)= a [m, n] @ b [n, cols] in fp32 (cols a multiple of kW; a's rows lda apart, b's
// ldb, c's ldc): register blocks of up to four vectors of columns.
void product(float* c, int64_t ldc, bool add, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
             int64_t n, int64_t cols) {
  int64_t j = 0;
  for (; j + 4 * kW <= cols; j += 4 * kW) rows_block<4>(c + j, ldc, add, a, lda, b + j, ldb, m, n);
  switch ((cols - j) / kW) {
    case 3: return rows_block<3>(c + j, ldc, add, a, lda, b + j, ldb, m, n);
    case 2: return rows_block<2>(c + j, ldc, add, a, lda, b + j, ldb, m, n);
    case 1: return rows_block<1>(c + j, ldc, add, a, lda, b + j, ldb, m, n);
    default: return;
  }
}

constexpr int64_t kTokens = 48;     // tokens per task
constexpr int64_t kInner = 512;     // the inner dimension per pass: a block's operands stay in L2
constexpr int64_t kColumns = 256;   // dx's columns per pass

// ---- forward: out [T, E] = x @ w^T: dot products of x's and w's rows ----

inline float hsum(V v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

// out[t][e] (+)= dot(x[t][0:n], w[e][0:n]) for t < RT, e < RE (x's rows ldx apart, w's ldw, out's
// ldo; n a multiple of kW): RT x RE accumulators, each x and w vector loaded once per step.
template <int RT, int RE>
inline void dots(float* __restrict out, int64_t ldo, bool add, const float* __restrict x, int64_t ldx,
                 const float* __restrict w, int64_t ldw, int64_t n) {
  V acc[RT][RE];
  for (int t = 0; t < RT; ++t) {
    for (int e = 0; e < RE; ++e) acc[t][e] = V{};
  }
  for (int64_t i = 0; i < n; i += kW) {
    V xv[RT];
    for (int t = 0; t < RT; ++t) xv[t] = loadv(x + t * ldx + i);
    for (int e = 0; e < RE; ++e) {
      const V wv = loadv(w + e * ldw + i);
      for (int t = 0; t < RT; ++t) acc[t][e] += xv[t] * wv;
    }
  }
  for (int t = 0; t < RT; ++t) {
    for (int e = 0; e < RE; ++e) out[t * ldo + e] = (add ? out[t * ldo + e] : 0.f) + hsum(acc[t][e]);
  }
}

constexpr int kDotRows = kRegisters == 32 ? 4 : 2;  // tokens x kDotCols experts per register block
constexpr int kDotCols = 4;

template <int RT>
inline void dots_row(float* out, int64_t ldo, bool add, const float* x, int64_t ldx, const float* w, int64_t ldw,
                     int64_t E, int64_t n) {
  int64_t e = 0;
  for (; e + kDotCols <= E; e += kDotCols) dots<RT, kDotCols>(out + e, ldo, add, x, ldx, w + e * ldw, ldw, n);
  for (; e < E; ++e) dots<RT, 1>(out + e, ldo, add, x, ldx, w + e * ldw, ldw, n);
}

// A task's inner dimension per pass: all of it where w's fp32 rows (E x H) take at most 512 KiB,
// else fewer (at least 256), and at most 2048 (a block of x's rows in fp32: <= 384 KiB).
inline int64_t inner_chunk(int64_t E, int64_t Hp) {
  const int64_t fit = std::max<int64_t>(256, (int64_t{1} << 17) / std::max<int64_t>(E, 1) / kW * kW);
  return std::min({Hp, fit, int64_t{2048}});
}

// fp32 x and w: nothing to convert, and BLAS's fp32 products run faster than these (0.64 against
// 0.98 ms for the forward of 4096 x 1024 tokens and 16 experts, 2 threads, measured). Below
// kBlasTokens tokens (decode) the forward converts w once and calls BLAS too: converting w to fp32
// rows costs what the product does (1 token, E 64, H 2048: 24 us against 40).
constexpr int64_t kBlasTokens = 16;
inline bool both_float(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat;
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// bf16 x and w with AMX-BF16: the products are TDPBF16PS's, exact bf16 products summed in fp32 as
// above, with x's rows read in place as A tiles (32 tokens a task) and w packed once as B tiles:
// a pass over x at memory speed instead of converting it (4096 x 1024 tokens, E 16: 0.21-0.25 ms
// against ~0.9, 2 threads, measured). (TDPBF16PS flushes subnormal inputs and results to zero:
// values below 1.2e-38, far under any logit's rounding.) For bf16 x and w, H a multiple of 32, and
// kAmxTokens tokens or more: w is packed as tiles every call, which fewer tokens do not repay
// (forward + backward against F.linear on fp32 copies at 32 / 64 tokens: E 64, H 2048 0.86 /
// 0.72x the time, E 128, H 4096 1.15 / 1.00x; measured).
constexpr int64_t kAmxTokens = 64;
inline bool amx_applies(at::ScalarType x_dtype, at::ScalarType w_dtype, int64_t T, int64_t H) {
  return x_dtype == at::kBFloat16 && w_dtype == at::kBFloat16 && H % 32 == 0 && T >= kAmxTokens && amx_ready();
}

void logits_amx(float* out, const c10::BFloat16* x, const at::Tensor& w, int64_t T, int64_t H) {
  const int64_t E = w.size(0), Ep = round_up(E, 32), pairs = H / 2;
  // w's pairs (w[e][2p], w[e][2p + 1]) as 32-bit words, per 16 experts [H / 2][16] (zeros past E)
  std::vector<uint32_t> packed(Ep * pairs, 0);
  const at::Tensor wc = w.contiguous();
  const auto* words = reinterpret_cast<const uint32_t*>(wc.data_ptr<c10::BFloat16>());
  at::parallel_for(0, (E + 15) / 16, 1, [&](int64_t q0, int64_t q1) {  // 16 experts a block
    for (int64_t q = q0; q < q1; ++q) {
      uint32_t* dst = packed.data() + q * pairs * 16;
      for (int64_t e = q * 16; e < std::min(E, q * 16 + 16); ++e) {
        for (int64_t p = 0; p < pairs; ++p) dst[p * 16 + e % 16] = words[e * pairs + p];
      }
    }
  });
  const auto* b = reinterpret_cast<const c10::BFloat16*>(packed.data());
  at::parallel_for(0, (T + 31) / 32, 1, [&](int64_t b0, int64_t b1) {
    load_tile_config();
    alignas(64) float c[32 * 32];
    thread_local std::vector<c10::BFloat16> tail_buf;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * 32, m = std::min<int64_t>(32, T - t0);
      const c10::BFloat16* a = x + t0 * H;
      if (m < 32) {  // the last rows, zero-padded: tile loads read 16 or 32 rows
        c10::BFloat16* tail = line_aligned(tail_buf, 32 * H);
        std::memcpy(tail, a, m * H * sizeof(c10::BFloat16));
        std::memset(static_cast<void*>(tail + m * H), 0, (32 - m) * H * sizeof(c10::BFloat16));
        a = tail;
      }
      for (int64_t e0 = 0; e0 < Ep; e0 += 32) {
        amx_block(c, 32, false, a, 16 * H, H * 2, 32, b + e0 * H, 16 * H, 512, H / 32, m > 16 ? 32 : 16, 32);
        for (int64_t r = 0; r < m; ++r) std::memcpy(out + (t0 + r) * E + e0, c + r * 32, std::min<int64_t>(32, E - e0) * sizeof(float));
      }
    }
    _tile_release();
  });
}
#endif

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
                    "router_logits: need x [T, H] and w [E, H] with the same H");
  const int64_t T = x.size(0), H = x.size(1), E = w.size(0), Hp = round_up(H, kW);
  at::Tensor out = at::empty({T, E}, x.options().dtype(at::kFloat));
  if (T == 0 || E == 0) return out;
  if (H == 0) return out.zero_();
  if (both_float(x, w) || T < kBlasTokens) return at::mm_out(out, x.to(at::kFloat), w.to(at::kFloat).t());
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (amx_applies(x.scalar_type(), w.scalar_type(), T, H)) {
    logits_amx(out.data_ptr<float>(), x.contiguous().data_ptr<c10::BFloat16>(), w, T, H);
    return out;
  }
#endif
  const int64_t ldw = unaliased_stride(Hp);
  const at::Tensor xc = x.contiguous(), wf = float_rows(w, ldw);  // [E, ldw]
  const float* wp = wf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t chunk = inner_chunk(E, Hp), token_tasks = (T + kTokens - 1) / kTokens;
  // few tokens (a decode step): the experts split over the threads too
  const int64_t threads = at::get_num_threads(), expert_tasks = token_tasks >= threads ? 1 : std::min(threads, (E + kDotCols - 1) / kDotCols);
  const int64_t per_task = (E + expert_tasks - 1) / expert_tasks;
  PANGU_DISPATCH_FLOATS(xc.scalar_type(), "router_logits", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    at::parallel_for(0, token_tasks * expert_tasks, 1, [&](int64_t k0, int64_t k1) {
      const int64_t ldx = unaliased_stride(chunk);
      thread_local std::vector<float> xf_buf;
      float* xf = line_aligned(xf_buf, kTokens * ldx);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = k / expert_tasks * kTokens, m = std::min(kTokens, T - t);
        const int64_t e0 = k % expert_tasks * per_task, ne = std::min(per_task, E - e0);
        for (int64_t h = 0; h < Hp; h += chunk) {
          const int64_t n = std::min(chunk, Hp - h);
          rows_to_float(xf, ldx, xp + t * H, H, m, h, std::max<int64_t>(0, std::min(n, H - h)));
          int64_t r = 0;
          for (; r + kDotRows <= m; r += kDotRows) {
            dots_row<kDotRows>(o + (t + r) * E + e0, E, h > 0, xf + r * ldx, ldx, wp + e0 * ldw + h, ldw, ne, n);
          }
          for (; r < m; ++r) dots_row<1>(o + (t + r) * E + e0, E, h > 0, xf + r * ldx, ldx, wp + e0 * ldw + h, ldw, ne, n);
        }
      }
    });
  });
  return out;
}

// ---- backward ----

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// dx on AMX-BF16 (bf16 x and w): the fp32 gradient g as the sum of two bf16 values, hi = bf16(g)
// and lo = bf16(g - hi) (g to ~2^-17 of itself, against bf16's 2^-9 for the rounded result), each
// product then exact and summed in fp32: dx = hi @ w + lo @ w, the sums kept between the two
// (4096 x 1024 tokens, E 16: 0.64 ms against ~0.9, 2 threads, measured). (The same for dw ran no
// faster than the vector kernel below: its time is the strided pass over x's columns.)
inline void split_bf16(float v, c10::BFloat16& hi, c10::BFloat16& lo) {
  hi = c10::BFloat16(v);
  lo = c10::BFloat16(std::isfinite(v) ? v - static_cast<float>(hi) : 0.f);
}

void grad_x_amx(c10::BFloat16* dx, const float* g, const at::Tensor& w, int64_t T, int64_t E, int64_t H) {
  const int64_t Ep = round_up(E, 32), inner = 2 * Ep;  // a row of A: hi, then lo, each Ep long
  const at::Tensor wc = w.contiguous();
  std::vector<c10::BFloat16> b_buf;  // w as B tiles (rows past E zeros), 32 of H's columns a task
  c10::BFloat16* b = line_aligned(b_buf, Ep * H);
  at::parallel_for(0, H / 32, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) pack_columns(b + j * 32 * Ep, wc.data_ptr<c10::BFloat16>(), H, j * 32, 32, Ep, E);
  });
  at::parallel_for(0, (T + 31) / 32, 1, [&](int64_t b0, int64_t b1) {
    load_tile_config();
    alignas(64) float c[32 * 32];
    thread_local std::vector<c10::BFloat16> a_buf;
    c10::BFloat16* a = line_aligned(a_buf, 32 * inner);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * 32, m = std::min<int64_t>(32, T - t0);
      std::fill(a, a + 32 * inner, c10::BFloat16(0.f));
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t e = 0; e < E; ++e) split_bf16(g[(t0 + r) * E + e], a[r * inner + e], a[r * inner + Ep + e]);
      }
      for (int64_t j = 0; j < H; j += 32) {  // hi @ w, then lo @ w added to its sums
        for (int part = 0; part < 2; ++part) {
          amx_block(c, 32, part == 1, a + part * Ep, 16 * inner, inner * 2, 32, b + j * Ep, 16 * Ep, 512, Ep / 32,
                    m > 16 ? 32 : 16, 32);
        }
        store_rows(c, 32, dx + t0 * H + j, H, m, false);
      }
    }
    _tile_release();
  });
}

#endif

// dx [T, H] = grad [T, E] @ w [E, H], rounded once to `dtype`: grad's rows broadcast, H along the
// lanes, E summed in registers.
at::Tensor grad_x(const at::Tensor& g, const at::Tensor& w, at::ScalarType dtype) {
  const int64_t T = g.size(0), E = w.size(0), H = w.size(1), Hp = round_up(H, kW);
  at::Tensor dx = empty_output({T, H}, w.options().dtype(dtype));
  if (T == 0 || H == 0) return dx;
  if (E == 0) return dx.zero_();
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (amx_applies(dtype, w.scalar_type(), T, H)) {
    grad_x_amx(dx.data_ptr<c10::BFloat16>(), g.data_ptr<float>(), w, T, E, H);
    return dx;
  }
#endif
  const at::Tensor wf = float_rows(w, Hp);
  const float *gp = g.data_ptr<float>(), *wp = wf.data_ptr<float>();
  PANGU_DISPATCH_FLOATS(dtype, "router_logits_backward", [&] {
    scalar_t* out = dx.data_ptr<scalar_t>();
    const int64_t tasks = (T + kTokens - 1) / kTokens, grain = std::max<int64_t>(1, (1 << 18) / (kTokens * Hp * E));
    at::parallel_for(0, tasks, grain, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> acc_buf;
      float* acc = line_aligned(acc_buf, kTokens * kColumns);
      for (int64_t t = b0 * kTokens; t < std::min(T, b1 * kTokens); t += kTokens) {
        const int64_t m = std::min(kTokens, T - t);
        for (int64_t h = 0; h < Hp; h += kColumns) {
          const int64_t cols = std::min(kColumns, Hp - h), n = std::min(cols, H - h);
          product(acc, kColumns, false, gp + t * E, E, wp + h, Hp, m, E, cols);
          for (int64_t r = 0; r < m; ++r) store_floats(out + (t + r) * H + h, acc + r * kColumns, n);
        }
      }
    });
  });
  return dx;
}

// dw [E, H] = grad^T [E, T] @ x [T, H] in fp32, rounded once to `dtype`: per strip of x's columns,
// grad's columns (experts) broadcast, the strip along the lanes, T summed in registers and in order
// over blocks of tokens.
at::Tensor grad_w(const at::Tensor& g, const at::Tensor& x, at::ScalarType dtype) {
  constexpr int64_t kStrip = 4 * kW;  // columns per task
  const int64_t T = x.size(0), H = x.size(1), E = g.size(1), Hs = round_up(H, kStrip);
  at::Tensor dw = at::empty({E, Hs}, x.options().dtype(at::kFloat));
  if (T == 0) dw.zero_();
  if (T == 0 || E == 0 || H == 0) return dw.narrow(1, 0, H).to(dtype).contiguous();
  const at::Tensor gt = g.t().contiguous(), xc = x.contiguous();  // grad^T: [E, T]
  const float* gp = gt.data_ptr<float>();
  float* d = dw.data_ptr<float>();
  PANGU_DISPATCH_FLOATS(xc.scalar_type(), "router_logits_backward", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    at::parallel_for(0, Hs / kStrip, 1, [&](int64_t s0, int64_t s1) {
      thread_local std::vector<float> strip_buf;
      float* strip = line_aligned(strip_buf, kInner * kStrip);
      for (int64_t h = s0 * kStrip; h < s1 * kStrip; h += kStrip) {
        for (int64_t t = 0; t < T; t += kInner) {
          const int64_t n = std::min(kInner, T - t);
          rows_to_float(strip, kStrip, xp + t * H, H, n, h, std::min(kStrip, H - h));
          product(d + h, Hs, t > 0, gp + t, T, strip, kStrip, E, n, kStrip);
        }
      }
    });
  });
  return dw.narrow(1, 0, H).to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor> router_logits_backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& w, bool x_grad, bool w_grad) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                        grad.size(0) == x.size(0) && grad.size(1) == w.size(0),
                    "router_logits_backward: need grad [T, E], x [T, H] and w [E, H]");
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, "router_logits_backward: grad must be float32");
  if (both_float(x, w)) {
    return {x_grad ? at::mm(grad, w) : at::empty({0}, x.options()), w_grad ? at::mm(grad.t(), x) : at::empty({0}, w.options())};
  }
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = x_grad ? grad_x(g, w, x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dw = w_grad ? grad_w(g, x, w.scalar_type()) : at::empty({0}, w.options());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pangu_cpu, m) {
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
  m.def("router_logits_backward(Tensor grad, Tensor x, Tensor weight, bool x_grad, bool weight_grad) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pangu_cpu, CPU, m) {
  m.impl("router_logits", &router_logits);
  m.impl("router_logits_backward", &router_logits_backward);
}

}  // namespace pangu_cpu
