// GEMM, AVX2 + FMA: the peak probes of the AVX2 microkernels, for benchmarks only (gemm.h,
// GemmKernels::peak_probe). Timed from Python for "% of peak"; each runs n_iters steps on every
// thread and returns the operations executed (a multiply-add counts 2).
//   float (and bf16, which AVX2 multiplies by FMA too): 12 independent 8-lane FMA chains, the float
//          microkernel's arithmetic without its loads.
//   int8:  12 madd_epi16 + add_epi32 pairs per step (the int8 microkernel's arithmetic without its
//          loads and broadcasts); one madd lane is 2 int8-equivalent multiply-adds.
#include <immintrin.h>

#include <cstdint>

#include "common/parallel.h"
#include "cpu/gemm/gemm.h"

namespace lp {

double gemm_peak_probe_avx2(int64_t n_iters, int n_threads, int kind) {
  const bool int8 = kind == LP_GEMM_PROBE_INT8;
  const float a_val = 0.999999f, b_val = 1e-7f;  // runtime values: nothing folds away
  parallel_region(n_threads, [&](int t, int) {
    if (!int8) {
      const __m256 a = _mm256_set1_ps(a_val), b = _mm256_set1_ps(b_val);
      // distinct starting values, or the compiler merges identical chains
      const float f = float(t);
      __m256 c0 = _mm256_set1_ps(f), c1 = _mm256_set1_ps(f + 1), c2 = _mm256_set1_ps(f + 2);
      __m256 c3 = _mm256_set1_ps(f + 3), c4 = _mm256_set1_ps(f + 4), c5 = _mm256_set1_ps(f + 5);
      __m256 c6 = _mm256_set1_ps(f + 6), c7 = _mm256_set1_ps(f + 7), c8 = _mm256_set1_ps(f + 8);
      __m256 c9 = _mm256_set1_ps(f + 9), c10 = _mm256_set1_ps(f + 10), c11 = _mm256_set1_ps(f + 11);
      for (int64_t it = 0; it < n_iters; ++it) {
        c0 = _mm256_fmadd_ps(c0, a, b), c1 = _mm256_fmadd_ps(c1, a, b), c2 = _mm256_fmadd_ps(c2, a, b);
        c3 = _mm256_fmadd_ps(c3, a, b), c4 = _mm256_fmadd_ps(c4, a, b), c5 = _mm256_fmadd_ps(c5, a, b);
        c6 = _mm256_fmadd_ps(c6, a, b), c7 = _mm256_fmadd_ps(c7, a, b), c8 = _mm256_fmadd_ps(c8, a, b);
        c9 = _mm256_fmadd_ps(c9, a, b), c10 = _mm256_fmadd_ps(c10, a, b), c11 = _mm256_fmadd_ps(c11, a, b);
      }
      __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                               _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
      s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
      volatile float sink = _mm256_cvtss_f32(s);
      (void)sink;
      return;
    }
    // One A register, "changed" (an empty asm) before each row as the microkernel's broadcasts
    // would: no madd is loop-invariant, and 12 accumulators + 2 B + A + a temporary fit 16 registers.
    __m256i a = _mm256_set1_epi32(t + 1);
    const __m256i b0 = _mm256_set1_epi32(0x00030002), b1 = _mm256_set1_epi32(0x00050004);
    __m256i c0 = _mm256_set1_epi32(0), c1 = _mm256_set1_epi32(1), c2 = _mm256_set1_epi32(2);
    __m256i c3 = _mm256_set1_epi32(3), c4 = _mm256_set1_epi32(4), c5 = _mm256_set1_epi32(5);
    __m256i c6 = _mm256_set1_epi32(6), c7 = _mm256_set1_epi32(7), c8 = _mm256_set1_epi32(8);
    __m256i c9 = _mm256_set1_epi32(9), c10 = _mm256_set1_epi32(10), c11 = _mm256_set1_epi32(11);
#define LP_PROBE_ROW(X, Y)                                                                  \
  __asm__("" : "+x"(a));                                                                    \
  X = _mm256_add_epi32(X, _mm256_madd_epi16(a, b0)), Y = _mm256_add_epi32(Y, _mm256_madd_epi16(a, b1));
    for (int64_t it = 0; it < n_iters; ++it) {
      LP_PROBE_ROW(c0, c1) LP_PROBE_ROW(c2, c3) LP_PROBE_ROW(c4, c5)
      LP_PROBE_ROW(c6, c7) LP_PROBE_ROW(c8, c9) LP_PROBE_ROW(c10, c11)
      __asm__("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5));
      __asm__("" : "+x"(c6), "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));
    }
#undef LP_PROBE_ROW
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                 _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
    s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_add_epi32(c8, c9), _mm256_add_epi32(c10, c11)));
    volatile int sink = _mm256_extract_epi32(s, 0);
    (void)sink;
  });
  // float: 12 FMAs x 8 lanes x 2 flops; int8: 12 madds x 8 lanes x 2 pairs x 2 ops
  return double(n_iters) * 12 * 8 * 2 * (int8 ? 2 : 1) * n_threads;
}

}  // namespace lp
