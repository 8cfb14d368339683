// GEMM, AVX2 + FMA + F16C: BLIS/GotoBLAS-style packed kernels (contract in gemm.h).
//
// This file has what is AVX2's own: two kernel sets (packing + microkernel) and the table. The
// macro-loop (units, K blocks, A / B blocks, threads), the tile epilogues, edge tiles and the scalar
// rest of packing are gemm_driver.h; the matrix-vector path is gemm_gemv_avx2.cc, the peak probe
// gemm_peak_avx2.cc.
// Register tiles are MR x NR = 6 x 16: 12 ymm accumulators (6 rows x 2 vectors of 8 columns), two
// for the B row and one for the broadcast A element.
//   float: A and B are widened to float32 while packing (16-bit products are then exact in
//          float32), accumulated with FMA. Partial sums across K blocks live in float32: in the
//          output itself when it is float32, else in a per-thread float32 workspace; the last K block
//          adds the bias and rounds once to the output dtype.
//   int8:  A and B are packed as int16 k-pairs; _mm256_madd_epi16 multiplies and adds one pair per
//          int32 lane (exact: |a0*b0 + a1*b1| <= 2^15), then a 32-bit add accumulates (exact for
//          K <= 131071). Partial sums live in the int32 output, or a per-thread int32 workspace for
//          scaled_gemm; the scaled epilogue runs in float32 without FMA contraction.
// Leftovers: rows past m and columns past n are zero in the packed panels; such edge tiles are
// computed into a local MR x NR tile and only their valid part is written (by scalar code doing the
// same float32 operations).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/dtypes.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

constexpr int64_t MR = kGemmAvx2Mr;  // 6
constexpr int64_t NR = kGemmAvx2Nr;  // 16
static_assert(MR == 6 && NR == 16, "the microkernels below are written for 6 x 16 tiles");

// 16 int8 -> 16 int16 (8 k-pairs when the bytes run along k).
static inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Broadcast of one int16 pair (32 bits) through the float broadcast, a plain load on AMD cores.
static inline __m256i bcast32(const int32_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// ---------------------------------------------------------------------------------------------
// float: f32 / f16 / bf16 widened to float32 panels (A: [k][MR], B: [k][NR]), FMA
// ---------------------------------------------------------------------------------------------
struct FloatKernel : GemmKernelSet<float, MR, NR, 1, FloatIn> {
  static constexpr bool takes(int dtype) { return dtype != LP_DTYPE_I8; }
  static constexpr double kMinFlopsPerThread = kGemmFmaMinFlopsPerThread;

  // acc(MR x NR) = prev + A_panel(MR x kc) * B_panel(kc x NR), then the tile's epilogue.
  // ap: [kc][MR] float32, bp: [kc][NR] float32 (32-byte aligned).
  static void ukernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, const GemmFloatTile& t) {
    // Partial sums of earlier K blocks (row i, half h), or zeros in the first K block.
    auto sums = [&](int64_t i, int h) { return t.prev ? Simd256::loadu(t.prev + i * t.prev_ld + 8 * h) : Simd256::zero(); };
    __m256 c00 = sums(0, 0), c01 = sums(0, 1), c10 = sums(1, 0), c11 = sums(1, 1), c20 = sums(2, 0), c21 = sums(2, 1);
    __m256 c30 = sums(3, 0), c31 = sums(3, 1), c40 = sums(4, 0), c41 = sums(4, 1), c50 = sums(5, 0), c51 = sums(5, 1);
#define LP_FMA_STEP(K)                                                                         \
    {                                                                                          \
      const __m256 b0 = _mm256_load_ps(bp + (K) * NR), b1 = _mm256_load_ps(bp + (K) * NR + 8); \
      __m256 a = _mm256_broadcast_ss(ap + (K) * MR + 0);                                       \
      c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);                    \
      a = _mm256_broadcast_ss(ap + (K) * MR + 1);                                              \
      c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);                    \
      a = _mm256_broadcast_ss(ap + (K) * MR + 2);                                              \
      c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);                    \
      a = _mm256_broadcast_ss(ap + (K) * MR + 3);                                              \
      c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);                    \
      a = _mm256_broadcast_ss(ap + (K) * MR + 4);                                              \
      c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);                    \
      a = _mm256_broadcast_ss(ap + (K) * MR + 5);                                              \
      c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);                    \
    }
    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
      LP_FMA_STEP(0) LP_FMA_STEP(1) LP_FMA_STEP(2) LP_FMA_STEP(3)
      ap += 4 * MR;
      bp += 4 * NR;
    }
    for (; k < kc; ++k) {
      LP_FMA_STEP(0)
      ap += MR;
      bp += NR;
    }
#undef LP_FMA_STEP
    const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    gemm_tile_store_outlined<Simd256>(t, acc);
  }

  // Vector packing of one full panel by layout (gemm_driver.h); each returns the k where it stopped.
  // A K-major (rows contiguous along k): load 8 k of each row, transpose, store 8 columns of the
  // panel (each store writes 8 lanes where the panel has 6; the next store overwrites the extra 2).
  template <int DT>
  static int64_t pack_a_kmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    const int64_t k_end = kc / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 6; ++i) r[i] = FloatIn<DT>::eight(s + i * ld + k);
      r[6] = r[7] = _mm256_setzero_ps();
      transpose8(r);
      for (int kk = 0; kk < 8; ++kk) _mm256_storeu_ps(d + (k + kk) * MR, r[kk]);
    }
    return k_end;
  }
  // A M-major (a transposed view): the 6 rows of one k are contiguous.
  template <int DT>
  static int64_t pack_a_mmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t i = 0; i < MR; ++i) d[k * MR + i] = FloatIn<DT>::one(s + k * ld + i);
    return kc;
  }
  // B N-major (row-major): each k row of the panel is 16 contiguous elements.
  template <int DT>
  static int64_t pack_b_nmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    for (int64_t k = 0; k < kc; ++k) {
      _mm256_store_ps(d + k * NR, FloatIn<DT>::eight(s + k * ld));
      _mm256_store_ps(d + k * NR + 8, FloatIn<DT>::eight(s + k * ld + 8));
    }
    return kc;
  }
  // B K-major (B = W^T with W row-major): two 8 x 8 transposes per 8 k.
  template <int DT>
  static int64_t pack_b_kmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    const int64_t k_end = kc / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
      for (int h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = FloatIn<DT>::eight(s + (h * 8 + j) * ld + k);
        transpose8(r);
        for (int kk = 0; kk < 8; ++kk) _mm256_store_ps(d + (k + kk) * NR + h * 8, r[kk]);
      }
    }
    return k_end;
  }
};

// ---------------------------------------------------------------------------------------------
// int8: int16 k-pairs (A: [k/2][MR][2], B: [k/2][NR][2], kc rounded up to even with a zero k),
// madd_epi16 + add_epi32
// ---------------------------------------------------------------------------------------------
struct Int8Kernel : GemmKernelSet<int16_t, MR, NR, 2> {
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_I8; }
  static constexpr double kMinFlopsPerThread = kGemmFmaMinFlopsPerThread;

  // acc(MR x NR) = prev + A_panel * B_panel; ap: [kc_even/2][MR][2] int16, bp: [kc_even/2][NR][2].
  static void ukernel(int64_t kc_even, const int16_t* __restrict ap, const int16_t* __restrict bp,
                      const GemmInt8Tile& t) {
    // Partial sums of earlier K blocks (row i, half h), or zeros in the first K block.
    auto sums = [&](int64_t i, int h) {
      return t.prev ? Simd256::loadu(t.prev + i * t.prev_ld + 8 * h) : _mm256_setzero_si256();
    };
    __m256i c00 = sums(0, 0), c01 = sums(0, 1), c10 = sums(1, 0), c11 = sums(1, 1), c20 = sums(2, 0), c21 = sums(2, 1);
    __m256i c30 = sums(3, 0), c31 = sums(3, 1), c40 = sums(4, 0), c41 = sums(4, 1), c50 = sums(5, 0), c51 = sums(5, 1);
    const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
    const __m256i* b256 = reinterpret_cast<const __m256i*>(bp);
#define LP_MADD_STEP(P)                                                                                             \
    {                                                                                                               \
      const __m256i b0 = _mm256_load_si256(b256 + 2 * (P)), b1 = _mm256_load_si256(b256 + 2 * (P) + 1);             \
      __m256i a = bcast32(a32 + (P) * MR + 0);                                                                      \
      c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, b0)), c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, b1)); \
      a = bcast32(a32 + (P) * MR + 1);                                                                              \
      c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, b0)), c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, b1)); \
      a = bcast32(a32 + (P) * MR + 2);                                                                              \
      c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, b0)), c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, b1)); \
      a = bcast32(a32 + (P) * MR + 3);                                                                              \
      c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(a, b0)), c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(a, b1)); \
      a = bcast32(a32 + (P) * MR + 4);                                                                              \
      c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(a, b0)), c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(a, b1)); \
      a = bcast32(a32 + (P) * MR + 5);                                                                              \
      c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(a, b0)), c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(a, b1)); \
    }
    // One k-pair per iteration, the accumulators pinned to registers after each: integer adds are
    // associative, and left alone the compiler regroups them across steps and spills accumulators.
    const int64_t n_pairs = kc_even / 2;
    for (int64_t p = 0; p < n_pairs; ++p) {
      LP_MADD_STEP(0)
      __asm__("" : "+x"(c00), "+x"(c01), "+x"(c10), "+x"(c11), "+x"(c20), "+x"(c21));
      __asm__("" : "+x"(c30), "+x"(c31), "+x"(c40), "+x"(c41), "+x"(c50), "+x"(c51));
      a32 += MR;
      b256 += 2;
    }
#undef LP_MADD_STEP
    const __m256i acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    gemm_tile_store_outlined<Simd256>(t, acc);
  }

  // A K-major: 16 k of each row = 8 pairs as 32-bit lanes; transpose 8 x 8 lanes (rows 6, 7 are
  // padding) and store 8 pair-columns of 6 rows, each store spilling 2 lanes the next one overwrites.
  template <int DT>
  static int64_t pack_a_kmajor(const int8_t* s, int64_t ld, int64_t kc, int16_t* d) {
    const int64_t k_end = kc / 16 * 16;
    for (int64_t k = 0; k < k_end; k += 16) {
      __m256 r[8];
      for (int i = 0; i < 6; ++i) r[i] = _mm256_castsi256_ps(widen16(s + i * ld + k));
      r[6] = r[7] = _mm256_setzero_ps();
      transpose8(r);
      for (int kp = 0; kp < 8; ++kp) _mm256_storeu_ps(reinterpret_cast<float*>(d + (k / 2 + kp) * 2 * MR), r[kp]);
    }
    return k_end;
  }
  // B N-major: interleave rows k and k+1 byte by byte, widen.
  template <int DT>
  static int64_t pack_b_nmajor(const int8_t* s, int64_t ld, int64_t kc, int16_t* d) {
    const int64_t k_end = kc / 2 * 2;
    for (int64_t k = 0; k < k_end; k += 2) {
      __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k * ld));
      __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + (k + 1) * ld));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + k * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + k * NR + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
    }
    return k_end;
  }
  // B K-major: a column's k-pairs are adjacent bytes; two 8 x 8 transposes of pairs per 16 k.
  template <int DT>
  static int64_t pack_b_kmajor(const int8_t* s, int64_t ld, int64_t kc, int16_t* d) {
    const int64_t k_end = kc / 16 * 16;
    for (int64_t k = 0; k < k_end; k += 16) {
      for (int h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_castsi256_ps(widen16(s + (h * 8 + j) * ld + k));
        transpose8(r);
        for (int kp = 0; kp < 8; ++kp) _mm256_store_ps(reinterpret_cast<float*>(d + (k + 2 * kp) * NR + h * 16), r[kp]);
      }
    }
    return k_end;
  }
};

GemmBlocking gemm_blocking_avx2(bool is_int8) { return gemm_blocking(MR, NR, is_int8 ? 2 : 4); }
GemmBlocking gemm_packed_blocking_avx2(bool is_int8, int64_t /* rows */) { return gemm_blocking_avx2(is_int8); }
void gemm_float_avx2(const GemmFloatArgs& g) { gemm_packed<FloatKernel>(g, gemm_blocking_avx2(false)); }
void gemm_int8_avx2(const GemmInt8Args& g) {
  // Few rows on the matrix-vector path: over these packed kernels, 2 threads, AMX Xeon at this level:
  // 4096 x 4096 at 1 / 4 / 8 / 12 / 16 rows 5.27 / 2.26 / 1.64 / 1.21 / 1.13x, 1024 x 1024 at 8 / 16
  // rows 1.46 / 0.99x; n == 1 (4096 x 4096) 7.8x.
  if (gemm_gemv_int8_takes(g)) return gemm_gemv_int8_avx2(g);
  gemm_packed<Int8Kernel>(g, gemm_blocking_avx2(true));
}
int64_t int8_packed_b_bytes_avx2(int64_t k, int64_t n) {
  return gemm_prepacked_b_bytes<Int8Kernel>(k, n, gemm_blocking_avx2(true));
}
void int8_pack_b_avx2(const GemmInt8Args& g, void* dst) { gemm_prepack_b<Int8Kernel>(g, gemm_blocking_avx2(true), dst); }
void gemm_float_quant_b_avx2(const GemmFloatArgs& g, const GemmQuantB& qb) {
  gemm_packed_quant_b<FloatKernel>(g, qb, gemm_blocking_avx2(false));
}

const GemmKernels kGemmAvx2 = {"avx2", LP_ISA_AVX2, gemm_float_avx2, gemm_int8_avx2, gemm_gemv_float_avx2,
                               nullptr /* small_m_float */, gemm_packed_blocking_avx2, gemm_peak_probe_avx2,
                               int8_packed_b_bytes_avx2, int8_pack_b_avx2, gemm_float_quant_b_avx2};

}  // namespace

const GemmKernels* gemm_kernels_avx2() { return &kGemmAvx2; }

}  // namespace lp
