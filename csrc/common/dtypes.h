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
static inline uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t x = f32_to_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);  // NaN
  if (ax >= 0x43e80000u) return uint8_t(sign | 0x7eu); // >= 464: saturate to 448
  if (ax < 0x3c800000u) {                              // below 2^-6: subnormal, unit 2^-9
    uint32_t m = uint32_t(std::nearbyint(bits_to_f32(ax) * 512.0f));
    return uint8_t(sign | m);
  }
  ax += 0x7ffffu + ((ax >> 20) & 1u);  // round to 3 mantissa bits
  uint32_t exp = (ax >> 23) - 120u;    // rebias 127 -> 7
  return uint8_t(sign | (exp << 3) | ((ax >> 20) & 7u));
}
static inline uint8_t f32_to_fp8_e5m2(float f) {
  uint32_t x = f32_to_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);  // NaN
  if (ax >= 0x47700000u) return uint8_t(sign | 0x7bu); // >= 61440: saturate to 57344
  if (ax < 0x38800000u) {                              // below 2^-14: subnormal, unit 2^-16
    uint32_t m = uint32_t(std::nearbyint(bits_to_f32(ax) * 65536.0f));
    return uint8_t(sign | m);
  }
  ax += 0xfffffu + ((ax >> 21) & 1u);  // round to 2 mantissa bits
  uint32_t exp = (ax >> 23) - 112u;    // rebias 127 -> 15
  return uint8_t(sign | (exp << 2) | ((ax >> 21) & 3u));
}
static inline float fp8_e4m3_to_f32(uint8_t b) {
  uint32_t exp = (b >> 3) & 0xfu, mant = b & 7u;
  float v;
  if (exp == 0) v = float(mant) * 0.001953125f;  // 2^-9
  else if (exp == 15 && mant == 7) v = std::nanf("");
  else v = bits_to_f32(((exp + 120u) << 23) | (mant << 20));
  return (b & 0x80u) ? -v : v;
}
static inline float fp8_e5m2_to_f32(uint8_t b) {
  uint32_t exp = (b >> 2) & 0x1fu, mant = b & 3u;
  float v;
  if (exp == 0) v = float(mant) * 1.52587890625e-05f;  // 2^-16
  else if (exp == 31) v = mant ? std::nanf("") : INFINITY;
  else v = bits_to_f32(((exp + 112u) << 23) | (mant << 21));
  return (b & 0x80u) ? -v : v;
}

}  // namespace lp
