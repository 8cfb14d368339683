// Weight-quantized linear, AMX: the bf16-activation kernels of qlinear_amx_kernels.h on the real tile
// instructions (tdpbf16ps), with the AVX-512 level's code conversions and Simd512 epilogue; every other
// entry is the AVX-512 table's (float32 / float16 activations, and bf16 activations at fewer rows
// than the table's bf16_min_rows, where the few-rows kernels read the weight once per 6-8 rows).
#include "common/codes.h"
#include "cpu/gemm/amx_tiles.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_amx_kernels.h"
#include "cpu/qlinear/qlinear_bf16_avx512.h"
#include "cpu/simd512.h"

namespace lp {
namespace {

// From this many rows, bf16 activations take the tiles; below, the AVX-512 kernels (w8: the float32
// kernel at 1-2 rows; w4: the few-rows kernel). 4096 x 4096, 2 threads, on a 2-core Xeon (session 13):
// w8 at 1 / 2 / 3 / 4 / 6 rows 0.54 / 0.62 / 1.82 / 1.63 / 1.89x the tiles' time, w4 0.52 / 0.80 /
// 1.0-1.1 / 1.2-1.3 / 1.5x. At few rows the tiles' time is the conversion of the codes to bf16 (the
// same ~1.1 ms from 1 to 6 rows).
constexpr int64_t kQLinearAmxMinRows = 3;

// From this many rows, float32 / float16 activations take the tiles too, split into exact bf16 pieces
// (three for float32); below, the AVX-512 float32 kernels. Float32 activations, 2 threads, the same
// Xeon (session 14), the AVX-512 level's time over the tiles': 4096 x 4096 w8 at 8 / 12 / 16 / 128
// rows 0.75 / 0.98 / 1.40 / 1.76x, w4 0.97 / 1.22 / 1.66 / 1.91x; MiniLM's 1536 x 384 w8 0.64 / 0.78 /
// 1.04x at 8 / 12 / 16 rows, w4 0.84 / 1.01 / 1.12x; 384 x 1536 at 64-1024 rows 1.6-1.8x.
constexpr int64_t kQLinearAmxSplitMinRowsW8 = 16, kQLinearAmxSplitMinRowsW4 = 12;

}  // namespace

const QLinearKernels* qlinear_kernels_amx() {
  static const QLinearKernels kTable = [] {
    QLinearKernels t = *qlinear_kernels_avx512();
    t.name = "amx";
    t.isa = LP_ISA_AMX;
    t.w8_bf16 = qlinear_amx_bf16_panels<AmxTiles, Simd512, Bf16ConvAvx512, false>;
    t.w4_bf16 = qlinear_amx_bf16_panels<AmxTiles, Simd512, Bf16ConvAvx512, true>;
    t.bf16_min_rows = kQLinearAmxMinRows;
    t.split_min_rows_w8 = kQLinearAmxSplitMinRowsW8;
    t.split_min_rows_w4 = kQLinearAmxSplitMinRowsW4;
    return t;
  }();
  return &kTable;
}

}  // namespace lp
