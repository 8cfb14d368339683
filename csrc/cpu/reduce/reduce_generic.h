// Portable block bodies of the int8-compressed reduce kernels over an element range [i0, n): the
// scalar block policy is made of them, and the SIMD policies call them for the elements left after
// their last full vector. Semantics: reduce.h; element rules: reduce_elem.h. (The uncompressed
// kernels are written once in reduce_plain.h.)
#pragma once
#include <cstdint>

#include "cpu/reduce/reduce_elem.h"

namespace lp {
namespace reduce_generic {

using namespace reduce_elem;


// ---- int8 compression, one block at a time ----

// Running block statistics over float32 values.
struct BlockStat {
  float absmax = 0.0f;
  bool non_finite = false;
  inline void add(float v) {
    float a = std::fabs(v);
    if (q8_non_finite(a)) non_finite = true;
    else absmax = a > absmax ? a : absmax;
  }
  inline float scale() const { return q8_scale(absmax, non_finite); }
};

template <int DT> static inline void q8_widen(float* acc, const void* x_, int64_t i0, int64_t n) {
  using T = typename Ty<DT>::T;
  const T* x = static_cast<const T*>(x_);
  for (int64_t i = i0; i < n; ++i) acc[i] = q8_in<DT>(x[i]);
}

// Codes of v[0, len) with `scale`.
static inline void q8_codes(int8_t* q, const float* v, int64_t i0, int64_t len, float scale) {
  for (int64_t i = i0; i < len; ++i) q[i] = q8_code(v[i], scale);
}

// v[i] = D(q, s)[i] + float32(x[i]) for i in [i0, len) of one block (scale s).
template <int DT>
static inline void q8_block_sum(float* v, const int8_t* q, float s, const void* x_, int64_t i0,
                                int64_t len) {
  using T = typename Ty<DT>::T;
  const T* x = static_cast<const T*>(x_);
  for (int64_t i = i0; i < len; ++i) v[i] = q8_value(q[i], s) + q8_in<DT>(x[i]);
}

// y[i] = narrow(D(q, s)[i] / divisor) for one block.
template <int DT>
static inline void q8_block_out(void* y_, const int8_t* q, float s, int64_t i0, int64_t len,
                                int divisor) {
  using T = typename Ty<DT>::T;
  T* y = static_cast<T*>(y_);
  if (divisor == 1) {
    for (int64_t i = i0; i < len; ++i) y[i] = q8_out<DT>(q8_value(q[i], s));
  } else {
    float d = float(divisor);
    for (int64_t i = i0; i < len; ++i) y[i] = q8_out<DT>(q8_value(q[i], s) / d);
  }
}

}  // namespace reduce_generic
}  // namespace lp
