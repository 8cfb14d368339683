// Scalar reduce kernels: the reference every SIMD table must match bit for bit (contract: reduce.h).
// a * b + c must stay two roundings, as in the SIMD files (which have FMA and must agree with this
// one): no contraction into fused multiply-adds, whatever the build's default.
#pragma GCC optimize("fp-contract=off")

#include <cstring>

#include "cpu/reduce/reduce_generic.h"
#include "cpu/reduce/reduce_plain.h"
#include "cpu/reduce/reduce_q8.h"

namespace lp {
namespace {

using namespace reduce_generic;
// Block primitives of reduce_q8.h, one element at a time.
struct ScalarBlocks {
  template <int DT> using T = typename Ty<DT>::T;

  template <int DT> static void to_f32(float* v, const T<DT>* x, int64_t len) {
    q8_widen<DT>(v, x, 0, len);
  }
  template <int DT>
  static void sum(float* v, const int8_t* q, float s, const T<DT>* x, int64_t len) {
    q8_block_sum<DT>(v, q, s, x, 0, len);
  }
  template <int DT> static BlockStat to_f32_stat(float* v, const T<DT>* x, int64_t len) {
    to_f32<DT>(v, x, len);
    return stat(v, len);
  }
  template <int DT>
  static BlockStat sum_stat(float* v, const int8_t* q, float s, const T<DT>* x, int64_t len) {
    sum<DT>(v, q, s, x, len);
    return stat(v, len);
  }
  static BlockStat stat(const float* v, int64_t len) {
    BlockStat st;
    for (int64_t i = 0; i < len; ++i) st.add(v[i]);
    return st;
  }
  static void codes(int8_t* q, const float* v, int64_t len, float scale) {
    q8_codes(q, v, 0, len, scale);
  }
  template <int DT>
  static void out(T<DT>* y, const int8_t* q, float s, int64_t len, int divisor) {
    q8_block_out<DT>(y, q, s, 0, len, divisor);
  }
  static void dequant_f32(float* v, const int8_t* q, float s, int64_t len) {
    for (int64_t i = 0; i < len; ++i) v[i] = q8_value(q[i], s);
  }
  static void dequant_add_f32(float* v, const int8_t* q, float s, int64_t len) {
    for (int64_t i = 0; i < len; ++i) v[i] = v[i] + q8_value(q[i], s);
  }
  template <int DT> static void store(T<DT>* y, const float* v, int64_t len, int divisor) {
    float d = float(divisor);
    for (int64_t i = 0; i < len; ++i) y[i] = q8_out<DT>(divisor == 1 ? v[i] : v[i] / d);
  }
  static void add_f32(float* x, const float* r, int64_t len) {
    for (int64_t i = 0; i < len; ++i) x[i] = x[i] + r[i];
  }
  static void residual(float* r, const float* x, const int8_t* q, float scale, int64_t len) {
    for (int64_t i = 0; i < len; ++i) r[i] = x[i] - q8_value(q[i], scale);
  }
};

const ReduceKernels kScalar = reduce_table<PlainKernels<One>, Q8Kernels<ScalarBlocks>>("scalar", LP_ISA_SCALAR);

}  // namespace

const ReduceKernels* reduce_kernels_scalar() { return &kScalar; }

}  // namespace lp
