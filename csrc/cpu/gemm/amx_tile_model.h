// A software model of the AMX tile instructions the GEMM kernels use (palette 1), written from the
// Intel SDM's pseudo-code, so that the AMX kernels' logic runs and is tested on any x86 CPU:
// gemm_amx_model_avx2.cc compiles the kernel source of gemm_amx_kernels.h against it.
//
// State, per thread as tile registers are per logical CPU: the configuration (palette 1: 8 tiles,
// each rows <= 16 and colsb <= 64 bytes; start_row) and 8 tiles of 16 rows x 64 bytes.
// What the hardware faults on throws AmxModelFault (a std::logic_error) naming the instruction and
// the condition. In a kernel on an OpenMP thread that ends the process through std::terminate with
// the message (as the fault would); the tests' gemm_amx_model_exec returns it.
//   ldtilecfg #GP: palette_id not 0 or 1; reserved bytes (2..15, colsb of tiles 8..15, rows of tiles
//             8..15) not zero; rows > 16; colsb > 64; rows == 0 xor colsb == 0. Palette 0 releases.
//   #UD: a tile instruction before a configuration, or on a tile that is not configured (rows 0);
//        tileloadd / tilestored with start_row >= rows or colsb not a multiple of 4; tdp*: operands
//        not three distinct tiles, colsb not a multiple of 4, shapes that do not chain (dst.rows !=
//        a.rows, a.colsb / 4 != b.rows, b.colsb != dst.colsb) or K = a.colsb / 4 or N = dst.colsb / 4
//        above 16.
// Data movement: tileloadd reads rows start_row .. rows - 1 of colsb bytes at base + row * stride and
// zeroes the rest of each row and the rows past `rows`; tilestored writes the same bytes; both reset
// start_row to 0. tilezero zeroes a tile.
// Arithmetic, as the SDM's pseudo-code (row m of dst, A = tsrc1 m x K dwords, B = tsrc2 K x N dwords):
//   tdpb[s|u][s|u]d: dst.int32[m][n] += the four byte products of A.dword[m][k] and B.dword[k][n]
//             (bytes signed or unsigned per operand), for k = 0 .. K - 1 in order, wrapping mod 2^32.
//   tdpbf16ps, tdpfp16ps: two float32 temporaries per column n (the even and the odd element of a
//             pair), both +0 at the start of the row: temp[2n + t] = fma(A[m][2k + t], B[k][2n + t],
//             temp[2n + t]) for k = 0 .. K - 1 in order; then dst[m][n] = dst[m][n] + (temp[2n] +
//             temp[2n + 1]). Each operation is one float32 operation rounded to nearest even with
//             DAZ (float32 subnormal operands read as zero: bf16 subnormal inputs, whose float32 is
//             subnormal too, and a subnormal accumulator) and FTZ (a tiny result becomes a zero of
//             its sign; x86 detects tininess after rounding: the result rounded to 24 bits with
//             unbounded exponent is below 2^-126 in magnitude). MXCSR is neither read nor written.
//             fp16 inputs are widened to float32 exactly first: fp16 subnormals are normal float32
//             numbers, so they are kept (the SDM: "input FP16 denormals are handled").
//   NaN: a NaN operand gives a NaN; which payload the hardware propagates is not modelled.
//
// Everything here is in an anonymous namespace like gemm_driver.h: each including file keeps its own
// copy (compiled with its own -m flags).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/dtypes.h"

namespace lp {
namespace {

// The 64-byte memory operand of ldtilecfg / sttilecfg.
struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxTileConfig) == 64, "the tile configuration is 64 bytes");

// The configuration every AMX kernel loads: all 8 tiles 16 rows x 64 bytes. A constant in memory, 64-byte aligned, that ldtilecfg reads whole
// (GCC 12's _tile_loadconfig declares an 8-byte read only, so a configuration built on the stack
// could lose its stores).
alignas(64) static const AmxTileConfig kAmxFullTiles = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0}, {16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0}};

struct AmxModelFault : std::logic_error {
  using std::logic_error::logic_error;
};

// Palette 1: 8 tiles of at most 16 rows x 64 bytes; tdp* K and N at most 16 dwords.
constexpr int kAmxTiles = 8, kAmxMaxRows = 16, kAmxMaxColsb = 64, kAmxMaxK = 16, kAmxMaxN = 16;

struct AmxModelState {
  bool configured = false;
  int start_row = 0;
  int rows[kAmxTiles] = {}, colsb[kAmxTiles] = {};
  alignas(64) uint8_t tile[kAmxTiles][kAmxMaxRows][kAmxMaxColsb] = {};
};

static inline AmxModelState& amx_model_state() {
  static thread_local AmxModelState s;
  return s;
}

[[noreturn]] static inline void amx_model_fault(const char* insn, const char* exc, const std::string& why) {
  throw AmxModelFault(std::string("AMX tile model: ") + insn + " raises " + exc + ": " + why);
}

static inline void amx_model_release() { amx_model_state() = AmxModelState(); }

static inline void amx_model_ldtilecfg(const void* mem) {
  AmxTileConfig c;
  std::memcpy(&c, mem, sizeof c);
  if (c.palette_id == 0) return amx_model_release();
  if (c.palette_id != 1) amx_model_fault("ldtilecfg", "#GP", "palette_id " + std::to_string(c.palette_id) + " is not 0 or 1");
  for (int i = 0; i < 14; ++i)
    if (c.reserved[i]) amx_model_fault("ldtilecfg", "#GP", "reserved byte " + std::to_string(i + 2) + " is not zero");
  for (int t = kAmxTiles; t < 16; ++t)
    if (c.colsb[t] || c.rows[t]) amx_model_fault("ldtilecfg", "#GP", "tile " + std::to_string(t) + " is beyond palette 1's 8 tiles");
  AmxModelState s;
  for (int t = 0; t < kAmxTiles; ++t) {
    const std::string tile = "tile " + std::to_string(t);
    if (c.rows[t] > kAmxMaxRows) amx_model_fault("ldtilecfg", "#GP", tile + " has " + std::to_string(c.rows[t]) + " rows (at most 16)");
    if (c.colsb[t] > kAmxMaxColsb) amx_model_fault("ldtilecfg", "#GP", tile + " has colsb " + std::to_string(c.colsb[t]) + " (at most 64)");
    if ((c.rows[t] == 0) != (c.colsb[t] == 0)) amx_model_fault("ldtilecfg", "#GP", tile + ": rows and colsb must be both zero or both non-zero");
    s.rows[t] = c.rows[t];
    s.colsb[t] = c.colsb[t];
  }
  s.configured = true;
  s.start_row = c.start_row;
  amx_model_state() = s;
}

static inline void amx_model_sttilecfg(void* mem) {
  const AmxModelState& s = amx_model_state();
  AmxTileConfig c;
  std::memset(&c, 0, sizeof c);
  if (s.configured) {
    c.palette_id = 1;
    c.start_row = uint8_t(s.start_row);
    for (int t = 0; t < kAmxTiles; ++t) c.colsb[t] = uint16_t(s.colsb[t]), c.rows[t] = uint8_t(s.rows[t]);
  }
  std::memcpy(mem, &c, sizeof c);
}

// #UD unless tile t is configured.
static inline AmxModelState& amx_model_valid(const char* insn, int t) {
  AmxModelState& s = amx_model_state();
  if (!s.configured) amx_model_fault(insn, "#UD", "the tiles are not configured (no ldtilecfg)");
  if (t < 0 || t >= kAmxTiles || s.rows[t] == 0)
    amx_model_fault(insn, "#UD", "tile " + std::to_string(t) + " is not configured");
  return s;
}

// Zeroes what lies outside tile t's configured rows x colsb.
static inline void amx_model_zero_outside(AmxModelState& s, int t) {
  for (int r = 0; r < kAmxMaxRows; ++r) {
    const int from = r < s.rows[t] ? s.colsb[t] : 0;
    std::memset(s.tile[t][r] + from, 0, size_t(kAmxMaxColsb - from));
  }
}

static inline void amx_model_check_rows(const char* insn, const AmxModelState& s, int t) {
  if (s.colsb[t] % 4) amx_model_fault(insn, "#UD", "colsb " + std::to_string(s.colsb[t]) + " is not a multiple of 4");
  if (s.start_row >= s.rows[t])
    amx_model_fault(insn, "#UD", "start_row " + std::to_string(s.start_row) + " >= rows " + std::to_string(s.rows[t]));
}

static inline void amx_model_tileloadd(int t, const void* base, int64_t stride) {
  AmxModelState& s = amx_model_valid("tileloadd", t);
  amx_model_check_rows("tileloadd", s, t);
  for (int r = 0; r < s.start_row; ++r) std::memset(s.tile[t][r], 0, kAmxMaxColsb);
  for (int r = s.start_row; r < s.rows[t]; ++r)
    std::memcpy(s.tile[t][r], static_cast<const char*>(base) + r * stride, size_t(s.colsb[t]));
  amx_model_zero_outside(s, t);
  s.start_row = 0;
}

static inline void amx_model_tilestored(int t, void* base, int64_t stride) {
  AmxModelState& s = amx_model_valid("tilestored", t);
  amx_model_check_rows("tilestored", s, t);
  for (int r = s.start_row; r < s.rows[t]; ++r)
    std::memcpy(static_cast<char*>(base) + r * stride, s.tile[t][r], size_t(s.colsb[t]));
  s.start_row = 0;
}

static inline void amx_model_tilezero(int t) {
  AmxModelState& s = amx_model_valid("tilezero", t);
  std::memset(s.tile[t], 0, sizeof s.tile[t]);
  s.start_row = 0;
}

// The #UD checks of every tdp* instruction; returns the state with M, K, N set.
static inline AmxModelState& amx_model_dp_shape(const char* insn, int c, int a, int b, int& m, int& k, int& n) {
  AmxModelState& s = amx_model_valid(insn, c);
  amx_model_valid(insn, a);
  amx_model_valid(insn, b);
  if (c == a || c == b || a == b) amx_model_fault(insn, "#UD", "the three tiles must be distinct");
  for (int t : {c, a, b})
    if (s.colsb[t] % 4) amx_model_fault(insn, "#UD", "tile " + std::to_string(t) + "'s colsb is not a multiple of 4");
  m = s.rows[c];
  k = s.colsb[a] / 4;
  n = s.colsb[c] / 4;
  if (s.rows[a] != m) amx_model_fault(insn, "#UD", "dst.rows != src1.rows");
  if (s.rows[b] != k) amx_model_fault(insn, "#UD", "src1.colsb / 4 != src2.rows");
  if (s.colsb[b] != s.colsb[c]) amx_model_fault(insn, "#UD", "src2.colsb != dst.colsb");
  if (k > kAmxMaxK || n > kAmxMaxN) amx_model_fault(insn, "#UD", "K or N above 16");
  return s;
}

static inline uint32_t amx_model_dword(const AmxModelState& s, int t, int r, int i) {
  uint32_t v;
  std::memcpy(&v, s.tile[t][r] + 4 * i, 4);
  return v;
}

// dst.int32[m][n] += the byte products of A.dword[m][k] and B.dword[k][n], wrapping mod 2^32.
template <bool ASigned, bool BSigned>
static inline void amx_model_dp_int8(const char* insn, int c, int a, int b) {
  int m_rows, k_dw, n_dw;
  AmxModelState& s = amx_model_dp_shape(insn, c, a, b, m_rows, k_dw, n_dw);
  auto byte = [](uint32_t w, int i, bool sgn) { const uint8_t u = uint8_t(w >> (8 * i)); return sgn ? int32_t(int8_t(u)) : int32_t(u); };
  for (int m = 0; m < m_rows; ++m) {
    for (int k = 0; k < k_dw; ++k) {
      const uint32_t x = amx_model_dword(s, a, m, k);
      for (int n = 0; n < n_dw; ++n) {
        const uint32_t y = amx_model_dword(s, b, k, n);
        uint32_t acc = amx_model_dword(s, c, m, n);
        for (int i = 0; i < 4; ++i) acc += uint32_t(byte(x, i, ASigned) * byte(y, i, BSigned));
        std::memcpy(s.tile[c][m] + 4 * n, &acc, 4);
      }
    }
  }
  amx_model_zero_outside(s, c);
}

// One float32 operation x * y + z with DAZ, FTZ and round to nearest even (see the top of the file).
static inline float amx_model_daz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
static inline float amx_model_fma(float x, float y, float z) {
  x = amx_model_daz(x), y = amx_model_daz(y), z = amx_model_daz(z);
  const float r = std::fma(x, y, z);
  const float ar = std::fabs(r);
  if (ar > 0x1p-126f || !(ar == ar)) return r;  // normal (or inf / NaN): not tiny
  if (ar < 0x1p-126f) return std::copysign(0.0f, r);
  // |r| == 2^-126: the exact value may lie just below it, tiny after rounding to 24 bits with an
  // unbounded exponent. Scaling by 2^64 (exact here: a sum this small has operands far below 2^63)
  // gives that rounding.
  const float scaled = std::fma(x * 0x1p64f, y, z * 0x1p64f);
  return std::fabs(scaled) < 0x1p-62f ? std::copysign(0.0f, r) : r;
}

template <class Widen>
static inline void amx_model_dp_pairs(const char* insn, int c, int a, int b, const Widen& widen) {
  int m_rows, k_dw, n_dw;
  AmxModelState& s = amx_model_dp_shape(insn, c, a, b, m_rows, k_dw, n_dw);
  auto half = [&](int t, int r, int i) {
    uint16_t h;
    std::memcpy(&h, s.tile[t][r] + 2 * i, 2);
    return widen(h);
  };
  for (int m = 0; m < m_rows; ++m) {
    float temp[2 * kAmxMaxN] = {};
    for (int k = 0; k < k_dw; ++k)
      for (int n = 0; n < n_dw; ++n)
        for (int t = 0; t < 2; ++t)
          temp[2 * n + t] = amx_model_fma(half(a, m, 2 * k + t), half(b, k, 2 * n + t), temp[2 * n + t]);
    for (int n = 0; n < n_dw; ++n) {
      const float pair = amx_model_fma(temp[2 * n], 1.0f, temp[2 * n + 1]);
      float acc;
      std::memcpy(&acc, s.tile[c][m] + 4 * n, 4);
      acc = amx_model_fma(acc, 1.0f, pair);
      std::memcpy(s.tile[c][m] + 4 * n, &acc, 4);
    }
  }
  amx_model_zero_outside(s, c);
}

static inline void amx_model_tdpbf16ps(int c, int a, int b) { amx_model_dp_pairs("tdpbf16ps", c, a, b, bf16_to_f32); }
static inline void amx_model_tdpfp16ps(int c, int a, int b) { amx_model_dp_pairs("tdpfp16ps", c, a, b, f16_to_f32); }
static inline void amx_model_tdpbssd(int c, int a, int b) { amx_model_dp_int8<true, true>("tdpbssd", c, a, b); }
static inline void amx_model_tdpbsud(int c, int a, int b) { amx_model_dp_int8<true, false>("tdpbsud", c, a, b); }
static inline void amx_model_tdpbusd(int c, int a, int b) { amx_model_dp_int8<false, true>("tdpbusd", c, a, b); }
static inline void amx_model_tdpbuud(int c, int a, int b) { amx_model_dp_int8<false, false>("tdpbuud", c, a, b); }

// The model as the kernels' tile policy (the members of amx_tiles.h's AmxTiles): what the kernel
// sources compiled against the model (gemm_amx_model_avx2.cc, qlinear_amx_model_avx2.cc) run.
struct AmxModelTiles {
  static void configure(const AmxTileConfig* c) { amx_model_ldtilecfg(c); }
  static void release() { amx_model_release(); }
  template <int T>
  static void zero() {
    amx_model_tilezero(T);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    amx_model_tileloadd(T, p, stride);
  }
  // tileloaddt1 is tileloadd with a cache hint: the same data.
  template <int T>
  static void load_t1(const void* p, int64_t stride) {
    amx_model_tileloadd(T, p, stride);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    amx_model_tilestored(T, p, stride);
  }
  template <int C, int A, int B>
  static void dp_bf16() {
    amx_model_tdpbf16ps(C, A, B);
  }
  template <int C, int A, int B>
  static void dp_fp16() {
    amx_model_tdpfp16ps(C, A, B);
  }
  template <int C, int A, int B>
  static void dp_s8() {
    amx_model_tdpbssd(C, A, B);
  }
  // The packing primitives in plain loops (what gemm_amx.cc's shuffles must equal).
  static void transpose_dwords_16x16(const void* src, int64_t src_stride, void* dst, int64_t dst_stride) {
    for (int q = 0; q < 16; ++q)
      for (int p = 0; p < 16; ++p)
        std::memcpy(static_cast<char*>(dst) + q * dst_stride + 4 * p,
                    static_cast<const char*>(src) + p * src_stride + 4 * q, 4);
  }
  static void pairs_32x32(const uint16_t* src, int64_t k_stride, uint16_t* dst) {
    for (int r = 0; r < 32; ++r)
      for (int k = 0; k < 32; ++k) dst[r * 32 + k] = src[r + k * k_stride];
  }
  template <int KU>
  static void interleave_rows_32(const void* src, int64_t src_stride, void* dst) {
    constexpr int kBytes = 4 / KU;  // one element
    for (int l = 0; l < 32; ++l)
      for (int u = 0; u < KU; ++u)
        std::memcpy(static_cast<char*>(dst) + (l * KU + u) * kBytes,
                    static_cast<const char*>(src) + u * src_stride + l * kBytes, kBytes);
  }
};

}  // namespace
}  // namespace lp
