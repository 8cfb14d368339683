// GEMM entry points: cache blocking from the detected caches, the kernel table picker, and the routing
// of a call through the table (which path takes which shape).
#include "cpu/gemm/gemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <initializer_list>
#include <thread>

#include "common/cpu_features.h"
#include "cpu/kernel_table.h"

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

const GemmKernels& gemm_kernels_for(int isa) {
  return pick_kernel_table(isa, {gemm_kernels_amx(), gemm_kernels_avx512(), gemm_kernels_avx2()},
                           gemm_kernels_scalar());
}

namespace {
std::atomic<const GemmKernels*> g_testing_table{nullptr};
}  // namespace

void gemm_set_testing_table(const GemmKernels* t) { g_testing_table.store(t, std::memory_order_relaxed); }

namespace {
std::atomic<int64_t> g_share_delay_us{0}, g_share_taken{0};
}  // namespace

int64_t gemm_share_testing(int64_t delay_us) {
  g_share_delay_us.store(delay_us, std::memory_order_relaxed);
  return g_share_taken.exchange(0, std::memory_order_relaxed);
}
void gemm_share_test_delay() {
  const int64_t us = g_share_delay_us.load(std::memory_order_relaxed);
  if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
}
void gemm_share_count_taken() { g_share_taken.fetch_add(1, std::memory_order_relaxed); }

const GemmKernels& gemm_kernels() {
  const GemmKernels* t = g_testing_table.load(std::memory_order_relaxed);
  return t ? *t : gemm_kernels_for(cpu_isa_active());
}

GemmBlocking gemm_packed_blocking(bool is_int8, int64_t rows) {
  const GemmKernels& kern = gemm_kernels();
  return kern.blocking ? kern.blocking(is_int8, rows) : gemm_blocking(kGemmAvx2Mr, kGemmAvx2Nr, is_int8 ? 2 : 4);
}

void gemm_float(const GemmFloatArgs& args) {
  if (args.m <= 0 || args.n <= 0 || args.n_batch <= 0) return;
  if (args.k <= 0) return gemm_float_scalar(args);  // an empty sum: zeros plus bias
  const GemmKernels& kern = gemm_kernels();
  if (kern.gemv_float && gemm_gemv_takes(args, !kern.small_m_float)) return kern.gemv_float(args);
  if (kern.small_m_float && kern.small_m_float(args)) return;
  kern.gemm_float(args);
}

void gemm_int8(const GemmInt8Args& args) {
  if (args.m <= 0 || args.n <= 0 || args.n_batch <= 0) return;
  if (args.k <= 0) return gemm_int8_scalar(args);  // zeros (scaled_gemm: the bias)
  gemm_kernels().gemm_int8(args);
}

int64_t gemm_int8_packed_b_bytes(int64_t k, int64_t n) {
  const GemmKernels& kern = gemm_kernels();
  return kern.int8_pack_b && k > 0 && n > 0 ? kern.int8_packed_b_bytes(k, n) : 0;
}

void gemm_int8_pack_b(const GemmInt8Args& args, void* dst) { gemm_kernels().int8_pack_b(args, dst); }

}  // namespace lp
