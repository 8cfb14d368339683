// GEMM, AVX2 + FMA + F16C: BLIS/GotoBLAS-style packed kernels (contract in gemm.h).
//
// The macro-loop (units, K blocks, A / B blocks, threads) is gemm_driver.h; this file has the packing,
// the microkernels and the epilogues.
// Register tiles are MR x NR = 6 x 16: 12 ymm accumulators (6 rows x 2 vectors of 8 columns), two
// for the B row and one for the broadcast A element.
//   float: A and B are widened to float32 while packing (16-bit products are then exact in
//          float32), accumulated with FMA. Partial sums across K blocks live in float32: in the
//          output itself when it is float32, else in a per-thread float32 workspace; the last K block
//          adds the bias and rounds once to the output dtype.
//   int8:  A and B are packed as int16 k-pairs; _mm256_madd_epi16 multiplies and adds one pair per
//          int32 lane (exact: |a0*b0 + a1*b1| <= 2^15), then a 32-bit add accumulates (exact for
//          K <= 131071). Partial sums live in the int32 output, or a per-thread int32 workspace for
//          scaled_gemm; the scaled epilogue runs in float32 without FMA contraction.
// Leftovers: rows past m and columns past n are zero in the packed panels; such edge tiles are
// computed into a local MR x NR tile and only their valid part is written (by scalar code doing the
// same float32 operations).
// Float products with one output row (m == 1) or column (n == 1) skip packing: a matrix-vector
// product reads its matrix once, and packing would triple that memory traffic (gemv_float below).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/dtypes.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/gemm/gemm_simd256.h"

namespace lp {
namespace {

constexpr int64_t MR = kGemmAvx2Mr;  // 6
constexpr int64_t NR = kGemmAvx2Nr;  // 16
static_assert(MR == 6 && NR == 16, "the microkernels below are written for 6 x 16 tiles");


// ---------------------------------------------------------------------------------------------
// Float packing
// ---------------------------------------------------------------------------------------------

// A rows [0, mc) x depth [0, kc) starting at `src` -> panels of MR rows, dst[panel][k][MR] (float32),
// rows past mc zero. Strides in elements.
template <int DT>
void pack_a_float(const typename FloatIn<DT>::T* src, int64_t rs, int64_t cs, int64_t mc, int64_t kc, float* dst) {
  using In = FloatIn<DT>;
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min(MR, mc - ip);
    float* d = dst + ip * kc;
    const typename In::T* s = src + ip * rs;
    int64_t k = 0;
    if (rows == MR && cs == 1) {
      // Rows contiguous along k: load 8 k of each row, transpose, store 8 columns of the panel (each
      // store writes 8 lanes where the panel has 6; the next store overwrites the extra 2).
      for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 6; ++i) r[i] = In::eight(s + i * rs + k);
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int kk = 0; kk < 8; ++kk) _mm256_storeu_ps(d + (k + kk) * MR, r[kk]);
      }
    }
    if (rows == MR && rs == 1) {  // a transposed view: the 6 rows of one k are contiguous
      for (; k < kc; ++k)
        for (int64_t i = 0; i < MR; ++i) d[k * MR + i] = In::one(s + k * cs + i);
    }
    for (; k < kc; ++k) {
      int64_t i = 0;
      for (; i < rows; ++i) d[k * MR + i] = In::one(s + i * rs + k * cs);
      for (; i < MR; ++i) d[k * MR + i] = 0.0f;
    }
  }
}

// B depth [0, kc) x columns [0, nc) starting at `src` -> panels of NR columns, dst[panel][k][NR]
// (float32), columns past nc zero.
template <int DT>
void pack_b_float(const typename FloatIn<DT>::T* src, int64_t rs, int64_t cs, int64_t kc, int64_t nc, float* dst) {
  using In = FloatIn<DT>;
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min(NR, nc - jp);
    float* d = dst + jp * kc;
    const typename In::T* s = src + jp * cs;
    int64_t k = 0;
    if (cols == NR && cs == 1) {  // row-major B: each k row of the panel is 16 contiguous elements
      for (; k < kc; ++k) {
        _mm256_store_ps(d + k * NR, In::eight(s + k * rs));
        _mm256_store_ps(d + k * NR + 8, In::eight(s + k * rs + 8));
      }
    } else if (cols == NR && rs == 1) {  // B = W^T with W row-major: columns contiguous along k
      for (; k + 8 <= kc; k += 8) {
        for (int h = 0; h < 2; ++h) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = In::eight(s + (h * 8 + j) * cs + k);
          transpose8(r);
          for (int kk = 0; kk < 8; ++kk) _mm256_store_ps(d + (k + kk) * NR + h * 8, r[kk]);
        }
      }
    }
    for (; k < kc; ++k) {
      int64_t j = 0;
      for (; j < cols; ++j) d[k * NR + j] = In::one(s + k * rs + j * cs);
      for (; j < NR; ++j) d[k * NR + j] = 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Float microkernel and epilogue
// ---------------------------------------------------------------------------------------------

// Round-to-nearest-even float32 -> bfloat16 of 16 lanes (two vectors), quiet NaNs kept.
static inline __m256i f32x16_to_bf16(__m256 v0, __m256 v1) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
  __m256i r[2];
  __m256 v[2] = {v0, v1};
  for (int h = 0; h < 2; ++h) {
    __m256i u = _mm256_castps_si256(v[h]);
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v[h], v[h], _CMP_UNORD_Q));
    __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
    r[h] = _mm256_blendv_epi8(rounded, nan_bits, nan);
  }
  // packus works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7]; reorder the 64-bit quarters.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
}

static inline void store_row_float(void* out, int dtype, __m256 v0, __m256 v1) {
  if (dtype == LP_DTYPE_F32) {
    float* o = static_cast<float*>(out);
    _mm256_storeu_ps(o, v0);
    _mm256_storeu_ps(o + 8, v1);
  } else if (dtype == LP_DTYPE_F16) {
    __m128i* o = static_cast<__m128i*>(out);
    _mm_storeu_si128(o, _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(o + 1, _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(out), f32x16_to_bf16(v0, v1));
  }
}

// acc(MR x NR) = prev + A_panel(MR x kc) * B_panel(kc x NR), then the tile's epilogue.
// ap: [kc][MR] float32, bp: [kc][NR] float32 (32-byte aligned).
void ukernel_float(int64_t kc, const float* __restrict ap, const float* __restrict bp, const GemmFloatTile& t) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (t.prev) {
    const float* p = t.prev;
    const int64_t ld = t.prev_ld;
    c00 = _mm256_loadu_ps(p + 0 * ld), c01 = _mm256_loadu_ps(p + 0 * ld + 8);
    c10 = _mm256_loadu_ps(p + 1 * ld), c11 = _mm256_loadu_ps(p + 1 * ld + 8);
    c20 = _mm256_loadu_ps(p + 2 * ld), c21 = _mm256_loadu_ps(p + 2 * ld + 8);
    c30 = _mm256_loadu_ps(p + 3 * ld), c31 = _mm256_loadu_ps(p + 3 * ld + 8);
    c40 = _mm256_loadu_ps(p + 4 * ld), c41 = _mm256_loadu_ps(p + 4 * ld + 8);
    c50 = _mm256_loadu_ps(p + 5 * ld), c51 = _mm256_loadu_ps(p + 5 * ld + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
#define LP_FMA_STEP(K)                                                          \
  {                                                                             \
    const __m256 b0 = _mm256_load_ps(bp + (K) * NR), b1 = _mm256_load_ps(bp + (K) * NR + 8); \
    __m256 a = _mm256_broadcast_ss(ap + (K) * MR + 0);                          \
    c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);      \
    a = _mm256_broadcast_ss(ap + (K) * MR + 1);                                 \
    c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);      \
    a = _mm256_broadcast_ss(ap + (K) * MR + 2);                                 \
    c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);      \
    a = _mm256_broadcast_ss(ap + (K) * MR + 3);                                 \
    c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);      \
    a = _mm256_broadcast_ss(ap + (K) * MR + 4);                                 \
    c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);      \
    a = _mm256_broadcast_ss(ap + (K) * MR + 5);                                 \
    c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);      \
  }
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    LP_FMA_STEP(0) LP_FMA_STEP(1) LP_FMA_STEP(2) LP_FMA_STEP(3)
    ap += 4 * MR;
    bp += 4 * NR;
  }
  for (; k < kc; ++k) {
    LP_FMA_STEP(0)
    ap += MR;
    bp += NR;
  }
#undef LP_FMA_STEP
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (!t.final) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(t.c32 + i * t.c32_ld, acc[i][0]);
      _mm256_storeu_ps(t.c32 + i * t.c32_ld + 8, acc[i][1]);
    }
    return;
  }
  __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
  if (t.bias) bias0 = _mm256_loadu_ps(t.bias), bias1 = _mm256_loadu_ps(t.bias + 8);
  const int64_t row_bytes = t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  char* o = static_cast<char*>(t.out);
  for (int i = 0; i < MR; ++i) {
    __m256 v0 = acc[i][0], v1 = acc[i][1];
    if (t.bias) v0 = _mm256_add_ps(v0, bias0), v1 = _mm256_add_ps(v1, bias1);
    store_row_float(o + i * row_bytes, t.out_dtype, v0, v1);
  }
}

// ---------------------------------------------------------------------------------------------
// int8 packing: int16 k-pairs
// ---------------------------------------------------------------------------------------------

// 16 int8 -> 16 int16 (8 k-pairs when the bytes run along k).
static inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A rows [0, mc) x depth [0, kc) -> panels of MR rows, dst[panel][k/2][MR][2] int16 (kc rounded up
// to even with a zero k; rows past mc zero). Panel size MR * kc_even.
void pack_a_int8(const int8_t* src, int64_t rs, int64_t cs, int64_t mc, int64_t kc, int16_t* dst) {
  const int64_t kc_even = (kc + 1) & ~int64_t(1);
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min(MR, mc - ip);
    int16_t* d = dst + ip * kc_even;
    const int8_t* s = src + ip * rs;
    int64_t k = 0;
    if (rows == MR && cs == 1) {
      // 16 k of each row = 8 pairs as 32-bit lanes; transpose 8 x 8 lanes (rows 6, 7 are padding)
      // and store 8 pair-columns of 6 rows, each store spilling 2 lanes the next one overwrites.
      for (; k + 16 <= kc; k += 16) {
        __m256 r[8];
        for (int i = 0; i < 6; ++i) r[i] = _mm256_castsi256_ps(widen16(s + i * rs + k));
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int kp = 0; kp < 8; ++kp) _mm256_storeu_ps(reinterpret_cast<float*>(d + (k / 2 + kp) * 2 * MR), r[kp]);
      }
    }
    for (; k < kc_even; k += 2) {
      int64_t i = 0;
      for (; i < rows; ++i) {
        d[k * MR + 2 * i] = s[i * rs + k * cs];
        d[k * MR + 2 * i + 1] = k + 1 < kc ? s[i * rs + (k + 1) * cs] : 0;
      }
      for (; i < MR; ++i) d[k * MR + 2 * i] = d[k * MR + 2 * i + 1] = 0;
    }
  }
}

// B depth [0, kc) x columns [0, nc) -> panels of NR columns, dst[panel][k/2][NR][2] int16.
void pack_b_int8(const int8_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t nc, int16_t* dst) {
  const int64_t kc_even = (kc + 1) & ~int64_t(1);
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min(NR, nc - jp);
    int16_t* d = dst + jp * kc_even;
    const int8_t* s = src + jp * cs;
    int64_t k = 0;
    if (cols == NR && cs == 1) {  // row-major: interleave rows k and k+1 byte by byte, widen
      for (; k + 2 <= kc; k += 2) {
        __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k * rs));
        __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + (k + 1) * rs));
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + k * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + k * NR + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
      }
    } else if (cols == NR && rs == 1) {  // B = W^T: a column's k-pairs are adjacent bytes
      for (; k + 16 <= kc; k += 16) {
        for (int h = 0; h < 2; ++h) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = _mm256_castsi256_ps(widen16(s + (h * 8 + j) * cs + k));
          transpose8(r);
          for (int kp = 0; kp < 8; ++kp) _mm256_store_ps(reinterpret_cast<float*>(d + (k + 2 * kp) * NR + h * 16), r[kp]);
        }
      }
    }
    for (; k < kc_even; k += 2) {
      int64_t j = 0;
      for (; j < cols; ++j) {
        d[k * NR + 2 * j] = s[k * rs + j * cs];
        d[k * NR + 2 * j + 1] = k + 1 < kc ? s[(k + 1) * rs + j * cs] : 0;
      }
      for (; j < NR; ++j) d[k * NR + 2 * j] = d[k * NR + 2 * j + 1] = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// int8 microkernel and epilogues
// ---------------------------------------------------------------------------------------------

static inline __m256 no_contract(__m256 v) {
  __asm__("" : "+x"(v));  // keeps mul and add separate roundings (no FMA contraction)
  return v;
}

// Broadcast of one int16 pair (32 bits) through the float broadcast, a plain load on AMD cores.
static inline __m256i bcast32(const int32_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// acc(MR x NR) = prev + A_panel * B_panel; ap: [kc_even/2][MR][2] int16, bp: [kc_even/2][NR][2].
void ukernel_int8(int64_t kc_even, const int16_t* __restrict ap, const int16_t* __restrict bp, const GemmInt8Tile& t) {
  __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (t.prev) {
    const int32_t* p = t.prev;
    const int64_t ld = t.prev_ld;
    auto ld8 = [](const int32_t* q) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)); };
    c00 = ld8(p + 0 * ld), c01 = ld8(p + 0 * ld + 8);
    c10 = ld8(p + 1 * ld), c11 = ld8(p + 1 * ld + 8);
    c20 = ld8(p + 2 * ld), c21 = ld8(p + 2 * ld + 8);
    c30 = ld8(p + 3 * ld), c31 = ld8(p + 3 * ld + 8);
    c40 = ld8(p + 4 * ld), c41 = ld8(p + 4 * ld + 8);
    c50 = ld8(p + 5 * ld), c51 = ld8(p + 5 * ld + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_si256();
  }
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
  const __m256i* b256 = reinterpret_cast<const __m256i*>(bp);
#define LP_MADD_STEP(P)                                                                         \
  {                                                                                             \
    const __m256i b0 = _mm256_load_si256(b256 + 2 * (P)), b1 = _mm256_load_si256(b256 + 2 * (P) + 1); \
    __m256i a = bcast32(a32 + (P) * MR + 0);                                                     \
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, b0)), c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, b1)); \
    a = bcast32(a32 + (P) * MR + 1);                                                           \
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, b0)), c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, b1)); \
    a = bcast32(a32 + (P) * MR + 2);                                                           \
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, b0)), c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, b1)); \
    a = bcast32(a32 + (P) * MR + 3);                                                           \
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(a, b0)), c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(a, b1)); \
    a = bcast32(a32 + (P) * MR + 4);                                                           \
    c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(a, b0)), c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(a, b1)); \
    a = bcast32(a32 + (P) * MR + 5);                                                           \
    c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(a, b0)), c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(a, b1)); \
  }
  // One k-pair per iteration, the accumulators pinned to registers after each: integer adds are
  // associative, and left alone the compiler regroups them across steps and spills accumulators.
  const int64_t n_pairs = kc_even / 2;
  for (int64_t p = 0; p < n_pairs; ++p) {
    LP_MADD_STEP(0)
    __asm__("" : "+x"(c00), "+x"(c01), "+x"(c10), "+x"(c11), "+x"(c20), "+x"(c21));
    __asm__("" : "+x"(c30), "+x"(c31), "+x"(c40), "+x"(c41), "+x"(c50), "+x"(c51));
    a32 += MR;
    b256 += 2;
  }
#undef LP_MADD_STEP
  const __m256i acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (!t.final || !t.scaled) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.c32 + i * t.c32_ld), acc[i][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.c32 + i * t.c32_ld + 8), acc[i][1]);
    }
    return;
  }
  __m256 sb0, sb1;
  if (t.scale_b_stride == 0) {
    sb0 = sb1 = _mm256_set1_ps(t.scale_b[0]);
  } else {
    sb0 = _mm256_loadu_ps(t.scale_b), sb1 = _mm256_loadu_ps(t.scale_b + 8);
  }
  __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
  if (t.bias) bias0 = _mm256_loadu_ps(t.bias), bias1 = _mm256_loadu_ps(t.bias + 8);
  const int64_t row_bytes = t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  char* o = static_cast<char*>(t.out);
  for (int i = 0; i < MR; ++i) {
    const __m256 sa = _mm256_set1_ps(t.scale_a[i * t.scale_a_stride]);
    __m256 v0 = no_contract(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), sa));
    __m256 v1 = no_contract(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), sa));
    v0 = no_contract(_mm256_mul_ps(v0, sb0));
    v1 = no_contract(_mm256_mul_ps(v1, sb1));
    if (t.bias) v0 = _mm256_add_ps(v0, bias0), v1 = _mm256_add_ps(v1, bias1);
    store_row_float(o + i * row_bytes, t.out_dtype, v0, v1);
  }
}

// ---------------------------------------------------------------------------------------------
// Traits for the driver (gemm_driver.h)
// ---------------------------------------------------------------------------------------------

// ---- float traits ----
struct FloatTraits {
  using Packed = float;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = 1;
  const GemmFloatArgs& g;
  bool c32_is_out;  // partial sums in the float32 output (else in the unit's workspace)
  int64_t ws_ld;

  int64_t b_panel_elems(int64_t kc_panel) const { return NR * kc_panel; }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* dst) const {
    const GemmOperand& a = g.a;
    const int64_t off = batch * a.stride_batch_elems + i0 * a.stride_row_elems + p0 * a.stride_col_elems;
    switch (a.dtype) {
      case LP_DTYPE_F16:
        return pack_a_float<LP_DTYPE_F16>(static_cast<const uint16_t*>(a.ptr) + off, a.stride_row_elems,
                                          a.stride_col_elems, mc, kc, dst);
      case LP_DTYPE_BF16:
        return pack_a_float<LP_DTYPE_BF16>(static_cast<const uint16_t*>(a.ptr) + off, a.stride_row_elems,
                                           a.stride_col_elems, mc, kc, dst);
      default:
        return pack_a_float<LP_DTYPE_F32>(static_cast<const float*>(a.ptr) + off, a.stride_row_elems,
                                          a.stride_col_elems, mc, kc, dst);
    }
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* dst) const {
    const GemmOperand& b = g.b;
    const int64_t off = batch * b.stride_batch_elems + p0 * b.stride_row_elems + j0 * b.stride_col_elems;
    switch (b.dtype) {
      case LP_DTYPE_F16:
        return pack_b_float<LP_DTYPE_F16>(static_cast<const uint16_t*>(b.ptr) + off, b.stride_row_elems,
                                          b.stride_col_elems, kc, nc, dst);
      case LP_DTYPE_BF16:
        return pack_b_float<LP_DTYPE_BF16>(static_cast<const uint16_t*>(b.ptr) + off, b.stride_row_elems,
                                           b.stride_col_elems, kc, nc, dst);
      default:
        return pack_b_float<LP_DTYPE_F32>(static_cast<const float*>(b.ptr) + off, b.stride_row_elems,
                                          b.stride_col_elems, kc, nc, dst);
    }
  }
  void tile(int64_t kc, const float* ap, const float* bp, const GemmUnit& w, int64_t row, int64_t col, int64_t rows,
            int64_t cols, bool first, bool last, void* ws) const {
    const GemmFloatTile t = gemm_float_tile(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    if (rows == MR && cols == NR)
      ukernel_float(kc, ap, bp, t);
    else
      gemm_edge_tile_float<MR, NR>(t, rows, cols, [&](const GemmFloatTile& lt) { ukernel_float(kc, ap, bp, lt); });
  }
};

// ---- int8 traits ----
struct Int8Traits {
  using Packed = int16_t;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = 2;
  const GemmInt8Args& g;
  bool c32_is_out;
  int64_t ws_ld;

  int64_t b_panel_elems(int64_t kc_panel) const { return NR * kc_panel; }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, int16_t* dst) const {
    const GemmOperand& a = g.a;
    const int64_t off = batch * a.stride_batch_elems + i0 * a.stride_row_elems + p0 * a.stride_col_elems;
    pack_a_int8(static_cast<const int8_t*>(a.ptr) + off, a.stride_row_elems, a.stride_col_elems, mc, kc, dst);
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, int16_t* dst) const {
    const GemmOperand& b = g.b;
    const int64_t off = batch * b.stride_batch_elems + p0 * b.stride_row_elems + j0 * b.stride_col_elems;
    pack_b_int8(static_cast<const int8_t*>(b.ptr) + off, b.stride_row_elems, b.stride_col_elems, kc, nc, dst);
  }
  void tile(int64_t kc_even, const int16_t* ap, const int16_t* bp, const GemmUnit& w, int64_t row, int64_t col,
            int64_t rows, int64_t cols, bool first, bool last, void* ws) const {
    const GemmInt8Tile t = gemm_int8_tile(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    if (rows == MR && cols == NR)
      ukernel_int8(kc_even, ap, bp, t);
    else
      gemm_edge_tile_int8<MR, NR>(t, rows, cols, [&](const GemmInt8Tile& lt) { ukernel_int8(kc_even, ap, bp, lt); });
  }
};

// ---------------------------------------------------------------------------------------------
// Matrix-vector path (float): one output row (m == 1) or column (n == 1)
// ---------------------------------------------------------------------------------------------
// A single row of A touches every element of B once, so packing B (a read, a write and a re-read)
// would triple the memory traffic of a memory-bound product. This path reads B in place:
//   y[j] = round_once( sum_k x[k] * B[k, j] + bias[j * bias_stride] )
// with x widened to float32 once. n == 1 maps onto it by transposition (y^T = x^T A^T). Columns are
// split among threads in chunks whose edges are multiples of 64 (and of every vector width used
// below); a column's arithmetic never depends on its chunk, so its bits do not depend on the thread
// count. Wide chunks let the row-contiguous case stream whole rows of B.
constexpr int64_t kGemvMaxChunk = 4096;  // columns; the float32 row accumulator stays in L1

struct Gemv {
  const float* x;               // k float32 values
  const void* b;                // k x n, element strides rs / cs, dtype
  int64_t rs, cs;
  int dtype;
  const float* bias;            // null, or bias[j * bias_stride]
  int64_t bias_stride;
  void* out;                    // y[j] at out + j * out_stride (elements of out_dtype)
  int64_t out_stride;
  int out_dtype;
  int64_t k, n;
};

// Scalar fused multiply-add through the intrinsic (not std::fma: a library template instantiated
// in this AVX2-compiled file could be the copy the linker keeps for generic code).
static inline float fma1(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

static inline void gemv_store(const Gemv& p, int64_t j, float acc) {
  gemm_store_float(p.out, p.out_dtype, j * p.out_stride, p.bias ? acc + p.bias[j * p.bias_stride] : acc);
}

// B rows contiguous (cs == 1): y[j0:j1] accumulates x[k] * B[k, j0:j1] for k = 0, 1, ... in order,
// four rows of B per pass over an L1-resident y.
template <int DT>
void gemv_rows(const Gemv& p, int64_t j0, int64_t j1) {
  using In = FloatIn<DT>;
  using T = typename In::T;
  const T* b = static_cast<const T*>(p.b);
  alignas(32) float y[kGemvMaxChunk];
  const int64_t w = j1 - j0, w8 = w / 8 * 8;
  for (int64_t j = 0; j < w; ++j) y[j] = 0.0f;
  int64_t k = 0;
  for (; k + 4 <= p.k; k += 4) {
    const T* r0 = b + k * p.rs + j0;
    const T *r1 = r0 + p.rs, *r2 = r1 + p.rs, *r3 = r2 + p.rs;
    const __m256 x0 = _mm256_set1_ps(p.x[k]), x1 = _mm256_set1_ps(p.x[k + 1]);
    const __m256 x2 = _mm256_set1_ps(p.x[k + 2]), x3 = _mm256_set1_ps(p.x[k + 3]);
    for (int64_t j = 0; j < w8; j += 8) {
      __m256 acc = _mm256_load_ps(y + j);
      acc = _mm256_fmadd_ps(x0, In::eight(r0 + j), acc);
      acc = _mm256_fmadd_ps(x1, In::eight(r1 + j), acc);
      acc = _mm256_fmadd_ps(x2, In::eight(r2 + j), acc);
      acc = _mm256_fmadd_ps(x3, In::eight(r3 + j), acc);
      _mm256_store_ps(y + j, acc);
    }
    for (int64_t j = w8; j < w; ++j) {
      float acc = y[j];
      acc = fma1(p.x[k], In::one(r0 + j), acc);
      acc = fma1(p.x[k + 1], In::one(r1 + j), acc);
      acc = fma1(p.x[k + 2], In::one(r2 + j), acc);
      acc = fma1(p.x[k + 3], In::one(r3 + j), acc);
      y[j] = acc;
    }
  }
  for (; k < p.k; ++k) {
    const T* r0 = b + k * p.rs + j0;
    const __m256 x0 = _mm256_set1_ps(p.x[k]);
    for (int64_t j = 0; j < w8; j += 8)
      _mm256_store_ps(y + j, _mm256_fmadd_ps(x0, In::eight(r0 + j), _mm256_load_ps(y + j)));
    for (int64_t j = w8; j < w; ++j) y[j] = fma1(p.x[k], In::one(r0 + j), y[j]);
  }
  for (int64_t j = 0; j < w; ++j) gemv_store(p, j0 + j, y[j]);
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// B columns contiguous (rs == 1, e.g. B = W^T with W row-major): y[j] is a dot product of x with
// column j, 8 lanes of partial sums over k, then a fixed horizontal sum and the k tail in order.
template <int DT>
void gemv_cols(const Gemv& p, int64_t j0, int64_t j1) {
  using In = FloatIn<DT>;
  using T = typename In::T;
  const T* b = static_cast<const T*>(p.b);
  const int64_t k8 = p.k / 8 * 8;
  auto tail = [&](const T* col, float acc) {
    for (int64_t k = k8; k < p.k; ++k) acc = fma1(p.x[k], In::one(col + k), acc);
    return acc;
  };
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {  // four columns share each load of x
    const T* c0 = b + j * p.cs;
    const T *c1 = c0 + p.cs, *c2 = c1 + p.cs, *c3 = c2 + p.cs;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < k8; k += 8) {
      const __m256 xv = _mm256_loadu_ps(p.x + k);
      a0 = _mm256_fmadd_ps(xv, In::eight(c0 + k), a0);
      a1 = _mm256_fmadd_ps(xv, In::eight(c1 + k), a1);
      a2 = _mm256_fmadd_ps(xv, In::eight(c2 + k), a2);
      a3 = _mm256_fmadd_ps(xv, In::eight(c3 + k), a3);
    }
    gemv_store(p, j, tail(c0, hsum8(a0)));
    gemv_store(p, j + 1, tail(c1, hsum8(a1)));
    gemv_store(p, j + 2, tail(c2, hsum8(a2)));
    gemv_store(p, j + 3, tail(c3, hsum8(a3)));
  }
  for (; j < j1; ++j) {
    const T* c0 = b + j * p.cs;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < k8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p.x + k), In::eight(c0 + k), a0);
    gemv_store(p, j, tail(c0, hsum8(a0)));
  }
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

void gemv_float(const GemmFloatArgs& g) {
  // Orient as y = x @ B: m == 1 reads x from A's row and B as given; n == 1 reads x from B's
  // column and uses A^T as the matrix (out's column is contiguous, like a row).
  const bool row = g.m == 1;
  const GemmOperand& xo = row ? g.a : g.b;
  const GemmOperand& mo = row ? g.b : g.a;
  const int64_t n_out = row ? g.n : g.m, k = g.k;
  const int64_t x_stride = row ? g.a.stride_col_elems : g.b.stride_row_elems;
  const int64_t rs = row ? mo.stride_row_elems : mo.stride_col_elems;
  const int64_t cs = row ? mo.stride_col_elems : mo.stride_row_elems;
  const int64_t out_elem = g.out_dtype == LP_DTYPE_F32 ? 4 : 2;
  const int64_t nt_want = threads_for(g.n_batch * gemm_ceil_div(n_out, 64), 2.0 * 64 * double(k), kGemmMinFlopsPerThread);
  const int64_t chunk_cols = std::min(
      kGemvMaxChunk, gemm_round_up(gemm_ceil_div(n_out, std::max<int64_t>(1, nt_want / g.n_batch)), 64));
  const int64_t n_chunks = gemm_ceil_div(n_out, chunk_cols);
  const int64_t n_items = g.n_batch * n_chunks;
  const int nt = int(std::min(n_items, nt_want));
  // Each thread widens the x of the batches it works on into its own buffer.
  const int64_t x_ld = gemm_round_up(k, 16);
  float* x_all = static_cast<float*>(gemm_scratch(1, size_t(nt) * size_t(x_ld) * 4));
  parallel_region(nt, [&](int t, int n_threads) {
    const int64_t i_begin = n_items * t / n_threads, i_end = n_items * (t + 1) / n_threads;
    float* x = x_all + int64_t(t) * x_ld;
    int64_t widened = -1;  // the batch whose x is in this thread's buffer
    for (int64_t item = i_begin; item < i_end; ++item) {
      const int64_t bi = item / n_chunks, chunk = item % n_chunks;
      if (widened != bi) {
        const int64_t base = bi * xo.stride_batch_elems;
        for (int64_t kk = 0; kk < k; ++kk) x[kk] = gemm_load_float(xo.ptr, xo.dtype, base + kk * x_stride);
        widened = bi;
      }
      Gemv p;
      p.x = x;
      p.b = static_cast<const char*>(mo.ptr) + bi * mo.stride_batch_elems * (mo.dtype == LP_DTYPE_F32 ? 4 : 2);
      p.rs = rs;
      p.cs = cs;
      p.dtype = mo.dtype;
      p.bias = g.bias;
      p.bias_stride = row ? 1 : 0;
      p.out = static_cast<char*>(g.out) + bi * n_out * out_elem;
      p.out_stride = 1;
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

}  // namespace

void gemm_gemv_float_avx2(const GemmFloatArgs& g) { gemv_float(g); }

// Peak probes, timed from Python for "% of peak" in benchmarks. Each runs n_iters steps on every
// thread and returns the operations executed (a multiply-add counts 2).
//   float: 12 independent 8-lane FMA chains (the float microkernel's arithmetic without its loads).
//   int8:  12 madd_epi16 + add_epi32 pairs per step (the int8 microkernel's arithmetic without its
//          loads and broadcasts); one madd lane is 2 int8-equivalent multiply-adds.
double gemm_peak_probe_avx2(int64_t n_iters, int n_threads, bool int8) {
  const float a_val = 0.999999f, b_val = 1e-7f;  // runtime values: nothing folds away
  parallel_region(n_threads, [&](int t, int) {
    if (!int8) {
      const __m256 a = _mm256_set1_ps(a_val), b = _mm256_set1_ps(b_val);
      // distinct starting values, or the compiler merges identical chains
      const float f = float(t);
      __m256 c0 = _mm256_set1_ps(f), c1 = _mm256_set1_ps(f + 1), c2 = _mm256_set1_ps(f + 2);
      __m256 c3 = _mm256_set1_ps(f + 3), c4 = _mm256_set1_ps(f + 4), c5 = _mm256_set1_ps(f + 5);
      __m256 c6 = _mm256_set1_ps(f + 6), c7 = _mm256_set1_ps(f + 7), c8 = _mm256_set1_ps(f + 8);
      __m256 c9 = _mm256_set1_ps(f + 9), c10 = _mm256_set1_ps(f + 10), c11 = _mm256_set1_ps(f + 11);
      for (int64_t it = 0; it < n_iters; ++it) {
        c0 = _mm256_fmadd_ps(c0, a, b), c1 = _mm256_fmadd_ps(c1, a, b), c2 = _mm256_fmadd_ps(c2, a, b);
        c3 = _mm256_fmadd_ps(c3, a, b), c4 = _mm256_fmadd_ps(c4, a, b), c5 = _mm256_fmadd_ps(c5, a, b);
        c6 = _mm256_fmadd_ps(c6, a, b), c7 = _mm256_fmadd_ps(c7, a, b), c8 = _mm256_fmadd_ps(c8, a, b);
        c9 = _mm256_fmadd_ps(c9, a, b), c10 = _mm256_fmadd_ps(c10, a, b), c11 = _mm256_fmadd_ps(c11, a, b);
      }
      __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                               _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
      s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
      volatile float sink = _mm256_cvtss_f32(s);
      (void)sink;
      return;
    }
    // One A register, "changed" (an empty asm) before each row as the microkernel's broadcasts
    // would: no madd is loop-invariant, and 12 accumulators + 2 B + A + a temporary fit 16 registers.
    __m256i a = _mm256_set1_epi32(t + 1);
    const __m256i b0 = _mm256_set1_epi32(0x00030002), b1 = _mm256_set1_epi32(0x00050004);
    __m256i c0 = _mm256_set1_epi32(0), c1 = _mm256_set1_epi32(1), c2 = _mm256_set1_epi32(2);
    __m256i c3 = _mm256_set1_epi32(3), c4 = _mm256_set1_epi32(4), c5 = _mm256_set1_epi32(5);
    __m256i c6 = _mm256_set1_epi32(6), c7 = _mm256_set1_epi32(7), c8 = _mm256_set1_epi32(8);
    __m256i c9 = _mm256_set1_epi32(9), c10 = _mm256_set1_epi32(10), c11 = _mm256_set1_epi32(11);
#define LP_PROBE_ROW(X, Y)                                                                  \
  __asm__("" : "+x"(a));                                                                    \
  X = _mm256_add_epi32(X, _mm256_madd_epi16(a, b0)), Y = _mm256_add_epi32(Y, _mm256_madd_epi16(a, b1));
    for (int64_t it = 0; it < n_iters; ++it) {
      LP_PROBE_ROW(c0, c1) LP_PROBE_ROW(c2, c3) LP_PROBE_ROW(c4, c5)
      LP_PROBE_ROW(c6, c7) LP_PROBE_ROW(c8, c9) LP_PROBE_ROW(c10, c11)
      __asm__("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5));
      __asm__("" : "+x"(c6), "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));
    }
#undef LP_PROBE_ROW
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                 _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
    s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_add_epi32(c8, c9), _mm256_add_epi32(c10, c11)));
    volatile int sink = _mm256_extract_epi32(s, 0);
    (void)sink;
  });
  // float: 12 FMAs x 8 lanes x 2 flops; int8: 12 madds x 8 lanes x 2 pairs x 2 ops
  return double(n_iters) * 12 * 8 * 2 * (int8 ? 2 : 1) * n_threads;
}

void gemm_float_avx2(const GemmFloatArgs& g) {
  if (g.m <= 0 || g.n <= 0 || g.n_batch <= 0 || g.k <= 0) {
    if (g.k <= 0) gemm_float_scalar(g);  // empty sum: zeros plus bias
    return;
  }
  if (g.m == 1 || g.n == 1) return gemv_float(g);
  const GemmBlocking blk = gemm_blocking(MR, NR, 4);
  // 16-bit outputs keep float32 partial sums in a workspace when K spans several blocks.
  const bool need_ws = g.out_dtype != LP_DTYPE_F32 && g.k > blk.kc;
  const GemmPlan plan = gemm_make_plan<MR, NR>(g.n_batch, g.m, g.n, g.k, blk, need_ws);
  FloatTraits tr{g, !need_ws, gemm_ws_ld(plan)};
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

void gemm_int8_avx2(const GemmInt8Args& g) {
  if (g.m <= 0 || g.n <= 0 || g.n_batch <= 0 || g.k <= 0) {
    if (g.k <= 0) gemm_int8_scalar(g);
    return;
  }
  const GemmBlocking blk = gemm_blocking(MR, NR, 2);
  // scaled_gemm keeps int32 partial sums in a workspace when K spans several blocks; the plain GEMM
  // keeps them in its int32 output.
  const bool need_ws = g.scale_a != nullptr && g.k > blk.kc;
  const GemmPlan plan = gemm_make_plan<MR, NR>(g.n_batch, g.m, g.n, g.k, blk, need_ws);
  Int8Traits tr{g, g.scale_a == nullptr, gemm_ws_ld(plan)};
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

}  // namespace lp
