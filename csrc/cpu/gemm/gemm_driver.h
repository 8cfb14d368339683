// The macro-loop of the packed (BLIS/GotoBLAS-style) GEMM kernels, shared by every SIMD ISA file.
//
// One "unit" = a batch index, a row range and a column range of the output; threads own disjoint
// units and never split K:
//   for each K block of depth kc:                    B block (kc x nu) packed into NR-column panels
//     for each A block of mc rows:                   A block (mc x kc) packed into MR-row panels (L2)
//       for each NR-column panel of B (in L1):
//         for each MR-row panel of A:  tile() -> one MR x NR tile of the output
// Unit edges are multiples of MR / NR, so whether an element sits in an edge tile (and hence its
// bits) never depends on the thread count.
//
// A Traits type supplies what is ISA- and dtype-specific:
//   Traits::Packed         packed element type
//   Traits::kMr, kNr       register tile
//   Traits::kKGroup        k values packed together per lane (1: float, 2: int16 / bf16 pairs, 4: int8 quads);
//                          a panel's depth is kc rounded up to it (zero-padded)
//   tr.b_panel_elems(kc_panel)   Packed elements of one B panel (NR * kc_panel, plus any per-panel extras)
//   tr.pack_a(batch, i0, mc, p0, kc, Packed* dst) / tr.pack_b(batch, p0, kc, j0, nc, Packed* dst)
//   tr.tile(kc_panel, ap, bp, unit, row, col, rows, cols, first, last, ws)   (row / col: global)
//
// Everything here is in an anonymous namespace on purpose: each ISA file compiles its own copy
// with its own -m flags, and the linker must never merge them (see common/dtypes.h).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"

namespace lp {
namespace {

// A thread gets at least this many flops before we fork: a 64^3 GEMM (0.5 MFLOP, a few us) stays
// on one thread; fork/join costs a few microseconds.
constexpr double kGemmMinFlopsPerThread = 3.0e6;
// Largest partial-sum workspace per thread (elements) for 16-bit / scaled outputs spanning K blocks.
constexpr int64_t kGemmWorkspaceElems = int64_t(4) << 20;
// Packing may write whole vectors past a panel's last valid lane; this much slack (in bytes) follows
// every packed block.
constexpr int64_t kGemmPackSlackBytes = 256;

// How the output is cut into units (batch x row range x column range) and spread over threads.
struct GemmPlan {
  int64_t mu = 0, nu = 0;  // rows / columns of a unit (multiples of MR / NR except at the end)
  int64_t units_m = 1, units_n = 1;
  int64_t n_units = 0;
  int n_threads = 1;
};

template <int64_t MR, int64_t NR>
GemmPlan gemm_make_plan(int64_t n_batch, int64_t m, int64_t n, int64_t k, const GemmBlocking& blk, bool need_ws) {
  GemmPlan p;
  p.nu = std::min(gemm_round_up(n, NR), blk.nc);
  p.mu = gemm_round_up(m, MR);
  if (need_ws) {
    // The workspace caps a unit's rows; cut M into equal units under the cap (not full units and a
    // sliver, which would leave a thread idle).
    const int64_t mu_max = std::max(blk.mc, kGemmWorkspaceElems / p.nu / blk.mc * blk.mc);
    if (p.mu > mu_max) p.mu = gemm_round_up(gemm_ceil_div(m, gemm_ceil_div(m, mu_max)), MR);
  }
  p.units_n = gemm_ceil_div(n, p.nu);
  p.units_m = gemm_ceil_div(m, p.mu);
  // Threads: at most one per register tile, and each with at least kGemmMinFlopsPerThread of work.
  const int64_t n_tiles = n_batch * gemm_ceil_div(m, MR) * gemm_ceil_div(n, NR);
  int64_t nt = threads_for(n_tiles, 2.0 * double(MR * NR) * double(k), kGemmMinFlopsPerThread);
  int64_t units = n_batch * p.units_m * p.units_n;
  if (nt > 1 && units < 4 * nt && units % nt != 0) {
    // Too few units to share evenly: cut each into nt pieces along the dimension whose other operand
    // is cheaper to pack twice (splitting N re-packs A in every thread, splitting M re-packs B).
    const bool split_n = m <= n ? n >= nt * NR : m < nt * MR;
    if (split_n) {
      p.nu = gemm_round_up(gemm_ceil_div(n, p.units_n * nt), NR);
      p.units_n = gemm_ceil_div(n, p.nu);
    } else {
      p.mu = gemm_round_up(gemm_ceil_div(m, p.units_m * nt), MR);
      p.units_m = gemm_ceil_div(m, p.mu);
    }
    units = n_batch * p.units_m * p.units_n;
  }
  p.n_units = units;
  p.n_threads = int(std::max<int64_t>(1, std::min(nt, units)));
  return p;
}

// Row length (elements) of a thread's partial-sum workspace: the unit's width plus one cache line,
// so that the rows of a tile (often 4 KiB multiples apart otherwise) do not all fall in one L1 set.
static inline int64_t gemm_ws_ld(const GemmPlan& p) { return p.nu + 16; }

// One unit's output window.
struct GemmUnit {
  int64_t batch, m0, m1, n0, n1;
};

static inline GemmUnit gemm_unit_at(const GemmPlan& p, int64_t u, int64_t m, int64_t n) {
  GemmUnit w;
  w.batch = u / (p.units_m * p.units_n);
  const int64_t r = u % (p.units_m * p.units_n);
  w.m0 = (r / p.units_n) * p.mu;
  w.m1 = std::min(m, w.m0 + p.mu);
  w.n0 = (r % p.units_n) * p.nu;
  w.n1 = std::min(n, w.n0 + p.nu);
  return w;
}

// Runs every unit of the plan (see the top of this file). need_ws: each thread gets an mu x nu
// float32 / int32 workspace for partial sums (passed to tr.tile).
template <class Traits>
void gemm_run_units(const Traits& tr, const GemmPlan& plan, const GemmBlocking& blk, int64_t m, int64_t n,
                    int64_t k, bool need_ws) {
  using Packed = typename Traits::Packed;
  constexpr int64_t MR = Traits::kMr, NR = Traits::kNr, KG = Traits::kKGroup;
  const int64_t kc_alloc = gemm_round_up(std::min(blk.kc, k), 16);  // a multiple of every KG
  const int64_t a_elems = gemm_round_up(std::min(blk.mc, plan.mu), MR) * kc_alloc;
  const int64_t b_elems = gemm_ceil_div(plan.nu, NR) * tr.b_panel_elems(kc_alloc);
  const int64_t ws_elems = need_ws ? plan.mu * gemm_ws_ld(plan) : 0;
  // One block per thread: [A panels | B panels | workspace], each part 64-byte aligned.
  const int64_t a_bytes = gemm_round_up(a_elems * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t b_bytes = gemm_round_up(b_elems * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t ws_bytes = gemm_round_up(ws_elems * 4, 64);
  const int64_t per_thread = a_bytes + b_bytes + ws_bytes;
  char* scratch = static_cast<char*>(gemm_scratch(0, size_t(per_thread) * size_t(plan.n_threads)));

  parallel_region(plan.n_threads, [&](int t, int n_threads) {
    char* mine = scratch + int64_t(t) * per_thread;
    Packed* a_pack = reinterpret_cast<Packed*>(mine);
    Packed* b_pack = reinterpret_cast<Packed*>(mine + a_bytes);
    void* ws = mine + a_bytes + b_bytes;
    const int64_t u_begin = plan.n_units * t / n_threads, u_end = plan.n_units * (t + 1) / n_threads;
    for (int64_t u = u_begin; u < u_end; ++u) {
      const GemmUnit w = gemm_unit_at(plan, u, m, n);
      const int64_t ncur = w.n1 - w.n0;
      for (int64_t p0 = 0; p0 < k; p0 += blk.kc) {
        const int64_t kc = std::min(blk.kc, k - p0);
        const int64_t kc_panel = gemm_round_up(kc, KG);
        const int64_t b_panel = tr.b_panel_elems(kc_panel);
        const bool first = p0 == 0, last = p0 + kc == k;
        tr.pack_b(w.batch, p0, kc, w.n0, ncur, b_pack);
        for (int64_t i0 = w.m0; i0 < w.m1; i0 += blk.mc) {
          const int64_t mcur = std::min(blk.mc, w.m1 - i0);
          tr.pack_a(w.batch, i0, mcur, p0, kc, a_pack);
          for (int64_t jr = 0; jr < ncur; jr += NR) {
            const Packed* bp = b_pack + (jr / NR) * b_panel;
            for (int64_t ir = 0; ir < mcur; ir += MR) {
              tr.tile(kc_panel, a_pack + ir * kc_panel, bp, w, i0 + ir, w.n0 + jr, std::min(MR, mcur - ir),
                      std::min(NR, ncur - jr), first, last, ws);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tiles: where one MR x NR tile's results go, and edge tiles
// ---------------------------------------------------------------------------------------------

struct GemmFloatTile {
  const float* prev = nullptr;  // float32 partial sums of earlier K blocks (null: first block)
  int64_t prev_ld = 0;
  bool final = false;           // last K block: add bias, round, write `out`; else write c32
  float* c32 = nullptr;         // float32 partial sums destination (not final)
  int64_t c32_ld = 0;
  void* out = nullptr;          // final destination at the tile's corner, dtype out_dtype
  int64_t out_ld = 0;
  int out_dtype = LP_DTYPE_F32;
  const float* bias = nullptr;  // at the tile's first column, or null
};

struct GemmInt8Tile {
  const int32_t* prev = nullptr;   // int32 partial sums of earlier K blocks (null: first block)
  int64_t prev_ld = 0;
  bool final = false;
  int32_t* c32 = nullptr;          // int32 destination: partial sums, or the plain GEMM's output
  int64_t c32_ld = 0;
  // scaled epilogue (final tiles of scaled_gemm only)
  bool scaled = false;
  void* out = nullptr;             // at the tile's corner
  int64_t out_ld = 0;
  int out_dtype = LP_DTYPE_F32;
  const float* scale_a = nullptr;  // at the tile's first row; stride 0 when per-tensor
  int64_t scale_a_stride = 0;
  const float* scale_b = nullptr;  // at the tile's first column; stride 0 when per-tensor
  int64_t scale_b_stride = 0;
  const float* bias = nullptr;     // at the tile's first column, or null
};

// Where the tile at (row, col) of unit w keeps its 32-bit partial sums: in the output itself
// (c32_is_out: a float32 output, or the plain int8 GEMM's int32 one), else in the unit's workspace
// ws (row length ws_ld); prev points at them after the first K block.
template <class Tile, class Args>
static inline void gemm_tile_sums(Tile& t, const Args& g, bool c32_is_out, int64_t ws_ld, void* ws, const GemmUnit& w,
                                  int64_t row, int64_t col, bool first, bool last) {
  using Elem = typename std::remove_pointer<decltype(t.c32)>::type;
  if (c32_is_out) {
    t.c32 = static_cast<Elem*>(g.out) + (w.batch * g.m + row) * g.n + col;
    t.c32_ld = g.n;
  } else {
    t.c32 = static_cast<Elem*>(ws) + (row - w.m0) * ws_ld + (col - w.n0);
    t.c32_ld = ws_ld;
  }
  if (!first) t.prev = t.c32, t.prev_ld = t.c32_ld;
  t.final = last;
}

// The float tile at (row, col): partial sums as above; the final K block adds the bias and rounds
// once into the output.
static inline GemmFloatTile gemm_float_tile(const GemmFloatArgs& g, bool c32_is_out, int64_t ws_ld, void* ws,
                                            const GemmUnit& w, int64_t row, int64_t col, bool first, bool last) {
  const int64_t out_off = (w.batch * g.m + row) * g.n + col;
  GemmFloatTile t;
  gemm_tile_sums(t, g, c32_is_out, ws_ld, ws, w, row, col, first, last);
  t.out = static_cast<char*>(g.out) + out_off * (g.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  t.out_ld = g.n;
  t.out_dtype = g.out_dtype;
  t.bias = g.bias ? g.bias + col : nullptr;
  return t;
}

// The int8 tile at (row, col): int32 partial sums as above; scaled_gemm's final tiles also get the
// epilogue's scales, bias and output.
static inline GemmInt8Tile gemm_int8_tile(const GemmInt8Args& g, bool c32_is_out, int64_t ws_ld, void* ws,
                                          const GemmUnit& w, int64_t row, int64_t col, bool first, bool last) {
  const int64_t out_off = (w.batch * g.m + row) * g.n + col;
  GemmInt8Tile t;
  gemm_tile_sums(t, g, c32_is_out, ws_ld, ws, w, row, col, first, last);
  if (g.scale_a) {
    t.scaled = true;
    t.out = static_cast<char*>(g.out) + out_off * (g.out_dtype == LP_DTYPE_F32 ? 4 : 2);
    t.out_ld = g.n;
    t.out_dtype = g.out_dtype;
    t.scale_a_stride = g.scale_a_n_elems == 1 ? 0 : 1;
    t.scale_a = g.scale_a + row * t.scale_a_stride;
    t.scale_b_stride = g.scale_b_n_elems == 1 ? 0 : 1;
    t.scale_b = g.scale_b + col * t.scale_b_stride;
    t.bias = g.bias ? g.bias + col : nullptr;
  }
  return t;
}

// An edge tile (rows < MR or cols < NR valid): the full-tile microkernel `uk(lt)` runs on a local
// MR x NR tile of Elem (float or int32), then the valid part is written by scalar code: to t.c32
// when write_c32, else through final_store(i, j, v), which repeats the full-tile epilogue's float32
// operations element by element.
template <int64_t MR, int64_t NR, class Elem, class Tile, class Ukernel, class FinalStore>
static inline void gemm_edge_tile(const Tile& t, int64_t rows, int64_t cols, const Ukernel& uk, bool write_c32,
                                  const FinalStore& final_store) {
  alignas(64) Elem local[MR * NR] = {};
  Tile lt;  // not final: the microkernel writes its sums to lt.c32
  if (t.prev) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) local[i * NR + j] = t.prev[i * t.prev_ld + j];
    lt.prev = local;
    lt.prev_ld = NR;
  }
  lt.c32 = local;
  lt.c32_ld = NR;
  uk(lt);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const Elem v = local[i * NR + j];
      if (write_c32)
        t.c32[i * t.c32_ld + j] = v;
      else
        final_store(i, j, v);
    }
  }
}

template <int64_t MR, int64_t NR, class Ukernel>
static inline void gemm_edge_tile_float(const GemmFloatTile& t, int64_t rows, int64_t cols, const Ukernel& uk) {
  gemm_edge_tile<MR, NR, float>(t, rows, cols, uk, !t.final, [&](int64_t i, int64_t j, float v) {
    gemm_store_float(t.out, t.out_dtype, i * t.out_ld + j, t.bias ? v + t.bias[j] : v);
  });
}

template <int64_t MR, int64_t NR, class Ukernel>
static inline void gemm_edge_tile_int8(const GemmInt8Tile& t, int64_t rows, int64_t cols, const Ukernel& uk) {
  gemm_edge_tile<MR, NR, int32_t>(t, rows, cols, uk, !t.final || !t.scaled, [&](int64_t i, int64_t j, int32_t v) {
    const float sa = t.scale_a[i * t.scale_a_stride], sb = t.scale_b[j * t.scale_b_stride];
    gemm_store_float(t.out, t.out_dtype, i * t.out_ld + j, gemm_scaled_value(v, sa, sb, t.bias, j));
  });
}

}  // namespace
}  // namespace lp
