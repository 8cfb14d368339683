// The AMX GEMM kernels (contract in gemm.h), written once against a policy of tile instructions
// `Tiles` and a vector layer `S` (simd256.h / simd512.h) for the epilogue, and compiled twice:
// gemm_amx.cc with the real instructions (inline assembly) and Simd512, and gemm_amx_model_avx2.cc
// with the software tile model of amx_tile_model.h and Simd256, so that the same kernel logic runs
// the contract tests on every machine.
//
// Tiles supplies (tile numbers are template arguments, as the instructions encode them):
//   configure(const AmxTileConfig*), release(), zero<T>(), load<T>(ptr, stride_bytes),
//   store<T>(ptr, stride_bytes), dp_bf16<C, A, B>() (tdpbf16ps), dp_fp16<C, A, B>() (tdpfp16ps),
//   dp_s8<C, A, B>() (tdpbssd);
// and three packing primitives (AVX-512 shuffles in gemm_amx.cc, plain loops in the model, so that the
// packing logic around them runs the tests everywhere):
//   transpose_dwords_16x16(src, src_stride_bytes, dst, dst_stride_bytes): dst row q, dword p = src
//     row p, dword q;
//   pairs_32x32(src, src_k_stride_elems, dst): 32 rows x 32 k of 16-bit values from an m-major
//     source (element (r, k) at src[r + k * stride]) into 32 rows of 32 k, 64 bytes apart.
//   interleave_rows_32<KU>(src, src_stride_bytes, dst): one 128-byte B row from KU rows of a
//     row-major B: column l's KU values (rows 0 .. KU - 1) at dst element l * KU.
//
// The register tile is MR x NR = 32 x 32 outputs in four C tiles of 16 x 16 32-bit sums (tmm0..3:
// C[i][j] = tmm(2i + j)), two A tiles (tmm4, tmm5: rows 0-15 and 16-31) and two B tiles (tmm6, tmm7:
// columns 0-15 and 16-31): per step of KT k values, four tdp* instructions. KT is one A tile row of
// 64 bytes: 32 bf16 / fp16 values or 64 int8 values.
// Packed layouts (gemm_pack_panels' element formula with its k grouping):
//   A: [k / KT][MR][KT]: a step's A tiles are 16 rows of 64 bytes, row stride 64 bytes;
//   B: [k / KU][NR][KU] with KU = 2 (a bf16 / fp16 pair) or 4 (an int8 quad), the SDM's VNNI layout:
//      B tile row r holds k = KU * r .. KU * r + KU - 1 of 16 columns, row stride NR * KU elements
//      (128 bytes); the second B tile starts 16 columns (64 bytes) further.
//   Depth padded with zeros to a multiple of KT (A and B alike), rows / columns past the matrix too.
// Arithmetic, per input dtype (what the instructions do exactly: amx_tile_model.h):
//   bfloat16 (tdpbf16ps): each bf16 x bf16 product is exact in float32 and every sum is a float32
//            sum rounded to nearest even, so this is a float32 accumulation as the contract asks, in
//            a different order from the AVX-512 kernels (per instruction, per output: the even
//            elements of the 16 pairs summed in k order, the odd ones likewise, the two sums added,
//            then added to the accumulator). The instruction reads bf16 subnormal inputs and
//            subnormal accumulators as zero and flushes tiny (below 2^-126) results to zero: an
//            output moves by less than 2^-126 per flushed operation (vdpbf16ps does the same).
//   float16  (tdpfp16ps, only on CPUs with AMX-FP16): products of fp16 values are exact in
//            float32, fp16 subnormal inputs are kept; the sums and the flushing are as for bf16.
//   int8     (tdpbssd): signed x signed bytes, int32 sums wrapping mod 2^32, hence exact for K <=
//            131071 (the final sum fits int32, so intermediate wrap-around is harmless).
// Partial sums across K blocks stay in memory: C tiles are loaded from them (tileloadd) and stored
// back (tilestored), in the driver's unit workspace (gemm_run_units, as for the AVX kernels) or, where
// K runs inside each B panel (amx_run_units_k_inside below), in a small per-thread buffer; the last
// K block's sums go to a per-thread 32 x 32 buffer, and the shared epilogue (bias, rounding once,
// scaled_gemm's epilogue, in S vectors; rows of large outputs with non-temporal stores) writes them a
// few rows at a time between the steps of the thread's next tile (AmxTraits::Deferred; int8 only
// with deep K, outside the row loop).
// A few rows times W^T (amx_gemm_w_rows) run transposed instead, W's tiles loaded in place: see there.
// Each thread loads the tile configuration before its first tile of a GEMM call and releases the
// tiles after its last (the driver's thread hooks), so no tile state outlives a call (another
// library's AMX code may run on the same threads between calls).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_features.h"
#include "cpu/gemm/amx_tile_model.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_driver.h"

namespace lp {
namespace {

constexpr int64_t kAmxMr = 32, kAmxNr = 32;

// The input kinds: packed element, k values per A tile row (KT) and per B unit (KU), dot product.
struct AmxBf16 {
  using Packed = uint16_t;
  static constexpr int64_t kKTile = 32, kKUnit = 2;
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_BF16; }
  template <class Tiles, int C, int A, int B> static void dp() { Tiles::template dp_bf16<C, A, B>(); }
};
struct AmxFp16 {
  using Packed = uint16_t;
  static constexpr int64_t kKTile = 32, kKUnit = 2;
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_F16; }
  template <class Tiles, int C, int A, int B> static void dp() { Tiles::template dp_fp16<C, A, B>(); }
};
struct AmxInt8 {
  using Packed = int8_t;
  static constexpr int64_t kKTile = 64, kKUnit = 4;
  static constexpr bool takes(int dtype) { return dtype == LP_DTYPE_I8; }
  template <class Tiles, int C, int A, int B> static void dp() { Tiles::template dp_s8<C, A, B>(); }
};

// Whether a tile's last K block runs the epilogue (bias, rounding, scales) instead of storing sums.
static inline bool amx_needs_epilogue(const GemmFloatTile& t) { return t.final; }
static inline bool amx_needs_epilogue(const GemmInt8Tile& t) { return t.final && t.scaled; }

// The pre-packed int8 B that the AMX tiles read (kPrepackedB below): the AVX-512 int8 kernels' layout
// in K blocks of the AMX blocking's depth kc (int8_pack_b_avx512_kc; gemm_prepacked_b_bytes /
// Int8Kernel in gemm_avx512.cc): per K block, ceil(n / 32) panels of 32 columns, each the k-quads
// [kc4 / 4][32][4] (kc4: the block's depth rounded up to 4) then 32 int32 column sums of the AVX-512
// kernels' own (128 bytes). The quads are the AMX B tile layout as it is (rows of 16 columns' quads,
// 128 bytes apart). A K block that is no multiple of 64 has its last tile step read past its quads
// (the column sums, the next panel, and after the last panel up to kAmxPrepackedSlackBytes more, which
// the AMX table allocates); those k meet A's zero padding and add nothing (0 * anything = 0 exactly).
static inline int64_t amx_int8_prepacked_panel_bytes(int64_t kc) { return kAmxNr * gemm_round_up(kc, 4) + kAmxNr * 4; }
constexpr int64_t kAmxPrepackedSlackBytes = 16 * kAmxNr * 4;

// The macro-loop's traits (gemm_driver.h) for kind Kind; kPrepackedB: int8 with B pre-packed as above.
template <class Tiles, class S, class Kind, class Args, bool kPrepackedB = false>
struct AmxTraits {
  using Packed = typename Kind::Packed;
  using Sum = typename std::conditional<std::is_same<Args, GemmInt8Args>::value, int32_t, float>::type;
  static constexpr int64_t kMr = kAmxMr, kNr = kAmxNr, kKGroup = Kind::kKTile, kKUnit = Kind::kKUnit;
  static_assert(kKGroup * sizeof(Packed) == 64 && kNr * kKUnit * sizeof(Packed) == 128, "tile rows of 64 bytes");
  const Args& g;
  bool c32_is_out;
  int64_t ws_ld;
  bool stream_out = false;  // full tiles' epilogues stream their rows (gemm_stream_output)

  static void thread_begin() {
    Tiles::configure(&kAmxFullTiles);
    deferred().row = kMr;
  }
  // The last tile's deferred epilogue; the fence orders the streamed output lines before the thread
  // reports its work done.
  static void thread_end() {
    deferred_finish(deferred());
    Tiles::release();
    _mm_sfence();
  }

  int64_t b_panel_elems(int64_t kc_panel) const { return kNr * kc_panel; }
  // A row-major B packed 8 panels at a time (rows read 512 bytes of bf16 at a time, not 64 from rows
  // 4-8 KiB apart): 32 x 4096 x 4096 bf16 g @ W 2.4 -> 1.6 ms, 128 rows 3.6 -> 3.0 ms on the 2-core
  // Xeon; 4 panels about the same, 16 slower at 256 rows. B = W^T reads along its rows already (8
  // panels: 1.7 -> 1.9 ms at 32 rows), so it keeps one.
  int64_t b_panel_group() const { return g.b.stride_col_elems == 1 && g.b.stride_row_elems != 1 ? 8 : 1; }
  const Packed* prepacked_b(int64_t p0, int64_t j0, const GemmBlocking& blk, int64_t n) const {
    if constexpr (kPrepackedB) {
      const int64_t n_panels = gemm_ceil_div(n, kNr);
      return static_cast<const Packed*>(g.b_packed) + (p0 / blk.kc) * n_panels * amx_int8_prepacked_panel_bytes(blk.kc) +
             (j0 / kNr) * amx_int8_prepacked_panel_bytes(std::min(blk.kc, g.k - p0));
    } else {
      return nullptr;
    }
  }

  void pack_a(int64_t batch, int64_t i0, int64_t mc, int64_t p0, int64_t kc, Packed* dst) const {
    const int64_t rs = g.a.stride_row_elems, cs = g.a.stride_col_elems;
    gemm_with_operand<Kind>(g.a, batch, i0, p0, [&](auto, auto src) {
      gemm_pack_panels<kMr, kKGroup>(
          dst, kMr * gemm_round_up(kc, kKGroup), mc, kc,
          [&](int64_t i, Packed* d) -> int64_t {
            const int64_t k_end = kc / kKGroup * kKGroup;
            if (cs == 1) {  // rows contiguous along k: a row's KT values are one 64-byte copy
              // Row by row: each source row read in order (k outer read 32 rows apart per step: 2048^3 bf16
              // 9.5-10.0 -> 9.0-9.3 ms, 4096 x 1024 x 1024 4.6-5.6 -> 4.5-5.3 ms on the 2-core Xeon).
              for (int64_t r = 0; r < kMr; ++r)
                for (int64_t k = 0; k < k_end; k += kKGroup) std::memcpy(d + k * kMr + r * kKGroup, src + (i + r) * rs + k, 64);
              return k_end;
            }
            if constexpr (sizeof(Packed) == 2) {
              if (rs == 1) {  // m-major 16-bit A (the weight gradient's g^T); int8 takes the element loop
                for (int64_t k = 0; k < k_end; k += kKGroup)
                  Tiles::pairs_32x32(reinterpret_cast<const uint16_t*>(src + i + k * cs), cs,
                                     reinterpret_cast<uint16_t*>(d + k * kMr));
                return k_end;
              }
            }
            return 0;
          },
          [&](int64_t i, int64_t k) { return Packed(src[i * rs + k * cs]); }, [](Packed*) {});
    });
  }

  // A read in place instead of packed (its tiles loaded with A's row stride, a_ld_bytes): where A's
  // rows run along k (a tile row is 64 contiguous bytes), K is whole steps (nothing past a row's end)
  // and the block's rows whole tiles (no rows past the matrix). A at (batch, row i0, k 0), or null.
  // 16-bit A only: int8 ran slower in place (1024 x 384 x 1536 W^T 0.87x on the 2-core Xeon).
  const Packed* a_in_place(int64_t batch, int64_t i0, int64_t mc, int64_t k) const {
    if (sizeof(Packed) != 2 || !Kind::takes(g.a.dtype) || g.a.stride_col_elems != 1 || g.a.stride_row_elems <= 0 ||
        k % kKGroup != 0 || mc % kMr != 0)
      return nullptr;
    return static_cast<const Packed*>(g.a.ptr) + batch * g.a.stride_batch_elems + i0 * g.a.stride_row_elems;
  }
  int64_t a_ld_bytes() const { return g.a.stride_row_elems * int64_t(sizeof(Packed)); }

  void pack_b(int64_t batch, int64_t p0, int64_t kc, int64_t j0, int64_t nc, Packed* dst) const {
    const int64_t rs = g.b.stride_row_elems, cs = g.b.stride_col_elems;
    const int64_t kc_panel = gemm_round_up(kc, kKGroup);
    gemm_with_operand<Kind>(g.b, batch, p0, j0, [&](auto, auto src) {
      // Row-major B: row by row across all full panels, KU rows interleaved per step (each row's run of
      // nc columns read in order, where a panel at a time read one line from each of kc rows 4-8 KiB
      // apart; 2048^3 bf16 9.4 -> 8.4 ms, 4096^3 85 -> 71 ms, int8 2048^3 4.5 -> 4.1 ms on the 2-core
      // Xeon). Prefetching the rows 64 ahead, which the panel-at-a-time packing needed, no longer
      // helps (2048^3, 32 x 4096 x 4096, 2048 x 2048 x 48: within noise).
      const int64_t full_panels = nc / kNr, k_end = kc / kKUnit * kKUnit;
      const bool rows_across = cs == 1 && rs != 1 && full_panels > 0;
      if (rows_across)
        for (int64_t k = 0; k < k_end; k += kKUnit)
          for (int64_t p = 0; p < full_panels; ++p)
            Tiles::template interleave_rows_32<kKUnit>(src + k * rs + p * kNr, rs * int64_t(sizeof(Packed)),
                                                       dst + p * kNr * kc_panel + k * kNr);
      // Packed to depth kc_panel: the scalar rest writes zeros for k past kc.
      gemm_pack_panels<kNr, kKUnit>(
          dst, kNr * kc_panel, nc, kc_panel,
          [&](int64_t j, Packed* d) -> int64_t {
            if (rs == 1) {
              // B = W^T: a column's KU values are one dword, and a panel's rows of KU-units are the
              // transpose of 32 columns' dwords: 16 x 16 blocks, then the dwords left one by one.
              constexpr int64_t kRowBytes = kNr * kKUnit * sizeof(Packed);
              const int64_t k_blocks = k_end / (16 * kKUnit) * (16 * kKUnit);
              // Each group of 16 columns along all of k before the next (the 16 source rows read in
              // order: 2048^3 1-15%, 32 / 128 x 4096 x 4096 2-9% faster than k blocks outer).
              for (int64_t l = 0; l < kNr; l += 16)
                for (int64_t k = 0; k < k_blocks; k += 16 * kKUnit)
                  Tiles::transpose_dwords_16x16(src + (j + l) * cs + k, cs * int64_t(sizeof(Packed)),
                                                d + k * kNr + l * kKUnit, kRowBytes);
              for (int64_t k = k_blocks; k < k_end; k += kKUnit)
                for (int64_t l = 0; l < kNr; ++l)
                  std::memcpy(d + k * kNr + l * kKUnit, src + (j + l) * cs + k, kKUnit * sizeof(Packed));
              return k_end;
            }
            return rows_across ? k_end : 0;
          },
          [&](int64_t j, int64_t k) { return k < kc ? Packed(src[k * rs + j * cs]) : Packed(0); }, [](Packed*) {});
    });
  }

  using Tile = typename std::conditional<std::is_same<Args, GemmInt8Args>::value, GemmInt8Tile, GemmFloatTile>::type;
  // A full tile's final sums waiting for their epilogue, which runs a few rows at a time between the
  // steps of the thread's next full tile (whatever its K block), so that the output's stores overlap
  // the tile unit's products instead of following them (see ukernel).
  struct Deferred {
    alignas(64) Sum sums[kMr * kNr];
    Tile t;
    int64_t row = kMr;  // the next row to write; kMr: nothing pending
    bool stream = false;  // rows streamed (as ukernel's `stream`)
  };
  // The thread's deferred tile: from thread_begin to thread_end, within one call.
  static Deferred& deferred() {
    thread_local Deferred d;
    return d;
  }
  // int8 (scaled_gemm's epilogue: the plain GEMM's int32 sums are stored by the tiles) defers only
  // tiles of 16 steps or more (K 1024) outside the row loop: w8a8 QuantLinear 1024 -> 4096 at 512 /
  // 4096 rows, 1024 -> 2048 at 4096 rows, 1024 -> 8192 at 2048 rows 1.19-1.21x; with 4-12 steps (K 256
  // - 768, 4096 rows) 0.77-0.93x, in the row loop at K 1024 0.93x, on the 2-core Xeon.
  static constexpr int64_t kDeferredRows = 4, kDeferredMinSteps = sizeof(Packed) == 2 ? 4 : 16;
  static constexpr bool kDefersInRowLoop = sizeof(Packed) == 2;
  // The rows per step of a tile of n_steps: all 32 within the steps (1 - 8 rows a step).
  static int64_t deferred_rows_per_step(int64_t n_steps) {
    return n_steps >= 32 ? 1 : n_steps >= 16 ? 2 : n_steps >= 8 ? 4 : 8;
  }
  // Out of line (as deferred_finish): inlined, its 24 epilogues made the tile loop 30 KB of code, and
  // 4096 x 256 x 1024 bf16 ran 0.97x where out of line ran 1.11x.
  static __attribute__((noinline)) void deferred_step(Deferred& d, int64_t rows_per_step) {
    switch (rows_per_step) {
      case 1: return deferred_rows<1>(d);
      case 2: return deferred_rows<2>(d);
      case 4: return deferred_rows<4>(d);
      default: return deferred_rows<8>(d);
    }
  }
  // The final epilogue of rows [0, R) of 32 x 32 sums (rows kNr apart) into t's output; streamed: into
  // a local buffer, then its rows (1 or 2 lines each) to the output with non-temporal stores (aligned
  // rows: gemm_stream_output).
  template <int64_t R>
  static inline __attribute__((always_inline)) void epilogue_rows(const Tile& t, const Sum* sums, bool stream) {
    constexpr int NV = int(kNr / S::kLanes);
    using V = decltype(S::loadu(sums));  // S::F or S::I
    V c[R][NV];
    for (int64_t i = 0; i < R; ++i)
      for (int h = 0; h < NV; ++h) c[i][h] = S::loadu(sums + i * kNr + h * S::kLanes);
    if (!stream) return gemm_tile_store<S, R>(t, c, R);
    alignas(64) float local[R * kNr];  // 4 bytes an element: room for every output dtype
    Tile lt = t;
    lt.out = local;
    lt.out_ld = kNr;
    gemm_tile_store<S, R>(lt, c, R);
    const int64_t elem = t.out_dtype == LP_DTYPE_F32 ? 4 : 2, row_bytes = kNr * elem;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t l = 0; l < row_bytes; l += 64)
        S::stream_line(static_cast<char*>(t.out) + i * t.out_ld * elem + l, reinterpret_cast<const char*>(local) + i * row_bytes + l);
  }
  template <int64_t R>
  static inline __attribute__((always_inline)) void deferred_rows(Deferred& d) {
    epilogue_rows<R>(gemm_tile_rows_from(d.t, d.row), d.sums + d.row * kNr, d.stream);
    d.row += R;
  }
  static __attribute__((noinline)) void deferred_finish(Deferred& d) {
    while (d.row < kMr) deferred_rows<kDeferredRows>(d);
  }
  // The thread's deferred tile for a full tile of kc_panel, or null: with fewer than kDeferredMinSteps
  // steps the next tile's are too few to hide an epilogue behind (4096 x 32 x 1024 bf16 0.87-0.94x,
  // the thread-local access and the rows in chunks), so such a tile writes its own at once.
  static Deferred* deferred_for(int64_t kc_panel, bool row_loop = false) {
    return (!row_loop || kDefersInRowLoop) && kc_panel >= kDeferredMinSteps * kKGroup ? &deferred() : nullptr;
  }

  // The four C tiles to 32 x 32 sums at c, rows ld elements apart.
  static inline __attribute__((always_inline)) void store_c(Sum* c, int64_t ld) {
    Tiles::template store<0>(c, ld * 4);
    Tiles::template store<1>(c + 16, ld * 4);
    Tiles::template store<2>(c + 16 * ld, ld * 4);
    Tiles::template store<3>(c + 16 * ld + 16, ld * 4);
  }

  // One full 32 x 32 tile (see the top of the file); t is a GemmFloatTile or GemmInt8Tile.
  // next_c: the 32-bit sums of the tile this thread runs next (32 rows, next_ld elements apart), or
  // null; its lines are prefetched while this tile's products run, since the tile loads that read
  // them stall on L3 otherwise (a quarter of a 2048^3 bf16 product).
  // pf_b: pf_b_bytes of B (the panel this thread multiplies next) brought to L2 over the steps (to L1
  // it evicted the panel in use, and ran no faster than no prefetch: 2048^3 / 4096^3 bf16 5-9% slower
  // than to L2 on the 2-core Xeon).
  // kBFromL2: B's tiles take the T1 hint and A's stay in L1 (amx_run_units_rows), not the other way.
  // deferred: the thread's deferred tile (full tiles; null: edge tiles, whose epilogue runs here). Its
  // rows are written between this tile's steps, and a final tile of this call is deferred in turn, its
  // rows streamed (non-temporal stores) where `stream`. A 32 x 32 epilogue costs as much as ~12 steps of
  // products when the output lines are new to the caches (8 MiB of bf16, rows 2 KiB apart): 4096 x 256 x
  // 1024 bf16 1.02 -> 0.87 ms, 2048^3 6.7 -> 6.2-6.4, 4096 x 1024 x 1024 3.6 -> 3.1 on the 2-core Xeon.
  template <class Tile, bool kBFromL2 = false>
  static void ukernel(int64_t kc_panel, const Packed* ap, const Packed* bp, const Tile& t, const void* next_c = nullptr,
                      int64_t next_ld = 0, const char* pf_b = nullptr, int64_t pf_b_bytes = 0, bool stream = false,
                      Deferred* deferred = nullptr, int64_t a_ld_bytes = 0) {
    constexpr int64_t kBHalf = 16 * kKUnit;  // 16 columns of B
    constexpr int64_t kARow = kKGroup * sizeof(Packed), kBRow = kNr * kKUnit * sizeof(Packed);
    if (t.prev) {
      const int64_t ld = t.prev_ld;
      Tiles::template load<0>(t.prev, ld * 4);
      Tiles::template load<1>(t.prev + 16, ld * 4);
      Tiles::template load<2>(t.prev + 16 * ld, ld * 4);
      Tiles::template load<3>(t.prev + 16 * ld + 16, ld * 4);
    } else {
      Tiles::template zero<0>();
      Tiles::template zero<1>();
      Tiles::template zero<2>();
      Tiles::template zero<3>();
    }
    // Rows of next_c to prefetch per step: all 32 rows (2 lines each) within the first 8 steps.
    const int64_t n_steps = kc_panel / kKGroup, rows_per_step = n_steps >= 8 ? 4 : gemm_ceil_div(kMr, n_steps);
    const char* pf = static_cast<const char*>(next_c);
    int64_t pf_row = next_c ? 0 : kMr;
    const int64_t pf_b_step = gemm_ceil_div(pf_b_bytes, n_steps * 64) * 64;
    const int64_t d_rows = deferred_rows_per_step(n_steps);
    const int64_t a_row = a_ld_bytes ? a_ld_bytes : kARow, a_half = 16 * a_row;
    const char* pf_b_end = pf_b + pf_b_bytes;
    for (int64_t k = 0; k < kc_panel; k += kKGroup) {
      for (int64_t r = 0; r < rows_per_step && pf_row < kMr; ++r, ++pf_row) {
        __builtin_prefetch(pf + pf_row * next_ld * 4, 1, 3);
        __builtin_prefetch(pf + pf_row * next_ld * 4 + 64, 1, 3);
      }
      for (int64_t l = 0; l < pf_b_step && pf_b < pf_b_end; l += 64, pf_b += 64) __builtin_prefetch(pf_b, 0, 2);
      const Packed* a = a_ld_bytes ? ap + k : ap + k * kMr;
      const Packed* b = bp + k * kNr;
      if constexpr (kBFromL2) {
        Tiles::template load<4>(a, a_row);
        Tiles::template load<5>(reinterpret_cast<const char*>(a) + a_half, a_row);
        Tiles::template load_t1<6>(b, kBRow);
        Tiles::template load_t1<7>(b + kBHalf, kBRow);
      } else {
        Tiles::template load_t1<4>(a, a_row);
        Tiles::template load_t1<5>(reinterpret_cast<const char*>(a) + a_half, a_row);
        Tiles::template load<6>(b, kBRow);
        Tiles::template load<7>(b + kBHalf, kBRow);
      }
      Kind::template dp<Tiles, 0, 4, 6>();
      Kind::template dp<Tiles, 1, 4, 7>();
      Kind::template dp<Tiles, 2, 5, 6>();
      Kind::template dp<Tiles, 3, 5, 7>();
      if (deferred && deferred->row < kMr) deferred_step(*deferred, d_rows);
    }
    if (deferred) {
      if (deferred->row < kMr) deferred_finish(*deferred);
      if (amx_needs_epilogue(t)) {
        store_c(deferred->sums, kNr);
        deferred->t = t;
        deferred->row = 0;
        deferred->stream = stream;
        return;
      }
    }
    if (!amx_needs_epilogue(t)) return store_c(t.c32, t.c32_ld);
    alignas(64) Sum sums[kMr * kNr];
    store_c(sums, kNr);
    epilogue_rows<kMr>(t, sums, stream);
  }

  // A tile of amx_run_units_k_inside: as tile(), with the partial sums read from `prev` (null: the
  // unit's own, or none in the first K block) and written to `dst` (null: the unit's own, or the
  // epilogue in the last K block), 32 rows of NR sums; pf_b: B lines to prefetch (ukernel).
  void tile_k_inside(int64_t kc_panel, const Packed* ap, const Packed* bp, const GemmUnit& w, int64_t row, int64_t col,
                     int64_t rows, int64_t cols, bool first, bool last, void* ws, const Sum* prev, Sum* dst,
                     const char* pf_b, int64_t pf_b_bytes, bool next_in_block, int64_t a_ld_bytes) const {
    auto t = gemm_tile_at(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    // The unit's own sums of the next tile down, where this K block reads or writes its own (the
    // chunk's edges): prefetched while the products run, as in tile().
    const bool own_sums = (!prev && !first) || (!dst && !last);
    const void* next_c = own_sums && next_in_block ? t.c32 + kMr * t.c32_ld : nullptr;
    const int64_t next_ld = t.c32_ld;
    if (prev && !first) t.prev = prev, t.prev_ld = kNr;
    if (dst && !last) t.c32 = dst, t.c32_ld = kNr;
    if (rows == kMr && cols == kNr)
      ukernel(kc_panel, ap, bp, t, next_c, next_ld, pf_b, pf_b_bytes, stream_out, deferred_for(kc_panel), a_ld_bytes);
    else
      gemm_edge_tile<kMr, kNr>(t, rows, cols, [&](const decltype(t)& lt) {
        ukernel(kc_panel, ap, bp, lt, nullptr, 0, nullptr, 0, false, nullptr, a_ld_bytes);
      });
  }

  // A tile of amx_run_units_rows (one K block): B from L2, A from L1, regular stores (the L2 streamer
  // fetches the next lines of the rows ahead of them; streamed rows lost that).
  void tile_rows(int64_t kc_panel, const Packed* ap, const Packed* bp, const GemmUnit& w, int64_t row, int64_t col,
                 int64_t rows, int64_t cols, int64_t a_ld_bytes) const {
    const auto t = gemm_tile_at(g, c32_is_out, ws_ld, nullptr, w, row, col, true, true);
    if (rows == kMr && cols == kNr)
      ukernel<Tile, true>(kc_panel, ap, bp, t, nullptr, 0, nullptr, 0, false, deferred_for(kc_panel, true), a_ld_bytes);
    else
      gemm_edge_tile<kMr, kNr>(t, rows, cols, [&](const decltype(t)& lt) {
        ukernel(kc_panel, ap, bp, lt, nullptr, 0, nullptr, 0, false, nullptr, a_ld_bytes);
      });
  }

  void tile(int64_t kc_panel, const Packed* ap, const Packed* bp, const GemmUnit& w, int64_t row, int64_t col,
            int64_t rows, int64_t cols, bool first, bool last, void* ws) const {
    const auto t = gemm_tile_at(g, c32_is_out, ws_ld, ws, w, row, col, first, last);
    // The next tile down (the driver's inner loop) reads or writes 32-bit sums unless it only runs the
    // epilogue of a single K block.
    const bool next_sums = row + kMr < w.m1 && (!last || !first);
    if (rows == kMr && cols == kNr)
      ukernel(kc_panel, ap, bp, t, next_sums ? t.c32 + kMr * t.c32_ld : nullptr, t.c32_ld, nullptr, 0, stream_out, deferred_for(kc_panel));
    else
      gemm_edge_tile<kMr, kNr>(t, rows, cols, [&](const decltype(t)& lt) { ukernel(kc_panel, ap, bp, lt); });
  }
};

// K inside each B panel reads A in place (AmxTraits::a_in_place) where a unit has at most
// this many columns (8 panels, each reading A's block again; packing it is a quarter of 4096 x 1024 x
// 256) and A's rows at most this far apart (16 rows 8 KiB apart share an L1 set): 4096 x 1024 x 128 /
// 256 / 384 bf16 1.22 / 1.16 / 1.08x, 4096 x 2048 x 256 1.05x, but 4096 x 1024 x 512 0.95x, 4096 x 4096 x 256
// 0.96x, 2048^3 0.90x on the 2-core Xeon.
constexpr int64_t kAmxAInPlaceMaxCols = 256, kAmxAInPlaceMaxLdBytes = 4096;

// The packed B of one unit (all of K) is capped at this many bytes per thread: wider units are cut
// narrower (amx_gemm_packed).
constexpr int64_t kAmxPackedBMaxBytes = int64_t(16) << 20;
// ... but not below this many columns (amx_gemm_packed: the loop of the driver then).
constexpr int64_t kAmxKInsideMinCols = 1024;

// The macro-loop of a unit with several A blocks and several K blocks (gemm_run_units otherwise): K runs
// inside each B panel, so that a tile's partial sums between K blocks stay in a small per-thread buffer
// (mc x 32 32-bit sums, in L2) instead of a unit-wide workspace beyond L2 (whose round trips, and the
// output lines, cost a 2048^3 bf16 product as much as its tdp* did: bench/notes_gemm.md session 14):
//   for each unit:  B packed for all of K (its K blocks' panels), unless pre-packed
//     for each A block of mc rows, for each K chunk (the A block's chunk fills half of L2):
//       A of the chunk packed, K block after K block (or read in place: kAmxAInPlaceMaxCols)
//       for each 32-column panel:  for each K block of the chunk:  for each 32-row tile: products
// Across chunks (K beyond one) the sums go through an mc x nu workspace (or the float32 / int32 output).
// While a panel's K block runs, the B panel multiplied next is prefetched to L2 a slice per tile: the
// packed B is beyond L2. The units' A blocks are shared between the threads (GemmUnitShare,
// gemm_driver.h): a block runs all of K on one thread, with that thread's A packing, chunk sums and
// workspace, and the owner's packed B. Busy loop on one of the 2 cores (2-core Xeon): bf16 2048^3
// 1.13-1.44x, 4096^3 1.33-1.44x, int8 2048^3 1.52-1.58x; without it 0.97-1.8x (the box's own
// unevenness; bench/RESULTS.md session 20).
template <class Traits>
void amx_run_units_k_inside(const Traits& tr, const GemmPlan& plan, const GemmBlocking& blk, int64_t m, int64_t n,
                            int64_t k, bool need_ws) {
  using Packed = typename Traits::Packed;
  using Sum = typename Traits::Sum;
  constexpr int64_t MR = Traits::kMr, NR = Traits::kNr, KG = Traits::kKGroup;
  const int64_t kc_alloc = gemm_round_up(blk.kc, KG), k_blocks = gemm_ceil_div(k, blk.kc);
  const int64_t mc_alloc = gemm_round_up(std::min(blk.mc, plan.mu), MR);
  const int64_t a_block = mc_alloc * kc_alloc, b_block = gemm_ceil_div(plan.nu, NR) * tr.b_panel_elems(kc_alloc);
  const bool b_pre = tr.prepacked_b(0, 0, blk, n) != nullptr;
  const int64_t kchunk = std::min(blk.kchunk, gemm_round_up(k, blk.kc));
  const int64_t a_bytes = gemm_round_up(kchunk / blk.kc * a_block * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t b_bytes = b_pre ? 0 : gemm_round_up(k_blocks * b_block * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t sums_bytes = mc_alloc * NR * 4;
  const int64_t ws_bytes = need_ws ? gemm_round_up(mc_alloc * gemm_ws_ld(plan) * 4, 64) : 0;
  const int64_t per_thread = a_bytes + b_bytes + sums_bytes + ws_bytes;
  char* scratch = static_cast<char*>(gemm_scratch(0, size_t(per_thread) * size_t(plan.n_threads)));

  // gemm_driver.h; B packed once, for all of K. Shared blocks of mc rows, however few: each block
  // streams the unit's whole packed B again (beyond L2), so the 8 blocks of 64 rows a 512-row unit
  // had cost 512 x 1024 -> 1024 bf16 10-20%, 512 x 2048 -> 2048 and 512 x 4096 -> 1024 20-30%
  // (bf16 and int8, 2-core Xeon; 2048^3 the same).
  const GemmShares<MR> shares(plan, blk, m, n, 1, blk.mc);
  auto kc_at = [&](int64_t p0) { return std::min(blk.kc, k - p0); };  // the K block at p0: its depth
  // A block [i0, i0 + mcur) of unit w, B packed at b_src (null: pre-packed), with the running thread's
  // A packing, chunk sums and workspace (the block's sums across chunks); inlined, as
  // gemm_run_units' run_block.
  auto run_block = [&](const GemmUnit& w, int64_t i0, int64_t mcur, const Packed* b_src, Packed* a_pack, Sum* sums,
                       void* ws) __attribute__((always_inline)) {
    const int64_t ncur = w.n1 - w.n0;
    // B panel jr of the K block at p0.
    auto b_at = [&](int64_t p0, int64_t jr) -> const Packed* {
      if (!b_src) return tr.prepacked_b(p0, w.n0 + jr, blk, n);
      return b_src + p0 / blk.kc * b_block + jr / NR * tr.b_panel_elems(gemm_round_up(kc_at(p0), KG));
    };
    // The A block as a unit of its own: the workspace holds its sums across chunks.
    GemmUnit wb = w;
    wb.m0 = i0;
    wb.m1 = i0 + mcur;
    // A read in place where a unit has few panels to share its packing (above).
    const Packed* a_src = ncur <= kAmxAInPlaceMaxCols ? tr.a_in_place(w.batch, i0, mcur, k) : nullptr;
    const int64_t a_ld = a_src && tr.a_ld_bytes() <= kAmxAInPlaceMaxLdBytes ? tr.a_ld_bytes() : 0;
    for (int64_t c0 = 0; c0 < k; c0 += kchunk) {
      const int64_t c1 = std::min(k, c0 + kchunk);
      if (!a_ld)
        for (int64_t p0 = c0; p0 < c1; p0 += blk.kc) tr.pack_a(w.batch, i0, mcur, p0, kc_at(p0), a_pack + (p0 - c0) / blk.kc * a_block);
      for (int64_t jr = 0; jr < ncur; jr += NR) {
        for (int64_t p0 = c0; p0 < c1; p0 += blk.kc) {
          const int64_t kc_panel = gemm_round_up(kc_at(p0), KG);
          const Packed* bp = b_at(p0, jr);
          // The B panel multiplied next: this panel's next K block, else the next panel's first.
          const int64_t next_p0 = p0 + blk.kc < c1 ? p0 + blk.kc : c0;
          const Packed* next_b = next_p0 != c0 || jr + NR < ncur ? b_at(next_p0, next_p0 != c0 ? jr : jr + NR) : nullptr;
          const int64_t next_b_bytes = next_b ? tr.b_panel_elems(gemm_round_up(kc_at(next_p0), KG)) * int64_t(sizeof(Packed)) : 0;
          const int64_t slice = gemm_ceil_div(next_b_bytes, gemm_ceil_div(mcur, MR) * 64) * 64;
          for (int64_t ir = 0; ir < mcur; ir += MR) {
            const int64_t off = ir / MR * slice;
            // Sums within the chunk in `sums` (row ir of the A block), at its edges the block's own.
            const Packed* ap = a_ld ? a_src + ir * tr.g.a.stride_row_elems + p0 : a_pack + (p0 - c0) / blk.kc * a_block + ir * kc_panel;
            tr.tile_k_inside(kc_panel, ap, bp, wb, i0 + ir,
                             w.n0 + jr, std::min(MR, mcur - ir), std::min(NR, ncur - jr), p0 == 0, p0 + blk.kc >= k, ws,
                             p0 == c0 ? nullptr : sums + ir * NR, p0 + blk.kc >= c1 ? nullptr : sums + ir * NR,
                             off < next_b_bytes ? reinterpret_cast<const char*>(next_b) + off : nullptr,
                             off < next_b_bytes ? std::min(slice, next_b_bytes - off) : 0, ir + MR < mcur, a_ld);
          }
        }
      }
    }
  };

  parallel_region(plan.n_threads, [&](int t, int n_threads) {
    char* mine = scratch + int64_t(t) * per_thread;
    Packed* a_pack = reinterpret_cast<Packed*>(mine);
    Packed* b_pack = reinterpret_cast<Packed*>(mine + a_bytes);
    Sum* sums = reinterpret_cast<Sum*>(mine + a_bytes + b_bytes);
    void* ws = mine + a_bytes + b_bytes + sums_bytes;
    const int64_t u_begin = plan.n_units * t / n_threads, u_end = plan.n_units * (t + 1) / n_threads;
    const bool shared = shares.on(n_threads);
    Traits::thread_begin();
    for (int64_t u = u_begin; u < u_end; ++u) {
      const GemmUnit w = gemm_unit_at(plan, u, m, n);
      const int64_t mb = shares.block_rows(w, shared);
      if (!b_pre)
        for (int64_t p0 = 0; p0 < k; p0 += blk.kc) tr.pack_b(w.batch, p0, kc_at(p0), w.n0, w.n1 - w.n0, b_pack + p0 / blk.kc * b_block);
      const Packed* b_src = b_pre ? nullptr : b_pack;
      if (!shared) {
        for (int64_t i0 = w.m0; i0 < w.m1; i0 += mb) run_block(w, i0, std::min(mb, w.m1 - i0), b_src, a_pack, sums, ws);
        continue;
      }
      shares.own(u, w, 0, b_src, nullptr, t == 0,
                 [&](int64_t i0, int64_t rows) { run_block(w, i0, rows, b_src, a_pack, sums, ws); });
      shares.finish(u, w, u + 1 < u_end);
    }
    // Done with its own units: take what is left of the others'.
    if (shared)
      shares.take_others(u_begin, [&](const GemmUnit& w, int64_t, int64_t i0, int64_t rows, const void* b, void*) {
        run_block(w, i0, rows, static_cast<const Packed*>(b), a_pack, sums, ws);
      });
    Traits::thread_end();
  });
}

// The macro-loop of a unit with one K block and several A blocks, whose packed B block fits half of
// L2: each 32-row tile runs along all of the unit's panels (B from L2, A from L1), so consecutive tiles
// write the next line of the same 32 output rows, which the L2 streamer then fetches ahead of the
// stores; down the panels (gemm_run_units) every tile's 32 lines are in 32 new places. 1.06-1.35x
// from 4096 x 256 x 1024 to 2048 x 64 x 2048 bf16 (int8 4096 x 512 x 1024 1.25x) on the 2-core Xeon.
// A is read in place where it can be (AmxTraits::a_in_place: a tile's 32 rows of A, each read along
// all of k once, then from L1 for every panel): 1.02-1.10x from 4096 x 64 x 1024 to 2048 x 384 x 1024.
//   for each unit:  B block packed (k x nu), unless pre-packed
//     for each A block of mc rows:  A block packed (or not);  for each 32-row tile:  for each panel: products
// The units' A blocks are shared between the threads (GemmUnitShare, gemm_driver.h).
template <class Traits>
void amx_run_units_rows(const Traits& tr, const GemmPlan& plan, const GemmBlocking& blk, int64_t m, int64_t n, int64_t k) {
  using Packed = typename Traits::Packed;
  constexpr int64_t MR = Traits::kMr, NR = Traits::kNr, KG = Traits::kKGroup;
  const int64_t kc_panel = gemm_round_up(k, KG);
  const int64_t a_bytes = gemm_round_up(gemm_round_up(std::min(blk.mc, plan.mu), MR) * kc_panel * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t b_panel = tr.b_panel_elems(kc_panel);
  const bool b_pre = tr.prepacked_b(0, 0, blk, n) != nullptr;
  const int64_t b_bytes =
      b_pre ? 0 : gemm_round_up(gemm_ceil_div(plan.nu, NR) * b_panel * int64_t(sizeof(Packed)) + kGemmPackSlackBytes, 64);
  const int64_t per_thread = a_bytes + b_bytes;
  char* scratch = static_cast<char*>(gemm_scratch(0, size_t(per_thread) * size_t(plan.n_threads)));
  const GemmShares<MR> shares(plan, blk, m, n, 1);  // gemm_driver.h; one K block
  // The tiles of A block [i0, i0 + mcur) of unit w, B at b_src (null: pre-packed); inlined, as
  // gemm_run_units' run_block.
  auto run_block = [&](const GemmUnit& w, int64_t i0, int64_t mcur, const Packed* b_src, Packed* a_pack)
                       __attribute__((always_inline)) {
    const int64_t ncur = w.n1 - w.n0;
    const Packed* a_src = tr.a_in_place(w.batch, i0, mcur, k);
    const int64_t a_ld = a_src ? tr.a_ld_bytes() : 0;
    if (!a_src) tr.pack_a(w.batch, i0, mcur, 0, k, a_pack);
    for (int64_t ir = 0; ir < mcur; ir += MR)
      for (int64_t jr = 0; jr < ncur; jr += NR)
        tr.tile_rows(kc_panel, a_src ? a_src + ir * tr.g.a.stride_row_elems : a_pack + ir * kc_panel,
                     b_src ? b_src + jr / NR * b_panel : tr.prepacked_b(0, w.n0 + jr, blk, n), w, i0 + ir, w.n0 + jr,
                     std::min(MR, mcur - ir), std::min(NR, ncur - jr), a_ld);
  };
  parallel_region(plan.n_threads, [&](int t, int n_threads) {
    Packed* a_pack = reinterpret_cast<Packed*>(scratch + int64_t(t) * per_thread);
    Packed* b_pack = reinterpret_cast<Packed*>(scratch + int64_t(t) * per_thread + a_bytes);
    const int64_t u_begin = plan.n_units * t / n_threads, u_end = plan.n_units * (t + 1) / n_threads;
    const bool shared = shares.on(n_threads);
    Traits::thread_begin();
    for (int64_t u = u_begin; u < u_end; ++u) {
      const GemmUnit w = gemm_unit_at(plan, u, m, n);
      const int64_t mb = shares.block_rows(w, shared);
      if (!b_pre) tr.pack_b(w.batch, 0, k, w.n0, w.n1 - w.n0, b_pack);
      const Packed* b_src = b_pre ? nullptr : b_pack;
      if (!shared) {
        for (int64_t i0 = w.m0; i0 < w.m1; i0 += mb) run_block(w, i0, std::min(mb, w.m1 - i0), b_src, a_pack);
        continue;
      }
      shares.own(u, w, 0, b_src, nullptr, t == 0, [&](int64_t i0, int64_t rows) { run_block(w, i0, rows, b_src, a_pack); });
      shares.finish(u, w, u + 1 < u_end);
    }
    // Done with its own units: take what is left of the others'.
    if (shared)
      shares.take_others(u_begin, [&](const GemmUnit& w, int64_t, int64_t i0, int64_t rows, const void* b, void*) {
        run_block(w, i0, rows, static_cast<const Packed*>(b), a_pack);
      });
    Traits::thread_end();
  });
}

// A few rows times W^T, W read in place (x @ W^T for up to 64 or 128 rows: nn.Linear's forward at a
// small batch, decode; bf16 / fp16, and int8 for scaled_gemm and the plain int8 GEMM, whose x^T is
// packed as k quads instead of pairs). The packed path packs all of W on every call, which reads and writes it once
// more than the product needs. Here the product runs transposed, out^T = W @ x^T: W is the A operand,
// whose tiles (16 rows of W x one 64-byte step of k) load straight from W with its row stride, so W
// streams from memory once, untouched; x^T is the B operand, packed once per call into the VNNI layout
// (a step: 16 k pairs x XR = 16 or 32 rows of x, one B tile per 16 rows, read from L2 by every group).
// Register tile per group of W rows: with up to 16 rows of x, 64 W rows (four C tiles of 16 W rows x 16
// x rows; the A tile alternates between tmm4 and tmm5, B in tmm6); with 17-32 rows, 32 W rows x 32 x
// rows (the packed kernel's 2 x 2), block after block of 32 rows of x, W's group read from memory in
// the first and from L2 after. Each block runs along all of K, then its C tiles are transposed into
// the output's rows by the shared epilogue. An output's k order is the packed kernel's (one tdp* per 64
// bytes of k, in order; the two factors of each product swap, which is exact), so its bits are those of
// the packed path. Tails: a K tail's last step reads a zero-padded copy of the group's row ends (a tile
// load past a row's end could leave W's allocation, and 0 x Inf garbage would be NaN); the last W rows,
// fewer than a group, are copied zero-padded and run as one more group.
// Which products: up to kAmxWRowsMaxM rows always; up to kAmxWRowsMaxMLargeW where W is at least 4 L2
// (its packing then costs more than the blocks after the first read W from L2) and the packed x^T at
// most half of L2. bf16, 4096 x 4096, 2 threads, 2-core Xeon, ratio to oneDNN, packed / in place: 48
// rows 0.80 / 1.57x, 64 1.00 / 1.65, 96 0.98 / 1.48, 128 1.02 / 1.30, 192 1.01 / 1.03, 256 1.14 / 0.91;
// 128 x 1024 -> 1024 (W 2 MiB) 1.05 / 0.82, 128 x 11008 -> 4096 (x^T 2.8 MiB) 0.86 / 0.85; 64 x 11008 ->
// 4096 0.89 / 1.45, 64 x 1024 -> 1024 1.29 / 1.28.
constexpr int64_t kAmxWRowsMaxM = 64, kAmxWRowsMaxMLargeW = 128;

// Threads take whole groups of W rows, so a W of few groups (a narrow output, long rows) leaves threads
// idle: there the packed path, which splits the rows of x too (64 x 8192 -> 32 at 2 threads: 0.36x the
// packed path, 8 x 65536 -> 64 0.59x, 64 x 2048 -> 96 0.74x). The bound does not depend on the thread
// count: up to 8 rows the other path is the AVX-512 kernel, whose bits differ, and a product's bits must
// not depend on the thread count.
constexpr int64_t kAmxWRowsMinGroups = 8;

// int8 (W8A8 by scaled_gemm, or the plain int8 GEMM) likewise, unless B is pre-packed (QuantLinear w8a8).
template <class Args>
static inline bool amx_w_rows_applies(const Args& g) {
  if (g.b.stride_row_elems != 1 || gemm_b_packed(g) != nullptr || g.m > kAmxWRowsMaxMLargeW) return false;
  const int64_t elem = g.a.dtype == LP_DTYPE_I8 ? 1 : 2, l2 = cpu_features().l2_bytes, group_rows = g.m > 16 ? 32 : 64;
  if (g.n_batch * gemm_ceil_div(g.n, group_rows) < kAmxWRowsMinGroups) return false;
  return g.m <= kAmxWRowsMaxM || (gemm_round_up(g.m, 32) * g.k * elem <= l2 / 2 && g.n * g.k * elem >= 4 * l2);
}

// The final sums of rows [row0, row0 + rows) x columns [col0, col0 + width) of batch bt (sums: XR rows,
// ld elements apart) through the shared epilogue (bias, rounding once, scaled_gemm's), 32 columns at a
// time: the vector one, or the scalar one of edge tiles past n.
template <class S, int64_t XR, class Args, class Sum>
static void amx_store_sums(const Args& g, const Sum* sums, int64_t ld, int64_t bt, int64_t row0, int64_t rows, int64_t col0,
                           int64_t width) {
  const GemmUnit unit{bt, 0, g.m, 0, g.n};
  for (int64_t h = 0; h < width && col0 + h < g.n; h += 32) {
    const auto t = gemm_tile_at(g, true, 0, nullptr, unit, row0, col0 + h, true, true);
    const int64_t cols = std::min<int64_t>(32, g.n - col0 - h);
    if (cols == 32) {
      constexpr int NV = int(32 / S::kLanes);
      using V = decltype(S::loadu(sums));
      V c[XR][NV];
      for (int64_t i = 0; i < XR; ++i)
        for (int v = 0; v < NV; ++v) c[i][v] = S::loadu(sums + i * ld + h + v * S::kLanes);
      gemm_tile_store<S, XR>(t, c, rows);
    } else {
      gemm_edge_tile<XR, 32>(t, rows, cols, [&](const decltype(t)& lt) {
        for (int64_t i = 0; i < XR; ++i)
          for (int64_t j = 0; j < 32; ++j) lt.c32[i * lt.c32_ld + j] = sums[i * ld + h + j];
      });
    }
  }
}

// Steps [0, n_steps) of one group: w at the group's first row and step, rows w_ld bytes apart; xs at
// the same step of packed x^T (a step: 64 bytes of k of XR rows). The C tiles accumulate (the caller
// zeroes them).
template <class Tiles, class Kind, int MB>
static inline void amx_w_rows_steps(const char* w, int64_t w_ld, const char* xs, int64_t n_steps) {
  constexpr int64_t XR = 16 * MB, step_bytes = 64 * XR;
  for (int64_t s = 0; s < n_steps; ++s, w += 64, xs += step_bytes) {
    if constexpr (MB == 1) {
      Tiles::template load<6>(xs, XR * 4);
      Tiles::template load<4>(w, w_ld);
      Kind::template dp<Tiles, 0, 4, 6>();
      Tiles::template load<5>(w + 16 * w_ld, w_ld);
      Kind::template dp<Tiles, 1, 5, 6>();
      Tiles::template load<4>(w + 32 * w_ld, w_ld);
      Kind::template dp<Tiles, 2, 4, 6>();
      Tiles::template load<5>(w + 48 * w_ld, w_ld);
      Kind::template dp<Tiles, 3, 5, 6>();
    } else {
      Tiles::template load<4>(w, w_ld);
      Tiles::template load<5>(w + 16 * w_ld, w_ld);
      Tiles::template load<6>(xs, XR * 4);
      Tiles::template load<7>(xs + 64, XR * 4);
      Kind::template dp<Tiles, 0, 4, 6>();
      Kind::template dp<Tiles, 1, 4, 7>();
      Kind::template dp<Tiles, 2, 5, 6>();
      Kind::template dp<Tiles, 3, 5, 7>();
    }
  }
}

template <class Tiles, class S, class Kind, int MB, class Args>
void amx_gemm_w_rows_mb(const Args& g) {
  using Packed = typename Kind::Packed;
  using Sum = typename std::conditional<std::is_same<Args, GemmInt8Args>::value, int32_t, float>::type;
  constexpr int64_t XR = 16 * MB, GW = 64 / MB, KT = Kind::kKTile, EB = int64_t(sizeof(Packed));
  static_assert(KT * EB == 64, "a step is 64 bytes of k");
  const int64_t m = g.m, n = g.n, k = g.k;
  const int64_t steps = gemm_ceil_div(k, KT), kp = steps * KT, full_steps = k / KT, k_tail = k - full_steps * KT;
  const int64_t full_groups = n / GW, n_tail = n - full_groups * GW, groups = full_groups + (n_tail ? 1 : 0);
  const int64_t x_blocks = gemm_ceil_div(m, XR), xblock_bytes = kp * XR * EB, xp_bytes = x_blocks * xblock_bytes;
  const int64_t wt_bytes = n_tail ? GW * kp * EB : 0;
  // Per call, by the calling thread (gemm_scratch slot 1: the few-row paths', which never run in the
  // same call): each batch's x zero-padded (x_blocks x XR rows x kp), then transposed into x^T's pairs
  // (quads for int8), block by block; each batch's last W rows zero-padded.
  char* xpad = static_cast<char*>(gemm_scratch(1, size_t(xp_bytes + (xp_bytes + wt_bytes) * g.n_batch)));
  char* xp = xpad + xp_bytes;
  char* wt = xp + xp_bytes * g.n_batch;
  const char* a = static_cast<const char*>(g.a.ptr);
  const char* b = static_cast<const char*>(g.b.ptr);
  for (int64_t bt = 0; bt < g.n_batch; ++bt) {
    std::memset(xpad, 0, size_t(xp_bytes));
    for (int64_t i = 0; i < m; ++i) {
      const char* row = a + (bt * g.a.stride_batch_elems + i * g.a.stride_row_elems) * EB;
      if (g.a.stride_col_elems == 1)
        std::memcpy(xpad + i * kp * EB, row, size_t(k * EB));
      else
        for (int64_t q = 0; q < k; ++q) std::memcpy(xpad + (i * kp + q) * EB, row + q * g.a.stride_col_elems * EB, size_t(EB));
    }
    for (int64_t xb = 0; xb < x_blocks; ++xb)
      for (int64_t st = 0; st < steps; ++st)
        for (int64_t j = 0; j < MB; ++j)
          Tiles::transpose_dwords_16x16(xpad + ((xb * XR + 16 * j) * kp + st * KT) * EB, kp * EB,
                                        xp + bt * xp_bytes + xb * xblock_bytes + st * 64 * XR + 64 * j, XR * 4);
    if (n_tail) {
      char* wb = wt + bt * wt_bytes;
      std::memset(wb, 0, size_t(wt_bytes));
      for (int64_t r = 0; r < n_tail; ++r)
        std::memcpy(wb + r * kp * EB, b + (bt * g.b.stride_batch_elems + (full_groups * GW + r) * g.b.stride_col_elems) * EB,
                    size_t(k * EB));
    }
  }
  const int64_t items = g.n_batch * groups;
  const int nt = threads_for(items, 2.0 * double(x_blocks * XR * GW) * double(k), kGemmMinFlopsPerThread);
  // Items are handed out in chunks from a counter (ClaimedChunks: 32 x 4096 -> 4096 bf16 1.27x, 8 rows and
  // 64 x 4096 -> 11008 1.00x; one item a claim cost int8 8 rows 0.94x); each item's outputs are its own.
  ClaimedChunks claims(items, nt);
  parallel_region(nt, [&](int, int) {
    Tiles::configure(&kAmxFullTiles);
    alignas(64) Sum sums_t[GW * XR], sums[XR * GW];
    alignas(64) char tail[GW * 64];
    for (int64_t i0, i1; claims.next(i0, i1);)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bt = it / groups, grp = it % groups, n0 = grp * GW;
      const bool last_rows = grp == full_groups;
      // The group's W: in place, or the zero-padded copy of the last rows; a K tail's row ends.
      const char* w = last_rows ? wt + bt * wt_bytes : b + (bt * g.b.stride_batch_elems + n0 * g.b.stride_col_elems) * EB;
      const int64_t w_ld = last_rows ? kp * EB : g.b.stride_col_elems * EB, w_steps = last_rows ? steps : full_steps;
      if (w_steps < steps) {
        std::memset(tail, 0, sizeof(tail));
        for (int64_t r = 0; r < GW; ++r) std::memcpy(tail + r * 64, w + r * w_ld + full_steps * 64, size_t(k_tail * EB));
      }
      // Block after block of x: the group's W from memory in the first, from L2 in the next.
      for (int64_t xb = 0; xb < x_blocks; ++xb) {
        const char* xs = xp + bt * xp_bytes + xb * xblock_bytes;
        Tiles::template zero<0>();
        Tiles::template zero<1>();
        Tiles::template zero<2>();
        Tiles::template zero<3>();
        amx_w_rows_steps<Tiles, Kind, MB>(w, w_ld, xs, w_steps);
        if (w_steps < steps) amx_w_rows_steps<Tiles, Kind, MB>(tail, 64, xs + full_steps * 64 * XR, 1);
        // C^T (W rows x x rows) to sums (x rows x W rows).
        if constexpr (MB == 1) {
          Tiles::template store<0>(sums_t, 64);
          Tiles::template store<1>(sums_t + 256, 64);
          Tiles::template store<2>(sums_t + 512, 64);
          Tiles::template store<3>(sums_t + 768, 64);
          for (int64_t q = 0; q < 4; ++q) Tiles::transpose_dwords_16x16(sums_t + 256 * q, 64, sums + 16 * q, GW * 4);
        } else {
          Tiles::template store<0>(sums_t, 128);
          Tiles::template store<1>(sums_t + 16, 128);
          Tiles::template store<2>(sums_t + 16 * 32, 128);
          Tiles::template store<3>(sums_t + 16 * 32 + 16, 128);
          for (int64_t nb = 0; nb < 32; nb += 16)
            for (int64_t mb = 0; mb < 32; mb += 16) Tiles::transpose_dwords_16x16(sums_t + nb * 32 + mb, 128, sums + mb * 32 + nb, 128);
        }
        amx_store_sums<S, XR>(g, sums, GW, bt, xb * XR, std::min(XR, m - xb * XR), n0, GW);
      }
    }
    Tiles::release();
  });
}

template <class Tiles, class S, class Kind, class Args>
void amx_gemm_w_rows(const Args& g) {
  if (g.m > 16)
    amx_gemm_w_rows_mb<Tiles, S, Kind, 2>(g);
  else
    amx_gemm_w_rows_mb<Tiles, S, Kind, 1>(g);
}

// Cache blocking (measured on a 2-core Xeon with AMX, L1d 48 KiB, L2 2 MiB: bench/notes_gemm.md session
// 12). A kc x 32 B panel takes two thirds of L1d: the A tiles are loaded with the T1 hint (tileloaddt1)
// so that they do not evict it, which made kc = 512 bf16 the best depth (fewer passes of the partial
// sums than 384; 768 spilled B). The packed A block takes an eighth of L2 (256 rows at that depth):
// with the full half of L2 (992 rows) the A block, the B panels and the partial sums' lines evicted
// one another, and 2048^3 bf16 ran 1.3x slower (int8 1.5x).
static inline GemmBlocking gemm_amx_blocking(int64_t elem_bytes) {
  const CpuFeatures& f = cpu_features();
  GemmBlocking b = gemm_blocking(kAmxMr, kAmxNr, elem_bytes, 2);
  const int64_t kt = 64 / elem_bytes;
  b.kc = std::max(kt, std::min<int64_t>(2048, f.l1d_bytes * 2 / 3 / (kAmxNr * elem_bytes)) / kt * kt);
  b.mc = std::max(kAmxMr, std::min<int64_t>(1020, f.l2_bytes / 8 / (b.kc * elem_bytes)) / kAmxMr * kAmxMr);
  // Where K runs inside each B panel (amx_run_units_k_inside), an A block's chunk fills half of L2: K
  // 2048 bf16 in one chunk on that Xeon (2048^3 bf16 8.4 -> 6.2-6.9 ms); at K 4096 two chunks of the
  // same 256 rows ran 10-15% faster than one chunk of 128 rows (B's panels reloaded half as often),
  // one chunk of 256 rows (the whole of L2) 1.5x slower.
  b.kchunk = std::max(b.kc, f.l2_bytes / 2 / (b.mc * elem_bytes) / b.kc * b.kc);
  return b;
}

// The packed GEMM on the tiles: amx_run_units_k_inside where a unit has several K blocks and several A
// blocks, amx_run_units_rows where it has one K block and several A blocks (and its B block fits half
// of L2), gemm_run_units otherwise (one A block: each B panel packed right before its tiles, from L1;
// a pre-packed B then streams K block by K block, in memory order: QuantLinear w8a8 at 32 / 128 rows ran
// 8-10% slower with K inside).
template <class Traits, class Args>
void amx_gemm_packed(const Args& g, const GemmBlocking& blk) {
  using Packed = typename Traits::Packed;
  const bool sums_in_out = gemm_sums_in_out(g), b_pre = gemm_b_packed(g) != nullptr;
  if (g.k > blk.kc) {
    // A unit's packed B (all of K) within kAmxPackedBMaxBytes: units cut narrower, down to
    // kAmxKInsideMinCols (each unit packs its rows of A again: at K 16384, 512-column units ran
    // 1024 x 16384 x 2048 bf16 0.9x as fast as the K-blocks-outer loop; K 8192 with 1024 columns 1.09x).
    const int64_t nc = std::min(blk.nc, kAmxPackedBMaxBytes / (gemm_round_up(g.k, blk.kc) * int64_t(sizeof(Packed))) /
                                            Traits::kNr * Traits::kNr);
    if (nc >= std::min(gemm_round_up(g.n, Traits::kNr), kAmxKInsideMinCols)) {
      GemmBlocking blk_k = blk;
      blk_k.nc = nc;
      const GemmPlan plan = gemm_make_plan<Traits::kMr, Traits::kNr>(g.n_batch, g.m, g.n, g.k, blk_k,
                                                                     kGemmMinFlopsPerThread, false, b_pre);
      if (plan.mu > blk.mc) {
        const Traits tr{g, sums_in_out, gemm_ws_ld(plan), gemm_stream_output(g, plan.n_threads)};
        return amx_run_units_k_inside(tr, plan, blk, g.m, g.n, g.k, !sums_in_out && g.k > blk.kchunk);
      }
    }
  }
  const bool need_ws = !sums_in_out && g.k > blk.kc;
  const GemmPlan plan =
      gemm_make_plan<Traits::kMr, Traits::kNr>(g.n_batch, g.m, g.n, g.k, blk, kGemmMinFlopsPerThread, need_ws, b_pre);
  if (g.k <= blk.kc && plan.mu > blk.mc &&
      gemm_round_up(plan.nu, Traits::kNr) * gemm_round_up(g.k, Traits::kKGroup) * int64_t(sizeof(Packed)) <=
          cpu_features().l2_bytes / 2) {
    const Traits tr{g, sums_in_out, gemm_ws_ld(plan)};
    return amx_run_units_rows(tr, plan, blk, g.m, g.n, g.k);
  }
  const Traits tr{g, sums_in_out, gemm_ws_ld(plan), gemm_stream_output(g, plan.n_threads)};
  gemm_run_units(tr, plan, blk, g.m, g.n, g.k, need_ws);
}

// Up to 16 rows times a row-major B, B read in place (x @ W with W stored (in, out): the input gradient
// g @ W of nn.Linear at a small batch, GPT-2-style Conv1D weights). The tiles want B as k pairs of a
// column, which a row-major B only gives after packing, and the packing reads B in short runs of many
// rows (8 x 4096 x 4096 bf16 1.7-1.9 ms, ~1.0x oneDNN). Here B's tiles are its rows as they are: 16 rows
// of k x 32 columns, 64 bytes a row, loaded with B's row stride, so a tile's dword n is the pair of
// columns (2n, 2n + 1) at one k. tdp* multiplies each dword of A by one of B lane by lane (C[m][n] +=
// A.lo * B.lo + A.hi * B.hi), so with A's dword p = (x[m][k0 + p], 0) it sums x * B[k][2n] only (the
// even columns), and with (0, x[m][k0 + p]) the odd ones: two tdp* per tile of B, each half a packed
// step's depth, twice the packed path's products, which 16 rows have to spare (B streams from memory).
// Per group of 64 columns: A even / odd in tmm4 / tmm5 (x packed once per call), B's two 32-column
// tiles in tmm6 / tmm7, C even / odd x B0 / B1 in tmm0-3. A thread runs its groups chunk by chunk of
// 64 rows of B (each of its rows' runs read across all its groups while the chunk is in L2; the running
// sums between chunks in its own buffer), and the epilogue interleaves the even and odd sums into the
// output's rows. Each output's k order: 16 k per tdp*, in order (not the packed path's bits, which
// take 32 k per tdp*). The zero halves multiply B's other column, so a non-finite B value would turn
// its even neighbour into NaN (0 x Inf): a call whose result has any non-finite value is run again by
// the packed path, whose outputs are then the contract's. Tails: K's last rows and the last columns
// (fewer than 64) come from zero-padded copies. 2 threads, 2-core Xeon, before / after: 2 / 8 / 16 x 4096
// x 4096 1.44 / 1.71 / 1.86 -> 0.87 / 0.89 / 0.88 ms (oneDNN 1.5-1.9), 16 x 4096 -> 11008 6.6 -> 4.6,
// 16 x 1024 x 1024 0.114 -> 0.072; at 32 rows 0.69-1.28x (the doubled products catch up), not taken.
// Taken where B has at least kAmxBInPlaceMinGroups groups of 64 columns (threads take whole groups), a
// bound that does not depend on the thread count, as kAmxWRowsMinGroups: this path's bits differ from
// the packed path's.
constexpr int64_t kAmxBInPlaceMaxM = 16, kAmxBInPlaceChunkSteps = 4, kAmxBInPlaceMinGroups = 8;

static inline bool amx_b_in_place_applies(const GemmFloatArgs& g) {
  return g.m <= kAmxBInPlaceMaxM && g.b.stride_col_elems == 1 && g.b.stride_row_elems != 1 &&
         gemm_ceil_div(g.n, 64) >= kAmxBInPlaceMinGroups;
}

// Returns false (outputs partly written) when a result was not finite: the caller runs the packed path.
template <class Tiles, class S, class Kind>
bool amx_gemm_b_in_place(const GemmFloatArgs& g) {
  using Packed = typename Kind::Packed;
  static_assert(sizeof(Packed) == 2, "16-bit inputs");
  constexpr int64_t XR = 16, GN = 64, KS = 16, CS = kAmxBInPlaceChunkSteps;  // rows of x, columns, k per step
  const int64_t m = g.m, n = g.n, k = g.k;
  const int64_t steps = gemm_ceil_div(k, KS), full_steps = k / KS, k_tail = k - full_steps * KS;
  const int64_t full_groups = n / GN, n_tail = n - full_groups * GN, groups = full_groups + (n_tail ? 1 : 0);
  // Per batch: x packed step by step (the even tile: 16 rows of 16 dwords (x, 0), then the odd); the
  // last columns (fewer than 64), zero-padded to steps * 16 rows of 64; K's last rows (fewer than 16) of
  // the other columns, zero-padded to 16 rows.
  const int64_t step_dwords = 2 * XR * KS, xp_dwords = steps * step_dwords;
  const int64_t cols_pad_elems = n_tail ? steps * KS * GN : 0, tail_ld = full_groups * GN;
  const int64_t rows_pad_elems = k_tail ? KS * tail_ld : 0;
  const int64_t batch_bytes = gemm_round_up(xp_dwords * 4 + (cols_pad_elems + rows_pad_elems) * 2, 64);
  char* per_batch = static_cast<char*>(gemm_scratch(1, size_t(batch_bytes * g.n_batch)));
  const Packed* a = static_cast<const Packed*>(g.a.ptr);
  const Packed* b = static_cast<const Packed*>(g.b.ptr);
  const int64_t b_ld = g.b.stride_row_elems;
  for (int64_t bt = 0; bt < g.n_batch; ++bt) {
    uint32_t* xb = reinterpret_cast<uint32_t*>(per_batch + bt * batch_bytes);
    std::memset(xb, 0, size_t(xp_dwords) * 4);
    for (int64_t i = 0; i < m; ++i) {
      const Packed* row = a + bt * g.a.stride_batch_elems + i * g.a.stride_row_elems;
      uint32_t* d = xb + i * KS;
      for (int64_t st = 0; st < steps; ++st, d += step_dwords) {
        const int64_t kn = std::min(KS, k - st * KS);
        for (int64_t q = 0; q < kn; ++q) {
          const uint32_t v = row[(st * KS + q) * g.a.stride_col_elems];
          d[q] = v;                  // (x, 0): the even columns
          d[XR * KS + q] = v << 16;  // (0, x): the odd ones
        }
      }
    }
    const Packed* bb = b + bt * g.b.stride_batch_elems;
    Packed* cols_pad = reinterpret_cast<Packed*>(xb + xp_dwords);
    if (n_tail) {
      std::memset(cols_pad, 0, size_t(cols_pad_elems) * 2);
      for (int64_t q = 0; q < k; ++q) std::memcpy(cols_pad + q * GN, bb + q * b_ld + full_groups * GN, size_t(n_tail) * 2);
    }
    if (k_tail) {
      Packed* rows_pad = cols_pad + cols_pad_elems;
      std::memset(rows_pad, 0, size_t(rows_pad_elems) * 2);
      for (int64_t q = 0; q < k_tail; ++q) std::memcpy(rows_pad + q * tail_ld, bb + (full_steps * KS + q) * b_ld, size_t(tail_ld) * 2);
    }
  }
  // Threads take contiguous ranges of the column groups; each group's running sums (its four C tiles
  // between chunks) have their own place, whatever thread runs it.
  const int nt = threads_for(groups, 2.0 * double(XR * GN) * double(k) * double(g.n_batch), kGemmMinFlopsPerThread);
  const int64_t c_tile = 16 * 16;
  float* sums_all = static_cast<float*>(gemm_scratch(2, size_t(groups * 4 * c_tile) * 4));
  bool finite = true;
  parallel_region(nt, [&](int t, int n_threads) {
    Tiles::configure(&kAmxFullTiles);
    alignas(64) float c[4][16 * 16], sums[XR * GN];
    bool mine_finite = true;
    const int64_t g0 = groups * t / n_threads, g1 = groups * (t + 1) / n_threads;
    for (int64_t bt = 0; bt < g.n_batch; ++bt) {
      const uint32_t* xpb = reinterpret_cast<const uint32_t*>(per_batch + bt * batch_bytes);
      const Packed* cols_pad = reinterpret_cast<const Packed*>(xpb + xp_dwords);
      const Packed* rows_pad = cols_pad + cols_pad_elems;
      const Packed* bb = b + bt * g.b.stride_batch_elems;
      for (int64_t c0 = 0; c0 < steps; c0 += CS) {
        const int64_t c1 = std::min(steps, c0 + CS);
        for (int64_t grp = g0; grp < g1; ++grp) {
          const bool last_cols = grp == full_groups;
          const Packed* w = last_cols ? cols_pad : bb + grp * GN;
          const int64_t w_ld = last_cols ? GN : b_ld;
          float* cs = sums_all + grp * 4 * c_tile;
          if (c0 == 0) {
            Tiles::template zero<0>();
            Tiles::template zero<1>();
            Tiles::template zero<2>();
            Tiles::template zero<3>();
          } else {
            Tiles::template load<0>(cs, 64);
            Tiles::template load<1>(cs + c_tile, 64);
            Tiles::template load<2>(cs + 2 * c_tile, 64);
            Tiles::template load<3>(cs + 3 * c_tile, 64);
          }
          const uint32_t* x = xpb + c0 * step_dwords;
          for (int64_t st = c0; st < c1; ++st, x += step_dwords) {
            const bool pad_rows = !last_cols && st >= full_steps;
            const Packed* wp = pad_rows ? rows_pad + grp * GN : w + st * KS * w_ld;
            const int64_t ld = pad_rows ? tail_ld : w_ld;
            Tiles::template load<4>(x, KS * 4);
            Tiles::template load<5>(x + XR * KS, KS * 4);
            Tiles::template load<6>(wp, ld * 2);
            Tiles::template load<7>(wp + 32, ld * 2);
            Kind::template dp<Tiles, 0, 4, 6>();
            Kind::template dp<Tiles, 1, 5, 6>();
            Kind::template dp<Tiles, 2, 4, 7>();
            Kind::template dp<Tiles, 3, 5, 7>();
          }
          if (c1 < steps) {
            Tiles::template store<0>(cs, 64);
            Tiles::template store<1>(cs + c_tile, 64);
            Tiles::template store<2>(cs + 2 * c_tile, 64);
            Tiles::template store<3>(cs + 3 * c_tile, 64);
            continue;
          }
          Tiles::template store<0>(c[0], 64);
          Tiles::template store<1>(c[1], 64);
          Tiles::template store<2>(c[2], 64);
          Tiles::template store<3>(c[3], 64);
          // Even / odd columns interleaved: C tile 2h + o holds columns 32 h + 2 j + o.
          float bad = 0.0f;  // 0 * (every sum): NaN where a sum is Inf or NaN
          for (int64_t i = 0; i < XR; ++i)
            for (int64_t h = 0; h < 2; ++h)
              for (int64_t j = 0; j < 16; ++j) {
                const float e = c[2 * h][i * 16 + j], o = c[2 * h + 1][i * 16 + j];
                sums[i * GN + 32 * h + 2 * j] = e;
                sums[i * GN + 32 * h + 2 * j + 1] = o;
                bad += 0.0f * e + 0.0f * o;
              }
          if (bad != 0.0f) mine_finite = false;  // NaN != 0
          amx_store_sums<S, XR>(g, sums, GN, bt, 0, m, grp * GN, GN);
        }
      }
    }
    Tiles::release();
    if (!mine_finite) {
#pragma omp atomic write
      finite = false;
    }
  });
  return finite;
}

// The AMX paths of a table: bf16 (and fp16 when has_fp16) float GEMMs, returning false for the
// other dtypes (the table's float32 kernels run them); every int8 GEMM.
template <class Tiles, class S>
bool gemm_float_amx_tiles(const GemmFloatArgs& g, bool has_fp16) {
  auto run = [&](auto kind) {
    using Kind = decltype(kind);
    if (amx_w_rows_applies(g)) return amx_gemm_w_rows<Tiles, S, Kind>(g);
    if (amx_b_in_place_applies(g) && amx_gemm_b_in_place<Tiles, S, Kind>(g)) return;
    amx_gemm_packed<AmxTraits<Tiles, S, Kind, GemmFloatArgs>>(g, gemm_amx_blocking(2));
  };
  if (g.a.dtype == LP_DTYPE_BF16) {
    run(AmxBf16{});
    return true;
  }
  if (g.a.dtype == LP_DTYPE_F16 && has_fp16) {
    run(AmxFp16{});
    return true;
  }
  return false;
}

template <class Tiles, class S>
void gemm_int8_amx_tiles(const GemmInt8Args& g) {
  if (amx_w_rows_applies(g)) return amx_gemm_w_rows<Tiles, S, AmxInt8>(g);
  amx_gemm_packed<AmxTraits<Tiles, S, AmxInt8, GemmInt8Args>>(g, gemm_amx_blocking(1));
}

// The int8 GEMM with B pre-packed as above, in K blocks of gemm_amx_blocking(1).kc.
template <class Tiles, class S>
void gemm_int8_amx_prepacked_tiles(const GemmInt8Args& g) {
  amx_gemm_packed<AmxTraits<Tiles, S, AmxInt8, GemmInt8Args, true>>(g, gemm_amx_blocking(1));
}

static inline GemmBlocking gemm_packed_blocking_amx(bool is_int8, int64_t /* rows */) {
  return gemm_amx_blocking(is_int8 ? 1 : 2);
}

}  // namespace
}  // namespace lp
