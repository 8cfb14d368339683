// Quantize / dequantize on the CPU (API.md §2): the span kernels every ISA implements, the element
// math they all share, and the drivers (quant.cc) that cut a tensor into groups, chunks and threads.
//
// Layout. x is contiguous, n_elems = n_outer * n_channels * n_inner, described by its granularity:
//   per-tensor  (1, 1, n, 0)                      one group
//   per-channel (prod(shape[:k]), shape[k], prod(shape[k+1:]), 0)   group of flat i: (i / n_inner) % n_channels
//   blockwise   (1, 1, n, B)                      group of flat i: i / B
// data holds one code byte per element (int8, uint8, fp8 bit patterns) or, for int4, two 4-bit
// two's-complement codes per byte (element i in byte i / 2, low nibble when i is even, padding 0).
// scale is float32 per group, zero_point int32 per group (uint8 only).
//
// Math (float32 throughout, identical on every ISA: SIMD code mirrors the scalar helpers below):
//   symmetric: scale = absmax / qmax; asymmetric uint8: lo = min(min, 0), hi = max(max, 0),
//   scale = (hi - lo) / 255 (with no overflow in hi - lo: group_scale), zero_point = rint(-lo / scale).
//   A group with scale 0 gets code 0.
//   nearest:    code = clamp(rint(x / scale) + zero_point)            (rint: half to even)
//   stochastic: code = clamp(floor(x / scale + u) + zero_point), u = rng_uniform(seed, flat index),
//               the floor of the exact sum (stochastic_floor), not of its float32 rounding
//   fp8:        code = f32_to_fp8(x / scale)                          (dtypes.h, saturating)
//   dequantize: out = round_to_out_dtype(float(code - zero_point) * scale), integer formats
//               saturating to +-FLT_MAX (scale_code)
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/dtypes.h"
#include "common/rng.h"

namespace lp {

// ---- drivers (quant.cc) ----
struct QuantizeArgs {
  const void* x;  // contiguous, x_dtype F32 / F16 / BF16
  int x_dtype;
  int64_t n_outer, n_channels, n_inner, block_size;  // block_size 0: not blockwise
  int fmt;
  bool stochastic;
  uint64_t seed;
  uint8_t* data;          // n_elems bytes (int4: ceil(n_elems / 2))
  float* scale;           // n_groups
  int32_t* zero_point;    // n_groups, uint8 only (else null)
};
// Returns the first flat index of a non-finite x element (outputs then undefined), or -1.
int64_t quantize(const QuantizeArgs& a);

struct DequantizeArgs {
  const uint8_t* data;
  const float* scale;
  const int32_t* zero_point;  // null for symmetric formats
  int fmt;
  int64_t n_outer, n_channels, n_inner, block_size;
  void* out;  // contiguous, out_dtype F32 / F16 / BF16
  int out_dtype;
};
void dequantize(const DequantizeArgs& a);

// ---- span kernels (one table per ISA) ----
// Statistics of a run of x: abs_bits = max over |x| as float32 bits (>= 0x7f800000 iff a NaN or Inf
// was seen: an integer max keeps NaN visible where a float max would drop it); min / max of x.
// Kernels merge into what they are given (the driver starts them at 0).
struct SpanStats {
  uint32_t abs_bits;
  float min, max;
};
// Elements [index0, index0 + n_elems) of x_base, merged into *st.
using StatsFn = void (*)(const void* x_base, int64_t index0, int64_t n_elems, SpanStats* st);
// Per element j: abs_bits[j], min[j], max[j] merged with element index0 + j (per-channel, n_inner 1).
using StatsElemFn = void (*)(const void* x_base, int64_t index0, int64_t n_elems, uint32_t* abs_bits,
                             float* min, float* max);

// One run of elements [index0, index0 + n_elems) quantized with one scale (scale[0]) or, per_elem,
// scale[j] for element index0 + j. Never crosses a multiple of 2^32 in index (the RNG's high word).
struct QuantSpan {
  const void* x_base;
  int64_t index0, n_elems;
  const float* scale;
  const int32_t* zero_point;  // uint8 only
  uint32_t rng_key;           // rng_key(seed), stochastic only
  uint8_t* data;              // the whole data buffer
};
using QuantSpanFn = void (*)(const QuantSpan& s);

struct DequantSpan {
  const uint8_t* data;  // the whole data buffer
  int64_t index0, n_elems;
  const float* scale;
  const int32_t* zero_point;
  void* out_base;  // the whole output buffer
};
using DequantSpanFn = void (*)(const DequantSpan& s);

struct QuantKernels {
  const char* name;
  int isa;  // the lp_isa level the table needs
  StatsFn (*stats)(int x_dtype, bool minmax);
  StatsElemFn (*stats_elem)(int x_dtype, bool minmax);
  QuantSpanFn (*quantize)(int fmt, int x_dtype, bool stochastic, bool per_elem);
  DequantSpanFn (*dequantize)(int fmt, int out_dtype, bool per_elem);
};
// Per-ISA tables (quant_<isa>.cc); null when this build lacks the ISA.
const QuantKernels* quant_kernels_scalar();
const QuantKernels* quant_kernels_avx2();
// The table for an lp_isa level, capped at what this build and CPU offer (levels above AVX2 run the
// AVX2 kernels, which run at the copy rate already); quant_kernels(): for cpu_isa_active().
const QuantKernels& quant_kernels_for(int isa);
const QuantKernels& quant_kernels();

// ---- element math shared by every ISA (SIMD code must match these bit for bit) ----
// Scale (and zero point) of a group from its statistics.
//
// uint8: hi - lo exceeds FLT_MAX when the values span more than it (e.g. [2e38, -2e38]). Then the
// same two float32 roundings are done at half scale: 2 * ((hi/2 - lo/2) / 255) is bit for bit what
// (hi - lo) / 255 gives with an unbounded exponent, because the halvings (hi and -lo are both
// >= 2^103 there, as each is <= FLT_MAX) and the doubling are exact and rounding commutes with
// them. So the scale has its usual relative error, zero_point = rint(-lo / scale) stays in [0, 255],
// |x / scale| about 255 at most, and |x - dequant| <= scale / 2 holds as for any range; a dequantized
// value past FLT_MAX at a range end saturates (scale_code), which only moves it closer to x.
//
// A group of tiny values whose quotient by qmax underflows to 0 (e.g. [1e-45]) gets the smallest
// positive float32, 2^-149, instead: then x / scale = x * 2^149 is an exact integer of magnitude at
// most qmax / 2 and dequantizes to x exactly. Only an all-zero group has scale 0 (API.md §2).
static inline float scale_at_least_min(float s, bool nonzero) {
  return s == 0.0f && nonzero ? 1.40129846e-45f : s;
}
static inline void group_scale(int fmt, const SpanStats& st, float* scale, int32_t* zero_point) {
  if (fmt == LP_QFMT_UINT8) {
    float lo = st.min < 0.0f ? st.min : 0.0f;  // explicit compares: no -0.0 leaks into the scale
    float hi = st.max > 0.0f ? st.max : 0.0f;
    float range = hi - lo;
    float s = range <= FLT_MAX ? range / 255.0f : 2.0f * ((0.5f * hi - 0.5f * lo) / 255.0f);
    s = scale_at_least_min(s, range > 0.0f);
    *scale = s;
    *zero_point = s == 0.0f ? 0 : int32_t(std::nearbyint(-lo / s));
    return;
  }
  *scale = scale_at_least_min(bits_to_f32(st.abs_bits) / qfmt_qmax(fmt), st.abs_bits != 0);
}

static inline float load_elem(int x_dtype, const void* base, int64_t i) {
  switch (x_dtype) {
    case LP_DTYPE_F16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case LP_DTYPE_BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// The statistics rules, element by element: elements [i0, i1) of x merged into *st (the scalar
// kernels are these loops; SIMD kernels run them on the elements after their last full vector).
template <bool MINMAX>
static inline void stats_merge(int xdt, const void* x, int64_t i0, int64_t i1, SpanStats* st) {
  SpanStats s = *st;
  for (int64_t i = i0; i < i1; ++i) {
    float v = load_elem(xdt, x, i);
    uint32_t a = f32_to_bits(v) & 0x7fffffffu;
    if (a > s.abs_bits) s.abs_bits = a;
    if (MINMAX) {
      if (v < s.min) s.min = v;
      if (v > s.max) s.max = v;
    }
  }
  *st = s;
}
// Per element: slot j (j0 <= j < n) merges element index0 + j.
template <bool MINMAX>
static inline void stats_elem_merge(int xdt, const void* x, int64_t index0, int64_t j0, int64_t n,
                                    uint32_t* abs_bits, float* mn, float* mx) {
  for (int64_t j = j0; j < n; ++j) {
    float v = load_elem(xdt, x, index0 + j);
    uint32_t a = f32_to_bits(v) & 0x7fffffffu;
    if (a > abs_bits[j]) abs_bits[j] = a;
    if (MINMAX) {
      if (v < mn[j]) mn[j] = v;
      if (v > mx[j]) mx[j] = v;
    }
  }
}

static inline void store_elem(int out_dtype, void* base, int64_t i, float v) {
  switch (out_dtype) {
    case LP_DTYPE_F16: static_cast<uint16_t*>(base)[i] = f32_to_f16(v); break;
    case LP_DTYPE_BF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// floor(v + u) in exact arithmetic, for rng.h's u = m * 2^-24 (m an integer in [0, 2^24)). The
// float32 sum v + u can round up across an integer (75 + (1 - 58 * 2^-24) -> 76: a code one whole
// scale off), so the carry is taken on u's grid instead. With f = floor(v), F = floor(v * 2^24):
//   * v * 2^24 and F * 2^-24 are exact (power-of-two scalings; |v| <= 1.5 qmax, as the scale is
//     absmax / qmax rounded by at most half of itself even when subnormal, so nothing overflows,
//     and F is an integer, so F * 2^-24 is 0 or at least 2^-24 in magnitude);
//   * d = F * 2^-24 - f is exact: its true value, frac(v) truncated to the 2^-24 grid, is a
//     multiple of 2^-24 in [0, 1), hence a float32, and a rounded subtraction returns it unchanged;
//   * floor(v + u) = f + [frac(v) + u >= 1] = f + [d + u >= 1], because u is on the same grid;
//   * d + u is a multiple of 2^-24 in [0, 2): below 1 it is exact, and from 1 up rounding keeps it
//     in [1, 2), so floor(d + u) is exactly that carry (0 or 1), and f + carry is exact.
// Every step is exact, so FMA contraction or any SIMD evaluation order gives the same bits.
static inline float stochastic_floor(float v, float u) {
  const float f = std::floor(v);
  const float d = std::floor(v * 16777216.0f) * 5.9604644775390625e-08f - f;
  return f + std::floor(d + u);
}

// The code byte of x (int4: the nibble in the low 4 bits). u is the stochastic offset, or < 0 for
// round-to-nearest-even.
static inline uint8_t quant_elem(int fmt, float x, float scale, int32_t zero_point, float u) {
  if (scale == 0.0f) return 0;  // all-zero group (and 0/0 guard); uint8's zero point is 0 here
  float t = x / scale;
  switch (fmt) {
    case LP_QFMT_FP8_E4M3: return f32_to_fp8_e4m3(t);
    case LP_QFMT_FP8_E5M2: return f32_to_fp8_e5m2(t);
    default: break;
  }
  float r = u < 0.0f ? std::nearbyint(t) : stochastic_floor(t, u);
  if (fmt == LP_QFMT_UINT8) return uint8_t(int32_t(clampf(r + float(zero_point), 0.0f, 255.0f)));
  float qmax = fmt == LP_QFMT_INT8 ? 127.0f : 7.0f;
  int32_t q = int32_t(clampf(r, -qmax, qmax));
  return fmt == LP_QFMT_INT4 ? uint8_t(q & 0xf) : uint8_t(int8_t(q));
}

// Writes code into element i of the data buffer (int4: its nibble, the other nibble kept).
static inline void store_code(int fmt, uint8_t* data, int64_t i, uint8_t code) {
  if (fmt != LP_QFMT_INT4) {
    data[i] = code;
    return;
  }
  uint8_t& b = data[i >> 1];
  b = (i & 1) ? uint8_t((b & 0x0f) | (code << 4)) : uint8_t((b & 0xf0) | code);
}

// The dequantized float32 value of a code: value (code_value) * scale, rounded once. Integer
// formats saturate to +-FLT_MAX instead of overflowing to +-inf: a range reaching within scale / 2
// of FLT_MAX has its end code's exact value past it (int8 with absmax FLT_MAX: 127 * (FLT_MAX / 127)
// rounds up; uint8 whose zero point rounds down: (255 - zp) * scale > hi), and FLT_MAX is then the
// float32 nearest to x. fp8 values are <= qmax, so their product cannot overflow (and an e5m2
// infinity code stays infinite). NaN (only from a NaN scale) passes through.
static inline float scale_code(int fmt, float value, float scale) {
  float v = value * scale;
  if (fmt == LP_QFMT_FP8_E4M3 || fmt == LP_QFMT_FP8_E5M2) return v;
  return v > FLT_MAX ? FLT_MAX : (v < -FLT_MAX ? -FLT_MAX : v);
}

// The float value of element i's code before scaling: code - zero_point, or the fp8 value.
static inline float code_value(int fmt, const uint8_t* data, int64_t i, int32_t zero_point) {
  switch (fmt) {
    case LP_QFMT_INT8: return float(int8_t(data[i]));
    case LP_QFMT_UINT8: return float(int32_t(data[i]) - zero_point);
    case LP_QFMT_INT4: {
      int32_t nib = (data[i >> 1] >> ((i & 1) * 4)) & 0xf;
      return float((nib ^ 8) - 8);  // 4-bit two's complement
    }
    case LP_QFMT_FP8_E4M3: return fp8_e4m3_to_f32(data[i]);
    default: return fp8_e5m2_to_f32(data[i]);
  }
}

}  // namespace lp
