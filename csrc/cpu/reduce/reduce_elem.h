// Element-level semantics of the reduce kernels (see reduce.h), shared by the scalar kernels and the
// leftover elements of the SIMD kernels, so both compute the very same thing.
// Everything is `static inline` (this header is included by files built with different -m flags).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtypes.h"
#include "cpu/reduce/reduce.h"

namespace lp {
namespace reduce_elem {

// Storage type T and accumulator type A of each dtype, with the conversions between them.
template <int DT> struct Ty;
// A dtype accumulated in its own type.
template <class X> struct TySame {
  using T = X; using A = X;
  static inline A widen(T x) { return x; }
  static inline T narrow(A a) { return a; }
};
template <> struct Ty<LP_DTYPE_F32> : TySame<float> {};
template <> struct Ty<LP_DTYPE_F16> {
  using T = uint16_t; using A = float;
  // As F16C's conversion: exact, and a signaling NaN comes out quiet.
  static inline A widen(T x) {
    float f = f16_to_f32(x);
    if ((x & 0x7c00u) == 0x7c00u && (x & 0x3ffu)) f = bits_to_f32(f32_to_bits(f) | 0x400000u);
    return f;
  }
  static inline T narrow(A a) { return f32_to_f16(a); }
};
template <> struct Ty<LP_DTYPE_BF16> {
  using T = uint16_t; using A = float;
  static inline A widen(T x) { return bf16_to_f32(x); }
  static inline T narrow(A a) { return f32_to_bf16(a); }
};
template <> struct Ty<LP_DTYPE_F64> : TySame<double> {};
template <> struct Ty<LP_DTYPE_I32> : TySame<int32_t> {};
template <> struct Ty<LP_DTYPE_I64> : TySame<int64_t> {};

template <class A> static inline bool is_nan(A a) {
  if constexpr (std::is_floating_point<A>::value) return a != a;
  else return false;
}

// The binary op on accumulators (acc first, new value second; see reduce.h).
template <int OP, class A> static inline A apply(A a, A b) {
  if constexpr (OP == LP_REDUCE_SUM || OP == LP_REDUCE_AVG) {
    if constexpr (std::is_integral<A>::value) {
      using U = typename std::make_unsigned<A>::type;  // wrap around without UB
      return A(U(a) + U(b));
    } else {
      return a + b;
    }
  } else if constexpr (OP == LP_REDUCE_MAX) {
    A r = a > b ? a : b;
    return is_nan(a) ? a : r;
  } else {
    A r = a < b ? a : b;
    return is_nan(a) ? a : r;
  }
}

// The end of a reduction: AVG divides once (float types only; the Python layer rejects int avg).
template <int OP, class A> static inline A finalize(A v, int n_ranks) {
  if constexpr (OP == LP_REDUCE_AVG && std::is_floating_point<A>::value) return v / A(n_ranks);
  else { (void)n_ranks; return v; }
}

// ---- int8 compression ----
// float32 view of an input element for the q8 path.
template <int DT> static inline float q8_in(typename Ty<DT>::T x) {
  if constexpr (DT == LP_DTYPE_F64) return float(x);
  else return Ty<DT>::widen(x);
}
template <int DT> static inline typename Ty<DT>::T q8_out(float v) {
  if constexpr (DT == LP_DTYPE_F64) return double(v);
  else return Ty<DT>::narrow(v);
}

// Scale of a block from its largest |v| and whether it held NaN/Inf (see reduce.h).
static inline float q8_scale(float absmax, bool non_finite) {
  if (non_finite) return INFINITY;
  return absmax / 127.0f;
}
// Code of v in a block of `scale`: scale 0 (zeros) and +Inf (non-finite block) give 0.
static inline int8_t q8_code(float v, float scale) {
  if (scale == 0.0f || scale == INFINITY) return 0;
  float r = std::nearbyint(v / scale);
  r = r > 127.0f ? 127.0f : r;
  r = r < -127.0f ? -127.0f : r;
  return int8_t(r);
}
static inline float q8_value(int8_t q, float scale) { return float(q) * scale; }
static inline bool q8_non_finite(float a) { return !(std::fabs(a) <= 3.40282347e+38f); }

}  // namespace reduce_elem
}  // namespace lp
