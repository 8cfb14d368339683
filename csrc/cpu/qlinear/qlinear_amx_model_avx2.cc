// The AMX kernels of qlinear_amx_kernels.h compiled against the software tile model
// (cpu/gemm/amx_tile_model.h), with plain-loop code conversions and the AVX2 vector layer: a table
// ("amx-model") that runs their logic on any CPU with AVX2, for tests only (the
// `qlinear_testing_table` hook of the bindings; it is no ISA level). Unlike the real AMX table it
// sends bf16 activations of every row count to the tile kernels, and float32 / float16 ones split into
// bf16 pieces; the rest is the AVX2 table's.
#include <cstdint>

#include "common/codes.h"
#include "common/dtypes.h"
#include "cpu/gemm/amx_tile_model.h"
#include "cpu/qlinear/qlinear.h"
#include "cpu/qlinear/qlinear_amx_kernels.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

// The conversions of qlinear_bf16_avx512.h as loops (what its shuffles must equal): pair row kk / 2,
// column j holds the bf16 values of k = kk and kk + 1 (zero past the codes).
struct AmxConvPlain {
  static void w8(const QLinearCall& c, const int8_t* panel, int64_t k0, int64_t k1, uint16_t* d) {
    for (int64_t kk = k0; kk < k1; ++kk)
      for (int64_t j = 0; j < kQLinearPanel; ++j)
        d[(kk - k0) / 2 * 2 * kQLinearPanel + 2 * j + (kk - k0) % 2] =
            kk < c.k ? f32_to_bf16(float(panel[kk * kQLinearPanel + j])) : uint16_t(0);
  }
  static void w4(const uint8_t* panel, const uint8_t* zero_g, int64_t k0, int64_t k1, uint16_t* d) {
    for (int64_t kk = k0; kk < k1; ++kk)
      for (int64_t j = 0; j < kQLinearPanel; ++j) {
        const int q = (panel[kk / 2 * kQLinearPanel + j] >> (4 * (kk % 2))) & 15;
        d[(kk - k0) / 2 * 2 * kQLinearPanel + 2 * j + (kk - k0) % 2] = f32_to_bf16(float(q - int(zero_g[j])));
      }
  }
};

}  // namespace

const QLinearKernels* qlinear_kernels_amx_model() {
  static const QLinearKernels kTable = [] {
    QLinearKernels t = *qlinear_kernels_avx2();
    t.name = "amx-model";
    t.w8_bf16 = qlinear_amx_bf16_panels<AmxModelTiles, Simd256, AmxConvPlain, false>;
    t.w4_bf16 = qlinear_amx_bf16_panels<AmxModelTiles, Simd256, AmxConvPlain, true>;
    t.bf16_min_rows = 1;
    t.split_min_rows_w8 = t.split_min_rows_w4 = 1;
    return t;
  }();
  return &kTable;
}

}  // namespace lp
