// GEMM, AVX-512 (F + BF16): the small-M path of the float GEMM (contract in gemm.h), a few rows of A
// times a transposed weight B = W^T, without packing.
//
// For a handful of output rows (decode, small batches) packing B costs as much as the product. When
// B's columns are contiguous along k (B = W^T with W row-major, nn.Linear's forward) and A's rows are
// too, every output is a dot product of an A row and a W row: W streams from memory once, untouched,
// and the few A rows stay in L1 / L2. Register block: 3 W rows x 8 A rows = 24 accumulators of 16
// float32 lanes over k (16 k per step for float32 by FMA, 32 for bf16 by vdpbf16ps on the natural
// (k, k+1) pairs), a masked tail, then one fixed lane-sum tree per output (Simd512::sum_lanes's,
// 16 outputs at a time: sum_lanes16).
// Leftovers: rows past m in the last A group re-read a valid row and are not stored; columns past n
// likewise. Each output's arithmetic is the same whichever group or thread computes it, so its bits
// do not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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
constexpr int64_t kPackAMinRows = 9;     // A packed in row groups (pack_a_groups) from this many rows

struct SmallM {
  const char* a;   // batch 0, row 0 of A
  int64_t a_row_bytes, a_batch_bytes;
  const char* a_packed;  // or A packed by pack_a_groups (group g of batch b at (b * a_groups + g) * a_group_bytes)
  int64_t a_groups, a_group_bytes;
  const char* w;   // batch 0, column 0 of B = row 0 of W
  int64_t w_row_bytes, w_batch_bytes;
  int64_t m, n, k;
  bool bf16;
  const float* bias;
  void* out;
  int out_dtype;
};

// The lane sums of N = 16 (or 8) vectors at once: lane j of the result is the sum of v[j]'s 16 lanes
// (for N = 8: the j = 4 l + q with q < 2, the other v[j] unused), by the tree of Simd512::sum_lanes
// (lane i + lane i + 8, then + 4, + 2, + 1; float addition commutes), so the bits are those of
// sum_lanes, in 45 (24) shuffles and adds instead of 8 per vector.
template <int N>
static inline __m512 sum_lanes16(const __m512 (&v)[16]) {
  static_assert(N == 8 || N == 16, "16 vectors, or the 8 of lanes 4 l + q, q < 2");
  // The tree leaves the sum of input slot 4 q + l in lane 4 l + q: the inputs go in transposed.
  auto in = [&](int slot) { return v[4 * (slot % 4) + slot / 4]; };
  __m512 s1[8], s2[4], s3[2];
  for (int p = 0; p < N / 2; ++p) {  // 128-bit blocks [a0 + a2, a1 + a3, b0 + b2, b1 + b3]: lanes i + i + 8
    const __m512 a = in(2 * p), b = in(2 * p + 1);
    s1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int r = 0; r < N / 4; ++r)  // blocks [A, B, C, D] of four inputs: lanes i + i + 4
    s2[r] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0xDD));
  for (int t = 0; t < N / 8; ++t)  // within blocks: lanes i + i + 2
    s3[t] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0x44), _mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0xEE));
  const __m512 e = s3[0], f = N == 16 ? s3[1] : s3[0];
  return _mm512_add_ps(_mm512_shuffle_ps(e, f, 0x88), _mm512_shuffle_ps(e, f, 0xDD));  // lanes i + i + 1
}

template <bool BF16, bool PACKED_A>
void small_m_block(const SmallM& p, int64_t batch, int64_t i0, int64_t j0) {
  constexpr int64_t kStep = BF16 ? 32 : 16;  // k per vector
  const char* ap = PACKED_A ? p.a_packed + (batch * p.a_groups + i0 / kSmallMRows) * p.a_group_bytes : nullptr;
  const char* arow[kSmallMRows];
  for (int64_t r = 0; r < kSmallMRows; ++r)
    arow[r] = PACKED_A ? nullptr : p.a + batch * p.a_batch_bytes + std::min(i0 + r, p.m - 1) * p.a_row_bytes;
  const char* wrow[kSmallMCols];
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
  auto a_row = [&](int64_t r, int64_t k, int64_t left) -> __m512 {
    if constexpr (PACKED_A) return _mm512_load_ps(reinterpret_cast<const float*>(ap + r * 64));
    return load(arow[r], k, left);
  };
#define LP_SM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define LP_SM_DECL(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = c##r##_0, c##r##_2 = c##r##_0;
#define LP_SM_STEP(r)                            \
  {                                              \
    const __m512 a = a_row(r, k, left);          \
    c##r##_0 = madd(c##r##_0, a, w0);            \
    c##r##_1 = madd(c##r##_1, a, w1);            \
    c##r##_2 = madd(c##r##_2, a, w2);            \
  }
  LP_SM_ROWS(LP_SM_DECL)
  for (int64_t k = 0; k < p.k; k += kStep, ap += kSmallMRows * 64) {
    const int64_t left = p.k - k;
    const __m512 w0 = load(wrow[0], k, left), w1 = load(wrow[1], k, left), w2 = load(wrow[2], k, left);
    LP_SM_ROWS(LP_SM_STEP)
  }
  // The 24 lane sums as two vectors, lane j of the first: row j % 8, column j / 8; of the second
  // (sum_lanes16<8>): row r, column 2 in lane 4 (r / 2) + r % 2. Bias added after the sum, rounded
  // once to the output dtype by the vector conversion (the scalar one's bits), then each valid output
  // copied out.
  const __m512 z = _mm512_setzero_ps();
  const __m512 first[16] = {c0_0, c1_0, c2_0, c3_0, c4_0, c5_0, c6_0, c7_0, c0_1, c1_1, c2_1, c3_1, c4_1, c5_1, c6_1, c7_1};
  const __m512 second[16] = {c0_2, c1_2, z, z, c2_2, c3_2, z, z, c4_2, c5_2, z, z, c6_2, c7_2, z, z};
#undef LP_SM_STEP
#undef LP_SM_DECL
#undef LP_SM_ROWS
  __m512 sums[2] = {sum_lanes16<16>(first), sum_lanes16<8>(second)};
  if (p.bias) {
    auto b = [&](int64_t c) { return _mm512_set1_ps(p.bias[std::min(j0 + c, p.n - 1)]); };
    sums[0] = _mm512_add_ps(sums[0], _mm512_mask_blend_ps(0xFF00, b(0), b(1)));
    sums[1] = _mm512_add_ps(sums[1], b(2));
  }
  alignas(64) uint8_t rounded[2][64];
  for (int v = 0; v < 2; ++v) Simd512::store_as(p.out_dtype, rounded[v], sums[v]);
  const int64_t rows = std::min(kSmallMRows, p.m - i0), cols = std::min(kSmallMCols, p.n - j0);
  const bool wide = p.out_dtype == LP_DTYPE_F32;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t lane = c < 2 ? c * 8 + r : 4 * (r / 2) + r % 2, at = (batch * p.m + i0 + r) * p.n + j0 + c;
      if (wide)
        std::memcpy(static_cast<float*>(p.out) + at, rounded[c / 2] + lane * 4, 4);
      else
        std::memcpy(static_cast<uint16_t*>(p.out) + at, rounded[c / 2] + lane * 2, 2);
    }
  }
}

// Whether the small-M path takes this product (float32 or bf16 inputs; float16 is packed).
bool small_m_applies(const GemmFloatArgs& g) {
  return g.m <= kSmallMMaxRows && g.k >= kSmallMMinDepth && g.n >= kSmallMCols && g.a.dtype != LP_DTYPE_F16 &&
         g.a.stride_col_elems == 1 && g.b.stride_row_elems == 1;
}

// A's rows in groups of 8, each group k-step by k-step: the 8 rows' 64 bytes of one step together
// (zero past K; rows past m repeat the last one). The block's 8 A vectors of a step are then at fixed
// offsets from one pointer: with 8 row pointers the loop ran out of general registers, spilled
// them to vector registers and, short of those, loaded every A vector three times. Taken from two
// row groups on (kPackAMinRows): with one, the copies made the product slower (2 x 4096 x 4096 bf16:
// 0.84x, its 8 rows from two distinct ones; 8 rows: 0.92x).
void pack_a_groups(const GemmFloatArgs& g, int64_t eb, int64_t k_steps, char* dst) {
  const int64_t step_elems = 64 / eb, groups = gemm_ceil_div(g.m, kSmallMRows);
  for (int64_t b = 0; b < g.n_batch; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      char* d = dst + (b * groups + grp) * k_steps * kSmallMRows * 64;
      for (int64_t r = 0; r < kSmallMRows; ++r) {
        const char* src = static_cast<const char*>(g.a.ptr) +
                          (b * g.a.stride_batch_elems + std::min(grp * kSmallMRows + r, g.m - 1) * g.a.stride_row_elems) * eb;
        for (int64_t s = 0; s < k_steps; ++s) {
          const int64_t left = g.k - s * step_elems;
          const __m512i v = left >= step_elems ? _mm512_loadu_si512(src + s * 64)
                                               : _mm512_maskz_loadu_epi8((uint64_t(1) << (left * eb)) - 1, src + s * 64);
          _mm512_store_si512(d + (s * kSmallMRows + r) * 64, v);
        }
      }
    }
  }
}

}  // namespace

// Takes the product when small_m_applies (returns false otherwise, having done nothing).
bool gemm_small_m_float_avx512(const GemmFloatArgs& g) {
  if (!small_m_applies(g)) return false;
  const int64_t eb = g.a.dtype == LP_DTYPE_BF16 ? 2 : 4;
  const int64_t k_steps = gemm_ceil_div(g.k * eb, 64), a_groups = gemm_ceil_div(g.m, kSmallMRows);
  const int64_t a_group_bytes = k_steps * kSmallMRows * 64;
  char* a_packed = nullptr;
  if (g.m >= kPackAMinRows) {
    // The calling thread packs A before the parallel region (gemm_scratch: slot 1, the
    // matrix-vector path's, which never runs in the same call).
    a_packed = static_cast<char*>(gemm_scratch(1, size_t(g.n_batch * a_groups * a_group_bytes)));
    pack_a_groups(g, eb, k_steps, a_packed);
  }
  SmallM p{static_cast<const char*>(g.a.ptr), g.a.stride_row_elems * eb, g.a.stride_batch_elems * eb, a_packed,
           a_groups, a_group_bytes,
           static_cast<const char*>(g.b.ptr), g.b.stride_col_elems * eb, g.b.stride_batch_elems * eb,
           g.m, g.n, g.k, g.a.dtype == LP_DTYPE_BF16, g.bias, g.out, g.out_dtype};
  // Work items: (batch, group of 3 W rows); every A row group is done for a W group while its rows
  // are in L1, so W is read from memory once. Handed out in chunks from a counter (ClaimedChunks): with a
  // busy loop on one core 32 x 4096 -> 4096 1.56x, without 0.99-1.02x (memory-bound; 2-core Xeon).
  const int64_t n_groups = gemm_ceil_div(g.n, kSmallMCols);
  const int64_t n_items = g.n_batch * n_groups;
  const int nt = threads_for(n_items, 2.0 * double(g.m) * double(kSmallMCols) * double(g.k), kGemmMinFlopsPerThread);
  parallel_for_claimed(n_items, nt, [&](int64_t item) {
    const int64_t batch = item / n_groups, j0 = (item % n_groups) * kSmallMCols;
    for (int64_t i0 = 0; i0 < g.m; i0 += kSmallMRows) {
      if (p.bf16)
        p.a_packed ? small_m_block<true, true>(p, batch, i0, j0) : small_m_block<true, false>(p, batch, i0, j0);
      else
        p.a_packed ? small_m_block<false, true>(p, batch, i0, j0) : small_m_block<false, false>(p, batch, i0, j0);
    }
  });
  return true;
}

}  // namespace lp
