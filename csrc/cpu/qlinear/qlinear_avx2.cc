// Weight-quantized linear, AVX2: the panel kernels of qlinear_kernel.h on 8-lane registers, 16-column
// sub-panels (2 vectors). Register budget (16 ymm): w8 6 rows x 2 accumulators + 2 widened code
// vectors + the broadcast; w4 2 rows x 2 x (group sum + total) + 4 widened code vectors + 2 broadcasts.
#include "common/codes.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_kernel.h"
#include "cpu/simd256.h"

namespace lp {

// The table (its kernels are instances over this file's vector type, which has internal linkage).
const QLinearKernels* qlinear_kernels_avx2() {
  static const QLinearKernels kTable = {
      "avx2", LP_ISA_AVX2, qlinear_w8_panels<Simd256, 6, 2>, qlinear_w4_panels<Simd256, 2, 2>, nullptr, nullptr,
      nullptr, nullptr,
      // 2 threads, against the panel kernels: w8 0.74x at 48 rows, 0.94x at 608 (the 6 x 16 float GEMM
      // tile loses to the w8 kernel here: never); w4 1.23x at 96, 1.67x at 608
      0, 96};
  return &kTable;
}

}  // namespace lp
