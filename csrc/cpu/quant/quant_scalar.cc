// Scalar span kernels for quantize / dequantize: the simple truth the SIMD versions are tested
// against. Every element goes through the shared helpers of quant.h (load_elem, quant_elem,
// store_code, code_value, scale_code, store_elem); no vector width, no leftovers.
#include "cpu/quant/quant.h"

namespace lp {
namespace {

// Statistics: the element rules of quant.h, nothing more.
template <int XDT, bool MINMAX>
void span_stats(const void* x, int64_t index0, int64_t n, SpanStats* st) {
  stats_merge<MINMAX>(XDT, x, index0, index0 + n, st);
}
template <int XDT, bool MINMAX>
void span_stats_elem(const void* x, int64_t index0, int64_t n, uint32_t* abs_bits, float* mn, float* mx) {
  stats_elem_merge<MINMAX>(XDT, x, index0, 0, n, abs_bits, mn, mx);
}

template <int FMT, int XDT, bool STOCH, bool PER_ELEM>
void span_quantize(const QuantSpan& s) {
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
void span_dequantize(const DequantSpan& s) {
  for (int64_t j = 0; j < s.n_elems; ++j) {
    int64_t i = s.index0 + j;
    int64_t g = PER_ELEM ? j : 0;
    int32_t zp = FMT == LP_QFMT_UINT8 ? s.zero_point[g] : 0;
    store_elem(ODT, s.out_base, i, scale_code(FMT, code_value(FMT, s.data, i, zp), s.scale[g]));
  }
}

#include "cpu/quant/quant_resolve.h"  // quant_table(), from the span_* templates above

const QuantKernels kScalar = quant_table("scalar", LP_ISA_SCALAR);

}  // namespace

const QuantKernels* quant_kernels_scalar() { return &kScalar; }

}  // namespace lp
