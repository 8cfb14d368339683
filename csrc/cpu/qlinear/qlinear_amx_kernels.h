// The AMX kernels of the weight-quantized linear family for bf16 activations (math and exactness:
// qlinear.h, "bf16 activations"), written once against a tile policy `Tiles` (cpu/gemm/amx_tiles.h, or
// the software model's AmxModelTiles of cpu/gemm/amx_tile_model.h), a vector layer `S` for the
// epilogue and a code converter `Conv`, and compiled twice: qlinear_amx.cc (the real instructions,
// Simd512, the AVX-512 level's converters) and qlinear_amx_model_avx2.cc (the model, Simd256, plain
// loops), so that the same kernel logic runs the tests on every machine.
//
// Per panel of 32 columns and K block of kQLinearBf16BlockK: the block's codes are converted to bf16
// k-pairs [k/2][32][2] in the thread's workspace (Conv::w8 / Conv::w4, as the AVX-512 kernels do), zero
// past the block up to a whole tile step of 32 k. That is the AMX B layout as it is: a B tile is 16
// pair rows of 16 columns (64 bytes of a 128-byte row), the second tile 16 columns further. Then per
// block of 32 rows (the last 16 or fewer: one A tile) and per segment of the K block (w8: all of it;
// w4: the piece in one group) the C tiles start from zero, the A tiles are loaded straight from the
// bf16 rows of x (c.xb: rows xb_ld apart, zero past k to a multiple of 32 columns and zero rows past m
// to a multiple of 32, qlinear.cc), four tdpbf16ps run per 32 k, and the sums are stored to a 32 x 32
// buffer and added (w4: times the group's scales) to the panel's float32 sums (m x 32). So the
// products are the exact ones of the AVX-512 kernels, summed in float32 in the tile unit's order
// (amx_tile_model.h): the same contract (API.md §5 within §1's float32 tolerance), the same flushing
// of bf16 subnormal activations as vdpbf16ps. The epilogue is the AVX-512 kernels': w8's per-channel
// scale, the bias, the output rounded once.
// Each thread loads the tile configuration on entry and releases the tiles before it returns.
//
// Anonymous namespace: each including file keeps its own copy (compiled with its own -m flags).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/codes.h"
#include "cpu/gemm/amx_tile_model.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_kernel.h"

namespace lp {
namespace {

constexpr int64_t kQLinearAmxRows = 32;  // rows of one block: two A tiles of 16
constexpr int64_t kQLinearAmxStepK = 32; // k of one tile step: a 64-byte A row of bf16

// The sums of one segment, rows [0, 32) (A2: both A tiles) or [0, 16), of `steps` steps of 32 k: x at
// the rows' first k (x_ld elements apart), b at the segment's first pair row; into buf (32 x 32 float,
// rows 32 apart), which the C tiles start from when ACC (else from zero).
// With pieces > 1 the activations are that many bf16 pieces, piece_ld elements apart in each row, all
// multiplied by the same B tiles into the same sums.
template <class Tiles, bool A2, bool ACC>
static inline void qlinear_amx_segment(const uint16_t* x, int64_t x_ld, const uint16_t* b, int64_t steps, float* buf,
                                       int64_t pieces, int64_t piece_ld) {
  constexpr int64_t kPairRow = 2 * kQLinearPanel;                         // elements of one pair row
  constexpr int64_t kBStep = kQLinearAmxStepK / 2 * kPairRow;            // elements of one step of B
  const int64_t x_stride = x_ld * 2;
  if constexpr (ACC) {
    Tiles::template load<0>(buf, kQLinearPanel * 4);
    Tiles::template load<1>(buf + 16, kQLinearPanel * 4);
    if constexpr (A2) {
      Tiles::template load<2>(buf + 16 * kQLinearPanel, kQLinearPanel * 4);
      Tiles::template load<3>(buf + 16 * kQLinearPanel + 16, kQLinearPanel * 4);
    }
  } else {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    if constexpr (A2) {
      Tiles::template zero<2>();
      Tiles::template zero<3>();
    }
  }
  // A (the activations, from L2) with the T1 hint, so as not to evict the converted block from L1.
  for (int64_t s = 0; s < steps; ++s) {
    Tiles::template load<6>(b + s * kBStep, kPairRow * 2);
    Tiles::template load<7>(b + s * kBStep + 32, kPairRow * 2);
    for (int64_t q = 0; q < pieces; ++q) {
      const uint16_t* xs = x + q * piece_ld + s * kQLinearAmxStepK;
      Tiles::template load_t1<4>(xs, x_stride);
      if constexpr (A2) Tiles::template load_t1<5>(xs + 16 * x_ld, x_stride);
      Tiles::template dp_bf16<0, 4, 6>();
      Tiles::template dp_bf16<1, 4, 7>();
      if constexpr (A2) {
        Tiles::template dp_bf16<2, 5, 6>();
        Tiles::template dp_bf16<3, 5, 7>();
      }
    }
  }
  Tiles::template store<0>(buf, kQLinearPanel * 4);
  Tiles::template store<1>(buf + 16, kQLinearPanel * 4);
  if constexpr (A2) {
    Tiles::template store<2>(buf + 16 * kQLinearPanel, kQLinearPanel * 4);
    Tiles::template store<3>(buf + 16 * kQLinearPanel + 16, kQLinearPanel * 4);
  }
}

// Rows of one chunk: the bf16 rows that fill half of L2, to the nearest multiple of 32. 4096 x 4096 on a
// 2 MiB L2 (2 threads, session 13): 256 rows against 96 took w8 from 5.3 to 3.7 ms at 128 rows and 8.5
// to 5.9 at 256 (the codes converted once, not three times), and against whole panels converted once
// per call (the activations then stream from L3 for every panel) 25 against 27-30 ms at 1024. Half of
// L2 (128 rows there) against all of it (256), in one process (session 24): 256 / 512 / 1024 rows w8
// 1.06 / 1.04 / 1.04x, w4 1.09 / 1.08 / 1.09x; a quarter 0.77-0.99x.
static inline int64_t qlinear_amx_row_chunk(const QLinearCall& c) {
  const int64_t rows = int64_t(cpu_features().l2_bytes) / 2 / (2 * c.xb_ld);
  return std::max<int64_t>(kQLinearAmxRows, (rows + kQLinearAmxRows / 2) / kQLinearAmxRows * kQLinearAmxRows);
}

// Every row of panels [p0, p1) with bf16 activations; W4 picks the scheme. ws: the thread's
// qlinear_bf16_ws_bytes(c). Rows go in chunks (qlinear_amx_row_chunk): a chunk stays in L2 while every
// panel passes over it, and each panel's codes are converted once per chunk. Rows are independent, so
// the chunking changes no result.
template <class Tiles, class S, class Conv, bool W4>
void qlinear_amx_bf16_panels(const QLinearCall& c, int64_t p0, int64_t p1, void* ws_bytes) {
  constexpr int L = S::kLanes, NV = int(kQLinearPanel / L);
  uint16_t* bbuf = static_cast<uint16_t*>(ws_bytes);
  float* sums = reinterpret_cast<float*>(static_cast<char*>(ws_bytes) + kQLinearBf16BlockK * kQLinearPanel * 2);
  alignas(64) float buf[kQLinearAmxRows * kQLinearPanel];
  const int64_t chunk = qlinear_amx_row_chunk(c);
  Tiles::configure(&kAmxFullTiles);
  for (int64_t r0 = 0; r0 < c.m; r0 += chunk) {
    const int64_t r1 = std::min(c.m, r0 + chunk);
    for (int64_t p = p0; p < p1; ++p) {
      std::memset(sums + r0 * kQLinearPanel, 0, size_t((r1 - r0) * kQLinearPanel) * sizeof(float));
      const float* scale_p = c.scale + p * c.n_groups * kQLinearPanel;  // w4's group scales
      for (int64_t k0 = 0; k0 < c.k_pad; k0 += kQLinearBf16BlockK) {
        // The block's codes as bf16 k-pairs, zero past k_pad up to a whole step.
        const int64_t k1 = std::min(c.k_pad, k0 + kQLinearBf16BlockK);
        qlinear_bf16_convert_block<Conv, W4>(c, p, k0, k1, bbuf);
        const int64_t k_steps_end = gemm_round_up(k1 - k0, kQLinearAmxStepK);
        std::memset(bbuf + (k1 - k0) * kQLinearPanel, 0, size_t((k_steps_end - (k1 - k0)) * kQLinearPanel) * 2);
        for (int64_t i0 = r0; i0 < r1; i0 += kQLinearAmxRows) {
          const int64_t rows = std::min(kQLinearAmxRows, r1 - i0);
          const uint16_t* x = c.xb + i0 * c.xb_ld;
          float* ws = sums + i0 * kQLinearPanel;
          // One segment: its tile sums into buf, then added to the rows' sums (w4: times scale s).
          auto segment = [&](int64_t s0, int64_t s1, const float* s) {
            const int64_t steps = gemm_ceil_div(s1 - s0, kQLinearAmxStepK);
            const uint16_t* b = bbuf + (s0 - k0) * kQLinearPanel;
            if (!W4 && rows == kQLinearAmxRows) {
              // w8, a whole block: the tiles add to the rows' sums in place (they have 32 rows, all valid).
              qlinear_amx_segment<Tiles, true, true>(x + s0, c.xb_ld, b, steps, ws, c.xb_pieces, c.xb_piece_ld);
              return;
            }
            if (rows > 16)
              qlinear_amx_segment<Tiles, true, false>(x + s0, c.xb_ld, b, steps, buf, c.xb_pieces, c.xb_piece_ld);
            else
              qlinear_amx_segment<Tiles, false, false>(x + s0, c.xb_ld, b, steps, buf, c.xb_pieces, c.xb_piece_ld);
            for (int h = 0; h < NV; ++h) {
              const typename S::F sh = s ? S::loadu(s + h * L) : S::zero();
              for (int64_t r = 0; r < rows; ++r) {
                float* w = ws + r * kQLinearPanel + h * L;
                const typename S::F v = S::loadu(buf + r * kQLinearPanel + h * L);
                S::storeu(w, s ? S::fmadd(sh, v, S::loadu(w)) : S::add(v, S::loadu(w)));
              }
            }
          };
          if constexpr (W4) {
            bf16_group_pieces(c, k0, k1, [&](int64_t s0, int64_t s1, int64_t g) { segment(s0, s1, scale_p + g * kQLinearPanel); });
          } else {
            segment(k0, k1, nullptr);
          }
        }
      }
      // Epilogue: w8's per-channel scale, then the bias and the output dtype (qlinear_store).
      const int64_t col0 = p * kQLinearPanel;
      for (int64_t i = r0; i < r1; ++i) {
        typename S::F acc[1][NV];
        for (int h = 0; h < NV; ++h) {
          acc[0][h] = S::loadu(sums + i * kQLinearPanel + h * L);
          if (!W4) acc[0][h] = S::mul(acc[0][h], S::loadu(c.scale + col0 + h * L));
        }
        qlinear_store<S, 1, NV>(c, i, col0, acc);
      }
    }
  }
  Tiles::release();
}

}  // namespace
}  // namespace lp
