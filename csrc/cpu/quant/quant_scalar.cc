// Scalar span kernels for quantize / dequantize: the simple truth the SIMD versions are tested
// against. Every element goes through the shared helpers of quant.h (load_elem, quant_elem,
// store_code, code_value, store_elem); no vector width, no leftovers.
#include "cpu/quant/quant.h"

namespace lp {
namespace {

// Statistics of elements [index0, index0 + n) merged into *st (see SpanStats).
template <int XDT, bool MINMAX>
void stats_scalar(const void* x, int64_t index0, int64_t n, SpanStats* st) {
  SpanStats s = *st;
  for (int64_t i = index0; i < index0 + n; ++i) {
    float v = load_elem(XDT, x, i);
    uint32_t a = f32_to_bits(v) & 0x7fffffffu;
    if (a > s.abs_bits) s.abs_bits = a;
    if (MINMAX) {
      if (v < s.min) s.min = v;
      if (v > s.max) s.max = v;
    }
  }
  *st = s;
}

// Per-element statistics: slot j merges element index0 + j.
template <int XDT, bool MINMAX>
void stats_elem_scalar(const void* x, int64_t index0, int64_t n, uint32_t* abs_bits, float* mn,
                       float* mx) {
  for (int64_t j = 0; j < n; ++j) {
    float v = load_elem(XDT, x, index0 + j);
    uint32_t a = f32_to_bits(v) & 0x7fffffffu;
    if (a > abs_bits[j]) abs_bits[j] = a;
    if (MINMAX) {
      if (v < mn[j]) mn[j] = v;
      if (v > mx[j]) mx[j] = v;
    }
  }
}

template <int FMT, int XDT, bool STOCH, bool PER_ELEM>
void quantize_scalar(const QuantSpan& s) {
  uint32_t key_hi = STOCH ? rng_key_hi(s.rng_key, uint64_t(s.index0)) : 0;
  for (int64_t j = 0; j < s.n_elems; ++j) {
    int64_t i = s.index0 + j;
    int64_t g = PER_ELEM ? j : 0;
    int32_t zp = FMT == LP_QFMT_UINT8 ? s.zero_point[g] : 0;
    float u = -1.0f;
    if (STOCH) u = float(rng_bits(s.rng_key, key_hi, uint32_t(i)) >> 8) * 5.9604644775390625e-08f;
    store_code(FMT, s.data, i, quant_elem(FMT, load_elem(XDT, s.x_base, i), s.scale[g], zp, u));
  }
}

template <int FMT, int ODT, bool PER_ELEM>
void dequantize_scalar(const DequantSpan& s) {
  for (int64_t j = 0; j < s.n_elems; ++j) {
    int64_t i = s.index0 + j;
    int64_t g = PER_ELEM ? j : 0;
    int32_t zp = FMT == LP_QFMT_UINT8 ? s.zero_point[g] : 0;
    store_elem(ODT, s.out_base, i, code_value(FMT, s.data, i, zp) * s.scale[g]);
  }
}

// ---- resolvers: one template instance per (format, dtype, mode) ----
template <bool MINMAX>
StatsFn stats_for_dtype(int xdt) {
  switch (xdt) {
    case LP_DTYPE_F16: return stats_scalar<LP_DTYPE_F16, MINMAX>;
    case LP_DTYPE_BF16: return stats_scalar<LP_DTYPE_BF16, MINMAX>;
    default: return stats_scalar<LP_DTYPE_F32, MINMAX>;
  }
}
StatsFn pick_stats(int xdt, bool minmax) {
  return minmax ? stats_for_dtype<true>(xdt) : stats_for_dtype<false>(xdt);
}

template <bool MINMAX>
StatsElemFn stats_elem_for_dtype(int xdt) {
  switch (xdt) {
    case LP_DTYPE_F16: return stats_elem_scalar<LP_DTYPE_F16, MINMAX>;
    case LP_DTYPE_BF16: return stats_elem_scalar<LP_DTYPE_BF16, MINMAX>;
    default: return stats_elem_scalar<LP_DTYPE_F32, MINMAX>;
  }
}
StatsElemFn pick_stats_elem(int xdt, bool minmax) {
  return minmax ? stats_elem_for_dtype<true>(xdt) : stats_elem_for_dtype<false>(xdt);
}

template <int FMT, int XDT>
QuantSpanFn quantize_for_mode(bool stoch, bool per_elem) {
  if (stoch) return per_elem ? quantize_scalar<FMT, XDT, true, true> : quantize_scalar<FMT, XDT, true, false>;
  return per_elem ? quantize_scalar<FMT, XDT, false, true> : quantize_scalar<FMT, XDT, false, false>;
}
template <int FMT>
QuantSpanFn quantize_for_dtype(int xdt, bool stoch, bool per_elem) {
  switch (xdt) {
    case LP_DTYPE_F16: return quantize_for_mode<FMT, LP_DTYPE_F16>(stoch, per_elem);
    case LP_DTYPE_BF16: return quantize_for_mode<FMT, LP_DTYPE_BF16>(stoch, per_elem);
    default: return quantize_for_mode<FMT, LP_DTYPE_F32>(stoch, per_elem);
  }
}
QuantSpanFn pick_quantize(int fmt, int xdt, bool stoch, bool per_elem) {
  switch (fmt) {
    case LP_QFMT_INT8: return quantize_for_dtype<LP_QFMT_INT8>(xdt, stoch, per_elem);
    case LP_QFMT_UINT8: return quantize_for_dtype<LP_QFMT_UINT8>(xdt, stoch, per_elem);
    case LP_QFMT_INT4: return quantize_for_dtype<LP_QFMT_INT4>(xdt, stoch, per_elem);
    // fp8 has no stochastic rounding (Python rejects it before the call)
    case LP_QFMT_FP8_E4M3: return quantize_for_dtype<LP_QFMT_FP8_E4M3>(xdt, false, per_elem);
    default: return quantize_for_dtype<LP_QFMT_FP8_E5M2>(xdt, false, per_elem);
  }
}

template <int FMT>
DequantSpanFn dequantize_for_dtype(int odt, bool per_elem) {
  switch (odt) {
    case LP_DTYPE_F16: return per_elem ? dequantize_scalar<FMT, LP_DTYPE_F16, true> : dequantize_scalar<FMT, LP_DTYPE_F16, false>;
    case LP_DTYPE_BF16: return per_elem ? dequantize_scalar<FMT, LP_DTYPE_BF16, true> : dequantize_scalar<FMT, LP_DTYPE_BF16, false>;
    default: return per_elem ? dequantize_scalar<FMT, LP_DTYPE_F32, true> : dequantize_scalar<FMT, LP_DTYPE_F32, false>;
  }
}
DequantSpanFn pick_dequantize(int fmt, int odt, bool per_elem) {
  switch (fmt) {
    case LP_QFMT_INT8: return dequantize_for_dtype<LP_QFMT_INT8>(odt, per_elem);
    case LP_QFMT_UINT8: return dequantize_for_dtype<LP_QFMT_UINT8>(odt, per_elem);
    case LP_QFMT_INT4: return dequantize_for_dtype<LP_QFMT_INT4>(odt, per_elem);
    case LP_QFMT_FP8_E4M3: return dequantize_for_dtype<LP_QFMT_FP8_E4M3>(odt, per_elem);
    default: return dequantize_for_dtype<LP_QFMT_FP8_E5M2>(odt, per_elem);
  }
}

const QuantKernels kScalar = {pick_stats, pick_stats_elem, pick_quantize, pick_dequantize};

}  // namespace

const QuantKernels* quant_kernels_scalar() { return &kScalar; }

}  // namespace lp
