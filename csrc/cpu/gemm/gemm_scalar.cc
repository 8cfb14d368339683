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

template <class T, class Load>
void widen_b(const GemmOperand& b, int64_t batch, int64_t k, int64_t n, T* dst, const Load& load) {
  const int64_t base = batch * b.stride_batch_elems;
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j)
      dst[kk * n + j] = load(base + kk * b.stride_row_elems + j * b.stride_col_elems);
}

}  // namespace

void gemm_float_scalar(const GemmFloatArgs& g) {
  const int64_t m = g.m, n = g.n, k = g.k;
  if (m <= 0 || n <= 0 || g.n_batch <= 0) return;
  const int nt = threads_for(m, 2.0 * double(n) * double(k), kMinFlopsPerThread);
  float* b_wide = static_cast<float*>(gemm_scratch(0, size_t(std::max<int64_t>(k * n, 1)) * 4));
  float* acc_rows = static_cast<float*>(gemm_scratch(1, size_t(nt) * size_t(n) * 4));
  for (int64_t bi = 0; bi < g.n_batch; ++bi) {
    if (bi == 0 || g.b.stride_batch_elems != 0) {
      widen_b(g.b, bi, k, n, b_wide,
              [&](int64_t off) { return gemm_load_float(g.b.ptr, g.b.dtype, off); });
    }
    const int64_t a_base = bi * g.a.stride_batch_elems;
    const int64_t out_base = bi * m * n;
    parallel_region(nt, [&](int t, int n_threads) {
      const int64_t row_begin = m * t / n_threads, row_end = m * (t + 1) / n_threads;
      float* acc = acc_rows + int64_t(t) * n;
      for (int64_t i = row_begin; i < row_end; ++i) {
        std::fill(acc, acc + n, 0.0f);
        for (int64_t kk = 0; kk < k; ++kk) {
          const float av =
              gemm_load_float(g.a.ptr, g.a.dtype, a_base + i * g.a.stride_row_elems + kk * g.a.stride_col_elems);
          const float* b_row = b_wide + kk * n;
          for (int64_t j = 0; j < n; ++j) acc[j] += av * b_row[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          const float v = g.bias ? acc[j] + g.bias[j] : acc[j];
          gemm_store_float(g.out, g.out_dtype, out_base + i * n + j, v);
        }
      }
    });
  }
}

void gemm_int8_scalar(const GemmInt8Args& g) {
  const int64_t m = g.m, n = g.n, k = g.k;
  if (m <= 0 || n <= 0 || g.n_batch <= 0) return;
  const int nt = threads_for(m, 2.0 * double(n) * double(k), kMinFlopsPerThread);
  int32_t* b_wide = static_cast<int32_t*>(gemm_scratch(0, size_t(std::max<int64_t>(k * n, 1)) * 4));
  int32_t* acc_rows = static_cast<int32_t*>(gemm_scratch(1, size_t(nt) * size_t(n) * 4));
  const int8_t* a_ptr = static_cast<const int8_t*>(g.a.ptr);
  const int8_t* b_ptr = static_cast<const int8_t*>(g.b.ptr);
  for (int64_t bi = 0; bi < g.n_batch; ++bi) {
    if (bi == 0 || g.b.stride_batch_elems != 0)
      widen_b(g.b, bi, k, n, b_wide, [&](int64_t off) { return int32_t(b_ptr[off]); });
    const int64_t a_base = bi * g.a.stride_batch_elems;
    const int64_t out_base = bi * m * n;
    parallel_region(nt, [&](int t, int n_threads) {
      const int64_t row_begin = m * t / n_threads, row_end = m * (t + 1) / n_threads;
      int32_t* acc = acc_rows + int64_t(t) * n;
      for (int64_t i = row_begin; i < row_end; ++i) {
        std::fill(acc, acc + n, 0);
        for (int64_t kk = 0; kk < k; ++kk) {
          const int32_t av = a_ptr[a_base + i * g.a.stride_row_elems + kk * g.a.stride_col_elems];
          const int32_t* b_row = b_wide + kk * n;
          for (int64_t j = 0; j < n; ++j) acc[j] += av * b_row[j];  // |sum| < 2^31 for k <= 131071
        }
        if (!g.scale_a) {
          std::copy(acc, acc + n, static_cast<int32_t*>(g.out) + out_base + i * n);
          continue;
        }
        const float sa = g.scale_a[g.scale_a_n_elems == 1 ? 0 : i];
        for (int64_t j = 0; j < n; ++j) {
          const float sb = g.scale_b[g.scale_b_n_elems == 1 ? 0 : j], bias = g.bias ? g.bias[j] : 0.0f;
          const float v = gemm_scaled_epilogue<GemmScalarVec>(acc[j], sa, sb, g.bias != nullptr, bias);
          gemm_store_float(g.out, g.out_dtype, out_base + i * n + j, v);
        }
      }
    });
  }
}

namespace {
// The scalar kernels take every shape themselves: no special paths, no blocking, no peak probe.
const GemmKernels kGemmScalar = {"scalar", LP_ISA_SCALAR, gemm_float_scalar, gemm_int8_scalar,
                                 nullptr,  nullptr,       nullptr,           nullptr};
}  // namespace

const GemmKernels* gemm_kernels_scalar() { return &kGemmScalar; }

}  // namespace lp
