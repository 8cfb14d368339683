// GEMM, AVX-512: the peak probes of the AVX-512 microkernels (gemm.h, GemmKernels::peak_probe), for
// benchmarks and for choosing the avx512 level's bf16 kernels. Each runs n_iters steps of the
// microkernel's instruction (vfmadd231ps, vdpbf16ps or vpdpbusd by kind) on every thread, without
// loads, timed from Python for "% of peak" (and here, once, for the bf16 choice).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "common/parallel.h"
#include "cpu/gemm/gemm.h"

namespace lp {
namespace {

// One thread's probe: the microkernel's arithmetic without its loads, 24 independent accumulators
// (12 rows x 2 vectors, as the 12 x 32 register tile).
template <bool INT>
struct ProbeVec {
  using V = __m512;
};
template <>
struct ProbeVec<true> {
  using V = __m512i;
};

template <int KIND>
void peak_probe_thread(int64_t n_iters, int t) {
  using V = typename ProbeVec<KIND == LP_GEMM_PROBE_INT8>::V;
  V a, b0, b1;
  if constexpr (KIND == LP_GEMM_PROBE_INT8) {
    a = _mm512_set1_epi32(0x01010101 + t), b0 = _mm512_set1_epi32(0x01020304), b1 = _mm512_set1_epi32(0x05060708);
  } else {
    a = _mm512_set1_ps(0.999999f + float(t)), b0 = _mm512_set1_ps(1e-7f), b1 = _mm512_set1_ps(2e-7f);
  }
  auto op = [&](V c, V x, V y) -> V {
    if constexpr (KIND == LP_GEMM_PROBE_FLOAT) return _mm512_fmadd_ps(x, y, c);
    else if constexpr (KIND == LP_GEMM_PROBE_BF16) return _mm512_dpbf16_ps(c, (__m512bh)x, (__m512bh)y);
    else return _mm512_dpbusd_epi32(c, x, y);
  };
#define LP_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LP_DECL(i) V c##i##_0 = b0, c##i##_1 = b1;
#define LP_STEP(i)                \
  c##i##_0 = op(c##i##_0, a, b0); \
  c##i##_1 = op(c##i##_1, a, b1);
  // The empty asm hides each accumulator's value from the optimizer, which could otherwise fold
  // the repeated operation on constants.
#define LP_PIN(i) __asm__("" : "+v"(c##i##_0), "+v"(c##i##_1));
  LP_ROWS(LP_DECL)
  for (int64_t it = 0; it < n_iters; ++it) {
    LP_ROWS(LP_STEP)
    LP_ROWS(LP_PIN)
  }
  {
    auto bits = [](V v) { return reinterpret_cast<__m512i&>(v); };
    __m512i acc = bits(a);
#define LP_SUM(i) acc = _mm512_xor_si512(acc, _mm512_xor_si512(bits(c##i##_0), bits(c##i##_1)));
    LP_ROWS(LP_SUM)
    volatile int sink = _mm512_reduce_add_epi32(acc);
    (void)sink;
  }
#undef LP_SUM
#undef LP_PIN
#undef LP_STEP
#undef LP_DECL
#undef LP_ROWS
}

// Per lane, vfmadd231ps does 2 flops, vdpbf16ps 4, vpdpbusd 8 int8 operations; a step is 24 of them.
double probe_ops(int64_t n_iters, int kind) {
  const double ops_per_lane = kind == LP_GEMM_PROBE_FLOAT ? 2 : kind == LP_GEMM_PROBE_BF16 ? 4 : 8;
  return double(n_iters) * kGemmAvx512Mr * 2 * 16 * ops_per_lane;
}

}  // namespace

// Returns the operations executed on all threads (probe_ops each).
double gemm_peak_probe_avx512(int64_t n_iters, int n_threads, int kind) {
  parallel_region(n_threads, [&](int t, int) {
    if (kind == LP_GEMM_PROBE_FLOAT)
      peak_probe_thread<LP_GEMM_PROBE_FLOAT>(n_iters, t);
    else if (kind == LP_GEMM_PROBE_BF16)
      peak_probe_thread<LP_GEMM_PROBE_BF16>(n_iters, t);
    else
      peak_probe_thread<LP_GEMM_PROBE_INT8>(n_iters, t);
  });
  return probe_ops(n_iters, kind) * n_threads;
}

// 4096 steps take ~80 us of vdpbf16ps on the AMX Xeon (~20 us of FMA); the best of 3 alternating runs
// each, so that a preempted run or the first 512-bit instructions' slow start does not decide. The
// rates differ 2x either way on the CPUs measured (half on that Xeon, twice on Zen 4).
bool gemm_bf16_dot_slower_than_fma_avx512() {
  constexpr int64_t kSteps = 4096;
  auto rate = [](auto probe, int kind) {
    const auto t0 = std::chrono::steady_clock::now();
    probe(kSteps, 0);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return probe_ops(kSteps, kind) / std::max(s, 1e-9);
  };
  double dot = 0, fma = 0;
  for (int r = 0; r < 3; ++r) {
    dot = std::max(dot, rate(peak_probe_thread<LP_GEMM_PROBE_BF16>, LP_GEMM_PROBE_BF16));
    fma = std::max(fma, rate(peak_probe_thread<LP_GEMM_PROBE_FLOAT>, LP_GEMM_PROBE_FLOAT));
  }
  return dot < 0.8 * fma;  // the widened panels are twice the bytes: vdpbf16ps on a tie
}

}  // namespace lp
