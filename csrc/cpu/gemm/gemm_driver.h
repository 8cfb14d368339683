// What the packed (BLIS/GotoBLAS-style) GEMM kernels of every SIMD ISA share; an ISA file adds only
// its packing, its microkernels and its kernel sets (see "Traits from an ISA's kernel set" below).
//
// The macro-loop (gemm_run_units). One "unit" = a batch index, a row range and a column range of the
// output; threads own disjoint units and never split K (a thread that falls behind leaves A blocks of
// its units to the others: GemmUnitShare):
//   for each K block of depth kc:                    B block (kc x nu) packed into NR-column panels
//     for each A block of mc rows:                   A block (mc x kc) packed into MR-row panels (L2)
//       for each NR-column panel of B (in L1):
//         for each MR-row panel of A:  tile() -> one MR x NR tile of the output
// Unit edges are multiples of MR / NR, so whether an element sits in an edge tile (and hence its
// bits) never depends on the thread count.
//
// The macro-loop takes a Traits type (GemmTraits<K, Args> below):
//   Traits::Packed         packed element type
//   Traits::kMr, kNr       register tile
//   Traits::kKGroup        k values packed together per lane (1: float, 2: int16 / bf16 pairs, 4: int8 quads,
//                          32 / 64: an AMX tile row);
//                          a panel's depth is kc rounded up to it (zero-padded)
//   tr.b_panel_elems(kc_panel)   Packed elements of one B panel (NR * kc_panel, plus any per-panel extras)
//   tr.pack_a(batch, i0, mc, p0, kc, Packed* dst) / tr.pack_b(batch, p0, kc, j0, nc, Packed* dst)
//   tr.prepacked_b(p0, j0, blk, n)   the pre-packed B panel of the K block at p0 and column j0 (a
//                          multiple of NR), or null (B packed in the call)
//   tr.tile(kc_panel, ap, bp, unit, row, col, rows, cols, first, last, ws)   (row / col: global)
// Also here: where a tile's results go (GemmFloatTile / GemmInt8Tile), the tile epilogues written
// once against the vector interface of simd256.h, edge tiles, and the panel loop of packing with its
// scalar rest and zero padding (gemm_pack_panels).
//
// Everything here is in an anonymous namespace on purpose: each ISA file compiles its own copy
// with its own -m flags, and the linker must never merge them (see common/dtypes.h).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include "common/codes.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"

namespace lp {
namespace {

// A thread gets at least this many flops before we fork: a 64^3 GEMM (0.5 MFLOP, a few us) stays
// on one thread; fork/join costs a few microseconds. The packed kernel sets may take less (their
// K::kMinFlopsPerThread: the FMA kernels do a MFLOP in 5-10 us, AMX in 1-2).
constexpr double kGemmMinFlopsPerThread = 3.0e6;
// The FMA kernel sets' (AVX2; AVX-512 float32 / bf16): 2 threads from ~1 MFLOP. On the 2-core AMX
// Xeon, 2 threads over 1 in three runs (session 18): AVX-512 float32 80^3 0.99-1.22x, 96^3 1.11-1.12x,
// 112^3 1.00-1.36x, 128^3 1.18-1.45x (64^3, which stays on one: 0.94-1.02x), bf16 80^3 1.26x; AVX2
// float32 / int8 80^3 1.15-1.20x, 96^3-128^3 1.36-1.61x. AVX-512 int8 (VNNI) ran 0.92-1.04x up to
// 96^3 and AMX 0.95-1.10x up to 128^3, so those keep the default.
constexpr double kGemmFmaMinFlopsPerThread = 0.5e6;
// Largest partial-sum workspace per thread (elements) for 16-bit / scaled outputs spanning K blocks.
constexpr int64_t kGemmWorkspaceElems = int64_t(4) << 20;
// Rows of a row-major B packed across a block's panels at a time (GemmTraits::pack_b): a multiple of
// every kernel set's k group.
constexpr int64_t kGemmBRowsChunk = 16;
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
GemmPlan gemm_make_plan(int64_t n_batch, int64_t m, int64_t n, int64_t k, const GemmBlocking& blk,
                        double min_flops_per_thread, bool need_ws, bool b_prepacked = false) {
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
  // Threads: at most one per register tile, and each with at least min_flops_per_thread of work.
  const int64_t n_tiles = n_batch * gemm_ceil_div(m, MR) * gemm_ceil_div(n, NR);
  int64_t nt = threads_for(n_tiles, 2.0 * double(MR * NR) * double(k), min_flops_per_thread);
  int64_t units = n_batch * p.units_m * p.units_n;
  if (nt > 1 && units < 4 * nt && units % nt != 0) {
    // Too few units to share evenly: cut each into nt pieces along the dimension whose other operand
    // is cheaper to pack twice (splitting N re-packs A in every thread, splitting M re-packs B; a
    // pre-packed B is packed by no thread, so then M is cut whenever it has rows enough).
    const bool split_n = b_prepacked ? m < nt * MR : m <= n ? n >= nt * NR : m < nt * MR;
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

// Optional per-thread hooks of a Traits: Traits::thread_begin() before a thread's first tile of a call,
// Traits::thread_end() after its last (the AMX kernels load their tile configuration once per call and
// thread: ldtilecfg per tile was a quarter of a 2048^3 bf16 product, bench/notes_gemm.md session 12).
template <class T, class = void>
struct GemmHasThreadHooks : std::false_type {};
template <class T>
struct GemmHasThreadHooks<T, std::void_t<decltype(T::thread_begin()), decltype(T::thread_end())>> : std::true_type {};

// Optional Traits member tr.b_panel_group(): B panels packed at once when B is packed panel by panel
// (one A block), for a layout whose packing reads better across several panels; default 1.
template <class T, class = void>
struct GemmHasBPanelGroup : std::false_type {};
template <class T>
struct GemmHasBPanelGroup<T, std::void_t<decltype(std::declval<const T&>().b_panel_group())>> : std::true_type {};
template <class Traits>
int64_t gemm_b_panel_group(const Traits& tr) {
  if constexpr (GemmHasBPanelGroup<Traits>::value) return std::max<int64_t>(1, tr.b_panel_group());
  return 1;
}

// Work sharing when one thread falls behind (a vCPU whose core is busy with another guest's or
// process's work ran 1.5x slower than its neighbour for seconds at a time on the 2-core Xeon): each
// thread owns a range of units, whose A blocks are claimed one by one from a counter, its owner's
// first; a thread done with its own units takes the blocks left in the others' current unit and K
// block (waiting for an owner to start its next one), reading their packed B (and workspace) in place
// with its own A packing. An owner waits for its blocks taken by others before it packs the next K
// block's or unit's B over the one they read. The blocks and tiles are the same whoever runs them,
// so the bits do not change. Units of one A block (B packed panel by panel) are not shared.
// gemm_run_units and both AMX loops (amx_run_units_rows, amx_run_units_k_inside) share their units.
// With a busy loop on one of the 2 cores: int8 2048^3 (avx512 level) 1.28x, float32 1024^3 1.59x,
// 2048^3 1.19x, AMX bf16 4096 x 512 -> 512 1.72x, 2048^3 1.13-1.44x, 4096^3 1.33-1.44x, several units a
// thread (N 11008) 1.14-1.22x; without: 1.00-1.16x
// (bench/RESULTS.md sessions 19, 20).
struct GemmUnitShare {
  std::atomic<uint64_t> claim{0};  // (K block + 1) << 32 | next A block; 0: not started
  std::atomic<int64_t> done{0};    // A blocks of the current K block finished
  std::atomic<bool> finished{false};
  const void* b = nullptr;         // the K block's packed B (null: pre-packed)
  void* ws = nullptr;              // the owner's workspace
};

// Spins until ready(), giving the core up every 64 tests (the thread waited for may share it).
template <class Ready>
static void gemm_wait_until(const Ready& ready) {
  for (int spins = 1; !ready(); ++spins) {
    _mm_pause();
    if (spins % 64 == 0) std::this_thread::yield();
  }
}

// A call's shared units, where its plan has several threads and units of several A blocks (else none,
// and each thread runs its units alone). A shared unit's A blocks: mc rows at most, and at least
// kGemmShareBlocks equal blocks so that there is something left to take (4 and 8 alike without a busy
// core; 8 balanced better with one), unless that would make them shorter than min_block_rows (a loop
// whose every block reads a large B again). MR: the register tile's rows (block edges on the tile grid).
// n_kb: the times a unit's B is packed, one K block after another (1 where it is packed for all of K
// at once).
constexpr int64_t kGemmShareBlocks = 8;
template <int64_t MR>
struct GemmShares {
  const GemmPlan& plan;
  const GemmBlocking& blk;
  int64_t m, n, n_kb;  // the product's rows, columns, and B's K blocks
  int64_t min_block_rows;  // fewer blocks than kGemmShareBlocks rather than blocks of fewer rows
  std::unique_ptr<GemmUnitShare[]> units;

  GemmShares(const GemmPlan& p, const GemmBlocking& b, int64_t m_, int64_t n_, int64_t n_kb_, int64_t min_block_rows_ = 0)
      : plan(p), blk(b), m(m_), n(n_), n_kb(n_kb_), min_block_rows(min_block_rows_),
        units(p.n_threads > 1 && p.mu > b.mc ? new GemmUnitShare[p.n_units] : nullptr) {}

  // Whether the threads of a region of n_threads share (all, or none: OpenMP may give fewer threads).
  bool on(int n_threads) const { return units && n_threads == plan.n_threads; }
  // The rows of unit w's A blocks: mc when it is not shared.
  int64_t block_rows(const GemmUnit& w, bool shared) const {
    if (!shared) return blk.mc;
    const int64_t rows = w.m1 - w.m0;
    const int64_t wanted = min_block_rows ? std::min(kGemmShareBlocks, rows / min_block_rows) : kGemmShareBlocks;
    return gemm_round_up(gemm_ceil_div(rows, std::max(gemm_ceil_div(rows, blk.mc), wanted)), MR);
  }

  // The owner's side, K block kb of unit u (w): publishes the block's packed B and workspace, runs its
  // A blocks as it claims them (run(i0, rows)), then, unless it is the unit's last K block, waits for
  // those others took, which read this B. test_delay: the hook of gemm_share_testing.
  template <class Run>
  void own(int64_t u, const GemmUnit& w, int64_t kb, const void* b, void* ws, bool test_delay, const Run& run) const {
    GemmUnitShare& sh = units[u];
    const int64_t mb = block_rows(w, true), n_blocks = gemm_ceil_div(w.m1 - w.m0, mb);
    sh.b = b;
    sh.ws = ws;
    sh.done.store(0, std::memory_order_relaxed);
    sh.claim.store(uint64_t(kb + 1) << 32, std::memory_order_release);
    if (test_delay && kb == 0) gemm_share_test_delay();
    for (uint64_t c = sh.claim.load(std::memory_order_relaxed); (c & 0xffffffffu) < uint64_t(n_blocks);) {
      if (!sh.claim.compare_exchange_weak(c, c + 1, std::memory_order_relaxed)) continue;
      const int64_t i0 = w.m0 + int64_t(c & 0xffffffffu) * mb;
      run(i0, std::min(mb, w.m1 - i0));
      sh.done.fetch_add(1, std::memory_order_release);
      c = sh.claim.load(std::memory_order_relaxed);
    }
    if (kb + 1 < n_kb) gemm_wait_until([&] { return sh.done.load(std::memory_order_acquire) >= n_blocks; });
  }

  // The owner's side after unit u's last K block (before it packs another unit's B over this one:
  // wait_for_others).
  void finish(int64_t u, const GemmUnit& w, bool wait_for_others) const {
    GemmUnitShare& sh = units[u];
    const int64_t n_blocks = gemm_ceil_div(w.m1 - w.m0, block_rows(w, true));
    if (wait_for_others) gemm_wait_until([&] { return sh.done.load(std::memory_order_acquire) >= n_blocks; });
    sh.finished.store(true, std::memory_order_release);
  }

  // The others' side, for a thread done with its units from u_begin: runs the A blocks left in each
  // other unit (run(w, kb, i0, rows, b, ws)) until none is left in its last K block, waiting between
  // K blocks for the owner to publish the next.
  template <class Run>
  void take_others(int64_t u_begin, const Run& run) const {
    for (int64_t d = 1; d < plan.n_units; ++d) {
      const int64_t v = (u_begin + d) % plan.n_units;
      GemmUnitShare& sh = units[v];
      const GemmUnit w = gemm_unit_at(plan, v, m, n);
      const int64_t mb = block_rows(w, true), n_blocks = gemm_ceil_div(w.m1 - w.m0, mb);
      for (;;) {
        uint64_t c = sh.claim.load(std::memory_order_acquire);
        if (c == 0 || (c & 0xffffffffu) >= uint64_t(n_blocks)) {
          if (int64_t(c >> 32) == n_kb) break;  // all taken
          // Not started, or between K blocks: wait for the next K block or the unit's end.
          gemm_wait_until([&] {
            return sh.claim.load(std::memory_order_acquire) != c || sh.finished.load(std::memory_order_acquire);
          });
          if (sh.finished.load(std::memory_order_acquire)) break;
          continue;
        }
        if (!sh.claim.compare_exchange_weak(c, c + 1, std::memory_order_acquire)) continue;
        const int64_t i0 = w.m0 + int64_t(c & 0xffffffffu) * mb;
        run(w, int64_t(c >> 32) - 1, i0, std::min(mb, w.m1 - i0), sh.b, sh.ws);
        sh.done.fetch_add(1, std::memory_order_release);
        gemm_share_count_taken();
      }
    }
  }
};

// Runs every unit of the plan (see the top of this file). need_ws: each thread gets an mu x nu
// float32 / int32 workspace for partial sums (passed to tr.tile). Units are shared (above) where there
// is one per thread.
template <class Traits>
void gemm_run_units(const Traits& tr, const GemmPlan& plan, const GemmBlocking& blk, int64_t m, int64_t n,
                    int64_t k, bool need_ws) {
  using Packed = typename Traits::Packed;
  constexpr int64_t MR = Traits::kMr, NR = Traits::kNr, KG = Traits::kKGroup;
  const int64_t kc_alloc = gemm_round_up(std::min(blk.kc, k), std::max<int64_t>(16, KG));  // a multiple of KG
  const int64_t a_elems = gemm_round_up(std::min(blk.mc, plan.mu), MR) * kc_alloc;
  const int64_t b_elems = gemm_ceil_div(plan.nu, NR) * tr.b_panel_elems(kc_alloc);
  const int64_t ws_elems = need_ws ? plan.mu * gemm_ws_ld(plan) : 0;
  // One block per thread: [A panels | B panels | workspace], each part 64-byte aligned.
  const int64_t a_bytes = gemm_round_up(a_elems * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t b_bytes = gemm_round_up(b_elems * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t ws_bytes = gemm_round_up(ws_elems * 4, 64);
  const int64_t per_thread = a_bytes + b_bytes + ws_bytes;
  char* scratch = static_cast<char*>(gemm_scratch(0, size_t(per_thread) * size_t(plan.n_threads)));

  const int64_t b_group = gemm_b_panel_group(tr);
  const GemmShares<MR> shares(plan, blk, m, n, gemm_ceil_div(k, blk.kc));

  // The tiles of A block [i0, i0 + mcur) of unit w in K block p0 (B of the block at b_src, or null: B
  // packed panel by panel, or pre-packed). Inlined at its three calls: called, it ran float32 128^3 -
  // 256^3 8-10% slower (the tile loop compiled apart from its caller).
  auto run_block = [&](const GemmUnit& w, int64_t p0, int64_t i0, int64_t mcur, const Packed* b_src, bool b_by_panel,
                       Packed* a_pack, Packed* b_pack, void* ws) __attribute__((always_inline)) {
    const int64_t kc = std::min(blk.kc, k - p0), kc_panel = gemm_round_up(kc, KG);
    const int64_t b_panel = tr.b_panel_elems(kc_panel), ncur = w.n1 - w.n0;
    const bool first = p0 == 0, last = p0 + kc == k;
    tr.pack_a(w.batch, i0, mcur, p0, kc, a_pack);
    for (int64_t jr = 0; jr < ncur; jr += NR) {
      if (b_by_panel && (jr / NR) % b_group == 0)
        tr.pack_b(w.batch, p0, kc, w.n0 + jr, std::min(NR * b_group, ncur - jr), b_pack);
      const Packed* bp = b_by_panel ? b_pack + ((jr / NR) % b_group) * b_panel
                         : b_src    ? b_src + (jr / NR) * b_panel
                                    : tr.prepacked_b(p0, w.n0 + jr, blk, n);
      for (int64_t ir = 0; ir < mcur; ir += MR)
        tr.tile(kc_panel, a_pack + ir * kc_panel, bp, w, i0 + ir, w.n0 + jr, std::min(MR, mcur - ir),
                std::min(NR, ncur - jr), first, last, ws);
    }
  };

  parallel_region(plan.n_threads, [&](int t, int n_threads) {
    char* mine = scratch + int64_t(t) * per_thread;
    Packed* a_pack = reinterpret_cast<Packed*>(mine);
    Packed* b_pack = reinterpret_cast<Packed*>(mine + a_bytes);
    void* ws = mine + a_bytes + b_bytes;
    const int64_t u_begin = plan.n_units * t / n_threads, u_end = plan.n_units * (t + 1) / n_threads;
    const bool shared = shares.on(n_threads);
    if constexpr (GemmHasThreadHooks<Traits>::value) Traits::thread_begin();
    for (int64_t u = u_begin; u < u_end; ++u) {
      const GemmUnit w = gemm_unit_at(plan, u, m, n);
      const int64_t ncur = w.n1 - w.n0, mb = shares.block_rows(w, shared);
      for (int64_t p0 = 0; p0 < k; p0 += blk.kc) {
        const int64_t kc = std::min(blk.kc, k - p0);
        // A pre-packed B's panels are found one by one (tr.prepacked_b at each panel's column: its
        // panels need not be b_panel elements apart).
        const bool b_pre = tr.prepacked_b(p0, w.n0, blk, n) != nullptr;
        // With one A block, each B panel is packed right before its tiles and used from L1: packed
        // all at once, a kc x nc block (4 MiB of bf16 at 4096 columns) is beyond L2 and comes back
        // from L3 (a 32-token input gradient g @ W, bench/notes_gemm.md). Traits may ask for groups
        // of b_group panels packed together (gemm_b_panel_group).
        // (A shared unit's B is packed whole, for the others to read, even where it has one A block.)
        const bool b_by_panel = !b_pre && !shared && w.m1 - w.m0 <= blk.mc;
        const Packed* b_src = nullptr;
        if (!b_pre && !b_by_panel) tr.pack_b(w.batch, p0, kc, w.n0, ncur, b_pack), b_src = b_pack;
        if (!shared) {
          for (int64_t i0 = w.m0; i0 < w.m1; i0 += mb)
            run_block(w, p0, i0, std::min(mb, w.m1 - i0), b_src, b_by_panel, a_pack, b_pack, ws);
          continue;
        }
        shares.own(u, w, p0 / blk.kc, b_src, ws, t == 0, [&](int64_t i0, int64_t rows) {
          run_block(w, p0, i0, rows, b_src, false, a_pack, b_pack, ws);
        });
      }
      if (shared) shares.finish(u, w, u + 1 < u_end);
    }
    // Done with its own units: take what is left of the others'.
    if (shared)
      shares.take_others(u_begin, [&](const GemmUnit& w, int64_t kb, int64_t i0, int64_t rows, const void* b,
                                      void* ws_v) {
        run_block(w, kb * blk.kc, i0, rows, static_cast<const Packed*>(b), false, a_pack, b_pack, ws_v);
      });
    // The streamed rows ordered before the caller reads the output (traits with hooks fence in thread_end).
    if constexpr (GemmHasThreadHooks<Traits>::value)
      Traits::thread_end();
    else if (tr.stream_out)
      _mm_sfence();
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
  bool stream = false;          // final: rows written with non-temporal stores (gemm_stream_output)
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

// Whether the 32-bit partial sums can live in the output itself: a float32 output, or the plain
// int8 GEMM's int32 one. Otherwise they go to a per-thread workspace when K spans several blocks.
static inline bool gemm_sums_in_out(const GemmFloatArgs& g) { return g.out_dtype == LP_DTYPE_F32; }
static inline bool gemm_sums_in_out(const GemmInt8Args& g) { return g.scale_a == nullptr; }

// The FMA kernel sets stream only outputs of at least this many bytes: beyond the share of L3 a
// product's output keeps (Zen 3 / Zen 4: 32 MiB). AVX-512 tables, 2-core AMX Xeon, 2 threads, float32
// g^T @ x at K = 32 (one K block), streamed / regular: 8 / 16 MiB out 1.01x, 32 MiB 1.33x, 48 MiB
// 2.13x, 64 MiB 2.17x, 128 MiB 2.36x; 4096 x 128 -> 4096 (64 MiB) 1.17x; bf16 out (avx512 level):
// 4096 x 32 -> 4096 1.53x, 8 MiB outputs 1.01-1.09x (bench/notes_gemm.md session 25).
constexpr int64_t kGemmFmaStreamMinBytes = int64_t(16) << 20;

// Whether a product's final rows should be streamed past the caches (non-temporal stores): its output
// is at least min_bytes and more bytes than the threads' L2 together, so its lines would not stay there,
// and streaming saves each line's read for ownership; and every row starts 64-byte aligned. The plain
// int8 GEMM's int32 sums are written as sums, never streamed. The AMX tables (min_bytes 0), on the
// 2-core Xeon: bf16 2048^3 8.4 -> 7.9 ms, 4096^3 68 -> 63 ms, 4096 x 32 x 4096 (32 MiB out) 5.1 -> 1.9
// ms; a 1 MiB output rewritten in a loop ran 3x slower streamed (bench/notes_gemm.md session 12). The
// FMA kernel sets: kGemmFmaStreamMinBytes.
static inline bool gemm_writes_epilogue(const GemmFloatArgs&) { return true; }
static inline bool gemm_writes_epilogue(const GemmInt8Args& g) { return g.scale_a != nullptr; }
template <class Args>
bool gemm_stream_output(const Args& g, int n_threads, int64_t min_bytes = 0) {
  const int64_t elem = g.out_dtype == LP_DTYPE_F32 ? 4 : 2, bytes = g.n_batch * g.m * g.n * elem;
  return gemm_writes_epilogue(g) && bytes >= std::max(min_bytes, cpu_features().l2_bytes * n_threads) &&
         reinterpret_cast<uintptr_t>(g.out) % 64 == 0 && g.n * elem % 64 == 0;
}

// Where the tile at (row, col) of unit w keeps its 32-bit partial sums: in the output itself
// (c32_is_out), else in the unit's workspace ws (row length ws_ld); prev points at them after the
// first K block.
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

// The output of the tile at (row, col), rounded to out_dtype.
template <class Args>
static inline void* gemm_tile_out(const Args& g, const GemmUnit& w, int64_t row, int64_t col) {
  const int64_t out_off = (w.batch * g.m + row) * g.n + col;
  return static_cast<char*>(g.out) + out_off * (g.out_dtype == LP_DTYPE_F32 ? 4 : 2);
}

// The float tile at (row, col): partial sums as above; the final K block adds the bias and rounds
// once into the output.
static inline GemmFloatTile gemm_tile_at(const GemmFloatArgs& g, bool c32_is_out, int64_t ws_ld, void* ws,
                                         const GemmUnit& w, int64_t row, int64_t col, bool first, bool last) {
  GemmFloatTile t;
  gemm_tile_sums(t, g, c32_is_out, ws_ld, ws, w, row, col, first, last);
  t.out = gemm_tile_out(g, w, row, col);
  t.out_ld = g.n;
  t.out_dtype = g.out_dtype;
  t.bias = g.bias ? g.bias + col : nullptr;
  return t;
}

// The int8 tile at (row, col): int32 partial sums as above; scaled_gemm's final tiles also get the
// epilogue's scales, bias and output.
static inline GemmInt8Tile gemm_tile_at(const GemmInt8Args& g, bool c32_is_out, int64_t ws_ld, void* ws,
                                        const GemmUnit& w, int64_t row, int64_t col, bool first, bool last) {
  GemmInt8Tile t;
  gemm_tile_sums(t, g, c32_is_out, ws_ld, ws, w, row, col, first, last);
  if (g.scale_a) {
    t.scaled = true;
    t.out = gemm_tile_out(g, w, row, col);
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

// The tile's rows from r0 on: its output and row scales r0 rows further (the bias and column scales
// stay); for a final tile's epilogue (gemm_tile_store) row range by row range.
static inline GemmFloatTile gemm_tile_rows_from(GemmFloatTile t, int64_t r0) {
  t.out = static_cast<char*>(t.out) + r0 * t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  return t;
}
static inline GemmInt8Tile gemm_tile_rows_from(GemmInt8Tile t, int64_t r0) {
  t.out = static_cast<char*>(t.out) + r0 * t.out_ld * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
  t.scale_a += r0 * t.scale_a_stride;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Tile epilogues, written once against the vector interface of simd256.h (S = Simd256 or Simd512):
// the microkernel hands over its MR x NV accumulators (NV vectors per row, NR = NV * S::kLanes).
// ---------------------------------------------------------------------------------------------

// The tile's fields are copied to locals first: stores through `out` could alias `t` as far as the
// compiler knows, and would otherwise make it reload them after every store.

// The epilogues below are unrolled over the whole tile (and the output dtype and bias are template
// arguments), so the accumulators stay in registers: a loop over the rows with the dtype switched
// per vector kept all of them in a stack array, ~20% of a K = 32 product's time (bench/notes_gemm.md).

// Every epilogue writes the tile's first `rows` rows (rows <= RB <= MR; RB, the rows a microkernel
// computes, is a compile-time bound: a full tile has rows = RB = MR, and the compiler drops the test).

// The accumulators (float32 or int32) as 32-bit partial sums at c32, rows ld elements apart.
template <class S, int64_t RB, int64_t MR, int NV, class Elem, class V>
static inline __attribute__((always_inline)) void gemm_tile_store_sums(Elem* c32, int64_t ld, const V (&c)[MR][NV],
                                                                       int64_t rows) {
#pragma GCC unroll 16
  for (int64_t i = 0; i < RB; ++i)
    if (i < rows)
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) S::storeu(c32 + i * ld + h * S::kLanes, c[i][h]);
}

// One tile row's NV vectors v(h), rounded once to DT and stored from o (a pair as one store2_as).
template <class S, int DT, int NV, class Value>
static inline __attribute__((always_inline)) void gemm_store_row(char* o, const Value& v) {
  if constexpr (NV == 2) {
    S::store2_as(DT, o, v(0), v(1));
  } else {
#pragma GCC unroll 4
    for (int h = 0; h < NV; ++h) S::store_as(DT, o + h * S::kLanes * (DT == LP_DTYPE_F32 ? 4 : 2), v(h));
  }
}

// Float tile, last K block: bias added (kBias), rounded once to DT, written to out.
template <class S, int64_t RB, int DT, bool kBias, int64_t MR, int NV>
static inline __attribute__((always_inline)) void gemm_tile_store_final(const GemmFloatTile& t, const typename S::F (&c)[MR][NV],
                                                                        int64_t rows) {
  constexpr int L = S::kLanes;
  constexpr int64_t elem_bytes = DT == LP_DTYPE_F32 ? 4 : 2;
  typename S::F bias[NV];
#pragma GCC unroll 4
  for (int h = 0; h < NV; ++h) bias[h] = kBias ? S::loadu(t.bias + h * L) : S::zero();
  const int64_t row_bytes = t.out_ld * elem_bytes;
  char* o = static_cast<char*>(t.out);
  // A tile row of whole 64-byte lines can be streamed (t.stream): rounded into a local line, then
  // copied past the caches.
  constexpr int64_t tile_row_bytes = NV * L * elem_bytes;
  const bool stream = t.stream;
#pragma GCC unroll 16
  for (int64_t i = 0; i < RB; ++i) {
    if (i >= rows) break;
    auto v = [&](int h) { return kBias ? S::add(c[i][h], bias[h]) : c[i][h]; };
    if constexpr (tile_row_bytes % 64 == 0) {
      if (stream) {
        alignas(64) char line[tile_row_bytes];
        gemm_store_row<S, DT, NV>(line, v);
#pragma GCC unroll 4
        for (int64_t l = 0; l < tile_row_bytes; l += 64) S::stream_line(o + i * row_bytes + l, line + l);
        continue;
      }
    }
    gemm_store_row<S, DT, NV>(o + i * row_bytes, v);
  }
}

// Calls store(dt, bias) with the output dtype and whether there is a bias as compile-time constants
// (std::integral_constant<int, DT>, std::bool_constant), one instantiation each.
template <class Store>
static inline __attribute__((always_inline)) void gemm_with_out_kind(int out_dtype, bool has_bias, const Store& store) {
  auto with_bias = [&](auto dt) __attribute__((always_inline)) {
    if (has_bias)
      store(dt, std::true_type{});
    else
      store(dt, std::false_type{});
  };
  switch (out_dtype) {
    case LP_DTYPE_F32: return with_bias(std::integral_constant<int, LP_DTYPE_F32>{});
    case LP_DTYPE_F16: return with_bias(std::integral_constant<int, LP_DTYPE_F16>{});
    default: return with_bias(std::integral_constant<int, LP_DTYPE_BF16>{});
  }
}

// Float tile: partial sums to c32 (not the last K block), else bias added and rounded once to out.
template <class S, int64_t RB, int64_t MR, int NV>
static inline __attribute__((always_inline)) void gemm_tile_store(const GemmFloatTile& t, const typename S::F (&c)[MR][NV],
                                                                  int64_t rows) {
  if (!t.final) return gemm_tile_store_sums<S, RB>(t.c32, t.c32_ld, c, rows);
  gemm_with_out_kind(t.out_dtype, t.bias != nullptr, [&](auto dt, auto bias) __attribute__((always_inline)) {
    gemm_tile_store_final<S, RB, decltype(dt)::value, decltype(bias)::value>(t, c, rows);
  });
}

// int8 tile, scaled_gemm's last K block: its epilogue (gemm_scaled_epilogue) rounded once to DT.
template <class S, int64_t RB, int DT, bool kBias, int64_t MR, int NV>
static inline __attribute__((always_inline)) void gemm_tile_store_scaled(const GemmInt8Tile& t,
                                                                         const typename S::I (&c)[MR][NV], int64_t rows) {
  constexpr int L = S::kLanes;
  constexpr int64_t elem_bytes = DT == LP_DTYPE_F32 ? 4 : 2;
  typename S::F sb[NV], bias[NV];
#pragma GCC unroll 4
  for (int h = 0; h < NV; ++h) {
    sb[h] = t.scale_b_stride == 0 ? S::set1(t.scale_b[0]) : S::loadu(t.scale_b + h * L);
    bias[h] = kBias ? S::loadu(t.bias + h * L) : S::zero();
  }
  const float* scale_a = t.scale_a;
  const int64_t scale_a_stride = t.scale_a_stride;
  const int64_t row_bytes = t.out_ld * elem_bytes;
  char* o = static_cast<char*>(t.out);
#pragma GCC unroll 16
  for (int64_t i = 0; i < RB; ++i) {
    if (i >= rows) break;
    const typename S::F sa = S::set1(scale_a[i * scale_a_stride]);
    gemm_store_row<S, DT, NV>(o + i * row_bytes,
                              [&](int h) { return gemm_scaled_epilogue<S>(c[i][h], sa, sb[h], kBias, bias[h]); });
  }
}

// int8 tile: int32 sums to c32 (not the last K block, or the plain int8 GEMM), else scaled_gemm's
// epilogue.
template <class S, int64_t RB, int64_t MR, int NV>
static inline __attribute__((always_inline)) void gemm_tile_store(const GemmInt8Tile& t, const typename S::I (&c)[MR][NV],
                                                                  int64_t rows) {
  if (!t.final || !t.scaled) return gemm_tile_store_sums<S, RB>(t.c32, t.c32_ld, c, rows);
  gemm_with_out_kind(t.out_dtype, t.bias != nullptr, [&](auto dt, auto bias) __attribute__((always_inline)) {
    gemm_tile_store_scaled<S, RB, decltype(dt)::value, decltype(bias)::value>(t, c, rows);
  });
}

// A full tile (all MR rows).
template <class S, class Tile, class V, int64_t MR, int NV>
static inline __attribute__((always_inline)) void gemm_tile_store(const Tile& t, const V (&c)[MR][NV]) {
  gemm_tile_store<S, MR>(t, c, MR);
}

// The epilogue as a call, the accumulators passed through memory once per tile: for a register file
// too small to hold the unrolled epilogue's constants beside the accumulators (AVX2's 16 ymm: inlined,
// a K = 32 bf16 product ran 10% slower).
template <class S, class Tile, class V, int64_t MR, int NV>
__attribute__((noinline)) void gemm_tile_store_outlined(const Tile& t, const V (&c)[MR][NV]) {
  gemm_tile_store<S>(t, c);
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
static inline void gemm_edge_tile(const GemmFloatTile& t, int64_t rows, int64_t cols, const Ukernel& uk) {
  gemm_edge_tile<MR, NR, float>(t, rows, cols, uk, !t.final, [&](int64_t i, int64_t j, float v) {
    gemm_store_float(t.out, t.out_dtype, i * t.out_ld + j, t.bias ? v + t.bias[j] : v);
  });
}

template <int64_t MR, int64_t NR, class Ukernel>
static inline void gemm_edge_tile(const GemmInt8Tile& t, int64_t rows, int64_t cols, const Ukernel& uk) {
  if (t.final && t.scaled && cols == NR) {
    // Only rows short (the last rows of a few-row input: every w8a8 QuantLinear call), for kernel
    // sets without ukernel_rows (AVX2, AMX): the
    // microkernel's own vector epilogue into a local tile, then the valid rows copied out. The same
    // float32 operations as the scalar path below, so the same bits, at a fraction of its cost.
    alignas(64) int32_t prev[MR * NR] = {};
    alignas(64) float out[MR * NR];  // 4 bytes an element: room for every output dtype
    float scale_a[MR] = {};          // rows past `rows`: scale 0, their results are dropped
    GemmInt8Tile lt = t;
    for (int64_t i = 0; i < rows; ++i) {
      scale_a[i] = t.scale_a[i * t.scale_a_stride];
      if (t.prev) std::copy(t.prev + i * t.prev_ld, t.prev + i * t.prev_ld + NR, prev + i * NR);
    }
    if (t.prev) lt.prev = prev, lt.prev_ld = NR;
    lt.scale_a = scale_a, lt.scale_a_stride = 1;
    lt.out = out, lt.out_ld = NR;
    uk(lt);
    const int64_t row_bytes = NR * (t.out_dtype == LP_DTYPE_F32 ? 4 : 2);
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<char*>(t.out) + i * t.out_ld * (row_bytes / NR), reinterpret_cast<const char*>(out) + i * row_bytes,
                  size_t(row_bytes));
    return;
  }
  gemm_edge_tile<MR, NR, int32_t>(t, rows, cols, uk, !t.final || !t.scaled, [&](int64_t i, int64_t j, int32_t v) {
    const float sa = t.scale_a[i * t.scale_a_stride], sb = t.scale_b[j * t.scale_b_stride];
    const float bias = t.bias ? t.bias[j] : 0.0f;
    gemm_store_float(t.out, t.out_dtype, i * t.out_ld + j,
                     gemm_scaled_epilogue<GemmScalarVec>(v, sa, sb, t.bias != nullptr, bias));
  });
}

// ---------------------------------------------------------------------------------------------
// Packing into panels: what every packing routine shares
// ---------------------------------------------------------------------------------------------

// Packs lines [0, n_lines) (rows of A, or columns of B) of depth [0, kc) into panels of LANES lines;
// the panel of lines [p0, p0 + LANES) goes to d = dst + (p0 / LANES) * panel_elems, element
// (p0 + l, k) at d[(k - k % KG) * LANES + l * KG + k % KG], over k < kc rounded up to KG.
//   vector(p0, d)  packs a full panel's leading k its own way (the ISA's vector code for the layouts
//                  it knows) and returns where it stopped, a multiple of KG (0: nothing done);
//   elem(line, k)  one element, for the rest: scalar code finishes every panel, and writes zeros
//                  for lines past n_lines and k past kc (so edge tiles and K tails add nothing);
//   finish(d)      runs on each panel once complete, while it is still in L1.
template <int64_t LANES, int64_t KG, class Packed, class Vector, class Elem, class Finish>
static inline void gemm_pack_panels(Packed* dst, int64_t panel_elems, int64_t n_lines, int64_t kc, const Vector& vector,
                                    const Elem& elem, const Finish& finish) {
  const int64_t kc_panel = gemm_round_up(kc, KG);
  for (int64_t p0 = 0; p0 < n_lines; p0 += LANES) {
    Packed* d = dst + (p0 / LANES) * panel_elems;
    const int64_t n_valid = std::min(LANES, n_lines - p0);
    for (int64_t k = n_valid == LANES ? vector(p0, d) : 0; k < kc_panel; k += KG) {
      Packed* dk = d + k * LANES;
      int64_t l = 0;
      for (; l < n_valid; ++l)
        for (int64_t t = 0; t < KG; ++t) dk[l * KG + t] = k + t < kc ? Packed(elem(p0 + l, k + t)) : Packed(0);
      for (; l < LANES; ++l)
        for (int64_t t = 0; t < KG; ++t) dk[l * KG + t] = Packed(0);
    }
    finish(d);
  }
}

// ---------------------------------------------------------------------------------------------
// Traits from an ISA's kernel set, and the packed GEMM
// ---------------------------------------------------------------------------------------------
// What an ISA supplies per kind of packed input, a kernel set K (GemmKernelSet gives the defaults):
//   K::Packed, K::kMr, K::kNr, K::kKGroup     as for Traits (top of this file)
//   K::takes(dtype)                           constexpr: the input dtypes it packs
//   K::b_panel_elems(kc_panel)                Packed elements of one B panel (default NR * kc_panel)
//   K::a_value<DT>(x), K::b_value<DT>(x)      the packed value of one input element (default: Widen)
//   K::pack_a_kmajor<DT>(s, ld, kc, d)        vector packing of one full panel at s, depth [0, kc),
//   K::pack_a_mmajor<DT>(s, ld, kc, d)        by layout: A's MR rows each contiguous along k (row i
//   K::pack_b_kmajor<DT>(s, ld, kc, d)        at s + i * ld), or the MR rows of one k contiguous (k
//   K::pack_b_nmajor<DT>(s, ld, kc, d)        at s + k * ld); B's NR columns alike (B = W^T is
//                                             K-major, a row-major B N-major). Each packs a leading
//                                             run of k and returns where it stopped, a multiple of
//                                             kKGroup (default: 0, the scalar rest packs it all)
//   K::finish_b_panel(d, kc_panel)            runs on each complete B panel (default: nothing)
//   K::ukernel(kc_panel, ap, bp, tile)        one full MR x NR tile (a GemmFloatTile or GemmInt8Tile)
//   K::kRowsKernel, K::ukernel_rows(kc_panel, ap, bp, tile, rows)   optional: a full-width tile of
//                                             rows < MR, in place (default: none, an edge tile)
// GemmTraits<K, Args> is the rest, the same for every ISA: operand offsets, the dtype switch, the
// panel loop and its scalar rest (gemm_pack_panels), tile setup and edge tiles.

// GemmInt8Args::b_packed (the float GEMM has none).
static inline const void* gemm_b_packed(const GemmFloatArgs&) { return nullptr; }
static inline const void* gemm_b_packed(const GemmInt8Args& g) { return g.b_packed; }

// The element type of an input dtype.
template <int DT>
struct GemmElemOf {
  using T = uint16_t;  // f16, bf16
};
template <>
struct GemmElemOf<LP_DTYPE_F32> {
  using T = float;
};
template <>
struct GemmElemOf<LP_DTYPE_I8> {
  using T = int8_t;
};
template <int DT>
using GemmElem = typename GemmElemOf<DT>::T;

// An element packed as it is (int8 widened to int16 pairs or kept as bytes, bf16 bits kept).
template <int DT>
struct GemmAsIs {
  static inline GemmElem<DT> one(const GemmElem<DT>* p) { return *p; }
};

// The defaults of a kernel set: packed type, register tile, k grouping, B panels of NR * kc_panel
// elements, elements converted by Widen<DT>::one (e.g. FloatIn of simd256.h, widening to float32).
template <class PackedT, int64_t MR, int64_t NR, int64_t KG, template <int> class Widen = GemmAsIs>
struct GemmKernelSet {
  using Packed = PackedT;
  static constexpr int64_t kMr = MR, kNr = NR, kKGroup = KG;
  static int64_t b_panel_elems(int64_t kc_panel) { return NR * kc_panel; }
  template <int DT> static Packed a_value(GemmElem<DT> x) { return Packed(Widen<DT>::one(&x)); }
  template <int DT> static Packed b_value(GemmElem<DT> x) { return Packed(Widen<DT>::one(&x)); }
  static void finish_b_panel(Packed*, int64_t) {}
  // K::ukernel_rows(kc_panel, ap, bp, tile, rows): a full-width tile's first rows (< MR) in place,
  // computing fewer rows than MR; without it (false) such a tile is an edge tile.
  static constexpr bool kRowsKernel = false;
  // Whether an m-major A block is packed by chunks of k across its panels (GemmTraits::pack_a).
  static constexpr bool kPackAByKChunks = false;
  // Whether final float tiles stream their rows past the caches where gemm_stream_output says so
  // (kernel sets whose tile rows are whole 64-byte lines: the AVX-512 ones. AVX2's float32 rows are
  // whole lines too, 1.95x at a 64 MiB output on the Xeon's avx2 level, but not set: its own CPUs (Zen
  // 3) were not measured).
  static constexpr bool kStreamOutput = false;
  // The least work (flops) that earns a thread (kGemmMinFlopsPerThread, kGemmFmaMinFlopsPerThread).
  static constexpr double kMinFlopsPerThread = kGemmMinFlopsPerThread;
  // No vector packing: the scalar rest packs the whole panel.
  template <int DT> static int64_t pack_a_kmajor(const GemmElem<DT>*, int64_t, int64_t, Packed*) { return 0; }
  template <int DT> static int64_t pack_a_mmajor(const GemmElem<DT>*, int64_t, int64_t, Packed*) { return 0; }
  template <int DT> static int64_t pack_b_kmajor(const GemmElem<DT>*, int64_t, int64_t, Packed*) { return 0; }
  template <int DT> static int64_t pack_b_nmajor(const GemmElem<DT>*, int64_t, int64_t, Packed*) { return 0; }
};

// pack(std::integral_constant<int, DT>, typed pointer to o's element at (batch, row, col)) for the
// dtype of o, when the kernel set K takes it.
template <class K, class Pack>
static inline void gemm_with_operand(const GemmOperand& o, int64_t batch, int64_t row, int64_t col, const Pack& pack) {
  const int64_t off = batch * o.stride_batch_elems + row * o.stride_row_elems + col * o.stride_col_elems;
  auto as = [&](auto dt) {
    if constexpr (K::takes(decltype(dt)::value)) pack(dt, static_cast<const GemmElem<decltype(dt)::value>*>(o.ptr) + off);
  };
  switch (o.dtype) {
    case LP_DTYPE_F16: return as(std::integral_constant<int, LP_DTYPE_F16>{});
    case LP_DTYPE_BF16: return as(std::integral_constant<int, LP_DTYPE_BF16>{});
    case LP_DTYPE_I8: return as(std::integral_constant<int, LP_DTYPE_I8>{});
    default: return as(std::integral_constant<int, LP_DTYPE_F32>{});
  }
}

// The microkernel called, not inlined: edge tiles use this copy. Inlined into the edge-tile code as
// well, the AVX-512 int8 microkernel with its scaled epilogue ran out of registers and kept its
// accumulators on the stack inside the k loop (w8a8 at 19 or 32 rows: 25% slower).
template <class K, class Tile>
__attribute__((noinline)) void gemm_ukernel_outlined(int64_t kc_panel, const typename K::Packed* ap,
                                                     const typename K::Packed* bp, const Tile& t) {
  K::ukernel(kc_panel, ap, bp, t);
}

// A tile of full width and fewer rows, in place (kernel sets with K::kRowsKernel).
template <class K, class Tile>
__attribute__((noinline)) void gemm_ukernel_rows_outlined(int64_t kc_panel, const typename K::Packed* ap,
                                                          const typename K::Packed* bp, const Tile& t, int64_t rows) {
  if constexpr (K::kRowsKernel) K::ukernel_rows(kc_panel, ap, bp, t, rows);
}

template <class K, class Args>
struct GemmTraits {
  using Packed = typename K::Packed;
  static constexpr int64_t kMr = K::kMr, kNr = K::kNr, kKGroup = K::kKGroup;
  static constexpr double kMinFlopsPerThread = K::kMinFlopsPerThread;
  static constexpr bool kStreamOutput = K::kStreamOutput;
  const Args& g;
  bool c32_is_out;  // partial sums in the output (else in the unit's workspace)
  int64_t ws_ld;
  bool stream_out = false;  // final tiles stream their rows (gemm_packed_with); the threads fence after

  int64_t b_panel_elems(int64_t kc_panel) const { return K::b_panel_elems(kc_panel); }
  // The pre-packed B's panels of the K block at p0 from column j0 (a multiple of NR), or null.
  const Packed* prepacked_b(int64_t p0, int64_t j0, const GemmBlocking& blk, int64_t n) const {
    const Packed* all = static_cast<const Packed*>(gemm_b_packed(g));
    if (!all) return nullptr;
    const int64_t block_elems = gemm_ceil_div(n, kNr) * K::b_panel_elems(gemm_round_up(blk.kc, kKGroup));
    const int64_t kc_panel = gemm_round_up(std::min(blk.kc, g.k - p0), kKGroup);
    return all + (p0 / blk.kc) * block_elems + (j0 / kNr) * K::b_panel_elems(kc_panel);
  }
  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, Packed* dst) const {
    const int64_t rs = g.a.stride_row_elems, cs = g.a.stride_col_elems;
    const int64_t panel_elems = kMr * gemm_round_up(kc, kKGroup);
    gemm_with_operand<K>(g.a, batch, i0, p0, [&](auto dt, auto src) {
      constexpr int DT = decltype(dt)::value;
      // M-major A (the weight gradient's g^T), kernel sets with K::kPackAByKChunks: chunks of 16 k
      // outer, the full panels inner, so that each line of A's k-rows is used up while in L1; panel
      // by panel, every MR rows brought the same lines back from L2.
      constexpr int64_t kChunk = 16;
      int64_t k_done = 0;
      if (K::kPackAByKChunks && rs == 1 && cs != 1 && mc >= 2 * kMr) {
        const int64_t n_full = mc / kMr;
        for (int64_t k0 = 0; k0 + kChunk <= kc; k0 += kChunk) {
          if (K::template pack_a_mmajor<DT>(src + k0 * cs, cs, kChunk, dst + k0 * kMr) != kChunk) break;
          for (int64_t q = 1; q < n_full; ++q)
            K::template pack_a_mmajor<DT>(src + q * kMr + k0 * cs, cs, kChunk, dst + q * panel_elems + k0 * kMr);
          k_done = k0 + kChunk;
        }
      }
      gemm_pack_panels<kMr, kKGroup>(
          dst, panel_elems, mc, kc,
          [&](int64_t i, Packed* d) -> int64_t {
            if (cs == 1) return K::template pack_a_kmajor<DT>(src + i * rs, rs, kc, d);
            if (rs == 1)
              return k_done + K::template pack_a_mmajor<DT>(src + i * rs + k_done * cs, cs, kc - k_done, d + k_done * kMr);
            return 0;
          },
          [&](int64_t i, int64_t k) { return K::template a_value<DT>(src[i * rs + k * cs]); }, [](Packed*) {});
    });
  }
  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, Packed* dst) const {
    const int64_t rs = g.b.stride_row_elems, cs = g.b.stride_col_elems;
    const int64_t kc_panel = gemm_round_up(kc, kKGroup);
    gemm_with_operand<K>(g.b, batch, p0, j0, [&](auto dt, auto src) {
      constexpr int DT = decltype(dt)::value;
      // Row-major B, several panels: chunks of kGemmBRowsChunk rows packed across all full panels
      // (each row's run of nc columns read in order; one panel at a time reads a line or two from
      // each of kc rows, 4-16 KiB apart), then each panel's rest below. On the 2-core AMX Xeon
      // (session 14): float32 1024^3 1.12x, int8 (avx512 level) 1024^3 / 2048^3 1.06x / 1.04x, the
      // rest 1.00-1.03x (the AMX kernels' own row-major packing: bench/notes_gemm.md).
      const int64_t full_panels = nc / kNr;
      const bool rows_across = cs == 1 && rs != 1 && full_panels > 1;
      int64_t k_chunks = rows_across ? kc / kGemmBRowsChunk * kGemmBRowsChunk : 0;
      for (int64_t k0 = 0; k0 < k_chunks; k0 += kGemmBRowsChunk)
        for (int64_t p = 0; p < full_panels; ++p)
          if (K::template pack_b_nmajor<DT>(src + p * kNr + k0 * rs, rs, kGemmBRowsChunk,
                                            dst + p * K::b_panel_elems(kc_panel) + k0 * kNr) != kGemmBRowsChunk) {
            k_chunks = 0;  // no vector packer for this layout (the first call tells): the panels pack it all
            break;
          }
      gemm_pack_panels<kNr, kKGroup>(
          dst, K::b_panel_elems(kc_panel), nc, kc,
          [&](int64_t j, Packed* d) -> int64_t {
            if (cs == 1 && k_chunks > 0)
              return k_chunks + K::template pack_b_nmajor<DT>(src + j * cs + k_chunks * rs, rs, kc - k_chunks, d + k_chunks * kNr);
            if (cs == 1) return K::template pack_b_nmajor<DT>(src + j * cs, rs, kc, d);
            if (rs == 1) return K::template pack_b_kmajor<DT>(src + j * cs, cs, kc, d);
            return 0;
          },
          [&](int64_t j, int64_t k) { return K::template b_value<DT>(src[k * rs + j * cs]); },
          [&](Packed* d) { K::finish_b_panel(d, kc_panel); });
    });
  }
  void tile(int64_t kc_panel, const Packed* ap, const Packed* bp, const GemmUnit& w, int64_t row, int64_t col,
            int64_t rows, int64_t cols, bool first, bool last, void* ws) const {
    auto t = gemm_tile_at(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    if constexpr (kStreamOutput) t.stream = stream_out && last;
    if (rows == kMr && cols == kNr)
      K::ukernel(kc_panel, ap, bp, t);
    else if (K::kRowsKernel && cols == kNr)
      gemm_ukernel_rows_outlined<K>(kc_panel, ap, bp, t, rows);
    else
      gemm_edge_tile<kMr, kNr>(t, rows, cols, [&](const decltype(t)& lt) { gemm_ukernel_outlined<K>(kc_panel, ap, bp, lt); });
  }
};

// The packed GEMM with the macro-loop's Traits (constructed as {g, c32_is_out, ws_ld}; GemmTraits or
// an ISA's own, e.g. the AMX kernels' of gemm_amx_kernels.h) and blocking blk (m, n, k, n_batch >= 1).
template <class Traits, class Args>
void gemm_packed_with(const Args& g, const GemmBlocking& blk) {
  const bool sums_in_out = gemm_sums_in_out(g);
  const bool need_ws = !sums_in_out && g.k > blk.kc;
  const GemmPlan plan =
      gemm_make_plan<Traits::kMr, Traits::kNr>(g.n_batch, g.m, g.n, g.k, blk, Traits::kMinFlopsPerThread, need_ws,
                                               gemm_b_packed(g) != nullptr);
  Traits tr{g, sums_in_out, gemm_ws_ld(plan)};
  // Final rows streamed where the kernel set asks for it and no earlier K block left them in the
  // caches (a float32 output holding the partial sums).
  tr.stream_out = Traits::kStreamOutput && (g.k <= blk.kc || !sums_in_out) &&
                  gemm_stream_output(g, plan.n_threads, kGemmFmaStreamMinBytes);
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

// The packed GEMM with kernel set K.
template <class K, class Args>
void gemm_packed(const Args& g, const GemmBlocking& blk) {
  gemm_packed_with<GemmTraits<K, Args>>(g, blk);
}

// The float GEMM whose B is a QuantLinear weight (GemmQuantB): GemmTraits with a pack_b that dequantizes
// the codes of one K block of NR-column panels (kernel sets of float32 panels: kKGroup 1).
template <class K>
struct GemmQuantBTraits : GemmTraits<K, GemmFloatArgs> {
  static_assert(std::is_same<typename K::Packed, float>::value && K::kKGroup == 1, "float32 panels only");
  const GemmQuantB* qb;

  void pack_b(int64_t, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* dst) const {
    constexpr int64_t NR = K::kNr, P = kQLinearPanel;
    const int64_t k = this->g.k, k_bytes = (k + 1) / 2, n_groups = qb->scheme == LP_QLINEAR_W4 ? gemm_ceil_div(k, qb->group_size) : 0;
    for (int64_t jp = 0; jp < nc; jp += NR, dst += NR * kc) {
      const int64_t col0 = j0 + jp, cols = std::min(NR, nc - jp);
      const int64_t panel = col0 / P, c0 = col0 % P;  // NR divides P: a GEMM panel lies in one QuantLinear panel
      if (qb->scheme == LP_QLINEAR_W8) {
        const int8_t* codes = static_cast<const int8_t*>(qb->codes) + (panel * k + p0) * P + c0;
        const float* scale = qb->scale + col0;
        float s[NR] = {};  // zero past the last column: the padding lanes come out 0
        std::copy_n(scale, cols, s);
        for (int64_t kk = 0; kk < kc; ++kk) {
          float* __restrict d = dst + kk * NR;
          const int8_t* q = codes + kk * P;
          if (cols == NR) {
            for (int64_t c = 0; c < NR; ++c) d[c] = float(q[c]) * s[c];
          } else {
            for (int64_t c = 0; c < NR; ++c) d[c] = c < cols ? float(q[c]) * s[c] : 0.0f;
          }
        }
      } else {
        const uint8_t* codes = static_cast<const uint8_t*>(qb->codes) + panel * k_bytes * P + c0;
        for (int64_t kk = 0; kk < kc; ++kk) {
          const int64_t kg = p0 + kk, g = kg / qb->group_size;
          const uint8_t* byte = codes + (kg / 2) * P;
          const float* scale = qb->scale + (panel * n_groups + g) * P + c0;
          const uint8_t* zero = qb->zero + (panel * n_groups + g) * P + c0;
          const int shift = int(kg & 1) * 4;
          float* __restrict d = dst + kk * NR;
          if (cols == NR) {
            for (int64_t c = 0; c < NR; ++c) d[c] = (float((byte[c] >> shift) & 15) - float(zero[c])) * scale[c];
          } else {
            for (int64_t c = 0; c < NR; ++c)
              d[c] = c < cols ? (float((byte[c] >> shift) & 15) - float(zero[c])) * scale[c] : 0.0f;
          }
        }
      }
    }
  }
};

template <class K>
void gemm_packed_quant_b(const GemmFloatArgs& g, const GemmQuantB& qb, const GemmBlocking& blk) {
  const bool sums_in_out = gemm_sums_in_out(g);
  const bool need_ws = !sums_in_out && g.k > blk.kc;
  const GemmPlan plan = gemm_make_plan<K::kMr, K::kNr>(g.n_batch, g.m, g.n, g.k, blk, K::kMinFlopsPerThread, need_ws);
  const GemmQuantBTraits<K> tr{{g, sums_in_out, gemm_ws_ld(plan)}, &qb};
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

// The pre-packed B of the int8 GEMM (GemmInt8Args::b_packed) with kernel set K and blocking blk: K
// block by K block (depth blk.kc, the last one shorter), each block the ceil(n / NR) panels that the
// macro-loop would pack for the whole width, so a unit's panels start at column j0 / NR.
template <class K>
int64_t gemm_prepacked_b_bytes(int64_t k, int64_t n, const GemmBlocking& blk) {
  const int64_t n_panels = gemm_ceil_div(n, K::kNr), full = k / blk.kc, rest = k % blk.kc;
  int64_t elems = full * n_panels * K::b_panel_elems(gemm_round_up(blk.kc, K::kKGroup));
  if (rest) elems += n_panels * K::b_panel_elems(gemm_round_up(rest, K::kKGroup));
  return elems * int64_t(sizeof(typename K::Packed)) + kGemmPackSlackBytes;
}

template <class K>
void gemm_prepack_b(const GemmInt8Args& g, const GemmBlocking& blk, void* dst) {
  const GemmTraits<K, GemmInt8Args> tr{g, false, 0};
  auto* d = static_cast<typename K::Packed*>(dst);
  const int64_t n_panels = gemm_ceil_div(g.n, K::kNr);
  for (int64_t p0 = 0; p0 < g.k; p0 += blk.kc) {
    const int64_t kc = std::min(blk.kc, g.k - p0);
    tr.pack_b(0, p0, kc, 0, g.n, d);
    d += n_panels * K::b_panel_elems(gemm_round_up(kc, K::kKGroup));
  }
}

}  // namespace
}  // namespace lp
