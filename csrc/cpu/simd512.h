// The 512-bit vector vocabulary (AVX-512 F / BW / DQ / VL): the Simd256 interface of simd256.h on
// 16-lane registers, so that code written once against it runs at either width. See simd256.h for
// the interface and its contract (roundings, store_as, sum_lanes).
//
// Include only from files compiled with the AVX-512 flags. Anonymous namespace, as in simd256.h.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/dtypes.h"

namespace lp {
namespace {

// Round-to-nearest-even float32 -> bfloat16 of 16 lanes, quiet NaNs kept (the integer arithmetic of
// f32x8_to_bf16 and the scalar f32_to_bf16; vcvtneps2bf16 would flush subnormals).
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

// float32 -> float16 of 16 lanes, rounded to nearest even with the canonical NaN of f32x8_to_f16.
static inline __m256i f32x16_to_f16(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (!nan) return h;
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
  const __m256i canon = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7e00)));
  return _mm256_mask_blend_epi16(nan, h, canon);
}

struct Simd512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;

  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float x) { return _mm512_set1_ps(x); }
  static inline F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static inline I loadu(const int32_t* p) { return _mm512_loadu_si512(p); }
  static inline void storeu(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static inline F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F no_contract(F v) {
    __asm__("" : "+v"(v));
    return v;
  }
  static inline void store_as(int dtype, void* out, F v) {
    if (dtype == LP_DTYPE_F32)
      _mm512_storeu_ps(out, v);
    else if (dtype == LP_DTYPE_F16)
      _mm256_storeu_si256(static_cast<__m256i*>(out), f32x16_to_f16(v));
    else
      _mm256_storeu_si256(static_cast<__m256i*>(out), f32x16_to_bf16(v));
  }
  // The compiler's _mm512_reduce_add_ps: a fixed tree of halvings (256, 128, 64, 32 bits).
  static inline float sum_lanes(F v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace lp
