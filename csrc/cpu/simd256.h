// The 256-bit vector vocabulary (AVX2 + FMA + F16C), in the spirit of ggml's simd-mappings.h: what a
// kernel needs from one register width, written once for that width. Code written against the
// interface below (e.g. the GEMM tile epilogues in gemm_driver.h) is instantiated per width with
// Simd256 or Simd512 (simd512.h); GemmScalarVec (gemm_common.h) is the same interface on one float.
//
//   F, I, H, kLanes                 float32 and int32 vectors of kLanes lanes, kLanes 16-bit values
//   zero, set1                      float32
//   loadu, storeu                   float32 or int32 by the pointer's type (unaligned)
//   to_float                        int32 -> float32 (exact below 2^24, else round to nearest even)
//   add, mul                        one rounding each
//   fmadd(a, b, c), fnmadd(a, b, c) a * b + c and c - a * b, rounded once
//   load_i8, load_u8                kLanes bytes widened to int32 lanes (signed / unsigned)
//   low_nibble, high_nibble         the 4-bit codes of a byte held in each int32 lane
//   no_contract(v)                  an empty asm that claims to change v, so a product is never fused
//                                   with a following add into an FMA (which would round once, not twice)
//   store_as(dtype, out, v)         kLanes float32 values rounded once to f32 / f16 / bf16 (round to
//                                   nearest even, NaNs kept quiet) and stored at out (unaligned)
//   store2_as(dtype, out, v0, v1)   store_as of v0 then v1 (bf16: store_bf16_pair, one conversion of
//                                   both where the ISA has it)
//   to_f16, to_bf16, store_half     the roundings store_as uses (F -> H) and the store of H
//   stream_line(dst, src)           one 64-byte line copied with a non-temporal store (both 64-byte
//                                   aligned; the caller fences with _mm_sfence before others read dst)
//   sum_lanes(v)                    a horizontal sum in a fixed order (so its bits never vary)
// What reads the same at every width is written once in simd_common.inc.
// The roundings are bit for bit the scalar f32_to_f16 / f32_to_bf16 of common/dtypes.h, NaNs included.
// Beside it: FloatIn<DT> (one or 8 elements of an input dtype widened to float32, exact) and
// transpose8 (8 x 8 lanes in registers). The GEMM epilogues, the quantize kernels and the reduce
// kernels all use these.
//
// Include only from files compiled with at least -mavx2 -mfma -mf16c. Everything is in an anonymous
// namespace so that each ISA file keeps its own copy: the linker must never pick a copy compiled with
// wider flags for another file (see common/dtypes.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/dtypes.h"

// The roundings and stores of an epilogue are forced inline: they take the output dtype as a constant
// at their call sites, and out of line (LTO's choice once more kernels shared them: store_bf16_pair
// was, in the AMX tile epilogue) each tile row pays a call and a dtype switch.
#ifndef LP_SIMD_INLINE
#define LP_SIMD_INLINE __attribute__((always_inline))
#endif

namespace lp {
namespace {

struct Simd256 {
#define LP_SIMD_BITS 256
#include "cpu/simd_common.inc"  // F, I, kLanes and the members every width shares

  // Round to nearest even, NaNs kept quiet (bit for bit the scalar f32_to_bf16).
  static inline LP_SIMD_INLINE H to_bf16(F v) {
    const I nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const I bits = _mm256_blendv_epi8(bf16_rounded_lanes(v), bf16_nan_lanes(v), nan);
    // Every lane holds 16 bits, so the saturating pack of the two halves is exact.
    return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  }
  // F16C's round to nearest even, NaN lanes rewritten to the scalar f32_to_f16's canonical NaN (F16C
  // would keep the payload's top bits).
  static inline LP_SIMD_INLINE H to_f16(F v) {
    const H h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (_mm256_testz_ps(nan, nan)) return h;  // the common case: no NaN
    const I canon = f16_nan_lanes(v), nan_i = _mm256_castps_si256(nan);
    const H canon16 = _mm_packus_epi32(_mm256_castsi256_si128(canon), _mm256_extracti128_si256(canon, 1));
    const H mask16 = _mm_packs_epi32(_mm256_castsi256_si128(nan_i), _mm256_extracti128_si256(nan_i, 1));
    return _mm_blendv_epi8(h, canon16, mask16);
  }
  static inline LP_SIMD_INLINE void store_half(void* out, H h) { _mm_storeu_si128(static_cast<H*>(out), h); }
  static inline void stream_line(void* dst, const void* src) {
    const __m256i* s = static_cast<const __m256i*>(src);
    _mm256_stream_si256(static_cast<__m256i*>(dst), _mm256_load_si256(s));
    _mm256_stream_si256(static_cast<__m256i*>(dst) + 1, _mm256_load_si256(s + 1));
  }
  static inline LP_SIMD_INLINE void store_bf16_pair(void* out, F v0, F v1) {
    store_half(out, to_bf16(v0));
    store_half(static_cast<char*>(out) + 16, to_bf16(v1));
  }
  // kLanes bytes widened to int32 lanes (signed / unsigned).
  static inline I load_i8(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static inline I load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static inline F no_contract(F v) {
    __asm__("" : "+x"(v));
    return v;
  }
  // (lanes 0-3 + lanes 4-7), then pairs, then the last two.
  static inline float sum_lanes(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

// ---------------------------------------------------------------------------------------------
// Element loads: one element or 8 contiguous elements of an input dtype, widened to float32.
// ---------------------------------------------------------------------------------------------
template <int DT>
struct FloatIn;
template <>
struct FloatIn<LP_DTYPE_F32> {
  using T = float;
  static inline float one(const T* p) { return *p; }
  static inline __m256 eight(const T* p) { return _mm256_loadu_ps(p); }
};
template <>
struct FloatIn<LP_DTYPE_F16> {
  using T = uint16_t;
  static inline float one(const T* p) { return _cvtsh_ss(*p); }
  static inline __m256 eight(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};
template <>
struct FloatIn<LP_DTYPE_BF16> {
  using T = uint16_t;
  static inline float one(const T* p) { return bf16_to_f32(*p); }
  static inline __m256 eight(const T* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

// In-register transpose of 8 vectors of 8 lanes: r[i][j] -> r[j][i].
static inline void transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

}  // namespace
}  // namespace lp
