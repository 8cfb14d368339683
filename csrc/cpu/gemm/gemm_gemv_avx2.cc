// GEMM, AVX2 + FMA + F16C: the matrix-vector path of the float GEMM (contract in gemm.h), one output
// row (m == 1) or column (n == 1), up to kGemvMaxRows rows of A times a row-major B, and in the AVX2
// table up to kGemvMaxRowsWt rows times B = W^T, each row as its own matrix-vector product; and the
// int8 GEMM's few rows (below). The AVX-512 tables use it too: the product is memory-bound, and
// 256-bit loads keep up with memory.
//
// A single row of A touches every element of B once, so packing B (a read, a write and a re-read)
// would triple the memory traffic of a memory-bound product. This path reads B in place:
//   y[j] = round_once( sum_k x[k] * B[k, j] + bias[j * bias_stride] )
// with x widened to float32 once. n == 1 maps onto it by transposition (y^T = x^T A^T). Columns are
// split among threads in chunks whose edges are multiples of 64 (and of every vector width used
// below); a column's arithmetic never depends on its chunk, so its bits do not depend on the thread
// count. Wide chunks let the row-contiguous case stream whole rows of B. Leftovers: columns past the
// last whole vector and k past the last whole step run the same fused multiply-adds one element at
// a time, in the same order.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/dtypes.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/gemm/gemm_gemv.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

constexpr int64_t kGemvMaxChunk = 4096;  // columns; the float32 row accumulator stays in L1
// Up to this many rows of A times a row-major B (float32 / float16; bf16 too in the AVX2 table, where
// packing cost more still: 2 / 3 / 4 x 4096 x 4096 3.33 / 2.04 / 2.06x, 4 x 1024 x 1024 1.47x; the
// AMX tables have x @ W with B in place) run here, row by row through each pass over B's rows:
// packing B cost these products more than reading it (2-core AMX Xeon, 2 threads (1 thread), over
// the packed tiles: 4096 x 4096 2 / 3 / 4 rows 1.87-2.02 / 1.24 / 1.37-1.63x (1.96 / 1.90 / 1.43x),
// 1024 x 1024 1.32 / 1.13 / 1.04x; 8 rows 0.62-1.01x: the rows' passes reload the B pieces,
// load-bound on 256-bit vectors). Two rows of x a pass over the B pieces then gave 1.05-1.20x more at
// 2-8 rows (8 rows still 1.4x behind MKL).
constexpr int64_t kGemvMaxRows = 4;
// And up to this many rows times a column-contiguous B (x @ W^T) in a table without a few-rows path
// of its own (AVX2; the AVX-512 tables have small_m_float): dot products of x's rows and W's rows in
// register blocks, W read once instead of packed. AVX2 level on the AMX Xeon, 2 threads, over the
// packed 6 x 16 kernels: float32 4096 x 4096 at 2 / 4 / 5 / 6 / 8 / 12 rows 2.35 / 1.87 / 1.29 / 1.08 /
// 1.33 / 0.86x, 1024 x 1024 at 4 / 8 rows 1.97 / 1.65x, 8 x 4096 -> 11008 1.21x, bf16 8 x 4096 x 4096
// 1.33x, 4 x 1024 x 1024 1.82x.
constexpr int64_t kGemvMaxRowsWt = 8;

struct Gemv {
  const float* x;               // rows x k float32 values, x_ld apart
  int64_t rows = 1, x_ld = 0;   // rows of x (and of y): 1, or a few (gemm_gemv_takes) with cs or rs == 1
  const void* b;                // k x n, element strides rs / cs, dtype
  int64_t rs, cs;
  int dtype;
  const float* bias;            // null, or bias[j * bias_stride]
  int64_t bias_stride;
  void* out;                    // y[i, j] at out + i * out_row_stride + j * out_stride (elements of out_dtype)
  int64_t out_stride, out_row_stride = 0;
  int out_dtype;
  int64_t k, n;
};

// Scalar fused multiply-add through the intrinsic (not std::fma: a library template instantiated
// in this AVX2-compiled file could be the copy the linker keeps for generic code).
static inline float fma1(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

static inline void gemv_store(const Gemv& p, int64_t i, int64_t j, float acc) {
  gemm_store_float(p.out, p.out_dtype, i * p.out_row_stride + j * p.out_stride,
                   p.bias ? acc + p.bias[j * p.bias_stride] : acc);
}
static inline void gemv_store(const Gemv& p, int64_t j, float acc) { gemv_store(p, 0, j, acc); }

// B rows contiguous (cs == 1): y[i, j0:j1] accumulates x[i, k] * B[k, j0:j1] for k = 0, 1, ... in
// order, four rows of B per pass over an L1-resident y, two rows of x at a time (the four B row pieces
// stay in L1 for the next two). Each y[i, j] is the one-row product's chain, so a few rows give
// the bits of that many matrix-vector products.
template <int DT>
void gemv_rows(const Gemv& p, int64_t j0, int64_t j1) {
  using In = FloatIn<DT>;
  using T = typename In::T;
  const T* b = static_cast<const T*>(p.b);
  alignas(32) float y_all[kGemvMaxChunk];
  const int64_t w = j1 - j0, w8 = w / 8 * 8, y_ld = gemm_round_up(w, 8);
  for (int64_t j = 0; j < p.rows * y_ld; ++j) y_all[j] = 0.0f;
  // Columns past the last whole vector: the same four fused multiply-adds one element at a time.
  auto tail4 = [&](const float* x, float* y, int64_t k, const T* r0, const T* r1, const T* r2, const T* r3) {
    for (int64_t j = w8; j < w; ++j) {
      float acc = y[j];
      acc = fma1(x[k], In::one(r0 + j), acc);
      acc = fma1(x[k + 1], In::one(r1 + j), acc);
      acc = fma1(x[k + 2], In::one(r2 + j), acc);
      acc = fma1(x[k + 3], In::one(r3 + j), acc);
      y[j] = acc;
    }
  };
  int64_t k = 0;
  for (; k + 4 <= p.k; k += 4) {
    const T* r0 = b + k * p.rs + j0;
    const T *r1 = r0 + p.rs, *r2 = r1 + p.rs, *r3 = r2 + p.rs;
    int64_t i = 0;
    for (; i + 2 <= p.rows; i += 2) {  // two rows of x share each load of B (1.05-1.20x over one)
      const float *xa = p.x + i * p.x_ld, *xb = xa + p.x_ld;
      float *ya = y_all + i * y_ld, *yb = ya + y_ld;
      const __m256 a0 = _mm256_set1_ps(xa[k]), a1 = _mm256_set1_ps(xa[k + 1]);
      const __m256 a2 = _mm256_set1_ps(xa[k + 2]), a3 = _mm256_set1_ps(xa[k + 3]);
      const __m256 b0 = _mm256_set1_ps(xb[k]), b1 = _mm256_set1_ps(xb[k + 1]);
      const __m256 b2 = _mm256_set1_ps(xb[k + 2]), b3 = _mm256_set1_ps(xb[k + 3]);
      for (int64_t j = 0; j < w8; j += 8) {
        const __m256 v0 = In::eight(r0 + j), v1 = In::eight(r1 + j), v2 = In::eight(r2 + j), v3 = In::eight(r3 + j);
        __m256 acc = _mm256_load_ps(ya + j), acc_b = _mm256_load_ps(yb + j);
        acc = _mm256_fmadd_ps(a0, v0, acc);
        acc_b = _mm256_fmadd_ps(b0, v0, acc_b);
        acc = _mm256_fmadd_ps(a1, v1, acc);
        acc_b = _mm256_fmadd_ps(b1, v1, acc_b);
        acc = _mm256_fmadd_ps(a2, v2, acc);
        acc_b = _mm256_fmadd_ps(b2, v2, acc_b);
        acc = _mm256_fmadd_ps(a3, v3, acc);
        acc_b = _mm256_fmadd_ps(b3, v3, acc_b);
        _mm256_store_ps(ya + j, acc);
        _mm256_store_ps(yb + j, acc_b);
      }
      tail4(xa, ya, k, r0, r1, r2, r3);
      tail4(xb, yb, k, r0, r1, r2, r3);
    }
    for (; i < p.rows; ++i) {
      const float* x = p.x + i * p.x_ld;
      float* y = y_all + i * y_ld;
      const __m256 x0 = _mm256_set1_ps(x[k]), x1 = _mm256_set1_ps(x[k + 1]);
      const __m256 x2 = _mm256_set1_ps(x[k + 2]), x3 = _mm256_set1_ps(x[k + 3]);
      for (int64_t j = 0; j < w8; j += 8) {
        __m256 acc = _mm256_load_ps(y + j);
        acc = _mm256_fmadd_ps(x0, In::eight(r0 + j), acc);
        acc = _mm256_fmadd_ps(x1, In::eight(r1 + j), acc);
        acc = _mm256_fmadd_ps(x2, In::eight(r2 + j), acc);
        acc = _mm256_fmadd_ps(x3, In::eight(r3 + j), acc);
        _mm256_store_ps(y + j, acc);
      }
      tail4(x, y, k, r0, r1, r2, r3);
    }
  }
  for (; k < p.k; ++k) {
    const T* r0 = b + k * p.rs + j0;
    for (int64_t i = 0; i < p.rows; ++i) {
      const float xk = p.x[i * p.x_ld + k];
      float* y = y_all + i * y_ld;
      const __m256 x0 = _mm256_set1_ps(xk);
      for (int64_t j = 0; j < w8; j += 8)
        _mm256_store_ps(y + j, _mm256_fmadd_ps(x0, In::eight(r0 + j), _mm256_load_ps(y + j)));
      for (int64_t j = w8; j < w; ++j) y[j] = fma1(xk, In::one(r0 + j), y[j]);
    }
  }
  for (int64_t i = 0; i < p.rows; ++i)
    for (int64_t j = 0; j < w; ++j) gemv_store(p, i, j0 + j, y_all[i * y_ld + j]);
}

// B columns contiguous (rs == 1, e.g. B = W^T with W row-major): dot products (gemv_dot_block of
// gemm_gemv.h), whose blocks give every output the one-row product's chain.
// float32 / float16 / bf16 B, float32 x: 8 k a step by FMA.
template <int DT>
struct FloatDot {
  using X = float;
  using W = typename FloatIn<DT>::T;
  using V = __m256;
  using Acc = __m256;
  static constexpr int64_t kStep = 8;
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 load_w(const W* p) { return FloatIn<DT>::eight(p); }
  static __m256 load_x(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 madd(__m256 acc, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, acc); }
  static float sum(__m256 acc) { return Simd256::sum_lanes(acc); }
  static float madd1(float acc, const float* x, const W* w) { return fma1(*x, FloatIn<DT>::one(w), acc); }
};

template <int DT>
void gemv_cols(const Gemv& p, int64_t j0, int64_t j1) {
  const auto* b = static_cast<const typename FloatDot<DT>::W*>(p.b);
  auto store = [&](int64_t i, int64_t j, float v) { gemv_store(p, i, j, v); };
  gemv_blocks(p.rows, j0, j1, [&](auto r, auto c, int64_t i0, int64_t j) {
    gemv_dot_block<FloatDot<DT>, decltype(r)::value, decltype(c)::value>(p.x, p.x_ld, b, p.cs, p.k, i0, j, store);
  });
}

// Any other strides: one column at a time, k in order.
template <int DT>
void gemv_strided(const Gemv& p, int64_t j0, int64_t j1) {
  using In = FloatIn<DT>;
  const typename In::T* b = static_cast<const typename In::T*>(p.b);
  for (int64_t j = j0; j < j1; ++j) {
    float acc = 0.0f;
    for (int64_t k = 0; k < p.k; ++k) acc = fma1(p.x[k], In::one(b + k * p.rs + j * p.cs), acc);
    gemv_store(p, j, acc);
  }
}

template <int DT>
void gemv_chunk(const Gemv& p, int64_t j0, int64_t j1) {
  if (p.cs == 1 && p.k > 0)
    gemv_rows<DT>(p, j0, j1);
  else if (p.rs == 1)
    gemv_cols<DT>(p, j0, j1);
  else
    gemv_strided<DT>(p, j0, j1);
}

}  // namespace

bool gemm_gemv_takes(const GemmFloatArgs& g, bool all_few_rows) {
  if (g.m == 1 || g.n == 1) return true;
  if (g.b.stride_col_elems == 1) return g.m <= kGemvMaxRows && (g.a.dtype != LP_DTYPE_BF16 || all_few_rows);
  return all_few_rows && g.b.stride_row_elems == 1 && g.m <= kGemvMaxRowsWt;
}

void gemm_gemv_float_avx2(const GemmFloatArgs& g) {
  // Orient as y = x @ B: m == 1 (or a few rows, B row-major) reads x from A's rows and B as given;
  // n == 1 reads x from B's column and uses A^T as the matrix (out's column is contiguous, like a row).
  const bool row = g.m == 1 || g.n != 1;
  const int64_t rows = row ? g.m : 1;
  const GemmOperand& xo = row ? g.a : g.b;
  const GemmOperand& mo = row ? g.b : g.a;
  const int64_t n_out = row ? g.n : g.m, k = g.k;
  const int64_t x_stride = row ? g.a.stride_col_elems : g.b.stride_row_elems;
  const int64_t rs = row ? mo.stride_row_elems : mo.stride_col_elems;
  const int64_t cs = row ? mo.stride_col_elems : mo.stride_row_elems;
  const int64_t out_elem = g.out_dtype == LP_DTYPE_F32 ? 4 : 2;
  // Memory-bound: a thread per kMinStreamBytesPerThread of B as well as per kGemmMinFlopsPerThread.
  const int64_t nt_want = threads_for_stream(g.n_batch * gemm_ceil_div(n_out, 64), 2.0 * 64 * double(k * rows),
                                             kGemmMinFlopsPerThread, 64.0 * double(k) * (mo.dtype == LP_DTYPE_F32 ? 4 : 2));
  // Columns a chunk: y (rows x chunk float32) in L1, and for a few rows the four B row pieces of a
  // pass too, for the next row of x.
  const int64_t max_chunk = rows == 1 ? kGemvMaxChunk : std::max<int64_t>(64, 2048 / rows / 64 * 64);
  const int64_t chunk_cols = std::min(
      max_chunk, gemm_round_up(gemm_ceil_div(n_out, std::max<int64_t>(1, nt_want / g.n_batch)), 64));
  const int64_t n_chunks = gemm_ceil_div(n_out, chunk_cols);
  const int64_t n_items = g.n_batch * n_chunks;
  const int nt = int(std::min(n_items, nt_want));
  // Each thread widens the x rows of the batches it works on into its own buffer.
  const int64_t x_ld = gemm_round_up(k, 16);
  float* x_all = static_cast<float*>(gemm_scratch(1, size_t(nt) * size_t(rows * x_ld) * 4));
  parallel_region(nt, [&](int t, int n_threads) {
    const int64_t i_begin = n_items * t / n_threads, i_end = n_items * (t + 1) / n_threads;
    float* x = x_all + int64_t(t) * rows * x_ld;
    int64_t widened = -1;  // the batch whose x is in this thread's buffer
    for (int64_t item = i_begin; item < i_end; ++item) {
      const int64_t bi = item / n_chunks, chunk = item % n_chunks;
      if (widened != bi) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t base = bi * xo.stride_batch_elems + i * xo.stride_row_elems;
          for (int64_t kk = 0; kk < k; ++kk) x[i * x_ld + kk] = gemm_load_float(xo.ptr, xo.dtype, base + kk * x_stride);
        }
        widened = bi;
      }
      Gemv p;
      p.x = x;
      p.rows = rows;
      p.x_ld = x_ld;
      p.b = static_cast<const char*>(mo.ptr) + bi * mo.stride_batch_elems * (mo.dtype == LP_DTYPE_F32 ? 4 : 2);
      p.rs = rs;
      p.cs = cs;
      p.dtype = mo.dtype;
      p.bias = g.bias;
      p.bias_stride = row ? 1 : 0;
      p.out = static_cast<char*>(g.out) + bi * rows * n_out * out_elem;
      p.out_stride = 1;
      p.out_row_stride = n_out;
      p.out_dtype = g.out_dtype;
      p.k = k;
      p.n = n_out;
      const int64_t j0 = chunk * chunk_cols, j1 = std::min(n_out, j0 + chunk_cols);
      switch (mo.dtype) {
        case LP_DTYPE_F16: gemv_chunk<LP_DTYPE_F16>(p, j0, j1); break;
        case LP_DTYPE_BF16: gemv_chunk<LP_DTYPE_BF16>(p, j0, j1); break;
        default: gemv_chunk<LP_DTYPE_F32>(p, j0, j1); break;
      }
    }
  });
}

// int8 (gemm_gemv.h): x widened to int16 once, 16 k a step by vpmovsxbw + vpmaddwd, summed in int32
// (exact: pairs of products fit int32, and the K limit of the int8 GEMM keeps every partial sum in range).
namespace {

struct Int8Dot : GemvInt8Ops<int16_t> {
  using V = __m256i;
  using Acc = __m256i;
  static constexpr int64_t kStep = 16;
  static int32_t correction(const int16_t*, int64_t) { return 0; }
  static __m256i zero() { return _mm256_setzero_si256(); }
  static __m256i load_w(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256i load_x(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static __m256i madd(__m256i acc, __m256i x, __m256i w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
  static int32_t sum(__m256i acc) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
};

}  // namespace

bool gemm_gemv_int8_takes(const GemmInt8Args& g) {
  if (g.b_packed || g.k <= 0) return false;
  return gemv_int8_by_rows(g) || (g.n == 1 && g.a.stride_col_elems == 1);
}

void gemm_gemv_int8_avx2(const GemmInt8Args& g) { gemm_gemv_int8_with<Int8Dot>(g); }

}  // namespace lp
