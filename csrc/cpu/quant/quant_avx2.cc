// AVX2 span kernels for quantize / dequantize (compiled with -mavx2 -mfma -mf16c; also used at the
// avx512 / amx levels). Bit for bit the scalar kernels (quant_scalar.cc):
//   * x / scale is a true division (_mm256_div_ps), round-half-even is _mm256_round_ps(NEAREST),
//     clamps are max-then-min on values that are never NaN where it matters, and the float -> int
//     conversion sees only integer-valued floats in range, so it is exact;
//   * fp8 encoding mirrors f32_to_fp8_e4m3 / _e5m2 of dtypes.h with integer ops (normal path by
//     adding the rounding bias, subnormals via a round of |t| * 2^k, saturation and NaN by blends);
//   * stochastic u is rng.h's generator, 8 lanes at a time with 32-bit multiplies, and the floor of
//     t + u is quant.h's stochastic_floor (exact steps only);
//   * dequantized values saturate like scale_code (max-then-min, NaN kept);
//   * fp8 decoding mirrors fp8_*_to_f32 with integer ops and blends; f16 output uses F16C
//     (RNE, identical to f32_to_f16 except NaN payloads, fixed up per vector); bf16 output is the
//     integer rounding of f32_to_bf16.
// Main loops take 32 elements (one 32-byte store of codes, or 16 bytes of int4); the leftovers, and
// an int4 span's first element when it starts mid-byte, go through the scalar element helpers.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "cpu/quant/quant.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ---- loads / stores of 8 elements (the vector layer of cpu/simd256.h) ----
template <int XDT>
inline __m256 load8(const void* base, int64_t i) {
  return FloatIn<XDT>::eight(static_cast<const typename FloatIn<XDT>::T*>(base) + i);  // exact
}

template <int ODT>
inline void store8(void* base, int64_t i, __m256 v) {
  if (ODT == LP_DTYPE_F32)
    _mm256_storeu_ps(static_cast<float*>(base) + i, v);
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     ODT == LP_DTYPE_BF16 ? Simd256::to_bf16(v) : Simd256::to_f16(v));
}

// ---- statistics ----
// Horizontal reductions (exact: max / min pick one of the inputs).
inline uint32_t hmax_u31(__m256i v) {  // lanes hold non-negative int32
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(m));
}
inline float hmin_ps(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_shuffle_ps(m, m, 0x4e));
  m = _mm_min_ps(m, _mm_shuffle_ps(m, m, 0xb1));
  return _mm_cvtss_f32(m);
}
inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 0x4e));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 0xb1));
  return _mm_cvtss_f32(m);
}

template <int XDT, bool MINMAX>
void span_stats(const void* x, int64_t index0, int64_t n, SpanStats* st) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0;
  __m256 mn0 = _mm256_setzero_ps(), mn1 = mn0, mx0 = mn0, mx1 = mn0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 v0 = load8<XDT>(x, index0 + j), v1 = load8<XDT>(x, index0 + j + 8);
    // |x| bits as non-negative int32: integer max orders them like floats and keeps NaN visible
    a0 = _mm256_max_epi32(a0, _mm256_and_si256(_mm256_castps_si256(v0), abs_mask));
    a1 = _mm256_max_epi32(a1, _mm256_and_si256(_mm256_castps_si256(v1), abs_mask));
    if (MINMAX) {
      mn0 = _mm256_min_ps(mn0, v0), mx0 = _mm256_max_ps(mx0, v0);
      mn1 = _mm256_min_ps(mn1, v1), mx1 = _mm256_max_ps(mx1, v1);
    }
  }
  SpanStats s = *st;
  s.abs_bits = std::max(s.abs_bits, hmax_u31(_mm256_max_epi32(a0, a1)));
  if (MINMAX) {  // the vector lanes started at 0, which the scale ignores (lo <= 0 <= hi)
    s.min = std::min(s.min, hmin_ps(_mm256_min_ps(mn0, mn1)));
    s.max = std::max(s.max, hmax_ps(_mm256_max_ps(mx0, mx1)));
  }
  stats_merge<MINMAX>(XDT, x, index0 + j, index0 + n, &s);
  *st = s;
}

template <int XDT, bool MINMAX>
void span_stats_elem(const void* x, int64_t index0, int64_t n, uint32_t* abs_bits, float* mn, float* mx) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = load8<XDT>(x, index0 + j);
    __m256i* ab = reinterpret_cast<__m256i*>(abs_bits + j);
    _mm256_storeu_si256(ab, _mm256_max_epi32(_mm256_loadu_si256(ab),
                                             _mm256_and_si256(_mm256_castps_si256(v), abs_mask)));
    if (MINMAX) {
      _mm256_storeu_ps(mn + j, _mm256_min_ps(_mm256_loadu_ps(mn + j), v));
      _mm256_storeu_ps(mx + j, _mm256_max_ps(_mm256_loadu_ps(mx + j), v));
    }
  }
  stats_elem_merge<MINMAX>(XDT, x, index0, j, n, abs_bits, mn, mx);
}

// ---- quantize ----
inline __m256i mix32x8(__m256i x) {  // rng_mix32, lane by lane
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// rng_uniform for the 8 indices whose low words are index_lo + 0..7 (same high word).
inline __m256 uniform8(__m256i key, __m256i key_hi, uint32_t index_lo) {
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int32_t(index_lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i h = mix32x8(_mm256_add_epi32(mix32x8(_mm256_xor_si256(idx, key_hi)), key));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(5.9604644775390625e-08f));
}

// stochastic_floor of quant.h (floor(t + u) of the exact sum), 8 lanes: every step is exact there.
inline __m256 stochastic_floor8(__m256 t, __m256 u) {
  const __m256 f = _mm256_floor_ps(t);
  const __m256 t_grid = _mm256_floor_ps(_mm256_mul_ps(t, _mm256_set1_ps(16777216.0f)));
  const __m256 d = _mm256_sub_ps(_mm256_mul_ps(t_grid, _mm256_set1_ps(5.9604644775390625e-08f)), f);
  return _mm256_add_ps(f, _mm256_floor_ps(_mm256_add_ps(d, u)));
}

// f32_to_fp8_e4m3 / _e5m2 of dtypes.h, 8 lanes, codes in int32 lanes.
template <int FMT>
inline __m256i fp8_codes(__m256 t) {
  constexpr bool E4 = FMT == LP_QFMT_FP8_E4M3;
  constexpr int kMantShift = E4 ? 20 : 21, kExpShift = E4 ? 3 : 2;
  const __m256i x = _mm256_castps_si256(t);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 24), _mm256_set1_epi32(0x80));
  const __m256i ax = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  // normal: add the round-to-nearest-even bias, rebias the exponent, keep the top mantissa bits
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(ax, kMantShift), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(ax, _mm256_add_epi32(_mm256_set1_epi32(E4 ? 0x7ffff : 0xfffff), lsb));
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(r, 23), _mm256_set1_epi32(E4 ? 120 : 112));
  const __m256i normal = _mm256_or_si256(_mm256_slli_epi32(e, kExpShift),
                                         _mm256_and_si256(_mm256_srli_epi32(r, kMantShift),
                                                          _mm256_set1_epi32(E4 ? 7 : 3)));
  // subnormal: |t| in units of the smallest subnormal, rounded half to even (exact scaling)
  const __m256 sub = _mm256_round_ps(_mm256_mul_ps(_mm256_castsi256_ps(ax), _mm256_set1_ps(E4 ? 512.0f : 65536.0f)),
                                     kRoundNearest);
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(E4 ? 0x3c800000 : 0x38800000), ax);
  const __m256i is_sat = _mm256_cmpgt_epi32(ax, _mm256_set1_epi32((E4 ? 0x43e80000 : 0x47700000) - 1));
  const __m256i is_nan = _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x7f800000));
  __m256i c = _mm256_blendv_epi8(normal, _mm256_cvtps_epi32(sub), is_sub);
  c = _mm256_blendv_epi8(c, _mm256_set1_epi32(E4 ? 0x7e : 0x7b), is_sat);
  c = _mm256_blendv_epi8(c, _mm256_set1_epi32(0x7f), is_nan);
  return _mm256_or_si256(c, sign);
}

// Everything one quantize span needs, hoisted out of the loop.
struct QuantConsts {
  __m256 scale, zero_point;  // broadcast (constant-scale spans)
  __m256i key, key_hi;       // stochastic
};

template <int FMT, int XDT, bool STOCH, bool PER_ELEM>
inline __m256i codes8(const QuantSpan& s, const QuantConsts& k, int64_t j) {
  const __m256 x = load8<XDT>(s.x_base, s.index0 + j);
  const __m256 sc = PER_ELEM ? _mm256_loadu_ps(s.scale + j) : k.scale;
  const __m256 t = _mm256_div_ps(x, sc);  // a true division, as the contract says
  __m256i c;
  if constexpr (FMT == LP_QFMT_FP8_E4M3 || FMT == LP_QFMT_FP8_E5M2) {
    c = fp8_codes<FMT>(t);
  } else {
    __m256 r = STOCH ? stochastic_floor8(t, uniform8(k.key, k.key_hi, uint32_t(s.index0 + j)))
                     : _mm256_round_ps(t, kRoundNearest);
    float lo, hi;
    if (FMT == LP_QFMT_UINT8) {
      const __m256 zp = PER_ELEM ? _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.zero_point + j)))
                                 : k.zero_point;
      r = _mm256_add_ps(r, zp);
      lo = 0.0f, hi = 255.0f;
    } else {
      hi = FMT == LP_QFMT_INT8 ? 127.0f : 7.0f;
      lo = -hi;
    }
    c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(lo)), _mm256_set1_ps(hi)));
  }
  if (PER_ELEM) {  // lanes of all-zero channels (scale 0) get code 0
    c = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(sc, _mm256_setzero_ps(), _CMP_EQ_OQ)), c);
  }
  return c;
}

// 32 codes (int32 lanes, in order) -> 32 bytes, or 16 bytes of int4 nibble pairs at element i (even).
template <int FMT>
inline void store_codes32(uint8_t* data, int64_t i, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i p01 = _mm256_packs_epi32(c0, c1), p23 = _mm256_packs_epi32(c2, c3);
  __m256i b = (FMT == LP_QFMT_INT8 || FMT == LP_QFMT_INT4) ? _mm256_packs_epi16(p01, p23)
                                                           : _mm256_packus_epi16(p01, p23);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undo the lane interleave
  if (FMT != LP_QFMT_INT4) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(data + i), b);
    return;
  }
  // Each 16-bit lane holds (odd code << 8 | even code): low nibble <- even, high nibble <- odd.
  const __m256i w = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x000f)),
                                    _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(0x00f0)));
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(data + (i >> 1)), _mm256_castsi256_si128(p));
}

// Codes 0 for elements [i0, i0 + n) (a group whose scale is 0).
inline void zero_codes(int fmt, uint8_t* data, int64_t i0, int64_t n) {
  if (fmt != LP_QFMT_INT4) {
    std::memset(data + i0, 0, size_t(n));
    return;
  }
  int64_t i = i0, end = i0 + n;
  if ((i & 1) && i < end) store_code(fmt, data, i++, 0);
  int64_t pairs_end = i + ((end - i) & ~int64_t(1));
  std::memset(data + (i >> 1), 0, size_t((pairs_end - i) >> 1));
  if (pairs_end < end) store_code(fmt, data, pairs_end, 0);
}

template <int FMT, int XDT, bool STOCH, bool PER_ELEM>
void span_quantize(const QuantSpan& s) {
  const int64_t n = s.n_elems;
  if (!PER_ELEM && s.scale[0] == 0.0f) {
    zero_codes(FMT, s.data, s.index0, n);
    return;
  }
  const uint32_t key_hi = STOCH ? rng_key_hi(s.rng_key, uint64_t(s.index0)) : 0;
  QuantConsts k;
  k.scale = _mm256_set1_ps(s.scale[0]);
  k.zero_point = _mm256_set1_ps(FMT == LP_QFMT_UINT8 ? float(s.zero_point[0]) : 0.0f);
  k.key = _mm256_set1_epi32(int32_t(s.rng_key));
  k.key_hi = _mm256_set1_epi32(int32_t(key_hi));
  auto scalar_elem = [&](int64_t j) {  // the scalar kernel's body
    int64_t i = s.index0 + j, g = PER_ELEM ? j : 0;
    int32_t zp = FMT == LP_QFMT_UINT8 ? s.zero_point[g] : 0;
    float u = STOCH ? float(rng_bits(s.rng_key, key_hi, uint32_t(i)) >> 8) * 5.9604644775390625e-08f : -1.0f;
    store_code(FMT, s.data, i, quant_elem(FMT, load_elem(XDT, s.x_base, i), s.scale[g], zp, u));
  };
  int64_t j = 0;
  if (FMT == LP_QFMT_INT4 && (s.index0 & 1) && n > 0) scalar_elem(j++);  // starts mid-byte
  for (; j + 32 <= n; j += 32) {
    __m256i c0 = codes8<FMT, XDT, STOCH, PER_ELEM>(s, k, j);
    __m256i c1 = codes8<FMT, XDT, STOCH, PER_ELEM>(s, k, j + 8);
    __m256i c2 = codes8<FMT, XDT, STOCH, PER_ELEM>(s, k, j + 16);
    __m256i c3 = codes8<FMT, XDT, STOCH, PER_ELEM>(s, k, j + 24);
    store_codes32<FMT>(s.data, s.index0 + j, c0, c1, c2, c3);
  }
  for (; j < n; ++j) scalar_elem(j);
}

// ---- dequantize ----
// fp8_e4m3_to_f32 / fp8_e5m2_to_f32 of dtypes.h on 8 codes (int32 lanes 0..255): normal codes by
// placing exponent and mantissa bits and rebiasing, subnormals as mant * 2^-9 (2^-16) converted
// exactly, the special codes by blends, then the sign bit.
template <int FMT>
inline __m256 fp8_values(__m256i b) {
  constexpr bool E4 = FMT == LP_QFMT_FP8_E4M3;
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, E4 ? 20 : 21), _mm256_set1_epi32((E4 ? 120 : 112) << 23));
  const __m256i mant = _mm256_and_si256(b, _mm256_set1_epi32(E4 ? 7 : 3));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mant), _mm256_set1_ps(E4 ? 0.001953125f : 1.52587890625e-05f));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(E4 ? 8 : 4), mag);  // exponent field 0
  __m256i v = _mm256_blendv_epi8(normal, _mm256_castps_si256(sub), is_sub);
  const __m256i nan = _mm256_castps_si256(_mm256_set1_ps(std::nanf("")));
  if (E4) {  // S.1111.111 is NaN; there is no infinity
    v = _mm256_blendv_epi8(v, nan, _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
  } else {  // exponent field 31: infinity (mantissa 0) or NaN
    const __m256i is_special = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7b));
    const __m256i special = _mm256_blendv_epi8(nan, _mm256_castps_si256(_mm256_set1_ps(INFINITY)),
                                               _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7c)));
    v = _mm256_blendv_epi8(v, special, is_special);
  }
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_castsi256_ps(_mm256_or_si256(v, sign));
}

// scale_code of quant.h, 8 lanes: value * scale, saturated to +-FLT_MAX for integer formats. The
// operand order keeps NaN (max_ps / min_ps return their second operand when either is NaN).
template <int FMT>
inline __m256 scale_codes8(__m256 value, __m256 scale) {
  const __m256 v = _mm256_mul_ps(value, scale);
  if (FMT == LP_QFMT_FP8_E4M3 || FMT == LP_QFMT_FP8_E5M2) return v;
  return _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_max_ps(_mm256_set1_ps(-FLT_MAX), v));
}

// The float values (code - zero_point, or the fp8 value) of 8 byte codes at data + i.
template <int FMT>
inline __m256 values8(const uint8_t* data, int64_t i, __m256i zp) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(data + i));
  if (FMT == LP_QFMT_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256i u = _mm256_cvtepu8_epi32(b);
  if (FMT == LP_QFMT_UINT8) return _mm256_cvtepi32_ps(_mm256_sub_epi32(u, zp));
  return fp8_values<FMT>(u);
}

template <int FMT, int ODT, bool PER_ELEM>
void span_dequantize(const DequantSpan& s) {
  const int64_t n = s.n_elems;
  auto scalar_elem = [&](int64_t j) {
    int64_t i = s.index0 + j, g = PER_ELEM ? j : 0;
    int32_t zp = FMT == LP_QFMT_UINT8 ? s.zero_point[g] : 0;
    store_elem(ODT, s.out_base, i, scale_code(FMT, code_value(FMT, s.data, i, zp), s.scale[g]));
  };
  const __m256 scale = _mm256_set1_ps(s.scale[0]);
  const __m256i zp = _mm256_set1_epi32(FMT == LP_QFMT_UINT8 ? s.zero_point[0] : 0);
  auto scale8 = [&](int64_t j) { return PER_ELEM ? _mm256_loadu_ps(s.scale + j) : scale; };
  auto zp8 = [&](int64_t j) {
    return PER_ELEM && FMT == LP_QFMT_UINT8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.zero_point + j)) : zp;
  };
  int64_t j = 0;
  if (FMT == LP_QFMT_INT4 && (s.index0 & 1) && n > 0) scalar_elem(j++);  // starts mid-byte
  for (; j + 32 <= n; j += 32) {
    const int64_t i = s.index0 + j;
    if (FMT == LP_QFMT_INT4) {
      // 16 bytes -> 32 nibbles in element order, sign-extended from 4 bits: (v ^ 8) - 8
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.data + (i >> 1)));
      const __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
      const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
      const __m128i e0 = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(lo, hi), eight), eight);
      const __m128i e1 = _mm_sub_epi8(_mm_xor_si128(_mm_unpackhi_epi8(lo, hi), eight), eight);
      const __m128i parts[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
      for (int q = 0; q < 4; ++q) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[q]));
        store8<ODT>(s.out_base, i + 8 * q, scale_codes8<FMT>(v, scale8(j + 8 * q)));
      }
    } else {
      for (int q = 0; q < 4; ++q) {
        __m256 v = values8<FMT>(s.data, i + 8 * q, zp8(j + 8 * q));
        store8<ODT>(s.out_base, i + 8 * q, scale_codes8<FMT>(v, scale8(j + 8 * q)));
      }
    }
  }
  for (; j < n; ++j) scalar_elem(j);
}

#include "cpu/quant/quant_resolve.h"  // quant_table(), from the span_* templates above

const QuantKernels kAvx2 = quant_table("avx2", LP_ISA_AVX2);

}  // namespace

const QuantKernels* quant_kernels_avx2() { return &kAvx2; }

}  // namespace lp
