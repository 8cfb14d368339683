// CPU weight-quantized linear family (API.md §5): out = x W^T + bias with W stored as int8 codes and
// one float32 scale per output channel ("w8"), or as 4-bit codes with one float32 scale and one zero
// point per group_size inputs of each output channel ("w4"). Activations f32 / f16 / bf16, float32
// accumulation, output rounded once to f32 / f16 / bf16. The weight is dequantized in registers
// inside the inner loop: no float copy of it ever exists, and a call reads each packed byte once per
// block of rows (decode shapes are memory-bound and stream the packed weight once).
//
// Packed layout (written once at conversion by lepton_core/nn/quant_linear.py, `pack_w8` / `pack_w4`;
// the one description of it is here). Output channels are cut into panels of kQLinearPanel = 32
// (codes.h; n_pad = n rounded up to 32; padding channels have code 0, scale 0, zero point 0):
//   w8  codes  int8   [n_pad / 32][k][32]            codes[p][kk][c] = q[32 p + c][kk]
//       scale  float  [n_pad]
//   w4  codes  uint8  [n_pad / 32][k_pad / 2][32]    k_pad = k rounded up to even; byte = q[.][2 kk]
//                                                    | q[.][2 kk + 1] << 4 (padding k: code 0)
//       scale  float  [n_pad / 32][n_groups][32]     n_groups = ceil(k / group_size)
//       zero   uint8  [n_pad / 32][n_groups][32]
// ("w8a8" is not this family: codes int8 [n][k] (the quantized weight as is) and scale float [n], run
// by the int8 GEMM of cpu/gemm (scaled_gemm), which on the AVX2 / AVX-512 levels packs codes^T once
// per process into its own panels (gemm_int8_pack_b; lepton_core/backends/cpu.py `_packed_b`), kept
// beside the buffers and never saved. CUDA reads the [n][k] codes directly.)
// Math (every ISA, float32): w8: out[i][j] = scale[j] * sum_k x[i][k] q[j][k] + bias[j];
// w4: out[i][j] = sum_g scale[g][j] * (sum_{k in g} x[i][k] q[j][k] - zero[g][j] * xsum[i][g]) + bias[j],
// which equals sum_k x[i][k] (q - zero) scale over the exact products up to float32 rounding (the
// contract's tolerance, API.md §1). Sums run over k in order; columns are independent, so the result
// does not depend on the thread count.
//
// bf16 activations at m >= the table's bf16_min_rows (ISAs with a bf16 dot product: the AVX-512 level;
// the AMX level's tile version of these kernels, qlinear_amx_kernels.h, does the same with tdpbf16ps),
// compute-bound: each thread converts a block of its panel's codes to bf16 k-pairs (exact: int8 codes,
// and w4's q - zero in -15..15, have at most 8 significant bits) in a per-thread buffer, never the
// whole weight, and multiplies the bf16 rows of x by it with vdpbf16ps (each bf16 x bf16 product is
// exact in float32, summed in float32). w8: out = scale[j] * (sum over K blocks of the block's sum) +
// bias; w4: out = sum_g scale[g][j] * (sum_{k in g} x[i][k] (q[j][k] - zero[g][j])) + bias, the same
// exact products as above summed in another float32 order (the contract's tolerance). Like lc.gemm's
// bf16 kernel, vdpbf16ps reads bf16 subnormal activations (|x| < 2^-126) as zero and flushes
// subnormal partial results (each dropped product is below 2^-119 |scale|, as |q| <= 127). float32 / f16
// activations stay on the float32 kernels: rounding them to bf16 would change the result beyond
// API.md §1's float32 tolerance (f16 -> bf16 is not exact either). The choice depends only on the
// dtype, m and the ISA, never on the thread count.
// w4 with bf16 activations at fewer rows (decode) also multiplies with vdpbf16ps, but converts each
// code byte into its bf16 pair in registers (no workspace: the weight is read once per 6 rows)
// and keeps the float32 path's per-group formula with an offset of 128 folded in, sum x (128 + q) -
// (zero + 128) * xsum (xsum: the float32 sums of the bf16 rows; 128 + q is a bf16 with no table
// lookup): 4096 x 4096 at M = 1 1.4x, M = 4 2x the float32 kernels (session 9), the offset form
// another 1.1x at 1 row, 1.25x at 2 (session 11). w8 likewise from 3 rows, 8 rows at a time, with
// w8's formula (session 11).
//
// Files: qlinear.cc (the table picker, activation conversion, threads), qlinear_scalar.cc (the
// reference), qlinear_kernel.h (the SIMD panel kernels, written once against the vector interface of
// cpu/simd256.h), qlinear_avx2.cc / qlinear_avx512.cc (their instantiations and tables),
// qlinear_bf16_avx512.h (the AVX-512 conversion of codes to bf16 k-pairs), qlinear_amx_kernels.h (the
// AMX bf16 kernels, written against a tile policy) with qlinear_amx.cc (the AMX table: the AVX-512 one
// with those kernels on the real tiles) and qlinear_amx_model_avx2.cc (the same kernels on the
// software tile model, a testing table).
#pragma once
#include <cstdint>

#include "common/codes.h"  // lp_qlinear_scheme, kQLinearPanel

namespace lp {

struct QLinearArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* x = nullptr;  // (m, k), any element strides
  int x_dtype = 0;          // LP_DTYPE_F32 / F16 / BF16
  int64_t x_stride_row = 0, x_stride_col = 0;
  int scheme = LP_QLINEAR_W8;
  int64_t group_size = 0;          // w4 only
  const void* codes = nullptr;     // packed (layout above)
  const float* scale = nullptr;
  const uint8_t* zero = nullptr;   // w4 only
  const float* bias = nullptr;     // (n,) or null
  void* out = nullptr;             // contiguous (m, n)
  int out_dtype = 0;
};

// What a panel kernel sees: the activations already widened to float32.
struct QLinearCall {
  int64_t m, n, k, k_pad, n_groups, group_size;
  const float* x;     // (m, k_pad) contiguous, zero past k
  const float* xsum;  // w4: (m, n_groups), sum of x over each group; else null
  const uint16_t* xb; // bf16 kernels: (m, k_pad) bf16 rows xb_ld apart, zero past k (x, xsum null)
  int64_t xb_ld;      // a multiple of 32 plus 32: the rows of a block fall in distinct L1 sets
  // float32 / float16 activations for the AMX kernels (split_min_rows_w8 / _w4): each row of xb holds xb_pieces
  // bf16 vectors xb_piece_ld elements apart whose sum is the row exactly (else 1 and 0).
  int64_t xb_pieces = 1, xb_piece_ld = 0;
  const void* codes;
  const float* scale;
  const uint8_t* zero;
  const float* bias;
  void* out;
  int out_dtype;
};

// One ISA's kernels: every row of output panels [p0, p1).
struct QLinearKernels {
  const char* name;
  int isa;  // the lp_isa level the table needs
  void (*w8)(const QLinearCall& c, int64_t p0, int64_t p1);
  void (*w4)(const QLinearCall& c, int64_t p0, int64_t p1);
  // bf16 activations (c.xb), m >= bf16_min_rows; null when the ISA has no bf16 dot product.
  // ws: this thread's qlinear_bf16_ws_bytes(c) bytes, 64-byte aligned.
  void (*w8_bf16)(const QLinearCall& c, int64_t p0, int64_t p1, void* ws);
  void (*w4_bf16)(const QLinearCall& c, int64_t p0, int64_t p1, void* ws);
  // w8 / w4, bf16 activations (c.xb; w4 with c.xsum), m < bf16_min_rows: the codes turned into bf16
  // pairs in registers (no workspace); null where the ISA has no bf16 dot product.
  void (*w8_bf16_few_rows)(const QLinearCall& c, int64_t p0, int64_t p1);
  void (*w4_bf16_few_rows)(const QLinearCall& c, int64_t p0, int64_t p1);
  // From this many rows, float32 / float16 activations take the float GEMM of the same ISA with each B
  // panel dequantized while it is packed (GemmKernels::float_quant_b) instead of w8 / w4 above: each
  // code converted once per call rather than once per row block. 0: never.
  int64_t float_gemm_min_rows_w8, float_gemm_min_rows_w4;
  // From this many rows, bf16 activations take w8_bf16 / w4_bf16 (below, the few-rows kernels where
  // the table has them, else w8 / w4).
  int64_t bf16_min_rows;
  // From this many rows, float32 / float16 activations also take w8_bf16 / w4_bf16, each row split
  // exactly into 3 / 2 bf16 pieces (QLinearCall::xb_pieces) whose products are summed in float32: the
  // AMX kernels, where three bf16 tile products cost less than one float32 FMA product. 0: never.
  int64_t split_min_rows_w8, split_min_rows_w4;
};

// The AVX-512 table's bf16_min_rows: from this many rows on, bf16 activations take the bf16 kernels
// that convert a block of codes into a workspace; below, the few-rows kernels (codes converted in registers, once per 8 / 6 rows), from
// kQLinearW8Bf16FewMinRows rows for w8 (1-2 rows stay on the float32 kernel, whose two accumulator
// sets keep the weight stream at copy speed). Measured on Zen 4, 4096 x 4096, 1 and 2 threads, few-rows
// against the block kernels: w8 1.4x at 8 rows, 1.2-1.3x at 16, 1.04-1.1x at 20; w4 1.3-1.4x at 8,
// 1.1-1.2x at 16, 1.0-1.1x at 20; w8 against the float32 kernel: 1.3x at 3 rows, 1.5x at 4, 1.7-1.9x at 7,
// 0.8-0.9x at 1 (session 11).
constexpr int64_t kQLinearBf16MinRows = 20;
constexpr int64_t kQLinearW8Bf16FewMinRows = 3;

// The bf16 kernels' K block: the k values of a panel converted at a time (512 k of 32 columns in
// bf16 are 32 KiB, L1d). A w4 group that straddles blocks is summed in pieces, each scaled.
constexpr int64_t kQLinearBf16BlockK = 512;

// A thread's workspace for the bf16 kernels: the converted block, then float32 sums (m, 32).
static inline int64_t qlinear_bf16_ws_bytes(const QLinearCall& c) {
  return kQLinearBf16BlockK * kQLinearPanel * 2 + c.m * kQLinearPanel * 4 + 64;
}

void qlinear(const QLinearArgs& args);  // through qlinear_kernels()
const QLinearKernels& qlinear_kernels_for(int isa);
// The table of cpu_isa_active(), or the testing table while one is set.
const QLinearKernels& qlinear_kernels();

const QLinearKernels* qlinear_kernels_scalar();
const QLinearKernels* qlinear_kernels_avx2();
const QLinearKernels* qlinear_kernels_avx512();
const QLinearKernels* qlinear_kernels_amx();  // the AVX-512 table with AMX bf16 kernels (qlinear_amx.cc)

// Testing hooks. The AMX kernels compiled against the software tile model (qlinear_amx_model_avx2.cc,
// needs AVX2; null when the build lacks it): no ISA level, the picker never returns it.
const QLinearKernels* qlinear_kernels_amx_model();
// Routes every call through `t` instead of the active level's table (null: back to that).
void qlinear_set_testing_table(const QLinearKernels* t);

// Stores the valid columns [0, cols) of one row of a panel's float32 results, bias added, rounded
// once (the scalar tail of every ISA, and the scalar reference's store).
void qlinear_store_row(const QLinearCall& c, int64_t row, int64_t col0, int64_t cols, const float* v);

}  // namespace lp
