// Weight-quantized linear, AVX-512: the panel kernels of qlinear_kernel.h on 16-lane registers, the
// whole 32-column panel at once (2 vectors). Register budget (32 zmm): w8 12 rows x 2 accumulators + 2
// widened code vectors + the broadcast; w4 6 rows x 2 x (group sum + total) + 4 code vectors + 2
// broadcasts.
#include "common/codes.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_kernel.h"
#include "cpu/simd256.h"
#include "cpu/simd512.h"

namespace lp {

// The table (its kernels are instances over this file's vector type, which has internal linkage).
const QLinearKernels* qlinear_kernels_avx512() {
  static const QLinearKernels kTable = {"avx512", LP_ISA_AVX512, qlinear_w8_panels<Simd512, 12, 2>, qlinear_w4_panels<Simd512, 6, 2>};
  return &kTable;
}

}  // namespace lp
