// GEMM, portable C++: the simple truth the SIMD kernels are tested against (contract in gemm.h).
//
// Method: for each batch, B is widened once into a row-major (k, n) float32 (or int32) copy; then
// every output row i is accumulated as acc[:] += A[i, k] * Bw[k, :] for k = 0, 1, ... in order (a
// plain axpy the compiler vectorizes with baseline SIMD), and the epilogue adds the bias and rounds
// once. Threads split the rows of a batch; a row's arithmetic does not depend on which thread runs
// it, so results are bitwise independent of the thread count. No leftovers: every loop runs to m/n/k.
#include <algorithm>
#include <cstdint>

#include "common/dtypes.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"

namespace lp {
namespace {

// One thread should get at least this many flops before we fork (fork/join costs a few us).
constexpr double kMinFlopsPerThread = 1 << 21;

// The method above for an accumulator type Acc (float or int32_t): load(operand, offset_elems) widens
// one element of A or B to Acc; finish(batch, i, acc) writes output row i from its n sums.
template <class Acc, class Args, class Load, class Finish>
void gemm_rows(const Args& g, const Load& load, const Finish& finish) {
  const int64_t m = g.m, n = g.n, k = g.k;
  if (m <= 0 || n <= 0 || g.n_batch <= 0) return;
  const int nt = threads_for(m, 2.0 * double(n) * double(k), kMinFlopsPerThread);
  Acc* b_wide = static_cast<Acc*>(gemm_scratch(0, size_t(std::max<int64_t>(k * n, 1)) * sizeof(Acc)));
  Acc* acc_rows = static_cast<Acc*>(gemm_scratch(1, size_t(nt) * size_t(n) * sizeof(Acc)));
  for (int64_t bi = 0; bi < g.n_batch; ++bi) {
    if (bi == 0 || g.b.stride_batch_elems != 0) {  // a broadcast B (batch stride 0) is widened once
      const int64_t base = bi * g.b.stride_batch_elems;
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t j = 0; j < n; ++j)
          b_wide[kk * n + j] = load(g.b, base + kk * g.b.stride_row_elems + j * g.b.stride_col_elems);
    }
    const int64_t a_base = bi * g.a.stride_batch_elems;
    parallel_region(nt, [&](int t, int n_threads) {
      const int64_t row_begin = m * t / n_threads, row_end = m * (t + 1) / n_threads;
      Acc* acc = acc_rows + int64_t(t) * n;
      for (int64_t i = row_begin; i < row_end; ++i) {
        std::fill(acc, acc + n, Acc(0));
        for (int64_t kk = 0; kk < k; ++kk) {
          const Acc av = load(g.a, a_base + i * g.a.stride_row_elems + kk * g.a.stride_col_elems);
          const Acc* b_row = b_wide + kk * n;
          for (int64_t j = 0; j < n; ++j) acc[j] += av * b_row[j];  // int32: |sum| < 2^31 for k <= 131071
        }
        finish(bi, i, acc);
      }
    });
  }
}

}  // namespace

void gemm_float_scalar(const GemmFloatArgs& g) {
  auto load = [](const GemmOperand& o, int64_t off) { return gemm_load_float(o.ptr, o.dtype, off); };
  gemm_rows<float>(g, load, [&](int64_t bi, int64_t i, const float* acc) {
    const int64_t out_row = (bi * g.m + i) * g.n;
    for (int64_t j = 0; j < g.n; ++j)
      gemm_store_float(g.out, g.out_dtype, out_row + j, g.bias ? acc[j] + g.bias[j] : acc[j]);
  });
}

void gemm_int8_scalar(const GemmInt8Args& g) {
  auto load = [](const GemmOperand& o, int64_t off) { return int32_t(static_cast<const int8_t*>(o.ptr)[off]); };
  gemm_rows<int32_t>(g, load, [&](int64_t bi, int64_t i, const int32_t* acc) {
    const int64_t out_row = (bi * g.m + i) * g.n;
    if (!g.scale_a) {
      std::copy(acc, acc + g.n, static_cast<int32_t*>(g.out) + out_row);
      return;
    }
    const float sa = g.scale_a[g.scale_a_n_elems == 1 ? 0 : i];
    for (int64_t j = 0; j < g.n; ++j) {
      const float sb = g.scale_b[g.scale_b_n_elems == 1 ? 0 : j], bias = g.bias ? g.bias[j] : 0.0f;
      const float v = gemm_scaled_epilogue<GemmScalarVec>(acc[j], sa, sb, g.bias != nullptr, bias);
      gemm_store_float(g.out, g.out_dtype, out_row + j, v);
    }
  });
}

namespace {
// The scalar kernels take every shape themselves: no special paths, no blocking, no peak probe.
const GemmKernels kGemmScalar = {"scalar", LP_ISA_SCALAR, gemm_float_scalar, gemm_int8_scalar,
                                 nullptr,  nullptr,       nullptr,           nullptr};
}  // namespace

const GemmKernels* gemm_kernels_scalar() { return &kGemmScalar; }

}  // namespace lp
