// CPU instruction-set detection (CPUID + OS support) and the process-wide ISA choice.
#pragma once
#include <cstdint>
#include <string>

#include "common/codes.h"

namespace lp {


struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx512_fp16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false, amx_fp16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 state + AMX permission
  int64_t l1d_bytes = 32 << 10, l2_bytes = 1 << 20, l3_bytes = 8 << 20;  // per core / shared
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();   // detected once
int cpu_isa_detected();              // the best level this CPU and OS support
int cpu_isa_compiled();              // the best level whose kernels this build contains
int cpu_isa_active();                // what kernels dispatch on now (automatic: min(detected, compiled))
void cpu_isa_set_active(int isa);    // capped at min(detected, compiled)
const char* cpu_isa_name(int isa);

}  // namespace lp
