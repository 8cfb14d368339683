// Picks the reduce kernel table for the active CPU instruction set (see reduce.h).
#include "cpu/reduce/reduce.h"

#include "common/cpu_features.h"
#include "common/dtypes.h"
#include "cpu/kernel_table.h"

namespace lp {

int reduce_acc_dtype(int dtype) {
  return (dtype == LP_DTYPE_F16 || dtype == LP_DTYPE_BF16) ? int(LP_DTYPE_F32) : dtype;
}

const ReduceKernels& reduce_kernels_for(int isa) {
  return pick_kernel_table(isa, {reduce_kernels_avx2()}, reduce_kernels_scalar());
}

const ReduceKernels& reduce_kernels() { return reduce_kernels_for(cpu_isa_active()); }

}  // namespace lp
