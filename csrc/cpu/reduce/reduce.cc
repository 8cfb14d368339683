// Picks the reduce kernel table for the active CPU instruction set (see reduce.h).
#include "cpu/reduce/reduce.h"

#include "common/cpu_features.h"
#include "common/dtypes.h"

namespace lp {

int reduce_acc_dtype(int dtype) {
  return (dtype == LP_DTYPE_F16 || dtype == LP_DTYPE_BF16) ? int(LP_DTYPE_F32) : dtype;
}

#ifndef LP_BUILD_AVX2
const ReduceKernels* reduce_kernels_avx2() { return nullptr; }
#endif

const ReduceKernels& reduce_kernels_for(int isa) {
  // avx512 and amx CPUs all have AVX2: they run the AVX2 kernels.
  if (isa >= LP_ISA_AVX2 && cpu_isa_detected() >= LP_ISA_AVX2) {
    if (const ReduceKernels* k = reduce_kernels_avx2()) return *k;
  }
  return reduce_kernels_scalar();
}

const ReduceKernels& reduce_kernels() { return reduce_kernels_for(cpu_isa_active()); }

}  // namespace lp
