// The AMX GEMM kernels of gemm_amx_kernels.h compiled against the software tile model
// (amx_tile_model.h), with the AVX2 vector layer for their epilogue: a table ("amx-model") that runs
// the AMX kernels' logic on any CPU with AVX2, for tests only (the `gemm_testing_table` hook of the
// bindings; it is not an ISA level). Unlike the real AMX table it sends every bf16, fp16 and int8
// shape to the tile kernels (no matrix-vector or few-row paths), fp16 included (the model has
// tdpfp16ps); float32 runs the AVX2 kernels. Also the model's own unit-test hook, gemm_amx_model_exec.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/gemm/amx_tile_model.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_amx_kernels.h"
#include "cpu/simd256.h"

namespace lp {
namespace {

void gemm_float_amx_model(const GemmFloatArgs& g) {
  if (!gemm_float_amx_tiles<AmxModelTiles, Simd256>(g, true)) gemm_kernels_avx2()->gemm_float(g);
}

void gemm_int8_amx_model(const GemmInt8Args& g) {
  if (g.b_packed)
    gemm_int8_amx_prepacked_tiles<AmxModelTiles, Simd256>(g);
  else
    gemm_int8_amx_tiles<AmxModelTiles, Simd256>(g);
}

// The pre-packed int8 B of the AMX table (gemm_amx_kernels.h) in plain loops, so that the tiles'
// reading of it runs the tests on every machine: the quads, and zeros where the AVX-512 kernels keep
// their column sums (the tiles never use them).
int64_t int8_packed_b_bytes_amx_model(int64_t k, int64_t n) {
  const int64_t kc = gemm_amx_blocking(1).kc, n_panels = gemm_ceil_div(n, kAmxNr);
  int64_t bytes = (k / kc) * n_panels * amx_int8_prepacked_panel_bytes(kc);
  if (k % kc) bytes += n_panels * amx_int8_prepacked_panel_bytes(k % kc);
  return bytes + kGemmPackSlackBytes + kAmxPrepackedSlackBytes;
}

void int8_pack_b_amx_model(const GemmInt8Args& g, void* dst) {
  const int64_t kc = gemm_amx_blocking(1).kc;
  const auto* b = static_cast<const int8_t*>(g.b.ptr);
  auto* d = static_cast<int8_t*>(dst);
  for (int64_t p0 = 0; p0 < g.k; p0 += kc) {
    const int64_t kcb = std::min(kc, g.k - p0), kc4 = gemm_round_up(kcb, 4);
    for (int64_t j0 = 0; j0 < g.n; j0 += kAmxNr, d += amx_int8_prepacked_panel_bytes(kcb)) {
      std::memset(d, 0, size_t(amx_int8_prepacked_panel_bytes(kcb)));
      for (int64_t q = 0; q < kc4; ++q)
        for (int64_t c = 0; c < kAmxNr && j0 + c < g.n; ++c)
          if (q < kcb) d[q / 4 * kAmxNr * 4 + c * 4 + q % 4] = b[(p0 + q) * g.b.stride_row_elems + (j0 + c) * g.b.stride_col_elems];
    }
  }
}

const GemmKernels kGemmAmxModel = {"amx-model",
                                   LP_ISA_AVX2,
                                   gemm_float_amx_model,
                                   gemm_int8_amx_model,
                                   nullptr,
                                   nullptr,
                                   gemm_packed_blocking_amx,
                                   nullptr,
                                   int8_packed_b_bytes_amx_model,
                                   int8_pack_b_amx_model,
                                   nullptr};

}  // namespace

const GemmKernels* gemm_kernels_amx_model() { return &kGemmAmxModel; }

std::string gemm_amx_model_exec(const std::string& op, const std::vector<int64_t>& args) {
  auto need = [&](size_t n) {
    if (args.size() != n)
      throw std::invalid_argument("gemm_amx_model_exec: " + op + " takes " + std::to_string(n) + " arguments, got " +
                                  std::to_string(args.size()));
  };
  auto ptr = [](int64_t a) { return reinterpret_cast<void*>(static_cast<uintptr_t>(a)); };
  static const struct {
    const char* name;
    void (*fn)(int, int, int);
  } kDotProducts[] = {{"tdpbf16ps", amx_model_tdpbf16ps}, {"tdpfp16ps", amx_model_tdpfp16ps},
                      {"tdpbssd", amx_model_tdpbssd},     {"tdpbsud", amx_model_tdpbsud},
                      {"tdpbusd", amx_model_tdpbusd},     {"tdpbuud", amx_model_tdpbuud}};
  try {
    if (op == "ldtilecfg") {
      need(1);
      amx_model_ldtilecfg(ptr(args[0]));
    } else if (op == "sttilecfg") {
      need(1);
      amx_model_sttilecfg(ptr(args[0]));
    } else if (op == "tilerelease") {
      need(0);
      amx_model_release();
    } else if (op == "tilezero") {
      need(1);
      amx_model_tilezero(int(args[0]));
    } else if (op == "tileloadd" || op == "tilestored") {
      need(3);
      if (op == "tileloadd")
        amx_model_tileloadd(int(args[0]), ptr(args[1]), args[2]);
      else
        amx_model_tilestored(int(args[0]), ptr(args[1]), args[2]);
    } else {
      for (const auto& d : kDotProducts) {
        if (op != d.name) continue;
        need(3);
        d.fn(int(args[0]), int(args[1]), int(args[2]));
        return "";
      }
      throw std::invalid_argument("gemm_amx_model_exec: unknown instruction '" + op + "'");
    }
  } catch (const AmxModelFault& f) {
    return f.what();
  }
  return "";
}

}  // namespace lp
