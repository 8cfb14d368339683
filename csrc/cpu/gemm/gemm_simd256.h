// 256-bit helpers shared by the AVX2 and AVX-512 GEMM files: 8-lane loads of every float input dtype
// widened to float32, and an 8 x 8 in-register transpose. Include only from files compiled with at
// least -mavx2 -mfma -mf16c. In an anonymous namespace so each ISA file keeps its own copy (the
// linker must never pick one compiled with wider flags for another file).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/dtypes.h"

namespace lp {
namespace {

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
