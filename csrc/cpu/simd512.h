// The 512-bit vector vocabulary (AVX-512 F / BW / DQ / VL + BF16): the Simd256 interface of simd256.h on
// 16-lane registers, so that code written once against it runs at either width. See simd256.h for
// the interface and its contract (roundings, store_as, sum_lanes).
//
// Include only from files compiled with the AVX-512 flags. Anonymous namespace, as in simd256.h.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/dtypes.h"

#ifndef LP_SIMD_INLINE
#define LP_SIMD_INLINE __attribute__((always_inline))  // as in simd256.h
#endif

namespace lp {
namespace {

struct Simd512 {
#define LP_SIMD_BITS 512
#include "cpu/simd_common.inc"  // F, I, kLanes and the members every width shares
  static inline LP_SIMD_INLINE void store_half(void* out, H h) { _mm256_storeu_si256(static_cast<H*>(out), h); }
  // kLanes bytes widened to int32 lanes (signed / unsigned).
  static inline I load_i8(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline I load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  // vcvtneps2bf16 (this level has AVX512-BF16) rounds to nearest even and quiets NaNs exactly as
  // bf16_rounded_lanes / bf16_nan_lanes do, but treats subnormal inputs as zero: a vector with a
  // subnormal lane takes the integer rounding instead (bits identical to the scalar f32_to_bf16).
  static inline LP_SIMD_INLINE H to_bf16(F v) {
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0)) return to_bf16_integer(v);
    return (H)_mm512_cvtneps_pbh(v);
  }
  // vcvtne2ps2bf16: both vectors in one conversion and one 64-byte store.
  static inline LP_SIMD_INLINE void store_bf16_pair(void* out, F v0, F v1) {
    if (__builtin_expect((_mm512_fpclass_ps_mask(v0, 0x20) | _mm512_fpclass_ps_mask(v1, 0x20)) != 0, 0)) {
      store_half(out, to_bf16_integer(v0));
      store_half(static_cast<char*>(out) + 32, to_bf16_integer(v1));
      return;
    }
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
  static inline void stream_line(void* dst, const void* src) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_load_si512(src));
  }
  static inline H to_bf16_integer(F v) {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, bf16_rounded_lanes(v), bf16_nan_lanes(v)));
  }
  static inline LP_SIMD_INLINE H to_f16(F v) {
    const H h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return nan ? _mm256_mask_blend_epi16(nan, h, _mm512_cvtepi32_epi16(f16_nan_lanes(v))) : h;
  }
  static inline F no_contract(F v) {
    __asm__("" : "+v"(v));
    return v;
  }
  // The compiler's _mm512_reduce_add_ps: a fixed tree of halvings (256, 128, 64, 32 bits).
  static inline float sum_lanes(F v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace lp
