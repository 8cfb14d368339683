// Element types shared by every backend, and exact scalar conversions between them.
//
// Every function here is `static inline` on purpose: this header is included by files compiled with
// different -m flags (scalar, avx2, avx512...). With external linkage the linker could keep the
// AVX-512-compiled copy of an inline function and call it from generic code on a CPU without AVX-512.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/codes.h"

namespace lp {

static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// ---- bfloat16 ----
static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }
// Round to nearest even; NaN stays NaN (quiet).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// ---- IEEE float16 ----
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}
// Round to nearest even, overflow to +-inf, NaN stays NaN.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                   // below 2^-14: f16 subnormal
    // Scaling by 2^24 is exact; rint rounds half to even in the default rounding mode.
    uint32_t m = uint32_t(std::nearbyint(bits_to_f32(ax) * 16777216.0f));
    return uint16_t(sign | m);  // m == 0x400 is the smallest normal: still the right encoding
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent (127 -> 15) and round to nearest even
  return uint16_t(sign | (ax >> 13));
}

// ---- OCP FP8 (E4M3FN: no inf, max 448; E5M2: IEEE-like, max 57344) ----
// float32 -> fp8 rounds to nearest even and saturates finite values to the largest finite code
// (the quantizer never produces larger magnitudes; saturation keeps rounding noise at the top safe).
// A format's parameters: mantissa bits, exponent bias, the float32 bits from which a value saturates
// (halfway above the largest finite value), the largest finite code, and whether the all-ones
// exponent means inf/NaN (E5M2) or only code 0x7f is NaN (E4M3FN).
struct Fp8E4M3 { static constexpr uint32_t kMant = 3, kBias = 7, kSatBits = 0x43e80000u, kMaxCode = 0x7eu; static constexpr bool kIeee = false; };
struct Fp8E5M2 { static constexpr uint32_t kMant = 2, kBias = 15, kSatBits = 0x47700000u, kMaxCode = 0x7bu; static constexpr bool kIeee = true; };

template <class FP8> static inline uint8_t f32_to_fp8(float f) {
  constexpr uint32_t shift = 23 - FP8::kMant;               // float32 mantissa bits dropped
  constexpr uint32_t min_normal_bits = (128u - FP8::kBias) << 23;  // 2^(1 - bias)
  constexpr float inv_subnormal_unit = float(1u << (FP8::kBias - 1 + FP8::kMant));
  uint32_t x = f32_to_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);       // NaN
  if (ax >= FP8::kSatBits) return uint8_t(sign | FP8::kMaxCode);
  if (ax < min_normal_bits) {                              // subnormal: round |x| / unit, exact scaling
    uint32_t m = uint32_t(std::nearbyint(bits_to_f32(ax) * inv_subnormal_unit));
    return uint8_t(sign | m);  // m == 1 << kMant is the smallest normal: still the right encoding
  }
  ax += ((1u << shift) >> 1) - 1u + ((ax >> shift) & 1u);  // round to kMant mantissa bits, ties to even
  uint32_t exp = (ax >> 23) - (127u - FP8::kBias);
  return uint8_t(sign | (exp << FP8::kMant) | ((ax >> shift) & ((1u << FP8::kMant) - 1u)));
}
template <class FP8> static inline float fp8_to_f32(uint8_t b) {
  constexpr uint32_t exp_max = (1u << (7 - FP8::kMant)) - 1u, mant_max = (1u << FP8::kMant) - 1u;
  constexpr float subnormal_unit = 1.0f / float(1u << (FP8::kBias - 1 + FP8::kMant));  // a power of two
  uint32_t exp = (b >> FP8::kMant) & exp_max, mant = b & mant_max;
  float v;
  if (exp == 0) v = float(mant) * subnormal_unit;
  else if (exp == exp_max && FP8::kIeee) v = mant ? std::nanf("") : INFINITY;
  else if (exp == exp_max && mant == mant_max) v = std::nanf("");
  else v = bits_to_f32(((exp + 127u - FP8::kBias) << 23) | (mant << (23 - FP8::kMant)));
  return (b & 0x80u) ? -v : v;
}
static inline uint8_t f32_to_fp8_e4m3(float f) { return f32_to_fp8<Fp8E4M3>(f); }
static inline uint8_t f32_to_fp8_e5m2(float f) { return f32_to_fp8<Fp8E5M2>(f); }
static inline float fp8_e4m3_to_f32(uint8_t b) { return fp8_to_f32<Fp8E4M3>(b); }
static inline float fp8_e5m2_to_f32(uint8_t b) { return fp8_to_f32<Fp8E5M2>(b); }

}  // namespace lp
