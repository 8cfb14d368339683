// AVX2 (+ F16C) reduce kernels: the same results as reduce_scalar.cc, bit for bit (contract:
// reduce.h). Full vectors here; leftover elements go through the portable bodies of
// reduce_generic.h. Also serves the avx512 and amx levels (every such CPU has AVX2).
//
// Bit-exactness notes: no FMA contraction (pragma below); max/min use VMAXPS/VMINPS, whose
// "second operand on NaN or equal" rule is exactly (a > b ? a : b), then put a back when a is NaN;
// float16 rounding uses F16C (round to nearest even, like dtypes.h) with NaN lanes rewritten to the
// canonical NaN that dtypes.h produces; bfloat16 rounding is the same integer trick as dtypes.h.
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>

#include <cstring>

#include "cpu/reduce/reduce_generic.h"
#include "cpu/reduce/reduce_plain.h"
#include "cpu/reduce/reduce_q8.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

using namespace reduce_generic;

// ---- float32 lanes ----
static inline __m256 max_nan(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
static inline __m256 min_nan(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_min_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
static inline __m256d max_nan(__m256d a, __m256d b) {
  return _mm256_blendv_pd(_mm256_max_pd(a, b), a, _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
}
static inline __m256d min_nan(__m256d a, __m256d b) {
  return _mm256_blendv_pd(_mm256_min_pd(a, b), a, _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
}

// 16-bit loads and stores: the vector layer of cpu/simd256.h (bit for bit dtypes.h, NaNs included).
static inline __m256 load_f16(const uint16_t* p) { return FloatIn<LP_DTYPE_F16>::eight(p); }
static inline void store_f16(uint16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), Simd256::to_f16(v)); }
static inline __m256 load_bf16(const uint16_t* p) { return FloatIn<LP_DTYPE_BF16>::eight(p); }
static inline void store_bf16(uint16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), Simd256::to_bf16(v)); }
static inline __m256 load_f64_as_f32(const double* p) {
  __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(p)), hi = _mm256_cvtpd_ps(_mm256_loadu_pd(p + 4));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline void store_f32_as_f64(double* p, __m256 v) {
  _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  _mm256_storeu_pd(p + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Per-dtype vector traits: L lanes of the accumulator type; load = widen, store = narrow.
template <int DT> struct V;
struct VF32Acc {
  static constexpr int L = 8;
  using vec = __m256;
  static vec load_acc(const float* p) { return _mm256_loadu_ps(p); }
  static void store_acc(float* p, vec v) { _mm256_storeu_ps(p, v); }
  template <int OP> static vec apply(vec a, vec b) {
    if constexpr (OP == LP_REDUCE_MAX) return max_nan(a, b);
    else if constexpr (OP == LP_REDUCE_MIN) return min_nan(a, b);
    else return _mm256_add_ps(a, b);
  }
  template <int OP> static vec finalize(vec v, int n_ranks) {
    if constexpr (OP == LP_REDUCE_AVG) return _mm256_div_ps(v, _mm256_set1_ps(float(n_ranks)));
    else return v;
  }
};
template <> struct V<LP_DTYPE_F32> : VF32Acc {
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
};
template <> struct V<LP_DTYPE_F16> : VF32Acc {
  static vec load(const uint16_t* p) { return load_f16(p); }
  static void store(uint16_t* p, vec v) { store_f16(p, v); }
};
template <> struct V<LP_DTYPE_BF16> : VF32Acc {
  static vec load(const uint16_t* p) { return load_bf16(p); }
  static void store(uint16_t* p, vec v) { store_bf16(p, v); }
};
template <> struct V<LP_DTYPE_F64> {
  static constexpr int L = 4;
  using vec = __m256d;
  static vec load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, vec v) { _mm256_storeu_pd(p, v); }
  static vec load_acc(const double* p) { return _mm256_loadu_pd(p); }
  static void store_acc(double* p, vec v) { _mm256_storeu_pd(p, v); }
  template <int OP> static vec apply(vec a, vec b) {
    if constexpr (OP == LP_REDUCE_MAX) return max_nan(a, b);
    else if constexpr (OP == LP_REDUCE_MIN) return min_nan(a, b);
    else return _mm256_add_pd(a, b);
  }
  template <int OP> static vec finalize(vec v, int n_ranks) {
    if constexpr (OP == LP_REDUCE_AVG) return _mm256_div_pd(v, _mm256_set1_pd(double(n_ranks)));
    else return v;
  }
};
struct VIntBase {
  using vec = __m256i;
  template <class I> static vec load(const I* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <class I> static void store(I* p, vec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  template <class I> static vec load_acc(const I* p) { return load(p); }
  template <class I> static void store_acc(I* p, vec v) { store(p, v); }
  template <int OP> static vec finalize(vec v, int) { return v; }
};
template <> struct V<LP_DTYPE_I32> : VIntBase {
  static constexpr int L = 8;
  template <int OP> static vec apply(vec a, vec b) {
    if constexpr (OP == LP_REDUCE_MAX) return _mm256_max_epi32(a, b);
    else if constexpr (OP == LP_REDUCE_MIN) return _mm256_min_epi32(a, b);
    else return _mm256_add_epi32(a, b);
  }
};
template <> struct V<LP_DTYPE_I64> : VIntBase {
  static constexpr int L = 4;
  template <int OP> static vec apply(vec a, vec b) {
    if constexpr (OP == LP_REDUCE_MAX) return _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi64(a, b));
    else if constexpr (OP == LP_REDUCE_MIN) return _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi64(b, a));
    else return _mm256_add_epi64(a, b);
  }
};

template <int DT> using TT = typename Ty<DT>::T;

// ---- int8 compression: block primitives for reduce_q8.h ----
template <int DT> static inline __m256 load_f32_of(const TT<DT>* p) {
  if constexpr (DT == LP_DTYPE_F64) return load_f64_as_f32(p);
  else return V<DT>::load(p);
}
template <int DT> static inline void store_f32_to(TT<DT>* p, __m256 v) {
  if constexpr (DT == LP_DTYPE_F64) store_f32_as_f64(p, v);
  else V<DT>::store(p, v);
}
static inline __m256 load_q8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
// Codes of 8 lanes, as int32 in [-127, 127].
static inline __m256i code_lanes(__m256 v, __m256 scale) {
  __m256 r = _mm256_round_ps(_mm256_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_min_ps(r, _mm256_set1_ps(127.0f));
  r = _mm256_max_ps(r, _mm256_set1_ps(-127.0f));
  return _mm256_cvtps_epi32(r);
}

struct Avx2Blocks {
  template <int DT> using T = TT<DT>;

  template <int DT> static void to_f32(float* v, const T<DT>* x, int64_t len) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(v + i, load_f32_of<DT>(x + i));
    q8_widen<DT>(v, x, i, len);
  }
  template <int DT>
  static void sum(float* v, const int8_t* q, float s, const T<DT>* x, int64_t len) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
      _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_mul_ps(load_q8(q + i), vs), load_f32_of<DT>(x + i)));
    q8_block_sum<DT>(v, q, s, x, i, len);
  }
  // Running block statistics of 8 lanes at a time (see BlockStat).
  struct VStat {
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    inline void add(__m256 v) {
      __m256 a = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(3.40282347e+38f), _CMP_NLE_UQ));  // > FLT_MAX, NaN
      m = _mm256_max_ps(m, a);
    }
    // Lanes, then the leftover elements v[i0, len) one at a time.
    inline BlockStat finish(const float* v, int64_t i0, int64_t len) const {
      BlockStat st;
      st.non_finite = !_mm256_testz_ps(bad, bad);
      if (!st.non_finite) {  // all finite: the max is order-independent
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, m);
        for (float a : lanes) st.absmax = a > st.absmax ? a : st.absmax;
      }
      for (int64_t i = i0; i < len; ++i) st.add(v[i]);
      return st;
    }
  };

  static BlockStat stat(const float* v, int64_t len) {
    VStat vs;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) vs.add(_mm256_loadu_ps(v + i));
    return vs.finish(v, i, len);
  }
  template <int DT> static BlockStat to_f32_stat(float* v, const T<DT>* x, int64_t len) {
    VStat vs;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 a = load_f32_of<DT>(x + i);
      _mm256_storeu_ps(v + i, a);
      vs.add(a);
    }
    q8_widen<DT>(v, x, i, len);
    return vs.finish(v, i, len);
  }
  template <int DT>
  static BlockStat sum_stat(float* v, const int8_t* q, float s, const T<DT>* x, int64_t len) {
    const __m256 vsc = _mm256_set1_ps(s);
    VStat vs;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 a = _mm256_add_ps(_mm256_mul_ps(load_q8(q + i), vsc), load_f32_of<DT>(x + i));
      _mm256_storeu_ps(v + i, a);
      vs.add(a);
    }
    q8_block_sum<DT>(v, q, s, x, i, len);
    return vs.finish(v, i, len);
  }
  static void codes(int8_t* q, const float* v, int64_t len, float scale) {
    if (scale == 0.0f || scale == INFINITY) {
      if (len > 0) std::memset(q, 0, size_t(len));
      return;
    }
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      __m256i c0 = code_lanes(_mm256_loadu_ps(v + i), vs), c1 = code_lanes(_mm256_loadu_ps(v + i + 8), vs);
      __m256i c2 = code_lanes(_mm256_loadu_ps(v + i + 16), vs), c3 = code_lanes(_mm256_loadu_ps(v + i + 24), vs);
      __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; i + 8 <= len; i += 8) {
      __m256i c = code_lanes(_mm256_loadu_ps(v + i), vs);
      __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w, w));
    }
    q8_codes(q, v, i, len, scale);
  }
  template <int DT>
  static void out(T<DT>* y, const int8_t* q, float s, int64_t len, int divisor) {
    const __m256 vs = _mm256_set1_ps(s), vd = _mm256_set1_ps(float(divisor));
    int64_t i = 0;
    if (divisor == 1) {
      for (; i + 8 <= len; i += 8) store_f32_to<DT>(y + i, _mm256_mul_ps(load_q8(q + i), vs));
    } else {
      for (; i + 8 <= len; i += 8)
        store_f32_to<DT>(y + i, _mm256_div_ps(_mm256_mul_ps(load_q8(q + i), vs), vd));
    }
    q8_block_out<DT>(y, q, s, i, len, divisor);
  }
  static void dequant_f32(float* v, const int8_t* q, float s, int64_t len) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(load_q8(q + i), vs));
    for (; i < len; ++i) v[i] = q8_value(q[i], s);
  }
  static void dequant_add_f32(float* v, const int8_t* q, float s, int64_t len) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
      _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_loadu_ps(v + i), _mm256_mul_ps(load_q8(q + i), vs)));
    for (; i < len; ++i) v[i] = v[i] + q8_value(q[i], s);
  }
  template <int DT> static void store(T<DT>* y, const float* v, int64_t len, int divisor) {
    const __m256 vd = _mm256_set1_ps(float(divisor));
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 x = _mm256_loadu_ps(v + i);
      store_f32_to<DT>(y + i, divisor == 1 ? x : _mm256_div_ps(x, vd));
    }
    float d = float(divisor);
    for (; i < len; ++i) y[i] = q8_out<DT>(divisor == 1 ? v[i] : v[i] / d);
  }
  static void add_f32(float* x, const float* r, int64_t len) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
      _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(r + i)));
    for (; i < len; ++i) x[i] = x[i] + r[i];
  }
  static void residual(float* r, const float* x, const int8_t* q, float scale, int64_t len) {
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
      _mm256_storeu_ps(r + i, _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_mul_ps(load_q8(q + i), vs)));
    for (; i < len; ++i) r[i] = x[i] - q8_value(q[i], scale);
  }
};

const ReduceKernels kAvx2 = reduce_table<PlainKernels<V>, Q8Kernels<Avx2Blocks>>("avx2", LP_ISA_AVX2);

}  // namespace

const ReduceKernels* reduce_kernels_avx2() { return &kAvx2; }

}  // namespace lp
