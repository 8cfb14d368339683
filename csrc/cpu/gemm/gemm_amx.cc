// GEMM, AMX (AMX-TILE + AMX-BF16 + AMX-INT8, AMX-FP16 where CPUID has it): the kernels of
// gemm_amx_kernels.h on the real tile instructions, and the table. bf16 runs tdpbf16ps, int8
// (plain and scaled_gemm) tdpbssd, fp16 tdpfp16ps on CPUs with AMX-FP16; float32 (and fp16
// without AMX-FP16), matrix-vector products and few rows times W^T (bf16: up to 8) borrow the
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
#include "cpu/gemm/gemm_amx_kernels.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

// The tile instructions as inline assembly (GCC 12's intrinsics take tile numbers as macro tokens
// and tell the compiler neither what tileloadd reads nor all of what ldtilecfg reads): every load
// and store is a compiler memory barrier, ldtilecfg reads its whole 64-byte operand.
struct AmxTiles {
  static void configure(const AmxTileConfig* c) { asm volatile("ldtilecfg %0" ::"m"(*c)); }
  static void release() { asm volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void load_t1(const void* p, int64_t stride) {
    asm volatile("tileloaddt1 (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>
  static void dp_bf16() {
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  template <int C, int A, int B>
  static void dp_s8() {
    asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  // 16 x 16 dwords: dst row q, dword p = src row p, dword q (unpacks of dwords and qwords, then two
  // rounds of 128-bit lane shuffles).
  static void transpose_dwords_16x16(const void* src, int64_t src_stride, void* dst, int64_t dst_stride) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(static_cast<const char*>(src) + i * src_stride);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
      for (int i = 0; i < 4; ++i) {
        t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
        t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
      }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(static_cast<char*>(dst) + i * dst_stride, r[i]);
  }
  // 32 rows x 32 k of 16-bit values, m-major source: k rows 2p and 2p + 1 interleaved into the dwords
  // of pair p for all 32 rows, then those 16 x 32 dwords transposed into the rows.
  static void pairs_32x32(const uint16_t* src, int64_t k_stride, uint16_t* dst) {
    alignas(64) uint32_t pairs[16 * 32];
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                        5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int p = 0; p < 16; ++p) {
      const __m512i a = _mm512_loadu_si512(src + 2 * p * k_stride);
      const __m512i b = _mm512_loadu_si512(src + (2 * p + 1) * k_stride);
      _mm512_store_si512(pairs + p * 32, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(pairs + p * 32 + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
    transpose_dwords_16x16(pairs, 128, dst, 64);
    transpose_dwords_16x16(pairs + 16, 128, dst + 16 * 32, 64);
  }
  // tdpfp16ps tmmC, tmmA, tmmB as bytes (no GCC 12 intrinsic; assemblers before binutils 2.40 lack the
  // mnemonic): VEX.128.F2.0F38.W0 5C /r, vvvv = ~B, ModRM = 11 C A.
  template <int C, int A, int B>
  static void dp_fp16() {
    asm volatile(".byte 0xc4, 0xe2, %c0, 0x5c, %c1" ::"i"(((~B & 15) << 3) | 3), "i"(0xc0 | (C << 3) | A));
  }
};

void gemm_float_amx(const GemmFloatArgs& g) {
  if (!gemm_float_amx_tiles<AmxTiles, Simd512>(g, cpu_features().amx_fp16)) gemm_kernels_avx512()->gemm_float(g);
}

// The AVX-512 few-rows kernel (x @ W^T, up to 48 rows) for bf16 only up to 8 rows: beyond, its
// vdpbf16ps is the bound (215 GFLOP/s on the 2-core Xeon), and the tiles with W^T packed by the dword
// transposes run 32 x 4096 x 4096 in 1.8 ms where it took 5.6 (4096 x 4096, 2 threads: 12 rows 1.7x,
// 16 rows 1.5x; 2-8 rows within noise, both reading W at the copy rate).
constexpr int64_t kAmxSmallMMaxRowsBf16 = 8;

bool gemm_small_m_float_amx(const GemmFloatArgs& g) {
  if (g.a.dtype == LP_DTYPE_BF16 && g.m > kAmxSmallMMaxRowsBf16) return false;
  return gemm_kernels_avx512()->small_m_float(g);
}

// An int8 B pre-packed once (QuantLinear w8a8's weight) is in the AVX-512 kernels' layout, and those
// kernels run it: with no pre-packed B of its own, the AMX path packed the whole weight in every call
// (a 1-row w8a8 4096 x 4096 product 4x slower than at the avx512 level). So do the products with a
// quantized B (QuantLinear w8 / w4 with many rows).
void gemm_int8_amx(const GemmInt8Args& g) {
  if (g.b_packed) return gemm_kernels_avx512()->gemm_int8(g);
  gemm_int8_amx_tiles<AmxTiles, Simd512>(g);
}
int64_t int8_packed_b_bytes_amx(int64_t k, int64_t n) { return gemm_kernels_avx512()->int8_packed_b_bytes(k, n); }
void int8_pack_b_amx(const GemmInt8Args& g, void* dst) { gemm_kernels_avx512()->int8_pack_b(g, dst); }
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
    AmxTiles::configure(&kAmxGemmConfig);
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
