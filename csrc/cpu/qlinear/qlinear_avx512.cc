// Weight-quantized linear, AVX-512: the panel kernels of qlinear_kernel.h on 16-lane registers, the
// whole 32-column panel at once (2 vectors). Register budget (32 zmm): w8 12 rows x 2 accumulators + 2
// widened code vectors + the broadcast; w4 6 rows x 2 x (group sum + total) + 4 code vectors + 2
// broadcasts.
// And this level's own bf16 kernels (qlinear.h, "bf16 activations"): per panel and K block of
// kQLinearBf16BlockK, the codes are converted to bf16 k-pairs ([k/2][32][2], the layout of lc.gemm's
// bf16 B panels) in the thread's workspace; then 12 rows at a time run vdpbf16ps over each segment
// (a w4 group's part of the block, or the whole block for w8) with 24 accumulators, and add the
// segment's sums (w4: times its group's scales) into the float32 sums of the panel (m x 32, L1/L2).
// And the kernels for bf16 activations at fewer rows (at the end), the codes converted in registers:
// w4_bf16_rows 6 rows x 2 x (group sum + total) + 2 code vectors, 2 constants and the broadcast (6 rows
// against 4: 1.1-1.4x at 6-19 rows, session 11); w8_bf16_rows 8 rows x 2 accumulators + 2 bf16 code
// vectors and the conversion's temporaries.
#include <immintrin.h>

#include "common/codes.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_bf16_avx512.h"
#include "cpu/qlinear/qlinear_kernel.h"
#include "cpu/simd256.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

// The bf16 sums of R rows over k-pairs [0, pairs) of a segment: x at the rows' first k (rows x_ld
// apart), b at the segment's first pair; added to the panel's sums ws (rows 32 apart), times s[h]
// when scaled (w4).
template <int R>
static inline __attribute__((always_inline)) void bf16_segment(const uint16_t* x, int64_t x_ld, const uint16_t* b,
                                                               int64_t pairs, float* ws, bool scaled, const float* s) {
  __m512 g[R][2];
  for (int r = 0; r < R; ++r) g[r][0] = g[r][1] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b + q * 64), b1 = (__m512bh)_mm512_load_si512(b + q * 64 + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * x_ld + 2 * q));
      g[r][0] = _mm512_dpbf16_ps(g[r][0], a, b0);
      g[r][1] = _mm512_dpbf16_ps(g[r][1], a, b1);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m512 sh = scaled ? _mm512_loadu_ps(s + 16 * h) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      float* w = ws + r * kQLinearPanel + 16 * h;
      _mm512_store_ps(w, scaled ? _mm512_fmadd_ps(sh, g[r][h], _mm512_load_ps(w)) : _mm512_add_ps(g[r][h], _mm512_load_ps(w)));
    }
  }
}

// Every row of panels [p0, p1) with bf16 activations; W4 picks the scheme. Rows go in chunks of about
// 2 MiB of activations (all of them for the usual shapes): a chunk stays in cache while every panel
// passes over it, and each panel's codes are converted once per chunk. Rows are independent, so the
// chunking changes no result.
template <bool W4>
void qlinear_bf16_panels(const QLinearCall& c, int64_t p0, int64_t p1, void* ws_bytes) {
  uint16_t* bbuf = static_cast<uint16_t*>(ws_bytes);
  float* sums = reinterpret_cast<float*>(static_cast<char*>(ws_bytes) + kQLinearBf16BlockK * kQLinearPanel * 2);
  const int64_t chunk = std::max<int64_t>(12, (int64_t(2) << 20) / (2 * c.xb_ld) / 12 * 12);
  for (int64_t r0 = 0; r0 < c.m; r0 += chunk) {
    const int64_t r1 = std::min(c.m, r0 + chunk);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t i = r0 * kQLinearPanel; i < r1 * kQLinearPanel; i += 16) _mm512_store_ps(sums + i, _mm512_setzero_ps());
      for (int64_t k0 = 0; k0 < c.k_pad; k0 += kQLinearBf16BlockK) {
        const int64_t k1 = std::min(c.k_pad, k0 + kQLinearBf16BlockK);
        qlinear_bf16_convert_block<Bf16ConvAvx512, W4>(c, p, k0, k1, bbuf);
        qlinear_row_blocks<Simd512, 12, 2>(r0, r1, [&](auto rows, int64_t i0) {
          constexpr int R = decltype(rows)::value;
          const uint16_t* x = c.xb + i0 * c.xb_ld;
          float* ws = sums + i0 * kQLinearPanel;
          if constexpr (W4) {
            const float* scale = c.scale + p * c.n_groups * kQLinearPanel;
            bf16_group_pieces(c, k0, k1, [&](int64_t s0, int64_t s1, int64_t g) {
              bf16_segment<R>(x + s0, c.xb_ld, bbuf + (s0 - k0) * kQLinearPanel, (s1 - s0) / 2, ws, true,
                              scale + g * kQLinearPanel);
            });
          } else {
            bf16_segment<R>(x + k0, c.xb_ld, bbuf, (k1 - k0) / 2, ws, false, nullptr);
          }
        });
      }
      // Epilogue: w8's per-channel scale, then the bias and the output dtype (qlinear_store).
      const int64_t col0 = p * kQLinearPanel;
      for (int64_t i = r0; i < r1; ++i) {
        __m512 acc[1][2];
        for (int h = 0; h < 2; ++h) {
          acc[0][h] = _mm512_load_ps(sums + i * kQLinearPanel + 16 * h);
          if (!W4) acc[0][h] = _mm512_mul_ps(acc[0][h], _mm512_loadu_ps(c.scale + col0 + 16 * h));
        }
        qlinear_store<Simd512, 1, 2>(c, i, col0, acc);
      }
    }
  }
}

// w4, bf16 activations, fewer rows than kQLinearBf16MinRows (decode, small batches): R rows of one
// 32-column panel with each code byte turned into its bf16 k-pair in registers and multiplied by
// vdpbf16ps, no workspace. The 32 bytes of a k-pair row widen to 32 words b; (b & 15) | 0x4300 and
// (b >> 4) | 0x4300 are the bf16 values 128 + q_k and 128 + q_k+1 (exact: bf16 has unit steps on
// [128, 256)), and interleaving the two gives the pairs: 6 vector instructions per 64 weights, no
// table lookup. The interleave works within 128-bit lanes, so the two accumulators hold columns
// {0-3, 8-11, 16-19, 24-27} and {4-7, 12-15, 20-23, 28-31}; the group's scales and zero points are
// permuted the same way and the sums back at the end. Per group the float32 path's formula with the
// offset folded into the zero point: scale * (sum x (128 + q) - (zero + 128) * xsum). The products
// are exact in float32; the group sum's terms are up to ~10x larger than sum x q's, so its float32
// rounding error is too, ~2^-24 * 143 * sum |x| per group, far below the bf16 output's rounding. As in
// the bf16 kernels above, a bf16 subnormal activation reads as zero in the products (but not in
// xsum): a difference below 143 * 2^-126 * |scale| per such value.
template <int R>
static inline void w4_bf16_rows(const QLinearCall& c, const uint8_t* panel, const float* scale, const uint8_t* zero,
                                int64_t i0, int64_t col0) {
  const __m512i lo4 = _mm512_set1_epi16(0x000f), bf16_128 = _mm512_set1_epi16(0x4300);
  // Natural column c of the pair (cols 0-15 | 16-31) at each accumulator lane, and back.
  const __m512i to_acc[2] = {_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                             _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)};
  const __m512i to_cols[2] = {_mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                              _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)};
  __m512 acc[R][2], gacc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint16_t* x = c.xb + i0 * c.xb_ld;
  for (int64_t g = 0; g < c.n_groups; ++g) {
    for (int r = 0; r < R; ++r) gacc[r][0] = gacc[r][1] = _mm512_setzero_ps();
    const int64_t k_end = std::min(c.k_pad, (g + 1) * c.group_size);
    for (int64_t kk = g * c.group_size; kk < k_end; kk += 2) {
      __builtin_prefetch(panel + kk / 2 * kQLinearPanel + kQLinearCodesAheadBytes, 0, 3);
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk / 2 * kQLinearPanel)));
      const __m512i lo = _mm512_ternarylogic_epi32(b, lo4, bf16_128, 0xea);  // (b & 15) | 0x4300
      const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), bf16_128);
      const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi16(lo, hi), w1 = (__m512bh)_mm512_unpackhi_epi16(lo, hi);
      for (int r = 0; r < R; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * c.xb_ld + kk));
        gacc[r][0] = _mm512_dpbf16_ps(gacc[r][0], a, w0);
        gacc[r][1] = _mm512_dpbf16_ps(gacc[r][1], a, w1);
      }
    }
    const float* sg = scale + g * kQLinearPanel;
    const uint8_t* zg = zero + g * kQLinearPanel;
    auto zf = [&](int h) {  // zero + 128 of columns 16 h .. 16 h + 15, exact
      return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zg + 16 * h))),
                                                 _mm512_set1_epi32(128)));
    };
    const __m512 s_lo = _mm512_loadu_ps(sg), s_hi = _mm512_loadu_ps(sg + 16), z_lo = zf(0), z_hi = zf(1);
    for (int h = 0; h < 2; ++h) {
      const __m512 sc = _mm512_permutex2var_ps(s_lo, to_acc[h], s_hi), z = _mm512_permutex2var_ps(z_lo, to_acc[h], z_hi);
      for (int r = 0; r < R; ++r) {
        const __m512 xs = _mm512_set1_ps(c.xsum[(i0 + r) * c.n_groups + g]);
        acc[r][h] = _mm512_fmadd_ps(sc, _mm512_fnmadd_ps(z, xs, gacc[r][h]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 a0 = acc[r][0], a1 = acc[r][1];
    acc[r][0] = _mm512_permutex2var_ps(a0, to_cols[0], a1);
    acc[r][1] = _mm512_permutex2var_ps(a0, to_cols[1], a1);
  }
  qlinear_store<Simd512, R, 2>(c, i0, col0, acc);
}

void qlinear_w4_bf16_few_rows(const QLinearCall& c, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = static_cast<const uint8_t*>(c.codes) + p * (c.k_pad / 2) * kQLinearPanel;
    const float* scale = c.scale + p * c.n_groups * kQLinearPanel;
    const uint8_t* zero = c.zero + p * c.n_groups * kQLinearPanel;
    qlinear_row_blocks<Simd512, 6, 2>(0, c.m, [&](auto rows, int64_t i0) {
      w4_bf16_rows<decltype(rows)::value>(c, panel, scale, zero, i0, p * kQLinearPanel);
    });
  }
}

// w8, bf16 activations, few rows (decode, small batches): R rows of one 32-column panel, each pair of
// code rows (k, k + 1) turned into bf16 k-pairs in registers (bf16_pairs_w8, as the block kernels
// convert them) and multiplied by vdpbf16ps; no workspace, the codes read once per R rows. The same
// exact products as the float32 path, summed in pairs (the contract's tolerance), and as in the bf16
// kernels above a bf16 subnormal activation reads as zero. Per 2 k x 32 columns: 12 conversion
// instructions, then 2 vdpbf16ps per row, against the float32 kernel's 2 FMAs per row and k (and each
// its own widening): at 4-15 rows half the multiply issue.
template <int R>
static inline void w8_bf16_rows(const QLinearCall& c, const int8_t* panel, int64_t i0, int64_t col0) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint16_t* x = c.xb + i0 * c.xb_ld;
  for (int64_t kk = 0; kk < c.k; kk += 2) {
    __m512bh w[2];
    bf16_pairs_w8(c, panel, kk, w);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * c.xb_ld + kk));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w[0]);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w[1]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m512 sc = _mm512_loadu_ps(c.scale + col0 + 16 * h);
    for (int r = 0; r < R; ++r) acc[r][h] = _mm512_mul_ps(acc[r][h], sc);
  }
  qlinear_store<Simd512, R, 2>(c, i0, col0, acc);
}

void qlinear_w8_bf16_few_rows(const QLinearCall& c, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = static_cast<const int8_t*>(c.codes) + p * c.k * kQLinearPanel;
    qlinear_row_blocks<Simd512, 8, 2>(0, c.m, [&](auto rows, int64_t i0) {
      w8_bf16_rows<decltype(rows)::value>(c, panel, i0, p * kQLinearPanel);
    });
  }
}

}  // namespace

// The table (its kernels are instances over this file's vector type, which has internal linkage).
const QLinearKernels* qlinear_kernels_avx512() {
  static const QLinearKernels kTable = {"avx512",
                                        LP_ISA_AVX512,
                                        qlinear_w8_panels<Simd512, 12, 2>,
                                        qlinear_w4_panels<Simd512, 6, 2>,
                                        qlinear_bf16_panels<false>,
                                        qlinear_bf16_panels<true>,
                                        qlinear_w8_bf16_few_rows,
                                        qlinear_w4_bf16_few_rows,
                                        // 2 threads, against the panel kernels: w8 1.0x at 32 rows, 1.18x at
                                        // 48; w4 0.94-0.97x at 64, 1.08x at 96; w8 / w4 1.13 / 1.22x at 608
                                        48,
                                        96,
                                        kQLinearBf16MinRows};
  return &kTable;
}

}  // namespace lp
