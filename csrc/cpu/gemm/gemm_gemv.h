// GEMM: the matrix-vector paths' dot products, written once for every ISA (each file that includes
// this compiles its own copy for its instruction set): a few rows of x times the rows of a matrix
// (B = W^T with W row-major, or A for one column of B), each output a dot product along k.
//   gemv_dot_block<Ops, R, C>  R rows of x x C matrix rows sharing each load (lanes of partial sums
//                              over k, a fixed horizontal sum, the k tail in order: every output's
//                              chain is the same in every block, so a few rows give the bits of that
//                              many one-row products)
//   gemv_blocks                the walk over columns in blocks of C (4 / 3 / 2 by the rows) and rows
//                              in blocks of up to 4
//   gemm_gemv_int8_with<Ops>   the int8 GEMM's path on it (gemm_gemv_int8_takes in gemm.h)
// Ops gives the element types (X of x, W of the matrix), the vector V and accumulator Acc, kStep k a
// step, zero / load_w / load_x / madd / sum / madd1 (one element of the tail); the int8 ones also
// x_value (an int8 x as X) and correction(x row, k): what to subtract from each of the row's sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"

namespace lp {
namespace {

template <class Ops, int R, int C, class Store>
static inline void gemv_dot_block(const typename Ops::X* x0, int64_t x_ld, const typename Ops::W* w0, int64_t w_ld,
                                  int64_t k_len, int64_t i0, int64_t j, const Store& store) {
  const typename Ops::W* w[C];
  for (int c = 0; c < C; ++c) w[c] = w0 + (j + c) * w_ld;
  const typename Ops::X* x[R];
  for (int r = 0; r < R; ++r) x[r] = x0 + (i0 + r) * x_ld;
  const int64_t k_vec = k_len / Ops::kStep * Ops::kStep;
  typename Ops::Acc acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Ops::zero();
  for (int64_t k = 0; k < k_vec; k += Ops::kStep) {
    typename Ops::V wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Ops::load_w(w[c] + k);
    for (int r = 0; r < R; ++r) {
      const typename Ops::V xv = Ops::load_x(x[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = Ops::madd(acc[r][c], xv, wv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      auto sum = Ops::sum(acc[r][c]);
      for (int64_t k = k_vec; k < k_len; ++k) sum = Ops::madd1(sum, x[r] + k, w[c] + k);
      store(i0 + r, j + c, sum);
    }
  }
}

// Columns [j0, j1) of `rows` rows of x: block(R, C, i0, j) (R, C as std::integral_constant) for each
// C columns (4 for 1-2 rows, 3 for 3, 2 for more; then single columns), each for every row of x in
// blocks of up to R = 4 rows, so that the block's columns stay in L1 from one row block to the next.
template <class Block>
static void gemv_blocks(int64_t rows, int64_t j0, int64_t j1, const Block& block) {
  auto rows_of = [&](int64_t j, auto cols) {
    for (int64_t i0 = 0; i0 < rows; i0 += 4) {
      switch (std::min<int64_t>(4, rows - i0)) {
        case 1: block(std::integral_constant<int, 1>{}, cols, i0, j); break;
        case 2: block(std::integral_constant<int, 2>{}, cols, i0, j); break;
        case 3: block(std::integral_constant<int, 3>{}, cols, i0, j); break;
        default: block(std::integral_constant<int, 4>{}, cols, i0, j); break;
      }
    }
  };
  auto columns = [&](auto cols) {
    constexpr int C = decltype(cols)::value;
    int64_t j = j0;
    for (; j + C <= j1; j += C) rows_of(j, cols);
    for (; j < j1; ++j) rows_of(j, std::integral_constant<int, 1>{});
  };
  if (rows <= 2)
    columns(std::integral_constant<int, 4>{});
  else if (rows == 3)
    columns(std::integral_constant<int, 3>{});
  else
    columns(std::integral_constant<int, 2>{});
}

// The int8 GEMM's few rows: x (A's rows, or b's column) copied once as Ops::X, k padded with zeros to
// a multiple of 64, and the matrix read in place; outputs through scaled_gemm's epilogue when scaled.
// Up to this many rows of x @ W^T (both tables that have the path: AVX2 and AVX-512; the measurements
// at gemm_int8_avx2 / gemm_int8_avx512).
constexpr int64_t kGemvInt8MaxRows = 8;

template <class X>
struct GemvInt8 {
  const X* x;           // rows x k, x_ld apart (k padded with zeros to a multiple of 64)
  const int32_t* corr;  // per row: subtracted from its sums (Ops::correction)
  int64_t x_ld;
  const int8_t* w;      // matrix row j (k-contiguous) at w + j * w_ld
  int64_t w_ld, k;
  const GemmInt8Args* g;
  int64_t batch;
  bool by_column;       // n == 1: the matrix is A (output j is A's row j), x is b's column
};

// Output (x row i, matrix row j): the plain int32, or scaled_gemm's epilogue.
template <class X>
static inline void gemv_int8_store(const GemvInt8<X>& p, int64_t i, int64_t j, int32_t acc) {
  const GemmInt8Args& g = *p.g;
  acc = int32_t(uint32_t(acc) - uint32_t(p.corr[i]));  // modulo 2^32: the corrected sum fits
  const int64_t a_row = p.by_column ? j : i, b_col = p.by_column ? 0 : j;
  const int64_t at = (p.batch * g.m + a_row) * g.n + b_col;
  if (!g.scale_a) {
    static_cast<int32_t*>(g.out)[at] = acc;
    return;
  }
  const float sa = g.scale_a[g.scale_a_n_elems == 1 ? 0 : a_row], sb = g.scale_b[g.scale_b_n_elems == 1 ? 0 : b_col];
  gemm_store_float(g.out, g.out_dtype, at,
                   gemm_scaled_epilogue<GemmScalarVec>(acc, sa, sb, g.bias != nullptr, g.bias ? g.bias[b_col] : 0.0f));
}

// What the int8 Ops share: x held as X (int8_t, or int16_t widened), W int8, and the k tail one
// product at a time, added modulo 2^32 (a vpdpbusd path's lanes may wrap before its correction).
template <class XT>
struct GemvInt8Ops {
  using X = XT;
  using W = int8_t;
  static X x_value(int8_t v) { return v; }
  static int32_t madd1(int32_t acc, const X* x, const int8_t* w) {
    return int32_t(uint32_t(acc) + uint32_t(int32_t(*x) * int32_t(*w)));
  }
};

// x @ W^T of at most kGemvInt8MaxRows rows (by rows: x = A's rows), or one column b times A with A's
// rows contiguous (by column: x = b, the matrix rows A's rows).
static inline bool gemv_int8_by_rows(const GemmInt8Args& g) {
  return g.m <= kGemvInt8MaxRows && g.b.stride_row_elems == 1;
}

template <class Ops>
void gemm_gemv_int8_with(const GemmInt8Args& g) {
  using X = typename Ops::X;
  const bool by_column = !gemv_int8_by_rows(g);
  const GemmOperand& xo = by_column ? g.b : g.a;  // x rows: A's, or b's column
  const GemmOperand& mo = by_column ? g.a : g.b;  // matrix rows: B's columns (W's rows), or A's rows
  const int64_t rows = by_column ? 1 : g.m, n_out = by_column ? g.m : g.n, k = g.k;
  const int64_t x_step = by_column ? g.b.stride_row_elems : g.a.stride_col_elems;
  const int64_t w_ld = by_column ? g.a.stride_row_elems : g.b.stride_col_elems;
  const int64_t x_ld = gemm_round_up(k, 64);
  // Chunks of 64 matrix rows; a thread per kMinStreamBytesPerThread of them as well as per
  // kGemmMinFlopsPerThread.
  const int64_t n_chunks = gemm_ceil_div(n_out, 64), n_items = g.n_batch * n_chunks;
  const int nt = threads_for_stream(n_items, 2.0 * 64 * double(k * rows), kGemmMinFlopsPerThread, 64.0 * double(k));
  const size_t x_bytes = gemm_round_up(int64_t(g.n_batch * rows * x_ld * sizeof(X)), 64);
  char* scratch = static_cast<char*>(gemm_scratch(1, x_bytes + size_t(g.n_batch * rows) * 4));
  X* x_all = reinterpret_cast<X*>(scratch);
  int32_t* corr_all = reinterpret_cast<int32_t*>(scratch + x_bytes);
  for (int64_t bi = 0; bi < g.n_batch; ++bi) {
    for (int64_t i = 0; i < rows; ++i) {
      const int8_t* src = static_cast<const int8_t*>(xo.ptr) + bi * xo.stride_batch_elems + i * xo.stride_row_elems;
      X* dst = x_all + (bi * rows + i) * x_ld;
      for (int64_t kk = 0; kk < k; ++kk) dst[kk] = Ops::x_value(src[kk * x_step]);
      for (int64_t kk = k; kk < x_ld; ++kk) dst[kk] = 0;
      corr_all[bi * rows + i] = Ops::correction(dst, k);
    }
  }
  parallel_for_claimed(n_items, nt, [&](int64_t item) {
    const int64_t bi = item / n_chunks, j0 = (item % n_chunks) * 64, j1 = std::min(n_out, j0 + 64);
    const GemvInt8<X> p{x_all + bi * rows * x_ld, corr_all + bi * rows, x_ld,
                        static_cast<const int8_t*>(mo.ptr) + bi * mo.stride_batch_elems, w_ld, k, &g, bi, by_column};
    auto store = [&](int64_t i, int64_t j, int32_t v) { gemv_int8_store(p, i, j, v); };
    gemv_blocks(rows, j0, j1, [&](auto r, auto c, int64_t i0, int64_t j) {
      gemv_dot_block<Ops, decltype(r)::value, decltype(c)::value>(p.x, p.x_ld, p.w, p.w_ld, p.k, i0, j, store);
    });
  });
}

}  // namespace
}  // namespace lp
