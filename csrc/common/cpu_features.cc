#include "common/cpu_features.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define LP_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lp {
namespace {

#ifdef LP_X86
void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) { __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]); }
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux keeps AMX tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM, 5.16+).
bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  const long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return false;
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0) return false;
  return (bitmask & (1ul << XFEATURE_XTILEDATA)) != 0;
#else
  return false;
#endif
}

void read_caches(CpuFeatures& f) {
  // Deterministic cache parameters: Intel leaf 4, AMD leaf 0x8000001D (same layout).
  uint32_t r[4];
  cpuid(0x80000000u, 0, r);
  uint32_t max_ext = r[0];
  uint32_t leaf = 4;
  if (f.vendor == "AuthenticAMD") {
    if (max_ext < 0x8000001Du) return;
    leaf = 0x8000001Du;
  }
  for (uint32_t i = 0; i < 16; ++i) {
    cpuid(leaf, i, r);
    uint32_t type = r[0] & 0x1f;
    if (type == 0) break;
    uint32_t level = (r[0] >> 5) & 7;
    int64_t ways = ((r[1] >> 22) & 0x3ff) + 1, parts = ((r[1] >> 12) & 0x3ff) + 1;
    int64_t line = (r[1] & 0xfff) + 1, sets = int64_t(r[2]) + 1;
    int64_t n_bytes = ways * parts * line * sets;
    if (n_bytes <= 0) continue;
    if (level == 1 && type == 1) f.l1d_bytes = n_bytes;  // data cache
    if (level == 2 && type != 2) f.l2_bytes = n_bytes;
    if (level == 3 && type != 2) f.l3_bytes = n_bytes;
  }
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef LP_X86
  uint32_t r[4];
  cpuid(0, 0, r);
  uint32_t max_leaf = r[0];
  char vendor[13] = {0};
  std::memcpy(vendor, &r[1], 4);
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  f.vendor = vendor;
  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (uint32_t i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.brand = brand;
    f.brand.erase(0, f.brand.find_first_not_of(' '));
  }
  cpuid(1, 0, r);
  bool osxsave = (r[2] >> 27) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  bool avx = (r[2] >> 28) & 1;
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = avx && (xcr0 & 0x6) == 0x6;               // SSE + AVX state
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;     // opmask + ZMM_Hi256 + Hi16_ZMM
  bool os_tiles = (xcr0 & 0x60000) == 0x60000;         // XTILECFG + XTILEDATA
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    uint32_t max_sub = r[0];
    f.avx2 = (r[1] >> 5) & 1;
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    f.avx512_vnni = (r[2] >> 11) & 1;
    f.avx512_fp16 = (r[3] >> 23) & 1;
    f.amx_bf16 = (r[3] >> 22) & 1;
    f.amx_tile = (r[3] >> 24) & 1;
    f.amx_int8 = (r[3] >> 25) & 1;
    if (max_sub >= 1) {
      cpuid(7, 1, r);
      f.avx512_bf16 = (r[0] >> 5) & 1;
      f.amx_fp16 = (r[0] >> 21) & 1;
    }
  }
  if (f.amx_tile && os_tiles) f.os_amx = request_amx_permission();
  read_caches(f);
#endif
  return f;
}

int detect_level(const CpuFeatures& f) {
  if (!(f.os_avx && f.avx2 && f.fma && f.f16c)) return LP_ISA_SCALAR;
  if (!(f.os_avx512 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.avx512_bf16 &&
        f.avx512_vnni))
    return LP_ISA_AVX2;
  if (!(f.os_amx && f.amx_tile && f.amx_bf16 && f.amx_int8)) return LP_ISA_AVX512;
  return LP_ISA_AMX;
}

std::atomic<int> g_active{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

int cpu_isa_detected() {
  static const int level = detect_level(cpu_features());
  return level;
}

int cpu_isa_compiled() {
#if defined(LP_BUILD_AMX)
  return LP_ISA_AMX;
#elif defined(LP_BUILD_AVX512)
  return LP_ISA_AVX512;
#elif defined(LP_BUILD_AVX2)
  return LP_ISA_AVX2;
#else
  return LP_ISA_SCALAR;
#endif
}

int cpu_isa_active() {
  int a = g_active.load(std::memory_order_relaxed);
  if (a < 0) {
    a = std::min(cpu_isa_detected(), cpu_isa_compiled());
    g_active.store(a, std::memory_order_relaxed);
  }
  return a;
}

void cpu_isa_set_active(int isa) {
  int best = std::min(cpu_isa_detected(), cpu_isa_compiled());
  g_active.store(std::max(0, std::min(isa, best)), std::memory_order_relaxed);
}

const char* cpu_isa_name(int isa) { return kIsaNames[isa >= LP_ISA_SCALAR && isa <= LP_ISA_AMX ? isa : 0]; }

}  // namespace lp
