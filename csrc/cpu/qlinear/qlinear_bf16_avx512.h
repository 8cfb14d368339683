// The AVX-512 conversions of a panel's codes into bf16 k-pairs ([k/2][32][2]: pair row kk / 2 holds
// k = kk, kk + 1 of the 32 columns, 128 bytes), shared by the AVX-512 level's bf16 kernels
// (qlinear_avx512.cc) and the AMX ones (qlinear_amx.cc), whose B tiles read that layout as it is.
// Exact: int8 codes, and w4's q - zero in -15 .. 15, have at most 8 significant bits.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/codes.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_kernel.h"

namespace lp {
namespace {

// w8: the codes of k and k + 1 (kk even; a k past c.k is a zero) of one panel as bf16 pairs, columns
// 16 h .. 16 h + 15 in w[h]. The bytes of k and k + 1 are interleaved first, so the widened floats are
// already in pair order; exact: |q| <= 127.
static inline void bf16_pairs_w8(const QLinearCall& c, const int8_t* panel, int64_t kk, __m512bh (&w)[2]) {
  auto floats16 = [](__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); };
  const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk * kQLinearPanel));
  const __m256i r1 = kk + 1 < c.k ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (kk + 1) * kQLinearPanel))
                                  : _mm256_setzero_si256();
  // lo: columns 0-7 | 16-23, hi: 8-15 | 24-31, each as (k, k + 1) byte pairs
  const __m256i lo = _mm256_unpacklo_epi8(r0, r1), hi = _mm256_unpackhi_epi8(r0, r1);
  w[0] = _mm512_cvtne2ps_pbh(floats16(_mm256_castsi256_si128(hi)), floats16(_mm256_castsi256_si128(lo)));
  w[1] = _mm512_cvtne2ps_pbh(floats16(_mm256_extracti128_si256(hi, 1)), floats16(_mm256_extracti128_si256(lo, 1)));
}

// w8: the codes of k values [k0, k1) (k0 even) of one panel as bf16 pairs, into d.
static void bf16_convert_w8(const QLinearCall& c, const int8_t* panel, int64_t k0, int64_t k1, uint16_t* d) {
  for (int64_t kk = k0; kk < k1; kk += 2) {
    __builtin_prefetch(panel + kk * kQLinearPanel + kQLinearCodesAheadBytes, 0, 3);
    __m512bh w[2];
    bf16_pairs_w8(c, panel, kk, w);
    for (int h = 0; h < 2; ++h) _mm512_store_si512(d + (kk - k0) * kQLinearPanel + 32 * h, (__m512i)w[h]);
  }
}

// w4: the codes of k values [k0, k1) (k0 even, within one group: zero_g its zero points) as bf16 pairs
// of q - zero, looked up in a table of the bf16 values of -16 .. 15 (exact) with vpermw.
static void bf16_convert_w4(const uint8_t* panel, const uint8_t* zero_g, int64_t k0, int64_t k1, uint16_t* d) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(iota, _mm512_sub_ps(iota, _mm512_set1_ps(16.0f)));
  __m512i zz[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero_g + 16 * h)));
    // 16 + 16 * 2^16 - (z + z * 2^16): each 16-bit half of a lane stays in 1 .. 31 after adding q.
    zz[h] = _mm512_sub_epi32(_mm512_set1_epi32(0x00100010), _mm512_or_si512(z, _mm512_slli_epi32(z, 16)));
  }
  const __m512i lo4 = _mm512_set1_epi32(0x0f), hi4 = _mm512_set1_epi32(0xf0);
  for (int64_t kk = k0; kk < k1; kk += 2) {
    __builtin_prefetch(panel + kk / 2 * kQLinearPanel + kQLinearCodesAheadBytes, 0, 3);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* bytes = panel + (kk / 2) * kQLinearPanel + 16 * h;
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
      const __m512i q = _mm512_or_si512(_mm512_and_si512(b, lo4), _mm512_slli_epi32(_mm512_and_si512(b, hi4), 12));
      _mm512_store_si512(d + (kk - k0) * kQLinearPanel + 32 * h, _mm512_permutexvar_epi16(_mm512_add_epi32(q, zz[h]), table));
    }
  }
}

// The two as the Conv policy of qlinear_bf16_convert_block (qlinear_kernel.h).
struct Bf16ConvAvx512 {
  static void w8(const QLinearCall& c, const int8_t* panel, int64_t k0, int64_t k1, uint16_t* d) {
    bf16_convert_w8(c, panel, k0, k1, d);
  }
  static void w4(const uint8_t* panel, const uint8_t* zero_g, int64_t k0, int64_t k1, uint16_t* d) {
    bf16_convert_w4(panel, zero_g, k0, k1, d);
  }
};

}  // namespace
}  // namespace lp
