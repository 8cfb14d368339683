// GEMM, AVX-512 (F / BW / DQ / VL + BF16 + VNNI): packed kernels on a 12 x 32 register tile
// (contract in gemm.h; the macro-loop over units, K blocks and A / B blocks is gemm_driver.h).
//
// Register tile MR x NR = 12 x 32: 24 zmm accumulators (12 rows x 2 vectors of 16 columns), two for
// the B row and one for the broadcast A value. Per input dtype:
//   float32 / float16: widened to float32 while packing (products exact), vfmadd231ps. The CPUs this
//            level targets need not have AVX512-FP16, so float16 is not multiplied natively.
//   bfloat16: packed as k-pairs (A: [k/2][MR][2], B: [k/2][NR][2]); vdpbf16ps adds both products of
//            a pair to a float32 lane. Each bf16 x bf16 product is exact in float32, so this is a
//            float32 accumulation as the contract asks; the instruction treats bf16 subnormal
//            inputs as zero and flushes subnormal results, which moves a result by less than 2^-126.
//   int8:    packed as k-quads (A: [k/4][MR][4], B: [k/4][NR][4]); vpdpbusd multiplies unsigned by
//            signed bytes, so A is stored as a + 128 (a ^ 0x80) and sum_k (a + 128) b = sum_k a b +
//            128 sum_k b: every B panel carries 128 * its column sums over the K block, subtracted
//            once. The instruction wraps modulo 2^32, and the final int32 is the exact sum (it fits:
//            |a b| <= 2^14 and K <= 131071), so intermediate wrap-around is harmless.
// Partial sums across K blocks: float32 in the output when it is float32, else a per-thread
// workspace; int32 in the plain int8 output or a workspace for scaled_gemm. The last K block adds the
// bias and rounds once; scaled_gemm's epilogue runs (float(acc) * sa) * sb + bias without FMA
// contraction.
// Leftovers: rows past m, columns past n and k past K are zero in the packed panels (A's k padding
// is a zero byte, not 0 ^ 0x80, so it adds nothing); edge tiles go through a local tile
// (gemm_edge_tile_*). Matrix-vector products (m == 1 or n == 1) are memory-bound and use the AVX2
// matrix-vector path; a few rows times a transposed weight (m <= 48, B = W^T) skip packing (the
// small-M path below).
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

constexpr int64_t MR = kGemmAvx512Mr;  // 12
constexpr int64_t NR = kGemmAvx512Nr;  // 32
static_assert(MR == 12 && NR == 32, "the packing and microkernels below are written for 12 x 32 tiles");

// Empty asm that claims to change v: keeps a multiply and a following add as two roundings (no FMA
// contraction).
static inline __m512 no_contract(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

static inline __m256 load8_u32(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }

// 12 lines (rows of A) of 8 32-bit units each, starting at line0 with line_bytes between lines, stored
// transposed as 8 groups of 12 units: dst[u * 12 + line]. xf transforms each 8-unit load.
template <class Xform>
static inline void pack12_transposed(const char* line0, int64_t line_bytes, float* dst, const Xform& xf) {
  __m256 r[8], q[8];
  for (int i = 0; i < 8; ++i) r[i] = xf(load8_u32(line0 + i * line_bytes));
  for (int i = 0; i < 4; ++i) q[i] = xf(load8_u32(line0 + (8 + i) * line_bytes));
  q[4] = q[5] = q[6] = q[7] = _mm256_setzero_ps();
  transpose8(r);
  transpose8(q);
  for (int u = 0; u < 8; ++u) {
    _mm256_storeu_ps(dst + u * 12, r[u]);
    _mm_storeu_ps(dst + u * 12 + 8, _mm256_castps256_ps128(q[u]));
  }
}

// 32 lines (columns of B) of 8 32-bit units each -> dst[u * 32 + line] (64-byte aligned dst).
static inline void pack32_transposed(const char* line0, int64_t line_bytes, float* dst) {
  for (int h = 0; h < 4; ++h) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = load8_u32(line0 + (h * 8 + j) * line_bytes);
    transpose8(r);
    for (int u = 0; u < 8; ++u) _mm256_store_ps(dst + u * 32 + h * 8, r[u]);
  }
}

// ---------------------------------------------------------------------------------------------
// Float32 / float16 packing: dst[panel][k][MR or NR] float32
// ---------------------------------------------------------------------------------------------

template <int DT>
void pack_a_float(const typename FloatIn<DT>::T* src, int64_t rs, int64_t cs, int64_t mc, int64_t kc, float* dst) {
  using In = FloatIn<DT>;
  using T = typename In::T;
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min(MR, mc - ip);
    float* d = dst + ip * kc;
    const T* s = src + ip * rs;
    int64_t k = 0;
    if (rows == MR && cs == 1) {
      if (DT == LP_DTYPE_F32) {
        for (; k + 8 <= kc; k += 8)
          pack12_transposed(reinterpret_cast<const char*>(s + k), rs * 4, d + k * MR, [](__m256 v) { return v; });
      } else {
        for (; k + 8 <= kc; k += 8) {  // widen 8 k of each row first, then transpose
          alignas(32) float rows_f32[MR * 8];
          for (int64_t i = 0; i < MR; ++i) _mm256_store_ps(rows_f32 + i * 8, In::eight(s + i * rs + k));
          pack12_transposed(reinterpret_cast<const char*>(rows_f32), 32, d + k * MR, [](__m256 v) { return v; });
        }
      }
    } else if (rows == MR && rs == 1) {  // transposed A: the 12 rows of one k are contiguous
      for (; k < kc; ++k) {
        const T* sk = s + k * cs;
        __m512 v;
        if (DT == LP_DTYPE_F32)
          v = _mm512_maskz_loadu_ps(0x0fff, sk);
        else
          v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(0x0fff, sk));
        _mm512_mask_storeu_ps(d + k * MR, 0x0fff, v);
      }
    }
    for (; k < kc; ++k) {
      int64_t i = 0;
      for (; i < rows; ++i) d[k * MR + i] = In::one(s + i * rs + k * cs);
      for (; i < MR; ++i) d[k * MR + i] = 0.0f;
    }
  }
}

template <int DT>
void pack_b_float(const typename FloatIn<DT>::T* src, int64_t rs, int64_t cs, int64_t kc, int64_t nc, float* dst) {
  using In = FloatIn<DT>;
  using T = typename In::T;
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min(NR, nc - jp);
    float* d = dst + jp * kc;
    const T* s = src + jp * cs;
    int64_t k = 0;
    if (cols == NR && cs == 1) {  // row-major B: each k row of the panel is 32 contiguous elements
      for (; k < kc; ++k)
        for (int h = 0; h < 4; ++h) _mm256_store_ps(d + k * NR + h * 8, In::eight(s + k * rs + h * 8));
    } else if (cols == NR && rs == 1) {  // B = W^T with W row-major: columns contiguous along k
      if (DT == LP_DTYPE_F32) {
        for (; k + 8 <= kc; k += 8) pack32_transposed(reinterpret_cast<const char*>(s + k), cs * 4, d + k * NR);
      } else {
        for (; k + 8 <= kc; k += 8) {
          alignas(32) float cols_f32[NR * 8];
          for (int64_t j = 0; j < NR; ++j) _mm256_store_ps(cols_f32 + j * 8, In::eight(s + j * cs + k));
          pack32_transposed(reinterpret_cast<const char*>(cols_f32), 32, d + k * NR);
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
// bfloat16 packing: k-pairs, dst[panel][k/2][MR or NR][2] (kc rounded up to even with a zero k)
// ---------------------------------------------------------------------------------------------

void pack_a_bf16(const uint16_t* src, int64_t rs, int64_t cs, int64_t mc, int64_t kc, uint16_t* dst) {
  const int64_t kc2 = gemm_round_up(kc, 2);
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min(MR, mc - ip);
    uint16_t* d = dst + ip * kc2;
    const uint16_t* s = src + ip * rs;
    int64_t k = 0;
    if (rows == MR && cs == 1) {  // a pair is 32 contiguous bits of a row: transpose 8 pairs at a time
      for (; k + 16 <= kc; k += 16)
        pack12_transposed(reinterpret_cast<const char*>(s + k), rs * 2, reinterpret_cast<float*>(d + k * MR),
                          [](__m256 v) { return v; });
    } else if (rows == MR && rs == 1) {  // transposed A: interleave the 12 contiguous rows of k and k+1
      for (; k + 2 <= kc; k += 2) {
        const __m256i lo = _mm256_maskz_loadu_epi16(0x0fff, s + k * cs);
        const __m256i hi = _mm256_maskz_loadu_epi16(0x0fff, s + (k + 1) * cs);
        const __m256i u0 = _mm256_unpacklo_epi16(lo, hi), u1 = _mm256_unpackhi_epi16(lo, hi);  // rows 0-3|8-11, 4-7|12-15
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k * MR), _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k * MR + 16), _mm256_extracti128_si256(u0, 1));
      }
    }
    for (; k < kc2; k += 2) {
      int64_t i = 0;
      for (; i < rows; ++i) {
        d[k * MR + 2 * i] = s[i * rs + k * cs];
        d[k * MR + 2 * i + 1] = k + 1 < kc ? s[i * rs + (k + 1) * cs] : 0;
      }
      for (; i < MR; ++i) d[k * MR + 2 * i] = d[k * MR + 2 * i + 1] = 0;
    }
  }
}

void pack_b_bf16(const uint16_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t nc, uint16_t* dst) {
  const int64_t kc2 = gemm_round_up(kc, 2);
  // Interleave two rows of 32 columns: out_lo = r0[0], r1[0], ..., r0[15], r1[15]; out_hi from column 16.
  alignas(64) static const uint16_t kIdx[64] = {
      0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
      11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
      22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i idx_lo = _mm512_load_si512(kIdx), idx_hi = _mm512_load_si512(kIdx + 32);
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min(NR, nc - jp);
    uint16_t* d = dst + jp * kc2;
    const uint16_t* s = src + jp * cs;
    int64_t k = 0;
    if (cols == NR && cs == 1) {  // row-major B: interleave rows k and k + 1
      for (; k + 2 <= kc; k += 2) {
        const __m512i r0 = _mm512_loadu_si512(s + k * rs), r1 = _mm512_loadu_si512(s + (k + 1) * rs);
        _mm512_store_si512(d + k * NR, _mm512_permutex2var_epi16(r0, idx_lo, r1));
        _mm512_store_si512(d + k * NR + 32, _mm512_permutex2var_epi16(r0, idx_hi, r1));
      }
    } else if (cols == NR && rs == 1) {  // B = W^T: a column's pairs are 32 contiguous bits
      for (; k + 16 <= kc; k += 16)
        pack32_transposed(reinterpret_cast<const char*>(s + k), cs * 2, reinterpret_cast<float*>(d + k * NR));
    }
    for (; k < kc2; k += 2) {
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
// int8 packing: k-quads, A as a ^ 0x80 (unsigned), B as is plus 128 * column sums per panel
// ---------------------------------------------------------------------------------------------

// Bytes of one packed B panel of depth kc4 (a multiple of 4): the quads, then NR int32 corrections.
static inline int64_t int8_b_panel_bytes(int64_t kc4) { return NR * kc4 + NR * 4; }

void pack_a_int8(const int8_t* src, int64_t rs, int64_t cs, int64_t mc, int64_t kc, uint8_t* dst) {
  const int64_t kc4 = gemm_round_up(kc, 4);
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min(MR, mc - ip);
    uint8_t* d = dst + ip * kc4;
    const int8_t* s = src + ip * rs;
    int64_t k = 0;
    if (rows == MR && cs == 1) {  // a quad is 32 contiguous bits of a row: transpose 8 quads at a time
      for (; k + 32 <= kc; k += 32)
        pack12_transposed(reinterpret_cast<const char*>(s + k), rs, reinterpret_cast<float*>(d + k * MR),
                          [&](__m256 v) { return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), flip)); });
    } else if (rows == MR && rs == 1) {  // transposed A: interleave the 12 contiguous rows of k .. k+3
      const __m128i flip128 = _mm256_castsi256_si128(flip);
      for (; k + 4 <= kc; k += 4) {
        const __m128i r0 = _mm_maskz_loadu_epi8(0x0fff, s + k * cs), r1 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 1) * cs);
        const __m128i r2 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 2) * cs), r3 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 3) * cs);
        const __m128i p01lo = _mm_unpacklo_epi8(r0, r1), p01hi = _mm_unpackhi_epi8(r0, r1);  // rows 0-7, 8-15
        const __m128i p23lo = _mm_unpacklo_epi8(r2, r3), p23hi = _mm_unpackhi_epi8(r2, r3);
        __m128i* o = reinterpret_cast<__m128i*>(d + k * MR);
        _mm_storeu_si128(o, _mm_xor_si128(_mm_unpacklo_epi16(p01lo, p23lo), flip128));      // rows 0-3
        _mm_storeu_si128(o + 1, _mm_xor_si128(_mm_unpackhi_epi16(p01lo, p23lo), flip128));  // rows 4-7
        _mm_storeu_si128(o + 2, _mm_xor_si128(_mm_unpacklo_epi16(p01hi, p23hi), flip128));  // rows 8-11
      }
    }
    for (; k < kc4; k += 4) {
      int64_t i = 0;
      for (; i < rows; ++i)
        for (int64_t t = 0; t < 4; ++t)
          d[k * MR + 4 * i + t] = k + t < kc ? uint8_t(s[i * rs + (k + t) * cs]) ^ 0x80 : 0;
      for (; i < MR; ++i)
        for (int64_t t = 0; t < 4; ++t) d[k * MR + 4 * i + t] = 0;
    }
  }
}

void pack_b_int8(const int8_t* src, int64_t rs, int64_t cs, int64_t kc, int64_t nc, uint8_t* dst) {
  const int64_t kc4 = gemm_round_up(kc, 4);
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min(NR, nc - jp);
    uint8_t* d = dst + (jp / NR) * int8_b_panel_bytes(kc4);
    const int8_t* s = src + jp * cs;
    int64_t k = 0;
    if (cols == NR && cs == 1) {  // row-major B: interleave 4 rows of 32 bytes into 32 quads
      for (; k + 4 <= kc; k += 4) {
        auto row = [&](int64_t t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + (k + t) * rs)); };
        const __m256i r0 = row(0), r1 = row(1), r2 = row(2), r3 = row(3);
        const __m256i p01lo = _mm256_unpacklo_epi8(r0, r1), p01hi = _mm256_unpackhi_epi8(r0, r1);  // cols 0-7|16-23, 8-15|24-31
        const __m256i p23lo = _mm256_unpacklo_epi8(r2, r3), p23hi = _mm256_unpackhi_epi8(r2, r3);
        const __m256i q0 = _mm256_unpacklo_epi16(p01lo, p23lo), q1 = _mm256_unpackhi_epi16(p01lo, p23lo);  // 0-3|16-19, 4-7|20-23
        const __m256i q2 = _mm256_unpacklo_epi16(p01hi, p23hi), q3 = _mm256_unpackhi_epi16(p01hi, p23hi);  // 8-11|24-27, 12-15|28-31
        __m256i* o = reinterpret_cast<__m256i*>(d + k * NR);
        _mm256_store_si256(o, _mm256_permute2x128_si256(q0, q1, 0x20));      // cols 0-7
        _mm256_store_si256(o + 1, _mm256_permute2x128_si256(q2, q3, 0x20));  // cols 8-15
        _mm256_store_si256(o + 2, _mm256_permute2x128_si256(q0, q1, 0x31));  // cols 16-23
        _mm256_store_si256(o + 3, _mm256_permute2x128_si256(q2, q3, 0x31));  // cols 24-31
      }
    } else if (cols == NR && rs == 1) {  // B = W^T: a column's quads are 32 contiguous bits
      for (; k + 32 <= kc; k += 32)
        pack32_transposed(reinterpret_cast<const char*>(s + k), cs, reinterpret_cast<float*>(d + k * NR));
    }
    for (; k < kc4; k += 4) {
      int64_t j = 0;
      for (; j < cols; ++j)
        for (int64_t t = 0; t < 4; ++t) d[k * NR + 4 * j + t] = k + t < kc ? uint8_t(s[(k + t) * rs + j * cs]) : 0;
      for (; j < NR; ++j)
        for (int64_t t = 0; t < 4; ++t) d[k * NR + 4 * j + t] = 0;
    }
    // 128 * column sums of this K block, read back from the panel (still in L1) with vpdpbusd by ones.
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int64_t q = 0; q < kc4 / 4; ++q) {
      s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_load_si512(d + q * 128));
      s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_load_si512(d + q * 128 + 64));
    }
    int32_t* corr = reinterpret_cast<int32_t*>(d + NR * kc4);
    _mm512_store_si512(corr, _mm512_slli_epi32(s0, 7));
    _mm512_store_si512(corr + 16, _mm512_slli_epi32(s1, 7));
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue helpers
// ---------------------------------------------------------------------------------------------

// Round-to-nearest-even float32 -> bfloat16 of 16 lanes, quiet NaNs kept (the same integer
// arithmetic as the scalar f32_to_bf16, so every ISA rounds alike; vcvtneps2bf16 would flush
// subnormals).
static inline __m256i f32x16_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                       _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
      16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i nan_bits = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, nan_bits));
}

// 32 float32 values (two vectors) rounded once to dtype and stored at out.
static inline void store_row_float(void* out, int dtype, __m512 v0, __m512 v1) {
  if (dtype == LP_DTYPE_F32) {
    float* o = static_cast<float*>(out);
    _mm512_storeu_ps(o, v0);
    _mm512_storeu_ps(o + 16, v1);
  } else if (dtype == LP_DTYPE_F16) {
    __m256i* o = static_cast<__m256i*>(out);
    _mm256_storeu_si256(o, _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm256_storeu_si256(o + 1, _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    __m256i* o = static_cast<__m256i*>(out);
    _mm256_storeu_si256(o, f32x16_to_bf16(v0));
    _mm256_storeu_si256(o + 1, f32x16_to_bf16(v1));
  }
}

// The float tile's epilogue: partial sums to c32, or bias + one rounding to out.
static inline void float_tile_store(const GemmFloatTile& t, const __m512 (&c)[MR][2]) {
  if (!t.final) {
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_ps(t.c32 + i * t.c32_ld, c[i][0]);
      _mm512_storeu_ps(t.c32 + i * t.c32_ld + 16, c[i][1]);
    }
    return;
  }
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (t.bias) bias0 = _mm512_loadu_ps(t.bias), bias1 = _mm512_loadu_ps(t.bias + 16);
  const int64_t row_bytes = t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  char* o = static_cast<char*>(t.out);
  for (int i = 0; i < MR; ++i) {
    __m512 v0 = c[i][0], v1 = c[i][1];
    if (t.bias) v0 = _mm512_add_ps(v0, bias0), v1 = _mm512_add_ps(v1, bias1);
    store_row_float(o + i * row_bytes, t.out_dtype, v0, v1);
  }
}

// The 24 accumulators are named variables (c<row>_<half>), written out by these macros: an array
// of vectors whose address escapes to a helper is kept in memory by the compiler, and every k step
// would then store and reload all 24.
#define LP_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LP_DECL(i) V c##i##_0, c##i##_1;
#define LP_GATHER(i) {c##i##_0, c##i##_1},

// float32 partial sums of earlier K blocks (or zeros) into the accumulators.
#define LP_LOAD_FLOAT(i)                                              \
  c##i##_0 = t.prev ? _mm512_loadu_ps(t.prev + i * t.prev_ld) : z;      \
  c##i##_1 = t.prev ? _mm512_loadu_ps(t.prev + i * t.prev_ld + 16) : z;

// ---------------------------------------------------------------------------------------------
// Microkernels: one full MR x NR tile
// ---------------------------------------------------------------------------------------------

// float32 panels: ap [kc][MR], bp [kc][NR] (64-byte aligned).
void ukernel_float(int64_t kc, const float* __restrict ap, const float* __restrict bp, const GemmFloatTile& t) {
  using V = __m512;
  const V z = _mm512_setzero_ps();
  LP_ROWS(LP_DECL)
  LP_ROWS(LP_LOAD_FLOAT)
#define LP_STEP(i)                                  \
  {                                                 \
    const __m512 a = _mm512_set1_ps(ap[i]);         \
    c##i##_0 = _mm512_fmadd_ps(a, b0, c##i##_0);    \
    c##i##_1 = _mm512_fmadd_ps(a, b1, c##i##_1);    \
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
    LP_ROWS(LP_STEP)
    ap += MR;
    bp += NR;
  }
#undef LP_STEP
  const __m512 c[MR][2] = {LP_ROWS(LP_GATHER)};
  float_tile_store(t, c);
}

// bfloat16 pair panels: ap [kc2/2][MR][2], bp [kc2/2][NR][2] (64-byte aligned).
void ukernel_bf16(int64_t kc2, const uint16_t* __restrict ap, const uint16_t* __restrict bp, const GemmFloatTile& t) {
  using V = __m512;
  const V z = _mm512_setzero_ps();
  LP_ROWS(LP_DECL)
  LP_ROWS(LP_LOAD_FLOAT)
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
#define LP_STEP(i)                                                   \
  {                                                                  \
    const __m512bh a = (__m512bh)_mm512_set1_epi32(a32[i]);          \
    c##i##_0 = _mm512_dpbf16_ps(c##i##_0, a, b0);                    \
    c##i##_1 = _mm512_dpbf16_ps(c##i##_1, a, b1);                    \
  }
  for (int64_t p = 0; p < kc2 / 2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp), b1 = (__m512bh)_mm512_load_si512(bp + 32);
    LP_ROWS(LP_STEP)
    a32 += MR;
    bp += 2 * NR;
  }
#undef LP_STEP
  const __m512 c[MR][2] = {LP_ROWS(LP_GATHER)};
  float_tile_store(t, c);
}

// int8 quad panels: ap [kc4/4][MR][4] (a ^ 0x80), bp [kc4/4][NR][4] then NR int32 corrections.
void ukernel_int8(int64_t kc4, const uint8_t* __restrict ap, const uint8_t* __restrict bp, const GemmInt8Tile& t) {
  using V = __m512i;
  const int32_t* corr = reinterpret_cast<const int32_t*>(bp + NR * kc4);
  const __m512i corr0 = _mm512_load_si512(corr), corr1 = _mm512_load_si512(corr + 16);
  const __m512i z = _mm512_setzero_si512();
  LP_ROWS(LP_DECL)
#define LP_LOAD_INT(i)                                                                              \
  c##i##_0 = _mm512_sub_epi32(t.prev ? _mm512_loadu_si512(t.prev + i * t.prev_ld) : z, corr0);      \
  c##i##_1 = _mm512_sub_epi32(t.prev ? _mm512_loadu_si512(t.prev + i * t.prev_ld + 16) : z, corr1);
  LP_ROWS(LP_LOAD_INT)
#undef LP_LOAD_INT
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
#define LP_STEP(i)                                       \
  {                                                      \
    const __m512i a = _mm512_set1_epi32(a32[i]);         \
    c##i##_0 = _mm512_dpbusd_epi32(c##i##_0, a, b0);     \
    c##i##_1 = _mm512_dpbusd_epi32(c##i##_1, a, b1);     \
  }
  for (int64_t q = 0; q < kc4 / 4; ++q) {
    const __m512i b0 = _mm512_load_si512(bp), b1 = _mm512_load_si512(bp + 64);
    LP_ROWS(LP_STEP)
    a32 += MR;
    bp += 4 * NR;
  }
#undef LP_STEP
  const __m512i c[MR][2] = {LP_ROWS(LP_GATHER)};
  if (!t.final || !t.scaled) {
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_si512(t.c32 + i * t.c32_ld, c[i][0]);
      _mm512_storeu_si512(t.c32 + i * t.c32_ld + 16, c[i][1]);
    }
    return;
  }
  __m512 sb0, sb1;
  if (t.scale_b_stride == 0) {
    sb0 = sb1 = _mm512_set1_ps(t.scale_b[0]);
  } else {
    sb0 = _mm512_loadu_ps(t.scale_b), sb1 = _mm512_loadu_ps(t.scale_b + 16);
  }
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (t.bias) bias0 = _mm512_loadu_ps(t.bias), bias1 = _mm512_loadu_ps(t.bias + 16);
  const int64_t row_bytes = t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  char* o = static_cast<char*>(t.out);
  for (int i = 0; i < MR; ++i) {
    const __m512 sa = _mm512_set1_ps(t.scale_a[i * t.scale_a_stride]);
    __m512 v0 = no_contract(_mm512_mul_ps(_mm512_cvtepi32_ps(c[i][0]), sa));
    __m512 v1 = no_contract(_mm512_mul_ps(_mm512_cvtepi32_ps(c[i][1]), sa));
    v0 = no_contract(_mm512_mul_ps(v0, sb0));
    v1 = no_contract(_mm512_mul_ps(v1, sb1));
    if (t.bias) v0 = _mm512_add_ps(v0, bias0), v1 = _mm512_add_ps(v1, bias1);
    store_row_float(o + i * row_bytes, t.out_dtype, v0, v1);
  }
}

#undef LP_LOAD_FLOAT
#undef LP_GATHER
#undef LP_DECL
#undef LP_ROWS

// ---------------------------------------------------------------------------------------------
// Traits for the driver (gemm_driver.h)
// ---------------------------------------------------------------------------------------------

static inline int64_t operand_offset(const GemmOperand& o, int64_t batch, int64_t row, int64_t col) {
  return batch * o.stride_batch_elems + row * o.stride_row_elems + col * o.stride_col_elems;
}

// float32 and float16 inputs, widened to float32.
struct FloatTraits {
  using Packed = float;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = 1;
  const GemmFloatArgs& g;
  bool c32_is_out;
  int64_t ws_ld;

  int64_t b_panel_elems(int64_t kc_panel) const { return NR * kc_panel; }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* dst) const {
    const GemmOperand& a = g.a;
    const int64_t off = operand_offset(a, batch, i0, p0);
    if (a.dtype == LP_DTYPE_F16)
      pack_a_float<LP_DTYPE_F16>(static_cast<const uint16_t*>(a.ptr) + off, a.stride_row_elems, a.stride_col_elems,
                                 mc, kc, dst);
    else
      pack_a_float<LP_DTYPE_F32>(static_cast<const float*>(a.ptr) + off, a.stride_row_elems, a.stride_col_elems, mc,
                                 kc, dst);
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* dst) const {
    const GemmOperand& b = g.b;
    const int64_t off = operand_offset(b, batch, p0, j0);
    if (b.dtype == LP_DTYPE_F16)
      pack_b_float<LP_DTYPE_F16>(static_cast<const uint16_t*>(b.ptr) + off, b.stride_row_elems, b.stride_col_elems,
                                 kc, nc, dst);
    else
      pack_b_float<LP_DTYPE_F32>(static_cast<const float*>(b.ptr) + off, b.stride_row_elems, b.stride_col_elems, kc,
                                 nc, dst);
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

// bfloat16 inputs as k-pairs for vdpbf16ps.
struct Bf16Traits {
  using Packed = uint16_t;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = 2;
  const GemmFloatArgs& g;
  bool c32_is_out;
  int64_t ws_ld;

  int64_t b_panel_elems(int64_t kc_panel) const { return NR * kc_panel; }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, uint16_t* dst) const {
    pack_a_bf16(static_cast<const uint16_t*>(g.a.ptr) + operand_offset(g.a, batch, i0, p0), g.a.stride_row_elems,
                g.a.stride_col_elems, mc, kc, dst);
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, uint16_t* dst) const {
    pack_b_bf16(static_cast<const uint16_t*>(g.b.ptr) + operand_offset(g.b, batch, p0, j0), g.b.stride_row_elems,
                g.b.stride_col_elems, kc, nc, dst);
  }
  void tile(int64_t kc2, const uint16_t* ap, const uint16_t* bp, const GemmUnit& w, int64_t row, int64_t col,
            int64_t rows, int64_t cols, bool first, bool last, void* ws) const {
    const GemmFloatTile t = gemm_float_tile(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    if (rows == MR && cols == NR)
      ukernel_bf16(kc2, ap, bp, t);
    else
      gemm_edge_tile_float<MR, NR>(t, rows, cols, [&](const GemmFloatTile& lt) { ukernel_bf16(kc2, ap, bp, lt); });
  }
};

// int8 as k-quads for vpdpbusd.
struct Int8Traits {
  using Packed = uint8_t;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = 4;
  const GemmInt8Args& g;
  bool c32_is_out;
  int64_t ws_ld;

  int64_t b_panel_elems(int64_t kc_panel) const { return int8_b_panel_bytes(kc_panel); }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, uint8_t* dst) const {
    pack_a_int8(static_cast<const int8_t*>(g.a.ptr) + operand_offset(g.a, batch, i0, p0), g.a.stride_row_elems,
                g.a.stride_col_elems, mc, kc, dst);
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, uint8_t* dst) const {
    pack_b_int8(static_cast<const int8_t*>(g.b.ptr) + operand_offset(g.b, batch, p0, j0), g.b.stride_row_elems,
                g.b.stride_col_elems, kc, nc, dst);
  }
  void tile(int64_t kc4, const uint8_t* ap, const uint8_t* bp, const GemmUnit& w, int64_t row, int64_t col,
            int64_t rows, int64_t cols, bool first, bool last, void* ws) const {
    const GemmInt8Tile t = gemm_int8_tile(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    if (rows == MR && cols == NR)
      ukernel_int8(kc4, ap, bp, t);
    else
      gemm_edge_tile_int8<MR, NR>(t, rows, cols, [&](const GemmInt8Tile& lt) { ukernel_int8(kc4, ap, bp, lt); });
  }
};

// ---------------------------------------------------------------------------------------------
// Small-M direct path: few rows of A times B = W^T (no packing)
// ---------------------------------------------------------------------------------------------
// For a handful of output rows (decode, small batches) packing B costs as much as the product. When
// B's columns are contiguous along k (B = W^T with W row-major, nn.Linear's forward) and A's rows are
// too, every output is a dot product of an A row and a W row: W streams from memory once, untouched,
// and the few A rows stay in L1 / L2. Register block: 3 W rows x 8 A rows = 24 accumulators of 16
// float32 lanes over k (16 k per step for float32 by FMA, 32 for bf16 by vdpbf16ps on the natural
// (k, k+1) pairs), a masked tail, then one fixed lane-sum tree per output. Rows past m in the last A
// group re-read a valid row and are not stored. Each output's arithmetic is the same whichever group
// or thread computes it, so its bits do not depend on the thread count.
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
      const float v = _mm512_reduce_add_ps(acc[r][c]);
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

void gemm_small_m(const GemmFloatArgs& g) {
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
}

}  // namespace

GemmBlocking gemm_blocking_avx512(int64_t elem_bytes) {
  // The B micro-panel fills all of L1d (kc 256 float32, 512 bf16, 1024 int8 on a 32 KiB L1d): A
  // streams from L2 through a few lines only, and a deeper kc halves the passes over the partial
  // sums. Measured at 2048^3 against half of L1d: float32 179 vs 156 GFLOP/s, bf16 377 vs 286,
  // int8 745 vs 622 G op/s (bench/notes_gemm.md).
  return gemm_blocking(MR, NR, elem_bytes, 1);
}

void gemm_float_avx512(const GemmFloatArgs& g) {
  if (g.m <= 0 || g.n <= 0 || g.n_batch <= 0 || g.k <= 0) {
    if (g.k <= 0) gemm_float_scalar(g);  // empty sum: zeros plus bias
    return;
  }
  if (g.m == 1 || g.n == 1) return gemm_gemv_float_avx2(g);
  if (small_m_applies(g)) return gemm_small_m(g);
  const GemmBlocking blk = gemm_blocking_avx512(g.a.dtype == LP_DTYPE_BF16 ? 2 : 4);
  // 16-bit outputs keep float32 partial sums in a workspace when K spans several blocks.
  const bool need_ws = g.out_dtype != LP_DTYPE_F32 && g.k > blk.kc;
  const GemmPlan plan = gemm_make_plan<MR, NR>(g.n_batch, g.m, g.n, g.k, blk, need_ws);
  if (g.a.dtype == LP_DTYPE_BF16) {
    Bf16Traits tr{g, !need_ws, gemm_ws_ld(plan)};
    gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
  } else {
    FloatTraits tr{g, !need_ws, gemm_ws_ld(plan)};
    gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
  }
}

void gemm_int8_avx512(const GemmInt8Args& g) {
  if (g.m <= 0 || g.n <= 0 || g.n_batch <= 0 || g.k <= 0) {
    if (g.k <= 0) gemm_int8_scalar(g);
    return;
  }
  const GemmBlocking blk = gemm_blocking_avx512(1);
  // scaled_gemm keeps int32 partial sums in a workspace when K spans several blocks; the plain GEMM
  // keeps them in its int32 output.
  const bool need_ws = g.scale_a != nullptr && g.k > blk.kc;
  const GemmPlan plan = gemm_make_plan<MR, NR>(g.n_batch, g.m, g.n, g.k, blk, need_ws);
  Int8Traits tr{g, g.scale_a == nullptr, gemm_ws_ld(plan)};
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

namespace {

// Peak probe body: the microkernel's arithmetic without its loads, 24 independent accumulators.
template <bool INT>
struct ProbeVec {
  using V = __m512;
};
template <>
struct ProbeVec<true> {
  using V = __m512i;
};

template <int KIND>
void peak_probe_thread(int64_t n_iters, int t) {
  using V = typename ProbeVec<KIND == 2>::V;
  V a, b0, b1;
  if constexpr (KIND == 2) {
    a = _mm512_set1_epi32(0x01010101 + t), b0 = _mm512_set1_epi32(0x01020304), b1 = _mm512_set1_epi32(0x05060708);
  } else {
    a = _mm512_set1_ps(0.999999f + float(t)), b0 = _mm512_set1_ps(1e-7f), b1 = _mm512_set1_ps(2e-7f);
  }
  auto op = [&](V c, V x, V y) -> V {
    if constexpr (KIND == 0) return _mm512_fmadd_ps(x, y, c);
    else if constexpr (KIND == 1) return _mm512_dpbf16_ps(c, (__m512bh)x, (__m512bh)y);
    else return _mm512_dpbusd_epi32(c, x, y);
  };
#define LP_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LP_DECL(i) V c##i##_0 = b0, c##i##_1 = b1;
#define LP_STEP(i)                \
  c##i##_0 = op(c##i##_0, a, b0); \
  c##i##_1 = op(c##i##_1, a, b1);
  // The empty asm hides each accumulator's value from the optimizer, which could otherwise fold
  // the repeated operation on constants.
#define LP_PIN(i) __asm__("" : "+v"(c##i##_0), "+v"(c##i##_1));
  LP_ROWS(LP_DECL)
  for (int64_t it = 0; it < n_iters; ++it) {
    LP_ROWS(LP_STEP)
    LP_ROWS(LP_PIN)
  }
  {
    auto bits = [](V v) { return reinterpret_cast<__m512i&>(v); };
    __m512i acc = bits(a);
#define LP_SUM(i) acc = _mm512_xor_si512(acc, _mm512_xor_si512(bits(c##i##_0), bits(c##i##_1)));
    LP_ROWS(LP_SUM)
    volatile int sink = _mm512_reduce_add_epi32(acc);
    (void)sink;
  }
#undef LP_SUM
#undef LP_PIN
#undef LP_STEP
#undef LP_DECL
#undef LP_ROWS
}

}  // namespace

// kind 0: vfmadd231ps (2 flops per lane), 1: vdpbf16ps (4 flops per lane), 2: vpdpbusd (8 ops per
// lane); returns the operations executed on all threads.
double gemm_peak_probe_avx512(int64_t n_iters, int n_threads, int kind) {
  parallel_region(n_threads, [&](int t, int) {
    if (kind == 0)
      peak_probe_thread<0>(n_iters, t);
    else if (kind == 1)
      peak_probe_thread<1>(n_iters, t);
    else
      peak_probe_thread<2>(n_iters, t);
  });
  const double ops_per_lane = kind == 0 ? 2 : kind == 1 ? 4 : 8;
  return double(n_iters) * MR * 2 * 16 * ops_per_lane * n_threads;
}

}  // namespace lp
