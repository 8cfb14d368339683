// The per-ISA table accessors of a build that leaves an ISA out (-DLEPTON_MAX_ISA, or a non-x86
// target): they return null, and the pickers of kernel_table.h skip them. One place for every family.
#include "cpu/gemm/gemm.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/quant/quant.h"
#include "cpu/reduce/reduce.h"

namespace lp {

#ifndef LP_BUILD_AVX2
const GemmKernels* gemm_kernels_avx2() { return nullptr; }
const QuantKernels* quant_kernels_avx2() { return nullptr; }
const QLinearKernels* qlinear_kernels_avx2() { return nullptr; }
const ReduceKernels* reduce_kernels_avx2() { return nullptr; }
const GemmKernels* gemm_kernels_amx_model() { return nullptr; }
const QLinearKernels* qlinear_kernels_amx_model() { return nullptr; }
std::string gemm_amx_model_exec(const std::string&, const std::vector<int64_t>&) {
  return "the AMX tile model is not built (it needs the avx2 level)";
}
#endif
#ifndef LP_BUILD_AVX512
const GemmKernels* gemm_kernels_avx512() { return nullptr; }
const GemmKernels* gemm_kernels_avx512_other() { return nullptr; }
const QLinearKernels* qlinear_kernels_avx512() { return nullptr; }
#endif
#ifndef LP_BUILD_AMX
const GemmKernels* gemm_kernels_amx() { return nullptr; }
const QLinearKernels* qlinear_kernels_amx() { return nullptr; }
#endif

}  // namespace lp
