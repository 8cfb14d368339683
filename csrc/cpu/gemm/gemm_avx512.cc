// GEMM, AVX-512 (F / BW / DQ / VL + BF16 + VNNI): packed kernels on a 12 x 32 register tile
// (contract in gemm.h). This file has what is AVX-512's own: three kernel sets (packing +
// microkernel) and the table. The macro-loop over units, K blocks and A / B blocks, the tile
// epilogues, edge tiles and the scalar rest of packing are gemm_driver.h. Other paths of the AVX-512 table: matrix-vector products (m == 1 or
// n == 1) are memory-bound and use the AVX2 matrix-vector path (gemm_gemv_avx2.cc); a few rows times
// a transposed weight skip packing (gemm_small_m_avx512.cc); the peak probe is gemm_peak_avx512.cc.
//
// Register tile MR x NR = 12 x 32: 24 zmm accumulators (12 rows x 2 vectors of 16 columns), two for
// the B row and one for the broadcast A value. Per input dtype:
//   float32 / float16: widened to float32 while packing (products exact), vfmadd231ps. The CPUs this
//            level targets need not have AVX512-FP16, so float16 is not multiplied natively.
//   bfloat16: packed as k-pairs (A: [k/2][MR][2], B: [k/2][NR][2]); vdpbf16ps adds both products of
//            a pair to a float32 lane. Each bf16 x bf16 product is exact in float32, so this is a
//            float32 accumulation as the contract asks; the instruction treats bf16 subnormal
//            inputs as zero and flushes subnormal results, which moves a result by less than 2^-126.
//            On a CPU whose vdpbf16ps gives fewer flops than its FMA (the AMX Xeons), the level's
//            other table widens bf16 to float32 like float16 instead (kGemmAvx512Bf16Fma below).
//   int8:    packed as k-quads (A: [k/4][MR][4], B: [k/4][NR][4]); vpdpbusd multiplies unsigned by
//            signed bytes, so A is stored as a + 128 (a ^ 0x80) and sum_k (a + 128) b = sum_k a b +
//            128 sum_k b: every B panel carries 128 * its column sums over the K block, subtracted
//            once. The instruction wraps modulo 2^32, and the final int32 is the exact sum (it fits:
//            |a b| <= 2^14 and K <= 131071), so intermediate wrap-around is harmless.
// Partial sums across K blocks: float32 in the output when it is float32, else a per-thread
// workspace; int32 in the plain int8 output or a workspace for scaled_gemm. The last K block adds the
// bias and rounds once; scaled_gemm's epilogue runs (float(acc) * sa) * sb + bias without FMA
// contraction.
// Leftovers: rows past m, columns past n and k past K are zero in the packed panels (A's k padding
// is a zero byte, not 0 ^ 0x80, so it adds nothing). A last row tile of full width is computed in
// place on 4, 8 or 12 rows (ukernel_rows); other edge tiles go through a local tile (gemm_edge_tile
// in gemm_driver.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_features.h"
#include "common/dtypes.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/simd256.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

constexpr int64_t MR = kGemmAvx512Mr;  // 12
constexpr int64_t NR = kGemmAvx512Nr;  // 32
static_assert(MR == 12 && NR == 32, "the packing and microkernels below are written for 12 x 32 tiles");

static inline __m256 load8_u32(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }

// 12 lines (rows of A) of 8 32-bit units each, starting at line0 with line_bytes between lines, stored
// transposed as 8 groups of 12 units: dst[u * 12 + line]. xf transforms each 8-unit load.
template <class Xform>
static inline void pack12_transposed(const char* line0, int64_t line_bytes, float* dst, const Xform& xf) {
  __m256 r[8], q[8];
  for (int i = 0; i < 8; ++i) r[i] = xf(load8_u32(line0 + i * line_bytes));
  for (int i = 0; i < 4; ++i) q[i] = xf(load8_u32(line0 + (8 + i) * line_bytes));
  q[4] = q[5] = q[6] = q[7] = _mm256_setzero_ps();
  transpose8(r);
  transpose8(q);
  for (int u = 0; u < 8; ++u) {
    _mm256_storeu_ps(dst + u * 12, r[u]);
    _mm_storeu_ps(dst + u * 12 + 8, _mm256_castps256_ps128(q[u]));
  }
}

// 32 lines (columns of B) of 8 32-bit units each -> dst[u * 32 + line] (64-byte aligned dst).
static inline void pack32_transposed(const char* line0, int64_t line_bytes, float* dst) {
  for (int h = 0; h < 4; ++h) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = load8_u32(line0 + (h * 8 + j) * line_bytes);
    transpose8(r);
    for (int u = 0; u < 8; ++u) _mm256_store_ps(dst + u * 32 + h * 8, r[u]);
  }
}

// The partial sums of earlier K blocks in a tile (row i, half h), or zeros in its first K block.
static inline __m512 tile_sums(const GemmFloatTile& t, int64_t i, int h) {
  return t.prev ? _mm512_loadu_ps(t.prev + i * t.prev_ld + 16 * h) : _mm512_setzero_ps();
}
static inline __m512i tile_sums(const GemmInt8Tile& t, int64_t i, int h) {
  return t.prev ? _mm512_loadu_si512(t.prev + i * t.prev_ld + 16 * h) : _mm512_setzero_si512();
}

// The 12 x 32 microkernel of every kernel set K, one full tile, or the first R rows of one (R = 4, 8:
// the last row tile of a product whose rows are not a multiple of 12, e.g. 32 = 12 + 12 + 8 tokens,
// computes R rows instead of 12, of which `rows` are written): accumulators from start(i, h) (row i,
// half h), then one step per packed k-group: B's two vectors of the group (K::load_b), and for each
// row the row's 32-bit group of A broadcast (K::bcast_a) and multiply-added (K::madd); then the
// tile's epilogue. ap: [kc_panel / G][MR][G], bp: [kc_panel / G][NR][G] (G = K::kKGroup, 64-byte
// aligned). The 24 accumulators are named variables (c<row>_<half>) written out by the LP_ROWS
// macros: an array of vectors whose address escapes to a helper is kept in memory by the compiler,
// and every step would then store and reload all 24.
template <class K, int64_t R, class Tile, class Start>
static inline void ukernel_12x32(int64_t kc_panel, const typename K::Packed* __restrict ap,
                                 const typename K::Packed* __restrict bp, const Tile& t, const Start& start,
                                 int64_t rows) {
  static_assert(R >= 1 && R <= MR, "R rows of a 12-row tile");
  constexpr int64_t G = K::kKGroup;
#define LP_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LP_START(i)                                                                         \
  typename K::Acc c##i##_0{}, c##i##_1{};                                                   \
  if ((i) < R && (i) < rows) c##i##_0 = start(i, 0), c##i##_1 = start(i, 1);
#define LP_STEP(i)                                  \
  if constexpr ((i) < R) {                          \
    const auto a = K::bcast_a(ap + i * G);          \
    c##i##_0 = K::madd(c##i##_0, a, b0);            \
    c##i##_1 = K::madd(c##i##_1, a, b1);            \
  }
#define LP_GATHER(i) {c##i##_0, c##i##_1},
  LP_ROWS(LP_START)
  for (int64_t q = 0; q < kc_panel / G; ++q) {
    const auto b0 = K::load_b(bp), b1 = K::load_b(bp + 16 * G);
    if constexpr (K::kPrefetchBSteps > 0) {  // the B row (2 lines) that many steps ahead, into L1
      const char* pb = reinterpret_cast<const char*>(bp + K::kPrefetchBSteps * NR * G);
      _mm_prefetch(pb, _MM_HINT_T0);
      _mm_prefetch(pb + 64, _MM_HINT_T0);
    }
    LP_ROWS(LP_STEP)
    ap += MR * G;
    bp += NR * G;
  }
  const typename K::Acc c[MR][2] = {LP_ROWS(LP_GATHER)};
#undef LP_GATHER
#undef LP_STEP
#undef LP_START
#undef LP_ROWS
  gemm_tile_store<Simd512, R>(t, c, rows);
}

// What each kernel set's ukernel / ukernel_rows share: the row bound R for `rows` (4, 8 or 12).
template <class K, class Tile, class Start>
static inline void ukernel_rows_12x32(int64_t kc_panel, const typename K::Packed* __restrict ap,
                                      const typename K::Packed* __restrict bp, const Tile& t, const Start& start,
                                      int64_t rows) {
  if (rows <= 4) return ukernel_12x32<K, 4>(kc_panel, ap, bp, t, start, rows);
  if (rows <= 8) return ukernel_12x32<K, 8>(kc_panel, ap, bp, t, start, rows);
  ukernel_12x32<K, MR>(kc_panel, ap, bp, t, start, rows);
}

// ---------------------------------------------------------------------------------------------
// float32 / float16 (and bf16 where the CPU's FMA outruns its vdpbf16ps): widened to float32 panels
// (A: [k][MR], B: [k][NR]), vfmadd231ps
// ---------------------------------------------------------------------------------------------
struct FloatKernel : GemmKernelSet<float, MR, NR, 1, FloatIn> {
  // bf16 only in the table that multiplies bf16 by FMA (kGemmAvx512Bf16Fma below).
  static constexpr bool takes(int dtype) {
    return dtype == LP_DTYPE_F32 || dtype == LP_DTYPE_F16 || dtype == LP_DTYPE_BF16;
  }
  static constexpr double kMinFlopsPerThread = kGemmFmaMinFlopsPerThread;
  // The microkernel prefetches the B row this many k steps ahead (1.5 KiB): the deep kc's B panel
  // streams from L2. On the 2-core AMX Xeon, 2 threads: 1024^3 7.6 -> 7.2 ms, 2048^3 60.6 -> 56.1,
  // 4096^3 472 -> 439; 1 thread 2048^3 123 -> 110 (8, 12 and 24 steps alike, 4 less). Not measured
  // on Zen 4, which had no such gap (float32 1.15-1.34x oneDNN there). bf16 / int8: none (this CPU's
  // vdpbf16ps-bound bf16 showed nothing either way).
  static constexpr int64_t kPrefetchBSteps = 12;

  // vfmadd231ps on float32 panels.
  using Acc = __m512;
  static __m512 load_b(const float* p) { return _mm512_load_ps(p); }
  static __m512 bcast_a(const float* p) { return _mm512_set1_ps(*p); }
  static __m512 madd(__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, c); }
  static void ukernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, const GemmFloatTile& t) {
    ukernel_12x32<FloatKernel, MR>(kc, ap, bp, t, [&](int64_t i, int h) { return tile_sums(t, i, h); }, MR);
  }
  static constexpr bool kRowsKernel = true;
  // Measured on Zen 4 (bf16 / float32 1024 x 4096 x 256 g^T @ x: 3-8%); not on int8's k-quads, nor
  // on AVX2 (its 6-row panels: 10-30% slower).
  static constexpr bool kPackAByKChunks = true;
  static constexpr bool kStreamOutput = true;
  static void ukernel_rows(int64_t kc, const float* __restrict ap, const float* __restrict bp, const GemmFloatTile& t,
                           int64_t rows) {
    ukernel_rows_12x32<FloatKernel>(kc, ap, bp, t, [&](int64_t i, int h) { return tile_sums(t, i, h); }, rows);
  }

  // Vector packing of one full panel by layout (gemm_driver.h); each returns the k where it stopped.
  // A K-major: 12 rows x 8 k transposed per step (float16 widened to float32 first).
  template <int DT>
  static int64_t pack_a_kmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    const int64_t k_end = kc / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
      if (DT == LP_DTYPE_F32) {
        pack12_transposed(reinterpret_cast<const char*>(s + k), ld * 4, d + k * MR, [](__m256 v) { return v; });
      } else {
        alignas(32) float rows_f32[MR * 8];
        for (int64_t i = 0; i < MR; ++i) _mm256_store_ps(rows_f32 + i * 8, FloatIn<DT>::eight(s + i * ld + k));
        pack12_transposed(reinterpret_cast<const char*>(rows_f32), 32, d + k * MR, [](__m256 v) { return v; });
      }
    }
    return k_end;
  }
  // A M-major: the 12 rows of one k are contiguous, one masked load each.
  template <int DT>
  static int64_t pack_a_mmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    for (int64_t k = 0; k < kc; ++k) {
      __m512 v;
      if constexpr (DT == LP_DTYPE_F32) {
        v = _mm512_maskz_loadu_ps(0x0fff, s + k * ld);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(0x0fff, s + k * ld);
        v = DT == LP_DTYPE_F16 ? _mm512_cvtph_ps(h)
                               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      _mm512_mask_storeu_ps(d + k * MR, 0x0fff, v);
    }
    return kc;
  }
  // B N-major (row-major): each k row of the panel is 32 contiguous elements.
  template <int DT>
  static int64_t pack_b_nmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    for (int64_t k = 0; k < kc; ++k)
      for (int h = 0; h < 4; ++h) _mm256_store_ps(d + k * NR + h * 8, FloatIn<DT>::eight(s + k * ld + h * 8));
    return kc;
  }
  // B K-major (B = W^T with W row-major): 32 columns x 8 k transposed per step.
  template <int DT>
  static int64_t pack_b_kmajor(const GemmElem<DT>* s, int64_t ld, int64_t kc, float* d) {
    const int64_t k_end = kc / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
      if (DT == LP_DTYPE_F32) {
        pack32_transposed(reinterpret_cast<const char*>(s + k), ld * 4, d + k * NR);
      } else {
        alignas(32) float cols_f32[NR * 8];
        for (int64_t j = 0; j < NR; ++j) _mm256_store_ps(cols_f32 + j * 8, FloatIn<DT>::eight(s + j * ld + k));
        pack32_transposed(reinterpret_cast<const char*>(cols_f32), 32, d + k * NR);
      }
    }
    return k_end;
  }
};

// ---------------------------------------------------------------------------------------------
// bfloat16: k-pairs (A: [k/2][MR][2], B: [k/2][NR][2], kc rounded up to even with a zero k), vdpbf16ps
// ---------------------------------------------------------------------------------------------
struct Bf16Kernel : GemmKernelSet<uint16_t, MR, NR, 2> {
  static constexpr int64_t kPrefetchBSteps = 0;  // see FloatKernel
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_BF16; }
  static constexpr double kMinFlopsPerThread = kGemmFmaMinFlopsPerThread;

  // vdpbf16ps: both products of a k-pair added to a float32 lane.
  using Acc = __m512;
  static __m512bh load_b(const uint16_t* p) { return (__m512bh)_mm512_load_si512(p); }
  static __m512bh bcast_a(const uint16_t* p) { return (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
  static __m512 madd(__m512 c, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(c, a, b); }
  static void ukernel(int64_t kc2, const uint16_t* __restrict ap, const uint16_t* __restrict bp,
                      const GemmFloatTile& t) {
    ukernel_12x32<Bf16Kernel, MR>(kc2, ap, bp, t, [&](int64_t i, int h) { return tile_sums(t, i, h); }, MR);
  }
  static constexpr bool kRowsKernel = true;
  static constexpr bool kPackAByKChunks = true;
  static constexpr bool kStreamOutput = true;
  static void ukernel_rows(int64_t kc2, const uint16_t* __restrict ap, const uint16_t* __restrict bp,
                           const GemmFloatTile& t, int64_t rows) {
    ukernel_rows_12x32<Bf16Kernel>(kc2, ap, bp, t, [&](int64_t i, int h) { return tile_sums(t, i, h); }, rows);
  }

  // A K-major: a pair is 32 contiguous bits of a row, 8 pairs of 12 rows transposed per step.
  template <int DT>
  static int64_t pack_a_kmajor(const uint16_t* s, int64_t ld, int64_t kc, uint16_t* d) {
    const int64_t k_end = kc / 16 * 16;
    for (int64_t k = 0; k < k_end; k += 16)
      pack12_transposed(reinterpret_cast<const char*>(s + k), ld * 2, reinterpret_cast<float*>(d + k * MR),
                        [](__m256 v) { return v; });
    return k_end;
  }
  // A M-major: interleave the 12 contiguous rows of k and k + 1.
  template <int DT>
  static int64_t pack_a_mmajor(const uint16_t* s, int64_t ld, int64_t kc, uint16_t* d) {
    const int64_t k_end = kc / 2 * 2;
    for (int64_t k = 0; k < k_end; k += 2) {
      const __m256i lo = _mm256_maskz_loadu_epi16(0x0fff, s + k * ld);
      const __m256i hi = _mm256_maskz_loadu_epi16(0x0fff, s + (k + 1) * ld);
      const __m256i u0 = _mm256_unpacklo_epi16(lo, hi), u1 = _mm256_unpackhi_epi16(lo, hi);  // rows 0-3|8-11, 4-7|12-15
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k * MR), _mm256_permute2x128_si256(u0, u1, 0x20));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k * MR + 16), _mm256_extracti128_si256(u0, 1));
    }
    return k_end;
  }
  // B N-major: interleave rows k and k + 1 of 32 columns (out_lo = r0[0], r1[0], ..., r0[15],
  // r1[15]; out_hi from column 16).
  template <int DT>
  static int64_t pack_b_nmajor(const uint16_t* s, int64_t ld, int64_t kc, uint16_t* d) {
    alignas(64) static const uint16_t kIdx[64] = {
        0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
        11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
        22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i idx_lo = _mm512_load_si512(kIdx), idx_hi = _mm512_load_si512(kIdx + 32);
    const int64_t k_end = kc / 2 * 2;
    for (int64_t k = 0; k < k_end; k += 2) {
      const __m512i r0 = _mm512_loadu_si512(s + k * ld), r1 = _mm512_loadu_si512(s + (k + 1) * ld);
      _mm512_store_si512(d + k * NR, _mm512_permutex2var_epi16(r0, idx_lo, r1));
      _mm512_store_si512(d + k * NR + 32, _mm512_permutex2var_epi16(r0, idx_hi, r1));
    }
    return k_end;
  }
  // B K-major: a column's pairs are 32 contiguous bits, 8 pairs of 32 columns transposed per step.
  template <int DT>
  static int64_t pack_b_kmajor(const uint16_t* s, int64_t ld, int64_t kc, uint16_t* d) {
    const int64_t k_end = kc / 16 * 16;
    for (int64_t k = 0; k < k_end; k += 16)
      pack32_transposed(reinterpret_cast<const char*>(s + k), ld * 2, reinterpret_cast<float*>(d + k * NR));
    return k_end;
  }
};

// ---------------------------------------------------------------------------------------------
// int8: k-quads (A: [k/4][MR][4] as a ^ 0x80, unsigned; B: [k/4][NR][4] as is, then 128 * its
// column sums per panel), vpdpbusd
// ---------------------------------------------------------------------------------------------
struct Int8Kernel : GemmKernelSet<uint8_t, MR, NR, 4> {
  static constexpr int64_t kPrefetchBSteps = 0;  // see FloatKernel
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_I8; }
  // Bytes of one packed B panel of depth kc4 (a multiple of 4): the quads, then NR int32 corrections.
  static int64_t b_panel_elems(int64_t kc4) { return NR * kc4 + NR * 4; }
  // A is stored as a ^ 0x80 = a + 128 (unsigned); its k padding is a zero byte, so it adds nothing.
  template <int DT>
  static uint8_t a_value(int8_t a) {
    return uint8_t(a) ^ 0x80;
  }

  // vpdpbusd: four unsigned x signed byte products added to an int32 lane. The accumulators start
  // at the partial sums minus the panel's corrections (128 * column sums, after its quads).
  using Acc = __m512i;
  static __m512i load_b(const uint8_t* p) { return _mm512_load_si512(p); }
  static __m512i bcast_a(const uint8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
  static __m512i madd(__m512i c, __m512i a, __m512i b) { return _mm512_dpbusd_epi32(c, a, b); }
  // The accumulators' start: partial sums minus the panel's corrections.
  static auto start(int64_t kc4, const uint8_t* bp, const GemmInt8Tile& t) {
    const int32_t* corr = reinterpret_cast<const int32_t*>(bp + NR * kc4);
    const __m512i c0 = _mm512_load_si512(corr), c1 = _mm512_load_si512(corr + 16);
    return [c0, c1, &t](int64_t i, int h) { return _mm512_sub_epi32(tile_sums(t, i, h), h ? c1 : c0); };
  }
  static void ukernel(int64_t kc4, const uint8_t* __restrict ap, const uint8_t* __restrict bp, const GemmInt8Tile& t) {
    ukernel_12x32<Int8Kernel, MR>(kc4, ap, bp, t, start(kc4, bp, t), MR);
  }
  static constexpr bool kRowsKernel = true;
  static void ukernel_rows(int64_t kc4, const uint8_t* __restrict ap, const uint8_t* __restrict bp,
                           const GemmInt8Tile& t, int64_t rows) {
    ukernel_rows_12x32<Int8Kernel>(kc4, ap, bp, t, start(kc4, bp, t), rows);
  }

  // A K-major: a quad is 32 contiguous bits of a row, 8 quads of 12 rows transposed (and flipped)
  // per step.
  template <int DT>
  static int64_t pack_a_kmajor(const int8_t* s, int64_t ld, int64_t kc, uint8_t* d) {
    const __m256i flip = _mm256_set1_epi8(char(0x80));
    const int64_t k_end = kc / 32 * 32;
    for (int64_t k = 0; k < k_end; k += 32)
      pack12_transposed(reinterpret_cast<const char*>(s + k), ld, reinterpret_cast<float*>(d + k * MR),
                        [&](__m256 v) { return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), flip)); });
    return k_end;
  }
  // A M-major: interleave the 12 contiguous rows of k .. k + 3 into quads, flipped.
  template <int DT>
  static int64_t pack_a_mmajor(const int8_t* s, int64_t ld, int64_t kc, uint8_t* d) {
    const __m128i flip = _mm_set1_epi8(char(0x80));
    const int64_t k_end = kc / 4 * 4;
    for (int64_t k = 0; k < k_end; k += 4) {
      const __m128i r0 = _mm_maskz_loadu_epi8(0x0fff, s + k * ld), r1 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 1) * ld);
      const __m128i r2 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 2) * ld), r3 = _mm_maskz_loadu_epi8(0x0fff, s + (k + 3) * ld);
      const __m128i p01lo = _mm_unpacklo_epi8(r0, r1), p01hi = _mm_unpackhi_epi8(r0, r1);  // rows 0-7, 8-15
      const __m128i p23lo = _mm_unpacklo_epi8(r2, r3), p23hi = _mm_unpackhi_epi8(r2, r3);
      __m128i* o = reinterpret_cast<__m128i*>(d + k * MR);
      _mm_storeu_si128(o, _mm_xor_si128(_mm_unpacklo_epi16(p01lo, p23lo), flip));      // rows 0-3
      _mm_storeu_si128(o + 1, _mm_xor_si128(_mm_unpackhi_epi16(p01lo, p23lo), flip));  // rows 4-7
      _mm_storeu_si128(o + 2, _mm_xor_si128(_mm_unpacklo_epi16(p01hi, p23hi), flip));  // rows 8-11
    }
    return k_end;
  }
  // B N-major: interleave 4 rows of 32 bytes into 32 quads.
  template <int DT>
  static int64_t pack_b_nmajor(const int8_t* s, int64_t ld, int64_t kc, uint8_t* d) {
    const int64_t k_end = kc / 4 * 4;
    for (int64_t k = 0; k < k_end; k += 4) {
      auto row = [&](int64_t t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + (k + t) * ld)); };
      const __m256i r0 = row(0), r1 = row(1), r2 = row(2), r3 = row(3);
      const __m256i p01lo = _mm256_unpacklo_epi8(r0, r1), p01hi = _mm256_unpackhi_epi8(r0, r1);  // cols 0-7|16-23, 8-15|24-31
      const __m256i p23lo = _mm256_unpacklo_epi8(r2, r3), p23hi = _mm256_unpackhi_epi8(r2, r3);
      const __m256i q0 = _mm256_unpacklo_epi16(p01lo, p23lo), q1 = _mm256_unpackhi_epi16(p01lo, p23lo);  // 0-3|16-19, 4-7|20-23
      const __m256i q2 = _mm256_unpacklo_epi16(p01hi, p23hi), q3 = _mm256_unpackhi_epi16(p01hi, p23hi);  // 8-11|24-27, 12-15|28-31
      __m256i* o = reinterpret_cast<__m256i*>(d + k * NR);
      _mm256_store_si256(o, _mm256_permute2x128_si256(q0, q1, 0x20));      // cols 0-7
      _mm256_store_si256(o + 1, _mm256_permute2x128_si256(q2, q3, 0x20));  // cols 8-15
      _mm256_store_si256(o + 2, _mm256_permute2x128_si256(q0, q1, 0x31));  // cols 16-23
      _mm256_store_si256(o + 3, _mm256_permute2x128_si256(q2, q3, 0x31));  // cols 24-31
    }
    return k_end;
  }
  // B K-major: a column's quads are 32 contiguous bits, 8 quads of 32 columns transposed per step.
  template <int DT>
  static int64_t pack_b_kmajor(const int8_t* s, int64_t ld, int64_t kc, uint8_t* d) {
    const int64_t k_end = kc / 32 * 32;
    for (int64_t k = 0; k < k_end; k += 32)
      pack32_transposed(reinterpret_cast<const char*>(s + k), ld, reinterpret_cast<float*>(d + k * NR));
    return k_end;
  }

  // 128 * column sums of this K block after the quads, read back from the panel (still in L1) with
  // vpdpbusd by ones.
  static void finish_b_panel(uint8_t* d, int64_t kc4) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int64_t q = 0; q < kc4 / 4; ++q) {
      s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_load_si512(d + q * 128));
      s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_load_si512(d + q * 128 + 64));
    }
    int32_t* corr = reinterpret_cast<int32_t*>(d + NR * kc4);
    _mm512_store_si512(corr, _mm512_slli_epi32(s0, 7));
    _mm512_store_si512(corr + 16, _mm512_slli_epi32(s1, 7));
  }
};

GemmBlocking gemm_blocking_avx512(int64_t elem_bytes) {
  // The B micro-panel fills all of L1d (kc 256 float32, 512 bf16, 1024 int8 on a 32 KiB L1d): A
  // streams from L2 through a few lines only, and a deeper kc halves the passes over the partial
  // sums. Measured at 2048^3 against half of L1d: float32 179 vs 156 GFLOP/s, bf16 377 vs 286,
  // int8 745 vs 622 G op/s (bench/notes_gemm.md).
  return gemm_blocking(MR, NR, elem_bytes, 1);
}

// Products of at least kGemmDeepKcMinRows rows take kc kGemmDeepKcFactor times deeper (1024 float32,
// 2048 bf16, 4096 int8 on a 32 KiB L1d): the B micro-panel then streams from L2, which 24
// multiply-adds per two B loads afford, and fewer K blocks mean fewer passes over the partial sums
// and fewer tile prologues. mc shrinks to keep the A block at half of L2 for the depth used, and nc
// to keep the B block at a quarter of L3 (4096 columns of depth 2048 were 16 MiB per thread, half of
// L3: bf16 4096^3 +3-4% with nc 2048, session 8).
// Measured (2 threads, A/B of the two blockings): bf16 4096 x 1024 x 1024 +9%, 2048^3 +5-15%, float32
// 1024^3 +5-10%, 1024 x 4096 x 1024 bf16 +8%; int8 2048^3 +5%, 4096^3 +8%, 1024 x 4096 x 256 +7%
// (session 9). Not below that many rows: there packing B dominates, and a deeper B block packs down
// columns 4x longer (bf16 64 x 4096 x 4096: -11%), except for an int8 B pre-packed once, which
// always takes the deep kc (gemm_int8_avx512).
static GemmBlocking gemm_deep_blocking_avx512(int64_t elem_bytes, int64_t k) {
  GemmBlocking b = gemm_blocking_avx512(elem_bytes);
  b.kc *= kGemmDeepKcFactor;
  const int64_t kc_used = std::min(b.kc, gemm_round_up(std::max<int64_t>(k, 1), 16));
  const int64_t mc = (cpu_features().l2_bytes / 2) / (kc_used * elem_bytes);
  b.mc = std::max<int64_t>(MR, std::min<int64_t>(1020, mc / MR * MR));
  // And nc, so that the kc x nc B block keeps to its quarter of L3 (gemm_blocking).
  const int64_t nc = (cpu_features().l3_bytes / 4) / (kc_used * elem_bytes);
  b.nc = std::max<int64_t>(NR * 4, std::min<int64_t>(b.nc, nc / NR * NR));
  return b;
}

// The blocking of a product of `rows` rows whose B is packed in the call: deep from
// kGemmDeepKcMinRows rows on.
static GemmBlocking gemm_rows_blocking_avx512(int64_t elem_bytes, int64_t rows, int64_t k) {
  return rows < kGemmDeepKcMinRows ? gemm_blocking_avx512(elem_bytes) : gemm_deep_blocking_avx512(elem_bytes, k);
}

GemmBlocking gemm_packed_blocking_avx512(bool is_int8, int64_t rows) {
  return gemm_rows_blocking_avx512(is_int8 ? 1 : 4, rows, int64_t(1) << 40);
}

void gemm_float_avx512(const GemmFloatArgs& g) {
  if (g.a.dtype == LP_DTYPE_BF16)
    gemm_packed<Bf16Kernel>(g, gemm_rows_blocking_avx512(2, g.m, g.k));
  else
    gemm_packed<FloatKernel>(g, gemm_rows_blocking_avx512(4, g.m, g.k));
}
// bf16 widened to float32 when packed (exact) and multiplied by vfmadd231ps, like float16.
void gemm_float_avx512_bf16_fma(const GemmFloatArgs& g) {
  gemm_packed<FloatKernel>(g, gemm_rows_blocking_avx512(4, g.m, g.k));
}
// Its few-rows path multiplies bf16 by FMAs too (split pairs: gemm_small_m_avx512.cc) and keeps bf16
// products of at most this many rows (float32: kSmallMMaxRowsF32TwoFma, gemm.h); the packed FMA kernels
// take more. AMX Xeon, 2 threads, x @ W^T,
// few-rows over packed: 4096 x 4096 at 16 / 24 / 32 / 40 / 48 rows 1.72 / 1.35 / 1.19 / 1.08 / 1.05x,
// 32 x 4096 -> 11008 1.18x, 32 x 11008 -> 4096 1.17x; 1024 x 1024 at 16 / 24 / 32 rows 1.18 / 0.97 /
// 0.89x (its vdpbf16ps version lost to the packed kernels from 24 rows at 4096 x 4096).
constexpr int64_t kSmallMMaxRowsBf16Fma = 32;
static bool gemm_small_m_float_avx512_bf16_fma(const GemmFloatArgs& g) {
  if (g.a.dtype == LP_DTYPE_BF16 && g.m > kSmallMMaxRowsBf16Fma) return false;
  if (g.a.dtype == LP_DTYPE_F32 && g.m > kSmallMMaxRowsF32TwoFma) return false;
  return gemm_small_m_float_avx512(g, true);
}
static bool gemm_small_m_float_avx512_bf16_dot(const GemmFloatArgs& g) { return gemm_small_m_float_avx512(g, false); }
// Its probe: the bf16 products are FMAs.
double gemm_peak_probe_avx512_bf16_fma(int64_t n_iters, int n_threads, int kind) {
  return gemm_peak_probe_avx512(n_iters, n_threads, kind == LP_GEMM_PROBE_BF16 ? LP_GEMM_PROBE_FLOAT : kind);
}

// A pre-packed int8 B (QuantLinear's weights) is packed once for every row count, so in deep K
// blocks whatever the rows: packing it is not in the call, which is what kept few-row products
// shallow. MiniLM's 1536 -> 384 at 608 rows +3%, 128 x 4096 x 11008 +5%, few rows neutral (session 9).
void gemm_int8_avx512(const GemmInt8Args& g) {
  // Few rows on the matrix-vector path (vpdpbusd dot products, W read in place), where packing W cost
  // more than the packed tiles saved: over them, 2 threads, AMX Xeon at this level: 4096 x 4096 at 1 /
  // 2 / 4 / 8 rows 2.58 / 2.35 / 2.23 / 1.78x, 1024 x 1024 at 1 / 8 rows 2.48 / 1.19x (the AVX2 path's
  // vpmaddwd: 2.29 / 2.09 / 1.12 / 0.97x); a 4096 x 4096 A times a column 1.22x the AVX2 path.
  if (gemm_gemv_int8_takes(g)) return gemm_gemv_int8_avx512(g);
  gemm_packed<Int8Kernel>(g, g.b_packed ? gemm_deep_blocking_avx512(1, g.k) : gemm_rows_blocking_avx512(1, g.m, g.k));
}
int64_t int8_packed_b_bytes_avx512(int64_t k, int64_t n) {
  return gemm_prepacked_b_bytes<Int8Kernel>(k, n, gemm_deep_blocking_avx512(1, k));
}
void int8_pack_b_avx512(const GemmInt8Args& g, void* dst) { gemm_prepack_b<Int8Kernel>(g, gemm_deep_blocking_avx512(1, g.k), dst); }


// The same with K blocks of depth kc (gemm.h: the AMX table's pre-packed weight).
static GemmBlocking gemm_int8_blocking_kc_avx512(int64_t k, int64_t kc) {
  GemmBlocking b = gemm_deep_blocking_avx512(1, k);
  b.kc = kc;
  return b;
}
void gemm_float_quant_b_avx512(const GemmFloatArgs& g, const GemmQuantB& qb) {
  gemm_packed_quant_b<FloatKernel>(g, qb, gemm_rows_blocking_avx512(4, g.m, g.k));
}

// Two tables for the avx512 level, alike but for the packed bf16 kernels: vdpbf16ps on bf16 k-pairs
// ("avx512-bf16dot"), or bf16 widened to float32 and vfmadd231ps ("avx512-bf16fma"). Which one runs is
// measured once per process (gemm_bf16_dot_slower_than_fma_avx512): on the Intel Xeon with AMX of
// sessions 12-23 vdpbf16ps ran at a quarter of vfmadd231ps's instruction rate (half its flops), and
// the widened kernels were 1.5-1.7x faster there (2 threads, 512-4096 rows, every layout); Zen 4
// runs vdpbf16ps at twice the FMA's flops. The few-rows bf16 kernel (small_m_float) follows: vdpbf16ps
// in the first, FMAs on the split bf16 pairs in the second (up to kSmallMMaxRowsBf16Fma rows).
const GemmKernels kGemmAvx512 = {"avx512-bf16dot",
                                 LP_ISA_AVX512,
                                 gemm_float_avx512,
                                 gemm_int8_avx512,
                                 gemm_gemv_float_avx2,
                                 gemm_small_m_float_avx512_bf16_dot,
                                 gemm_packed_blocking_avx512,
                                 gemm_peak_probe_avx512,
                                 int8_packed_b_bytes_avx512,
                                 int8_pack_b_avx512,
                                 gemm_float_quant_b_avx512};
const GemmKernels kGemmAvx512Bf16Fma = {"avx512-bf16fma",
                                        LP_ISA_AVX512,
                                        gemm_float_avx512_bf16_fma,
                                        gemm_int8_avx512,
                                        gemm_gemv_float_avx2,
                                        gemm_small_m_float_avx512_bf16_fma,
                                        gemm_packed_blocking_avx512,
                                        gemm_peak_probe_avx512_bf16_fma,
                                        int8_packed_b_bytes_avx512,
                                        int8_pack_b_avx512,
                                        gemm_float_quant_b_avx512};

const GemmKernels* avx512_table(bool chosen) {
  // Probed only where the level can run: the picker asks for this table on every CPU.
  static const bool fma = cpu_isa_detected() >= LP_ISA_AVX512 && gemm_bf16_dot_slower_than_fma_avx512();
  return fma == chosen ? &kGemmAvx512Bf16Fma : &kGemmAvx512;
}

}  // namespace

const GemmKernels* gemm_kernels_avx512() { return avx512_table(true); }
const GemmKernels* gemm_kernels_avx512_other() { return avx512_table(false); }

// gemm.h: the AMX table's pre-packed int8 weight (K blocks of depth kc) and the GEMM reading it.
int64_t int8_packed_b_bytes_avx512_kc(int64_t k, int64_t n, int64_t kc) {
  return gemm_prepacked_b_bytes<Int8Kernel>(k, n, gemm_int8_blocking_kc_avx512(k, kc));
}
void int8_pack_b_avx512_kc(const GemmInt8Args& g, int64_t kc, void* dst) {
  gemm_prepack_b<Int8Kernel>(g, gemm_int8_blocking_kc_avx512(g.k, kc), dst);
}
void gemm_int8_prepacked_avx512_kc(const GemmInt8Args& g, int64_t kc) {
  gemm_packed<Int8Kernel>(g, gemm_int8_blocking_kc_avx512(g.k, kc));
}

}  // namespace lp
