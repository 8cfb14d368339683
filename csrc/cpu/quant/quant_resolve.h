// The resolvers every ISA's quant file shares: they turn run-time (format, dtype, mode) into one
// template instance of that file's span kernels, and quant_table() makes its QuantKernels table.
//
// Included by quant_<isa>.cc *inside its anonymous namespace*, after its four kernel templates
//   span_stats<XDT, MINMAX>, span_stats_elem<XDT, MINMAX>,
//   span_quantize<FMT, XDT, STOCH, PER_ELEM>, span_dequantize<FMT, ODT, PER_ELEM>,
// so every instance is made, with internal linkage, in the file compiled with that ISA's flags.
// (No include guard: each including file needs its own copy.)

template <bool MINMAX>
StatsFn stats_for_dtype(int xdt) {
  switch (xdt) {
    case LP_DTYPE_F16: return span_stats<LP_DTYPE_F16, MINMAX>;
    case LP_DTYPE_BF16: return span_stats<LP_DTYPE_BF16, MINMAX>;
    default: return span_stats<LP_DTYPE_F32, MINMAX>;
  }
}
StatsFn pick_stats(int xdt, bool minmax) {
  return minmax ? stats_for_dtype<true>(xdt) : stats_for_dtype<false>(xdt);
}

template <bool MINMAX>
StatsElemFn stats_elem_for_dtype(int xdt) {
  switch (xdt) {
    case LP_DTYPE_F16: return span_stats_elem<LP_DTYPE_F16, MINMAX>;
    case LP_DTYPE_BF16: return span_stats_elem<LP_DTYPE_BF16, MINMAX>;
    default: return span_stats_elem<LP_DTYPE_F32, MINMAX>;
  }
}
StatsElemFn pick_stats_elem(int xdt, bool minmax) {
  return minmax ? stats_elem_for_dtype<true>(xdt) : stats_elem_for_dtype<false>(xdt);
}

template <int FMT, int XDT>
QuantSpanFn quantize_for_mode(bool stoch, bool per_elem) {
  if (stoch) return per_elem ? span_quantize<FMT, XDT, true, true> : span_quantize<FMT, XDT, true, false>;
  return per_elem ? span_quantize<FMT, XDT, false, true> : span_quantize<FMT, XDT, false, false>;
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

template <int FMT, int ODT>
DequantSpanFn dequantize_for_mode(bool per_elem) {
  return per_elem ? span_dequantize<FMT, ODT, true> : span_dequantize<FMT, ODT, false>;
}
template <int FMT>
DequantSpanFn dequantize_for_dtype(int odt, bool per_elem) {
  switch (odt) {
    case LP_DTYPE_F16: return dequantize_for_mode<FMT, LP_DTYPE_F16>(per_elem);
    case LP_DTYPE_BF16: return dequantize_for_mode<FMT, LP_DTYPE_BF16>(per_elem);
    default: return dequantize_for_mode<FMT, LP_DTYPE_F32>(per_elem);
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

// The including file's table: `name` and `isa` (lp_isa level) as QuantKernels documents.
constexpr QuantKernels quant_table(const char* name, int isa) {
  return {name, isa, pick_stats, pick_stats_elem, pick_quantize, pick_dequantize};
}

