// GEMM entry points: cache blocking from the detected caches, and the per-ISA kernel choice.
#include "cpu/gemm/gemm.h"

#include <algorithm>

#include "common/cpu_features.h"

namespace lp {

GemmBlocking gemm_blocking(int64_t mr, int64_t nr, int64_t elem_bytes, int64_t l1_share) {
  const CpuFeatures& f = cpu_features();
  GemmBlocking b;
  b.mr = mr;
  b.nr = nr;
  // A kc x nr micro-panel of B stays in L1d while the A micro-panels stream past it; half of L1d
  // (l1_share 2) leaves room for the A micro-panel and the output tile.
  int64_t kc = (f.l1d_bytes / l1_share) / (nr * elem_bytes);
  b.kc = std::max<int64_t>(64, std::min<int64_t>(1024, kc / 16 * 16));
  // The packed mc x kc block of A lives in L2 (half of it, B's micro-panel streams through too).
  int64_t mc = (f.l2_bytes / 2) / (b.kc * elem_bytes);
  b.mc = std::max<int64_t>(mr, std::min<int64_t>(1020, mc / mr * mr));
  // The packed kc x nc block of B is read from L3 once per A block; a quarter of L3 leaves room for
  // the other core's block and the output.
  int64_t nc = (f.l3_bytes / 4) / (b.kc * elem_bytes);
  b.nc = std::max<int64_t>(nr * 4, std::min<int64_t>(4096, nc / nr * nr));
  return b;
}

GemmBlocking gemm_packed_blocking(bool is_int8) {
#ifdef LP_BUILD_AVX512
  if (cpu_isa_active() >= LP_ISA_AVX512) return gemm_blocking_avx512(is_int8 ? 1 : 4);
#endif
  return gemm_blocking(kGemmAvx2Mr, kGemmAvx2Nr, is_int8 ? 2 : 4);
}

void gemm_float(const GemmFloatArgs& args) {
#ifdef LP_BUILD_AVX512
  if (cpu_isa_active() >= LP_ISA_AVX512) return gemm_float_avx512(args);  // the amx level too
#endif
#ifdef LP_BUILD_AVX2
  if (cpu_isa_active() >= LP_ISA_AVX2) return gemm_float_avx2(args);
#endif
  gemm_float_scalar(args);
}

void gemm_int8(const GemmInt8Args& args) {
#ifdef LP_BUILD_AVX512
  if (cpu_isa_active() >= LP_ISA_AVX512) return gemm_int8_avx512(args);
#endif
#ifdef LP_BUILD_AVX2
  if (cpu_isa_active() >= LP_ISA_AVX2) return gemm_int8_avx2(args);
#endif
  gemm_int8_scalar(args);
}

}  // namespace lp
