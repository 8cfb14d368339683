// GEMM, AVX-512 (F + BF16): the small-M path of the float GEMM (contract in gemm.h), a few rows of A
// times a transposed weight B = W^T, without packing.
//
// For a handful of output rows (decode, small batches) packing B costs as much as the product. When
// B's columns are contiguous along k (B = W^T with W row-major, nn.Linear's forward) and A's rows are
// too, every output is a dot product of an A row and a W row: W streams from memory once, untouched,
// and the few A rows stay in L1 / L2. Register block: 3 W rows x 8 A rows = 24 accumulators of 16
// float32 lanes over k (16 k per step for float32 by FMA, 32 for bf16 by vdpbf16ps on the natural
// (k, k+1) pairs), a masked tail, then one fixed lane-sum tree per output (Simd512::sum_lanes).
// Leftovers: rows past m in the last A group re-read a valid row and are not stored; columns past n
// likewise. Each output's arithmetic is the same whichever group or thread computes it, so its bits
// do not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/dtypes.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

constexpr int64_t kSmallMMaxRows = 48;   // at most this many rows of A
constexpr int64_t kSmallMMinDepth = 128; // and K at least this (the lane sums are per output)
constexpr int64_t kSmallMRows = 8, kSmallMCols = 3;

struct SmallM {
  const char* a;   // batch 0, row 0 of A
  int64_t a_row_bytes, a_batch_bytes;
  const char* w;   // batch 0, column 0 of B = row 0 of W
  int64_t w_row_bytes, w_batch_bytes;
  int64_t m, n, k;
  bool bf16;
  const float* bias;
  void* out;
  int out_dtype;
};

template <bool BF16>
void small_m_block(const SmallM& p, int64_t batch, int64_t i0, int64_t j0) {
  constexpr int64_t kStep = BF16 ? 32 : 16;  // k per vector
  const char* arow[kSmallMRows];
  const char* wrow[kSmallMCols];
  for (int64_t r = 0; r < kSmallMRows; ++r)
    arow[r] = p.a + batch * p.a_batch_bytes + std::min(i0 + r, p.m - 1) * p.a_row_bytes;
  for (int64_t c = 0; c < kSmallMCols; ++c)
    wrow[c] = p.w + batch * p.w_batch_bytes + std::min(j0 + c, p.n - 1) * p.w_row_bytes;
  constexpr int64_t kElemBytes = BF16 ? 2 : 4;
  auto load = [](const char* row, int64_t k, int64_t n_valid) -> __m512 {
    const void* q = row + k * kElemBytes;
    if (BF16)
      return _mm512_castsi512_ps(n_valid >= kStep ? _mm512_loadu_si512(q)
                                                  : _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n_valid) - 1), q));
    return n_valid >= kStep ? _mm512_loadu_ps(q) : _mm512_maskz_loadu_ps(__mmask16((1u << n_valid) - 1), q);
  };
  auto madd = [](__m512 acc, __m512 x, __m512 y) -> __m512 {
    if (BF16) return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)y);
    return _mm512_fmadd_ps(x, y, acc);
  };
#define LP_SM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define LP_SM_DECL(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = c##r##_0, c##r##_2 = c##r##_0;
#define LP_SM_STEP(r)                            \
  {                                              \
    const __m512 a = load(arow[r], k, left);     \
    c##r##_0 = madd(c##r##_0, a, w0);            \
    c##r##_1 = madd(c##r##_1, a, w1);            \
    c##r##_2 = madd(c##r##_2, a, w2);            \
  }
  LP_SM_ROWS(LP_SM_DECL)
  for (int64_t k = 0; k < p.k; k += kStep) {
    const int64_t left = p.k - k;
    const __m512 w0 = load(wrow[0], k, left), w1 = load(wrow[1], k, left), w2 = load(wrow[2], k, left);
    LP_SM_ROWS(LP_SM_STEP)
  }
#define LP_SM_GATHER(r) {c##r##_0, c##r##_1, c##r##_2},
  const __m512 acc[kSmallMRows][kSmallMCols] = {LP_SM_ROWS(LP_SM_GATHER)};
#undef LP_SM_GATHER
#undef LP_SM_STEP
#undef LP_SM_DECL
#undef LP_SM_ROWS
  const int64_t rows = std::min(kSmallMRows, p.m - i0), cols = std::min(kSmallMCols, p.n - j0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = Simd512::sum_lanes(acc[r][c]);
      const int64_t j = j0 + c;
      gemm_store_float(p.out, p.out_dtype, (batch * p.m + i0 + r) * p.n + j, p.bias ? v + p.bias[j] : v);
    }
  }
}

// Whether the small-M path takes this product (float32 or bf16 inputs; float16 is packed).
bool small_m_applies(const GemmFloatArgs& g) {
  return g.m <= kSmallMMaxRows && g.k >= kSmallMMinDepth && g.n >= kSmallMCols && g.a.dtype != LP_DTYPE_F16 &&
         g.a.stride_col_elems == 1 && g.b.stride_row_elems == 1;
}

}  // namespace

// Takes the product when small_m_applies (returns false otherwise, having done nothing).
bool gemm_small_m_float_avx512(const GemmFloatArgs& g) {
  if (!small_m_applies(g)) return false;
  const int64_t eb = g.a.dtype == LP_DTYPE_BF16 ? 2 : 4;
  SmallM p{static_cast<const char*>(g.a.ptr), g.a.stride_row_elems * eb, g.a.stride_batch_elems * eb,
           static_cast<const char*>(g.b.ptr), g.b.stride_col_elems * eb, g.b.stride_batch_elems * eb,
           g.m, g.n, g.k, g.a.dtype == LP_DTYPE_BF16, g.bias, g.out, g.out_dtype};
  // Work items: (batch, group of 3 W rows); every A row group is done for a W group while its rows
  // are in L1, so W is read from memory once.
  const int64_t n_groups = gemm_ceil_div(g.n, kSmallMCols);
  const int64_t n_items = g.n_batch * n_groups;
  const int nt = threads_for(n_items, 2.0 * double(g.m) * double(kSmallMCols) * double(g.k), kGemmMinFlopsPerThread);
  parallel_for(n_items, nt, [&](int64_t item) {
    const int64_t batch = item / n_groups, j0 = (item % n_groups) * kSmallMCols;
    for (int64_t i0 = 0; i0 < g.m; i0 += kSmallMRows) {
      if (p.bf16)
        small_m_block<true>(p, batch, i0, j0);
      else
        small_m_block<false>(p, batch, i0, j0);
    }
  });
  return true;
}

}  // namespace lp
