// GEMM, AVX-512 (F + BF16): the small-M path of the float GEMM (contract in gemm.h), a few rows of A
// times a transposed weight B = W^T, without packing.
//
// For a handful of output rows (decode, small batches) packing B costs as much as the product. When
// B's columns are contiguous along k (B = W^T with W row-major, nn.Linear's forward) and A's rows are
// too, every output is a dot product of an A row and a W row: W streams from memory once, untouched,
// and the few A rows stay in L1 / L2. Register block: 3 W rows x 8 A rows (12 x 2 and 6 x 4 for
// products of 2 and 4 rows at most) = 24 accumulators of 16 float32 lanes over k (16 k per step for
// float32 by FMA; 32 for bf16, by vdpbf16ps on the natural (k, k+1) pairs, or on CPUs whose vdpbf16ps
// is the slower (the avx512-bf16fma table) by two FMAs on the pairs' even and odd elements, each
// widened exactly to float32: SmallMMul), a masked tail, then one fixed lane-sum tree per output
// (Simd512::sum_lanes's, 16 outputs at a time: sum_lanes16).
// Leftovers: rows past m in the last A group re-read a valid row and are not stored; columns past n
// likewise. Each output's arithmetic is the same whichever group or thread computes it, so its bits
// do not depend on the thread count.
// Also here: the int8 GEMM's few rows (x @ W^T, up to 8 rows, or A times one column) on the
// matrix-vector path of gemm_gemv.h with vpdpbusd (Int8DotVnni, at the end).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtypes.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/gemm/gemm_driver.h"
#include "cpu/gemm/gemm_gemv.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

constexpr int64_t kSmallMMaxRows = 48;   // at most this many rows of A
constexpr int64_t kSmallMMinDepth = 128; // and K at least this (the lane sums are per output)
constexpr int64_t kSmallMRows = 8, kSmallMCols = 3;
constexpr int64_t kPackAMinRows = 9;     // A packed in row groups (pack_a_groups) from this many rows

// How a block multiplies: float32 by vfmadd231ps; bf16 by vdpbf16ps on (k, k + 1) pairs; or bf16 by
// vfmadd231ps on the pairs split into their even and odd elements (a bf16 is the top half of a float32:
// the even one shifted up 16 bits, the odd one with the low 16 bits cleared, both exact). The split
// costs two instructions a W vector shared by the block's rows (1 / R of the FMAs), where vdpbf16ps
// gives half the FMA's flops on the Xeons with AMX measured (bench/notes_gemm.md, session 23). A is
// always packed for it (pack_a_groups): split there for the 2- and 4-row blocks, split as it is loaded
// by the 8-row block (small_m_block).
enum class SmallMMul { kF32, kBf16Dot, kBf16Fma };

struct SmallM {
  const char* a;   // batch 0, row 0 of A
  int64_t a_row_bytes, a_batch_bytes;
  const char* a_packed;  // or A packed by pack_a_groups (group g of batch b at (b * a_groups + g) * a_group_bytes)
  int64_t a_groups, a_group_bytes;  // groups of the block's rows
  const char* w;   // batch 0, column 0 of B = row 0 of W
  int64_t w_row_bytes, w_batch_bytes;
  int64_t m, n, k;
  SmallMMul mul;
  const float* bias;
  void* out;
  int out_dtype;
};

// The lane sums of N = 16 (or 8) vectors at once: lane j of the result is the sum of v[j]'s 16 lanes
// (for N = 8: the j = 4 l + q with q < 2, the other v[j] unused), by the tree of Simd512::sum_lanes
// (lane i + lane i + 8, then + 4, + 2, + 1; float addition commutes), so the bits are those of
// sum_lanes, in 45 (24) shuffles and adds instead of 8 per vector.
template <int N>
static inline __m512 sum_lanes16(const __m512 (&v)[16]) {
  static_assert(N == 8 || N == 16, "16 vectors, or the 8 of lanes 4 l + q, q < 2");
  // The tree leaves the sum of input slot 4 q + l in lane 4 l + q: the inputs go in transposed.
  auto in = [&](int slot) { return v[4 * (slot % 4) + slot / 4]; };
  __m512 s1[8], s2[4], s3[2];
  for (int p = 0; p < N / 2; ++p) {  // 128-bit blocks [a0 + a2, a1 + a3, b0 + b2, b1 + b3]: lanes i + i + 8
    const __m512 a = in(2 * p), b = in(2 * p + 1);
    s1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int r = 0; r < N / 4; ++r)  // blocks [A, B, C, D] of four inputs: lanes i + i + 4
    s2[r] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0xDD));
  for (int t = 0; t < N / 8; ++t)  // within blocks: lanes i + i + 2
    s3[t] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0x44), _mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0xEE));
  const __m512 e = s3[0], f = N == 16 ? s3[1] : s3[0];
  return _mm512_add_ps(_mm512_shuffle_ps(e, f, 0x88), _mm512_shuffle_ps(e, f, 0xDD));  // lanes i + i + 1
}

// A vector of 32 bf16 as its even and its odd elements in float32 (exact): the even ones shifted up 16
// bits, the odd ones with the low 16 bits cleared (a mask register, not a vector constant: the 8-row
// block has no vector register to spare).
struct SmallMSplit {
  __m512 even, odd;
};
static inline SmallMSplit split_bf16(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_castsi512_ps(_mm512_maskz_mov_epi16(0xAAAAAAAAu, v))};
}
// A block's W and A vectors: one register each; split bf16, two for W and for A either two (A_REGS) or
// a pointer into A's split packing, which the FMAs read.
template <bool SPLIT, bool A_REGS>
struct SmallMVec {
  using W = __m512;
  using A = __m512;
};
template <bool A_REGS>
struct SmallMVec<true, A_REGS> {
  using W = SmallMSplit;
  using A = std::conditional_t<A_REGS, SmallMSplit, const float*>;
};

// One block of R A rows x C = 24 / R W rows at (i0, j0). R = 8 (C = 3) from 5 rows of A; 2 or 4 rows
// take R = 2 (C = 12) or 4 (C = 6), so that no multiply-add is spent on a repeated row: 2 rows of bf16
// ran the 8-row block bound by its vdpbf16ps, 2.5x the 1-row product's time where both read W once.
// Accumulator i is row i % R, column i / R (named c<i>: see ukernel_12x32 in gemm_avx512.cc for why);
// each step loads the smaller side's vectors first and streams the other side's through them one at a
// time, so 24 + min(R, C) + 1 vector registers are live. Split bf16 (kBf16Fma) takes two registers a
// vector: the 8-row block splits its A rows as it loads them (24 + 2 x 3 for W + 2 for A: 32), the 2- and
// 4-row blocks read A from its split packing (24 + 2 + 1). A split in the 8-row block's registers
// instead of read split from memory: 1.19-1.21x at 6-24 rows of 4096 x 4096, 1.34x at 8 x 11008 -> 4096
// (the split rows are twice the A bytes, from L2 for every FMA pair), 0.94x at 8 x 1024 -> 1024 (A in
// L1). The accumulators' arithmetic is the 8-row block's whatever R, so the bits are too.
template <SmallMMul MUL, bool PACKED_A, int R>
void small_m_block(const SmallM& p, int64_t batch, int64_t i0, int64_t j0) {
  static_assert(R == 2 || R == 4 || R == kSmallMRows, "2, 4 or 8 rows a block");
  static_assert(MUL != SmallMMul::kBf16Fma || PACKED_A, "the split bf16 FMAs read A from pack_a_groups");
  constexpr int C = 24 / R;
  constexpr bool kBf16 = MUL != SmallMMul::kF32, kSplit = MUL == SmallMMul::kBf16Fma;
  constexpr bool kARegs = kSplit && R >= C;  // split A: in registers (8-row block) or read from memory
  constexpr int64_t kStep = kBf16 ? 32 : 16;        // k per vector
  constexpr int64_t kAStepBytes = kSplit && !kARegs ? 128 : 64;  // a packed row's bytes a step
  const char* ap = PACKED_A ? p.a_packed + (batch * p.a_groups + i0 / R) * p.a_group_bytes : nullptr;
  const char* arow[R];
  for (int r = 0; r < R; ++r)
    arow[r] = PACKED_A ? nullptr : p.a + batch * p.a_batch_bytes + std::min(i0 + r, p.m - 1) * p.a_row_bytes;
  const char* wrow[C];
  for (int c = 0; c < C; ++c)
    wrow[c] = p.w + batch * p.w_batch_bytes + std::min(j0 + c, p.n - 1) * p.w_row_bytes;
  constexpr int64_t kElemBytes = kBf16 ? 2 : 4;
  using WVec = typename SmallMVec<kSplit, kARegs>::W;
  using AVec = typename SmallMVec<kSplit, kARegs>::A;
  auto load = [](const char* row, int64_t k, int64_t n_valid) -> WVec {
    const void* q = row + k * kElemBytes;
    if constexpr (kSplit) {
      return split_bf16(n_valid >= kStep ? _mm512_loadu_si512(q)
                                         : _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n_valid) - 1), q));
    } else if constexpr (kBf16) {
      return _mm512_castsi512_ps(n_valid >= kStep ? _mm512_loadu_si512(q)
                                                  : _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n_valid) - 1), q));
    } else {
      return n_valid >= kStep ? _mm512_loadu_ps(q) : _mm512_maskz_loadu_ps(__mmask16((1u << n_valid) - 1), q);
    }
  };
  auto madd = [](__m512 acc, const AVec& x, const WVec& y) -> __m512 {
    if constexpr (kARegs)
      return _mm512_fmadd_ps(x.odd, y.odd, _mm512_fmadd_ps(x.even, y.even, acc));
    else if constexpr (kSplit)
      return _mm512_fmadd_ps(_mm512_load_ps(x + 16), y.odd, _mm512_fmadd_ps(_mm512_load_ps(x), y.even, acc));
    else if constexpr (kBf16)
      return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)y);
    else
      return _mm512_fmadd_ps(x, y, acc);
  };
  auto a_row = [&](int r, int64_t k, int64_t left) -> AVec {
    if constexpr (kARegs) return split_bf16(_mm512_load_si512(ap + r * kAStepBytes));
    else if constexpr (kSplit) return reinterpret_cast<const float*>(ap + r * kAStepBytes);
    else if constexpr (PACKED_A) return _mm512_load_ps(reinterpret_cast<const float*>(ap + r * kAStepBytes));
    else return load(arow[r], k, left);
  };
#define LP_SM_24(X) \
  X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)      \
  X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
// The same list again, for use inside an expansion of LP_SM_24 (a macro does not expand within itself).
#define LP_SM_24_IN(X) \
  X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)      \
  X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
#define LP_SM_DECL(i) __m512 c##i = _mm512_setzero_ps();
// Accumulator i in the order the step runs: with W's C vectors loaded (R = 8), row by row, its A
// vector loaded as the row's first; with A's R vectors loaded, column by column likewise.
#define LP_SM_CASE(i) \
  if constexpr (idx == (i)) c##i = madd(c##i, x, y);
#define LP_SM_MADD_ROWS(j)                                                          \
  {                                                                                 \
    constexpr int r = (j) / C, c = (j) % C, idx = r + c * R;                        \
    if constexpr (c == 0) a = a_row(r, k, left);                                    \
    const AVec& x = a;                                                              \
    const WVec& y = wv[c];                                                          \
    LP_SM_24_IN(LP_SM_CASE)                                                         \
  }
#define LP_SM_MADD_COLS(j)                                                          \
  {                                                                                 \
    constexpr int c = (j) / R, r = (j) % R, idx = r + c * R;                        \
    if constexpr (r == 0) w = load(wrow[c], k, left);                               \
    const AVec& x = av[r];                                                          \
    const WVec& y = w;                                                              \
    LP_SM_24_IN(LP_SM_CASE)                                                         \
  }
  LP_SM_24(LP_SM_DECL)
  for (int64_t k = 0; k < p.k; k += kStep, ap += PACKED_A ? R * kAStepBytes : 0) {
    const int64_t left = p.k - k;
    if constexpr (R >= C) {
      WVec wv[C];
      AVec a;
      for (int c = 0; c < C; ++c) wv[c] = load(wrow[c], k, left);
      LP_SM_24(LP_SM_MADD_ROWS)
    } else {
      AVec av[R];
      WVec w;
      for (int r = 0; r < R; ++r) av[r] = a_row(r, k, left);
      LP_SM_24(LP_SM_MADD_COLS)
    }
  }
  // The 24 lane sums as two vectors: accumulator i < 16 in lane i of the first; i >= 16 in lane
  // 4 ((i - 16) / 2) + i % 2 of the second (sum_lanes16<8>). Bias added after the sum, rounded once to
  // the output dtype by the vector conversion (the scalar one's bits), then each valid output copied out.
  const __m512 z = _mm512_setzero_ps();
  const __m512 first[16] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15};
  const __m512 second[16] = {c16, c17, z, z, c18, c19, z, z, c20, c21, z, z, c22, c23, z, z};
#undef LP_SM_CASE
#undef LP_SM_MADD_COLS
#undef LP_SM_MADD_ROWS
#undef LP_SM_DECL
#undef LP_SM_24_IN
#undef LP_SM_24
  auto lane_of = [](int i) { return i < 16 ? i : 16 + 4 * ((i - 16) / 2) + i % 2; };  // 16 +: the second vector
  __m512 sums[2] = {sum_lanes16<16>(first), sum_lanes16<8>(second)};
  if (p.bias) {
    alignas(64) float bias_lanes[32] = {};
    for (int i = 0; i < 24; ++i) bias_lanes[lane_of(i)] = p.bias[std::min<int64_t>(j0 + i / R, p.n - 1)];
    sums[0] = _mm512_add_ps(sums[0], _mm512_load_ps(bias_lanes));
    sums[1] = _mm512_add_ps(sums[1], _mm512_load_ps(bias_lanes + 16));
  }
  alignas(64) uint8_t rounded[2][64];
  for (int v = 0; v < 2; ++v) Simd512::store_as(p.out_dtype, rounded[v], sums[v]);
  const int64_t rows = std::min<int64_t>(R, p.m - i0), cols = std::min<int64_t>(C, p.n - j0);
  const bool wide = p.out_dtype == LP_DTYPE_F32;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const int lane = lane_of(int(r + c * R));
      const int64_t at = (batch * p.m + i0 + r) * p.n + j0 + c;
      if (wide)
        std::memcpy(static_cast<float*>(p.out) + at, rounded[lane / 16] + (lane % 16) * 4, 4);
      else
        std::memcpy(static_cast<uint16_t*>(p.out) + at, rounded[lane / 16] + (lane % 16) * 2, 2);
    }
  }
}

// Whether the small-M path takes this product (float32 or bf16 inputs; float16 is packed).
bool small_m_applies(const GemmFloatArgs& g) {
  return g.m <= kSmallMMaxRows && g.k >= kSmallMMinDepth && g.n >= kSmallMCols && g.a.dtype != LP_DTYPE_F16 &&
         g.a.stride_col_elems == 1 && g.b.stride_row_elems == 1;
}

// A's rows in groups of the block's rows (8; 2 or 4 for the split bf16 FMAs, which read A split from
// here), each group k-step by k-step: the group's 64 bytes of one step together (zero past K; rows
// past m repeat the last one); split, each row's 32 bf16 of a step as 128 bytes, its even then its odd
// elements as float32 (split_bf16). The block's A vectors of a step are then at fixed offsets from one
// pointer: with 8 row pointers the loop ran out of general registers, spilled them to vector registers
// and, short of those, loaded every A vector three times. Unsplit, taken from two row groups on (kPackAMinRows): with one, the copies made
// the product slower (2 x 4096 x 4096 bf16: 0.84x, its 8 rows from two distinct ones; 8 rows: 0.92x).
void pack_a_groups(const GemmFloatArgs& g, int64_t eb, int64_t k_steps, int64_t group_rows, bool split, char* dst) {
  const int64_t step_elems = 64 / eb, groups = gemm_ceil_div(g.m, group_rows), row_step_bytes = split ? 128 : 64;
  for (int64_t b = 0; b < g.n_batch; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      char* d = dst + (b * groups + grp) * k_steps * group_rows * row_step_bytes;
      for (int64_t r = 0; r < group_rows; ++r) {
        const char* src = static_cast<const char*>(g.a.ptr) +
                          (b * g.a.stride_batch_elems + std::min(grp * group_rows + r, g.m - 1) * g.a.stride_row_elems) * eb;
        for (int64_t s = 0; s < k_steps; ++s) {
          const int64_t left = g.k - s * step_elems;
          const __m512i v = left >= step_elems ? _mm512_loadu_si512(src + s * 64)
                                               : _mm512_maskz_loadu_epi8((uint64_t(1) << (left * eb)) - 1, src + s * 64);
          char* at = d + (s * group_rows + r) * row_step_bytes;
          if (split) {
            const SmallMSplit x = split_bf16(v);
            _mm512_store_ps(at, x.even);
            _mm512_store_ps(at + 64, x.odd);
          } else {
            _mm512_store_si512(at, v);
          }
        }
      }
    }
  }
}

}  // namespace

// Takes the product when small_m_applies (returns false otherwise, having done nothing); bf16 by
// vdpbf16ps, or by FMAs on its split pairs where bf16_by_fma (SmallMMul).
bool gemm_small_m_float_avx512(const GemmFloatArgs& g, bool bf16_by_fma) {
  if (!small_m_applies(g)) return false;
  const bool bf16 = g.a.dtype == LP_DTYPE_BF16, split = bf16 && bf16_by_fma;
  const int64_t eb = bf16 ? 2 : 4;
  // Blocks of 2 or 4 rows for products of at most that many rows, else of 8 (small_m_block).
  const int rows_per_block = g.m <= 2 ? 2 : g.m <= 4 ? 4 : int(kSmallMRows), cols_per_block = 24 / rows_per_block;
  const int64_t k_steps = gemm_ceil_div(g.k * eb, 64), a_groups = gemm_ceil_div(g.m, rows_per_block);
  const bool split_packed = split && rows_per_block < kSmallMRows;  // not small_m_block's kARegs
  const int64_t a_group_bytes = k_steps * rows_per_block * (split_packed ? 128 : 64);
  char* a_packed = nullptr;
  if (g.m >= kPackAMinRows || split) {
    // The calling thread packs A before the parallel region (gemm_scratch: slot 1, the
    // matrix-vector path's, which never runs in the same call).
    a_packed = static_cast<char*>(gemm_scratch(1, size_t(g.n_batch * a_groups * a_group_bytes)));
    pack_a_groups(g, eb, k_steps, rows_per_block, split_packed, a_packed);
  }
  SmallM p{static_cast<const char*>(g.a.ptr), g.a.stride_row_elems * eb, g.a.stride_batch_elems * eb, a_packed,
           a_groups, a_group_bytes,
           static_cast<const char*>(g.b.ptr), g.b.stride_col_elems * eb, g.b.stride_batch_elems * eb,
           g.m, g.n, g.k, split ? SmallMMul::kBf16Fma : bf16 ? SmallMMul::kBf16Dot : SmallMMul::kF32,
           g.bias, g.out, g.out_dtype};
  // Work items: (batch, group of W rows of a block); every A row group is done for a W group while its
  // rows are in L1, so W is read from memory once. Handed out in chunks from a counter (ClaimedChunks):
  // with a busy loop on one core 32 x 4096 -> 4096 1.56x, without 0.99-1.02x (memory-bound; 2-core Xeon).
  const int64_t n_groups = gemm_ceil_div(g.n, cols_per_block);
  const int64_t n_items = g.n_batch * n_groups;
  const int nt = threads_for_stream(n_items, 2.0 * double(g.m) * double(cols_per_block) * double(g.k),
                                    kGemmMinFlopsPerThread, double(cols_per_block) * double(g.k) * double(eb));
  auto run = [&](auto mul, int64_t batch, int64_t j0) {
    constexpr SmallMMul M = decltype(mul)::value;
    constexpr bool kSplit = M == SmallMMul::kBf16Fma;  // A always packed
    if (rows_per_block == 2) return small_m_block<M, kSplit, 2>(p, batch, 0, j0);
    if (rows_per_block == 4) return small_m_block<M, kSplit, 4>(p, batch, 0, j0);
    for (int64_t i0 = 0; i0 < g.m; i0 += kSmallMRows) {
      if constexpr (kSplit)
        small_m_block<M, true, 8>(p, batch, i0, j0);
      else if (p.a_packed)
        small_m_block<M, true, 8>(p, batch, i0, j0);
      else
        small_m_block<M, false, 8>(p, batch, i0, j0);
    }
  };
  parallel_for_claimed(n_items, nt, [&](int64_t item) {
    const int64_t batch = item / n_groups, j0 = (item % n_groups) * cols_per_block;
    switch (p.mul) {
      case SmallMMul::kF32: return run(std::integral_constant<SmallMMul, SmallMMul::kF32>{}, batch, j0);
      case SmallMMul::kBf16Dot: return run(std::integral_constant<SmallMMul, SmallMMul::kBf16Dot>{}, batch, j0);
      case SmallMMul::kBf16Fma: return run(std::integral_constant<SmallMMul, SmallMMul::kBf16Fma>{}, batch, j0);
    }
  });
  return true;
}

// The int8 GEMM's few rows on the matrix-vector path (gemm_gemv.h) by vpdpbusd: W's bytes flipped to
// unsigned (w ^ 0x80 = w + 128) as the instruction's first operand and x as is, so each lane sums
// (w + 128) x over 4 k; each row's 128 * sum x over the vectorized k comes off at the end (modulo 2^32:
// the lanes may wrap, the corrected sum fits int32 under the int8 GEMM's K limit).
namespace {
struct Int8DotVnni : GemvInt8Ops<int8_t> {
  using V = __m512i;
  using Acc = __m512i;
  static constexpr int64_t kStep = 64;
  static int32_t correction(const int8_t* x, int64_t k) {
    int32_t s = 0;
    for (int64_t kk = 0; kk < k / kStep * kStep; ++kk) s += x[kk];
    return int32_t(uint32_t(s) * 128u);
  }
  static __m512i zero() { return _mm512_setzero_si512(); }
  static __m512i load_w(const int8_t* p) {
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80)));
  }
  static __m512i load_x(const int8_t* p) { return _mm512_loadu_si512(p); }
  static __m512i madd(__m512i acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, w, x); }
  static int32_t sum(__m512i acc) { return _mm512_reduce_add_epi32(acc); }
};
}  // namespace

void gemm_gemv_int8_avx512(const GemmInt8Args& g) { gemm_gemv_int8_with<Int8DotVnni>(g); }

}  // namespace lp
