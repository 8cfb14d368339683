// The SIMD panel kernels of the weight-quantized linear family (math and layout in qlinear.h), written
// once against the vector interface of cpu/simd256.h: S = Simd256 (qlinear_avx2.cc) or Simd512
// (qlinear_avx512.cc). A 32-column panel is processed as sub-panels of NV vectors (NV * kLanes
// columns); R rows at a time keep R x NV accumulators in registers while the sub-panel's codes are
// widened to float32 once per k and multiply-added into every row. Rows past a multiple of R run a
// smaller R. With m <= R the packed weight is read exactly once per call (decode shapes).
//
// Anonymous namespace: each ISA file compiles its own copy with its own -m flags (see common/dtypes.h).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/cpu_features.h"
#include "cpu/qlinear/qlinear.h"

namespace lp {
namespace {

// Calls f(s0, s1, g) for each piece [s0, s1) of [k0, k1) that lies in one w4 group g (all edges even).
template <class F>
static inline void bf16_group_pieces(const QLinearCall& c, int64_t k0, int64_t k1, const F& f) {
  for (int64_t s0 = k0; s0 < k1;) {
    const int64_t g = s0 / c.group_size, s1 = std::min(k1, (g + 1) * c.group_size);
    f(s0, s1, g);
    s0 = s1;
  }
}

// The codes of k values [k0, k1) of panel p as bf16 k-pairs into d ([k/2][32][2], pair row 0 at k0;
// k0 even): an ISA's converters Conv::w8(c, panel, k0, k1, d) and Conv::w4(panel, zero_g, s0, s1, d)
// (one w4 group's piece at a time), for the bf16 kernels of the AVX-512 and AMX levels.
template <class Conv, bool W4>
static inline void qlinear_bf16_convert_block(const QLinearCall& c, int64_t p, int64_t k0, int64_t k1, uint16_t* d) {
  if constexpr (W4) {
    const uint8_t* panel = static_cast<const uint8_t*>(c.codes) + p * (c.k_pad / 2) * kQLinearPanel;
    const uint8_t* zero = c.zero + p * c.n_groups * kQLinearPanel;
    bf16_group_pieces(c, k0, k1, [&](int64_t s0, int64_t s1, int64_t g) {
      Conv::w4(panel, zero + g * kQLinearPanel, s0, s1, d + (s0 - k0) * kQLinearPanel);
    });
  } else {
    Conv::w8(c, static_cast<const int8_t*>(c.codes) + p * c.k * kQLinearPanel, k0, k1, d);
  }
}

// The kernels that stream a panel's codes prefetch them this far ahead: a panel's codes cross pages
// that the hardware prefetchers do not follow, and between blocks (the AMX kernels' tiles) no loads are
// in flight. 2 threads on a 2-core Xeon (session 13): w4 bf16 one row 4096 -> 11008 1.71 -> 1.1 ms,
// 4096 x 4096 0.44-0.49 -> 0.39-0.41; w8 one row (the float32 kernel) 4096 -> 11008 2.8 -> 1.7-2.1 ms,
// 4096 x 4096 0.47 -> 0.37; the AMX conversions at 8 rows of 4096 -> 11008: w8 5.2 -> 3.0, w4 3.5 ->
// 2.4 (1-4 KiB alike).
constexpr int64_t kQLinearCodesAheadBytes = 2048;

// The R x NV results of rows [i0, i0 + R) at columns [col0, col0 + NV * kLanes): bias added and
// rounded once; a sub-panel past n goes through the scalar tail.
template <class S, int R, int NV>
static inline void qlinear_store(const QLinearCall& c, int64_t i0, int64_t col0, const typename S::F (&acc)[R][NV]) {
  constexpr int L = S::kLanes;
  const int64_t cols = std::min<int64_t>(NV * L, c.n - col0);
  if (cols <= 0) return;
  const int64_t elem_bytes = c.out_dtype == LP_DTYPE_F32 ? 4 : 2;
  for (int r = 0; r < R; ++r) {
    if (cols == NV * L) {
      for (int h = 0; h < NV; ++h) {
        const typename S::F v = c.bias ? S::add(acc[r][h], S::loadu(c.bias + col0 + h * L)) : acc[r][h];
        S::store_as(c.out_dtype, static_cast<char*>(c.out) + ((i0 + r) * c.n + col0 + h * L) * elem_bytes, v);
      }
    } else {
      alignas(64) float v[NV * L];
      for (int h = 0; h < NV; ++h) S::storeu(v + h * L, acc[r][h]);
      qlinear_store_row(c, i0 + r, col0, cols, v);
    }
  }
}

// w8 with few rows (decode, m = 1..3): R x NV accumulator chains of one FMA per k are too few to
// cover the FMA latency, so a second set takes the odd k, added at the end (4096 x 4096 at M = 1:
// AVX-512 +5-12%, AVX2 1.4x / 1.9x at 1 / 2 threads; session 9).
// Only where the second set fits in the register file beside the codes and the broadcasts.
template <class S, int R, int NV>
constexpr bool qlinear_two_chains() {
  return R * NV < 8 && 2 * R * NV + NV + 1 <= (S::kLanes == 16 ? 32 : 16);
}

// w8: R rows of one sub-panel. codes: the sub-panel's first column at k = 0 (rows of k 32 bytes apart).
template <class S, int R, int NV>
static inline void qlinear_w8_rows(const QLinearCall& c, const int8_t* codes, int64_t i0, int64_t col0) {
  using F = typename S::F;
  constexpr int L = S::kLanes;
  F acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < NV; ++h) acc[r][h] = S::zero();
  const float* x = c.x + i0 * c.k_pad;
  auto step = [&](int64_t kk, F(&a)[R][NV]) __attribute__((always_inline)) {
    __builtin_prefetch(codes + kk * kQLinearPanel + kQLinearCodesAheadBytes, 0, 3);
    F w[NV];
    for (int h = 0; h < NV; ++h) w[h] = S::to_float(S::load_i8(codes + kk * kQLinearPanel + h * L));
    for (int r = 0; r < R; ++r) {
      const F xb = S::set1(x[r * c.k_pad + kk]);
      for (int h = 0; h < NV; ++h) a[r][h] = S::fmadd(xb, w[h], a[r][h]);
    }
  };
  int64_t kk = 0;
  if constexpr (qlinear_two_chains<S, R, NV>()) {
    F odd[R][NV];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < NV; ++h) odd[r][h] = S::zero();
    for (; kk + 1 < c.k; kk += 2) step(kk, acc), step(kk + 1, odd);
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < NV; ++h) acc[r][h] = S::add(acc[r][h], odd[r][h]);
  }
  for (; kk < c.k; ++kk) step(kk, acc);
  for (int h = 0; h < NV; ++h) {
    const F s = S::loadu(c.scale + col0 + h * L);
    for (int r = 0; r < R; ++r) acc[r][h] = S::mul(acc[r][h], s);
  }
  qlinear_store<S, R, NV>(c, i0, col0, acc);
}

// w4's form of the same (the low and high nibbles' products in separate sets), when it fits: gacc,
// gacc_hi and acc, the codes, two broadcasts. 4096 x 4096 at M = 1: AVX2 (one row fits) 1.6x; AVX-512
// neutral (there the conversions and FMAs fill the vector pipes already), kept for one code path.
template <class S, int R, int NV>
constexpr bool qlinear_w4_two_chains() {
  return R * NV < 8 && 3 * R * NV + 2 * NV + 2 <= (S::kLanes == 16 ? 32 : 16);
}

// w4: R rows of one sub-panel; per group, sum x q in registers, then scale * (that - zero * xsum).
// codes / scale / zero: the sub-panel's first column in its panel (rows 32 entries apart).
template <class S, int R, int NV>
static inline void qlinear_w4_rows(const QLinearCall& c, const uint8_t* codes, const float* scale, const uint8_t* zero,
                                   int64_t i0, int64_t col0) {
  using F = typename S::F;
  constexpr int L = S::kLanes;
  constexpr bool kTwo = qlinear_w4_two_chains<S, R, NV>();
  F acc[R][NV], gacc[R][NV], gacc_hi[kTwo ? R : 1][NV];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < NV; ++h) acc[r][h] = S::zero();
  const float* x = c.x + i0 * c.k_pad;
  for (int64_t g = 0; g < c.n_groups; ++g) {
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < NV; ++h) gacc[r][h] = S::zero();
    if constexpr (kTwo)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < NV; ++h) gacc_hi[r][h] = S::zero();
    const int64_t k_end = std::min(c.k_pad, (g + 1) * c.group_size);
    for (int64_t kk = g * c.group_size; kk < k_end; kk += 2) {
      __builtin_prefetch(codes + (kk / 2) * kQLinearPanel + kQLinearCodesAheadBytes, 0, 3);
      F lo[NV], hi[NV];
      for (int h = 0; h < NV; ++h) {
        const typename S::I b = S::load_u8(codes + (kk / 2) * kQLinearPanel + h * L);
        lo[h] = S::to_float(S::low_nibble(b));
        hi[h] = S::to_float(S::high_nibble(b));
      }
      for (int r = 0; r < R; ++r) {
        const F x0 = S::set1(x[r * c.k_pad + kk]), x1 = S::set1(x[r * c.k_pad + kk + 1]);
        for (int h = 0; h < NV; ++h) {
          if constexpr (kTwo) {
            gacc[r][h] = S::fmadd(x0, lo[h], gacc[r][h]);
            gacc_hi[r][h] = S::fmadd(x1, hi[h], gacc_hi[r][h]);
          } else {
            gacc[r][h] = S::fmadd(x1, hi[h], S::fmadd(x0, lo[h], gacc[r][h]));
          }
        }
      }
    }
    if constexpr (kTwo)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < NV; ++h) gacc[r][h] = S::add(gacc[r][h], gacc_hi[r][h]);
    for (int h = 0; h < NV; ++h) {
      const F s = S::loadu(scale + g * kQLinearPanel + h * L);
      const F z = S::to_float(S::load_u8(zero + g * kQLinearPanel + h * L));
      for (int r = 0; r < R; ++r) {
        const F xs = S::set1(c.xsum[(i0 + r) * c.n_groups + g]);
        acc[r][h] = S::fmadd(s, S::fnmadd(z, xs, gacc[r][h]), acc[r][h]);
      }
    }
  }
  qlinear_store<S, R, NV>(c, i0, col0, acc);
}

// Rows [i0, m) of one sub-panel, R rows at a time, then the rest with R - 1, R - 2, ... (fully
// unrolled instantiations: the accumulators stay in registers).
template <class S, int R, int NV, class Body>
static inline void qlinear_row_blocks(int64_t i0, int64_t m, const Body& body) {
  if constexpr (R >= 1) {
    for (; i0 + R <= m; i0 += R) body(std::integral_constant<int, R>{}, i0);
    if (i0 < m) qlinear_row_blocks<S, R - 1, NV>(i0, m, body);
  }
}

// Rows are taken in chunks whose float32 activations fill about half of L2 (a multiple of R rows, so
// the row blocks, and the results, are those of one pass): every panel of the thread passes over a
// chunk while it is in L2, instead of the whole x (3.7 MB at 608 rows of K = 1536) coming back from L3
// for every panel. MiniLM's layers at 608 rows: w8 +0.5-4%, w4 +2-5% (session 9; the hardware
// prefetcher hid most of it). Decode shapes are one chunk.
template <int R>
static inline int64_t qlinear_row_chunk(const QLinearCall& c) {
  const int64_t rows = int64_t(cpu_features().l2_bytes / 2) / (c.k_pad * int64_t(sizeof(float)));
  return std::max<int64_t>(R, rows / R * R);
}

// body(p, sub, r0, r1) for every row chunk [r0, r1) (outermost), panel p of [p0, p1) and sub-panel
// (first column sub within the panel) that has columns.
template <class S, int R, int NV, class Body>
static inline void qlinear_for_panels(const QLinearCall& c, int64_t p0, int64_t p1, const Body& body) {
  constexpr int64_t W = NV * S::kLanes;  // columns of a sub-panel
  const int64_t chunk = qlinear_row_chunk<R>(c);
  for (int64_t r0 = 0; r0 < c.m; r0 += chunk) {
    const int64_t r1 = std::min(c.m, r0 + chunk);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t sub = 0; sub < kQLinearPanel && p * kQLinearPanel + sub < c.n; sub += W) body(p, sub, r0, r1);
  }
}

template <class S, int R, int NV>
void qlinear_w8_panels(const QLinearCall& c, int64_t p0, int64_t p1) {
  const int8_t* codes = static_cast<const int8_t*>(c.codes);
  qlinear_for_panels<S, R, NV>(c, p0, p1, [&](int64_t p, int64_t sub, int64_t r0, int64_t r1) {
    const int8_t* panel = codes + p * c.k * kQLinearPanel + sub;
    qlinear_row_blocks<S, R, NV>(r0, r1, [&](auto rows, int64_t i0) {
      qlinear_w8_rows<S, decltype(rows)::value, NV>(c, panel, i0, p * kQLinearPanel + sub);
    });
  });
}

template <class S, int R, int NV>
void qlinear_w4_panels(const QLinearCall& c, int64_t p0, int64_t p1) {
  const uint8_t* codes = static_cast<const uint8_t*>(c.codes);
  qlinear_for_panels<S, R, NV>(c, p0, p1, [&](int64_t p, int64_t sub, int64_t r0, int64_t r1) {
    const uint8_t* panel = codes + p * (c.k_pad / 2) * kQLinearPanel + sub;
    const float* scale = c.scale + p * c.n_groups * kQLinearPanel + sub;
    const uint8_t* zero = c.zero + p * c.n_groups * kQLinearPanel + sub;
    qlinear_row_blocks<S, R, NV>(r0, r1, [&](auto rows, int64_t i0) {
      qlinear_w4_rows<S, decltype(rows)::value, NV>(c, panel, scale, zero, i0, p * kQLinearPanel + sub);
    });
  });
}

}  // namespace
}  // namespace lp
