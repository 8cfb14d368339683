// GEMM, AMX (AMX-TILE + AMX-BF16 + AMX-INT8, AMX-FP16 where CPUID has it): the kernels of
// gemm_amx_kernels.h on the real tile instructions, and the table. bf16 runs tdpbf16ps, int8
// (plain and scaled_gemm) tdpbssd, fp16 tdpfp16ps on CPUs with AMX-FP16; float32 (and fp16
// without AMX-FP16), matrix-vector products and few rows times W^T (bf16: only where W is narrow) borrow the
// AVX-512 table's kernels, and so do int8 products with a pre-packed B and float products with a
// quantized B (gemm_int8_amx below). What each instruction computes exactly, and how that meets the
// contract: the top of gemm_amx_kernels.h and amx_tile_model.h. Also the level's peak probe
// (tdpbf16ps / tdpbssd). The automatic choice on CPUs with AMX since session 12, when these kernels first ran on
// one (a 2-core Xeon: bench/RESULTS.md). The process asks Linux for XTILEDATA permission when it
// detects AMX (cpu_features.cc); the picker gives this table only where that succeeded.
#include <cstdint>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/amx_tiles.h"
#include "cpu/gemm/gemm_amx_kernels.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

void gemm_float_amx(const GemmFloatArgs& g) {
  if (!gemm_float_amx_tiles<AmxTiles, Simd512>(g, cpu_features().amx_fp16)) gemm_kernels_avx512()->gemm_float(g);
}

// The AVX-512 few-rows kernel (x @ W^T): float32 up to kSmallMMaxRowsF32TwoFma rows (gemm.h), and bf16
// up to 8 rows where the tiles with W read in place (amx_gemm_w_rows) do not take the product (a W of
// too few row groups for the threads: 8 x 65536 -> 64 ran 0.38 ms there, 0.46 on the packed tiles).
// The tiles with W in place read W at the memory rate where this kernel was bound by its vdpbf16ps
// (session 16; it multiplies by FMAs on this Xeon since session 24) and the packed tiles by packing W on
// every call (4096 x 4096, 2 threads, 2-core Xeon: 2 / 4 / 8 / 16 / 32 rows 1.55 / 1.42 / 1.23 / 1.89 /
// 1.92x oneDNN, where this kernel (up to 8 rows) or the packed tiles ran 0.67-1.0x).
constexpr int64_t kAmxSmallMMaxRowsBf16 = 8;

bool gemm_small_m_float_amx(const GemmFloatArgs& g) {
  if (g.a.dtype == LP_DTYPE_BF16 && (g.m > kAmxSmallMMaxRowsBf16 || amx_w_rows_applies(g))) return false;
  if (g.a.dtype == LP_DTYPE_F32 && g.m > kSmallMMaxRowsF32TwoFma) return false;
  return gemm_kernels_avx512()->small_m_float(g);
}

// An int8 B pre-packed once (QuantLinear w8a8's weight) is in the AVX-512 int8 kernels' layout, in K
// blocks of the AMX depth (gemm_amx_kernels.h): from kAmxPrepackedMinRows rows the tiles read it in
// place, below the AVX-512 kernels do (a few rows stream the weight once at the memory rate either
// way). QuantLinear w8a8 4096 x 4096, 2 threads, 2-core Xeon (session 13), tiles against the AVX-512
// kernels on the same packing: 8 / 12 rows 0.9-1.0x / 0.85-0.9x, 16 rows 1.3x, 32 rows 3.4x, 128 rows
// 2.5x, 512 rows 3.3x; the AVX-512 kernels with these K blocks (1024) ran 0.9-0.94x their own deep ones.
// Products with a quantized B (QuantLinear w8 / w4, float32 activations, many rows) are the AVX-512
// kernels'.
constexpr int64_t kAmxPrepackedMinRows = 16;

void gemm_int8_amx(const GemmInt8Args& g) {
  if (!g.b_packed) return gemm_int8_amx_tiles<AmxTiles, Simd512>(g);
  if (g.m < kAmxPrepackedMinRows) return gemm_int8_prepacked_avx512_kc(g, gemm_amx_blocking(1).kc);
  gemm_int8_amx_prepacked_tiles<AmxTiles, Simd512>(g);
}
int64_t int8_packed_b_bytes_amx(int64_t k, int64_t n) {
  return int8_packed_b_bytes_avx512_kc(k, n, gemm_amx_blocking(1).kc) + kAmxPrepackedSlackBytes;
}
void int8_pack_b_amx(const GemmInt8Args& g, void* dst) { int8_pack_b_avx512_kc(g, gemm_amx_blocking(1).kc, dst); }
void gemm_float_quant_b_amx(const GemmFloatArgs& g, const GemmQuantB& qb) {
  gemm_kernels_avx512()->float_quant_b(g, qb);
}

// The microkernel's four tdp* per step on tiles loaded once (zeros), without the loads; float32
// runs the AVX-512 probe (the level's float32 kernels are AVX-512's). Returns the operations on all
// threads: a 16 x 16 x 16-dword tdp* does 16^3 * 2 bf16 or * 4 int8 multiply-adds, 2 operations each.
double gemm_peak_probe_amx(int64_t n_iters, int n_threads, int kind) {
  if (kind == LP_GEMM_PROBE_FLOAT) return gemm_peak_probe_avx512(n_iters, n_threads, kind);
  alignas(64) static const uint8_t kZeros[16 * 64] = {};
  parallel_region(n_threads, [&](int, int) {
    AmxTiles::configure(&kAmxFullTiles);
    AmxTiles::zero<0>();
    AmxTiles::zero<1>();
    AmxTiles::zero<2>();
    AmxTiles::zero<3>();
    AmxTiles::load<4>(kZeros, 64);
    AmxTiles::load<5>(kZeros, 64);
    AmxTiles::load<6>(kZeros, 64);
    AmxTiles::load<7>(kZeros, 64);
    for (int64_t it = 0; it < n_iters; ++it) {
      if (kind == LP_GEMM_PROBE_BF16) {
        AmxTiles::dp_bf16<0, 4, 6>();
        AmxTiles::dp_bf16<1, 4, 7>();
        AmxTiles::dp_bf16<2, 5, 6>();
        AmxTiles::dp_bf16<3, 5, 7>();
      } else {
        AmxTiles::dp_s8<0, 4, 6>();
        AmxTiles::dp_s8<1, 4, 7>();
        AmxTiles::dp_s8<2, 5, 6>();
        AmxTiles::dp_s8<3, 5, 7>();
      }
    }
    AmxTiles::release();
  });
  const double macs_per_dp = 16.0 * 16 * 16 * (kind == LP_GEMM_PROBE_BF16 ? 2 : 4);
  return double(n_iters) * n_threads * 4 * macs_per_dp * 2;
}

const GemmKernels kGemmAmx = {"amx",
                              LP_ISA_AMX,
                              gemm_float_amx,
                              gemm_int8_amx,
                              gemm_gemv_float_avx2,
                              gemm_small_m_float_amx,
                              gemm_packed_blocking_amx,
                              gemm_peak_probe_amx,
                              int8_packed_b_bytes_amx,
                              int8_pack_b_amx,
                              gemm_float_quant_b_amx};

}  // namespace

const GemmKernels* gemm_kernels_amx() { return &kGemmAmx; }

}  // namespace lp
