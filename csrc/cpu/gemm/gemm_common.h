// Helpers shared by the GEMM kernels of every ISA: element loads/stores with dtype conversion, the
// scaled int8 epilogue (once, for every vector width), and per-thread scratch buffers.
//
// Everything is `static inline` or in an anonymous namespace on purpose (see common/dtypes.h): this
// header is compiled into files with different -m flags, and the linker must never pick an
// AVX2-compiled copy for generic code.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/dtypes.h"

namespace lp {

// Stops the compiler from fusing the multiply before it into a following add (an FMA would round
// once where the contract rounds twice). An empty asm that claims to modify the value is enough.
static inline float gemm_fp_barrier(float v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}

// One element of a float operand (f32 / f16 / bf16) as float32 (exact).
static inline float gemm_load_float(const void* base, int dtype, int64_t offset_elems) {
  switch (dtype) {
    case LP_DTYPE_F16: return f16_to_f32(static_cast<const uint16_t*>(base)[offset_elems]);
    case LP_DTYPE_BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[offset_elems]);
    default: return static_cast<const float*>(base)[offset_elems];
  }
}

// Rounds a float32 result once to the output dtype and stores it.
static inline void gemm_store_float(void* base, int dtype, int64_t offset_elems, float v) {
  switch (dtype) {
    case LP_DTYPE_F16: static_cast<uint16_t*>(base)[offset_elems] = f32_to_f16(v); break;
    case LP_DTYPE_BF16: static_cast<uint16_t*>(base)[offset_elems] = f32_to_bf16(v); break;
    default: static_cast<float*>(base)[offset_elems] = v; break;
  }
}

namespace {
// The vector interface of simd256.h on one float, so that code written once against it (such as
// gemm_scaled_epilogue) serves scalar loops too.
struct GemmScalarVec {
  using F = float;
  using I = int32_t;
  static inline F to_float(I v) { return float(v); }
  static inline F add(F a, F b) { return a + b; }
  static inline F mul(F a, F b) { return a * b; }
  static inline F no_contract(F v) { return gemm_fp_barrier(v); }
};
}  // namespace

// scaled_gemm's epilogue in the contract's order, (float(acc) * sa) * sb + bias (bias only when
// has_bias), each operation rounded on its own: the one definition for every width (Vec is
// GemmScalarVec, Simd256 or Simd512).
template <class Vec>
static inline typename Vec::F gemm_scaled_epilogue(typename Vec::I acc, typename Vec::F sa, typename Vec::F sb,
                                                   bool has_bias, typename Vec::F bias) {
  typename Vec::F v = Vec::no_contract(Vec::mul(Vec::to_float(acc), sa));
  v = Vec::no_contract(Vec::mul(v, sb));
  return has_bias ? Vec::add(v, bias) : v;
}

// A 64-byte aligned scratch buffer of the calling thread that only grows: packing buffers and
// partial-sum workspaces (for all worker threads, sliced by the caller) are reused across calls, so
// small GEMMs pay no malloc/mmap and page faults. Called before any parallel region, so a failed
// allocation throws std::bad_alloc (MemoryError in Python) instead of aborting inside OpenMP.
// `slot` picks one of a few independent buffers.
static inline void* gemm_scratch(int slot, size_t n_bytes) {
  struct Buf {
    void* ptr = nullptr;
    size_t n_bytes = 0;
    ~Buf() { std::free(ptr); }
  };
  static thread_local Buf bufs[4];
  Buf& b = bufs[slot];
  if (b.n_bytes < n_bytes) {
    std::free(b.ptr);
    size_t rounded = (n_bytes + 4095) & ~size_t(4095);
    b.ptr = std::aligned_alloc(64, rounded);
    b.n_bytes = b.ptr ? rounded : 0;
    if (!b.ptr) throw std::bad_alloc();
  }
  return b.ptr;
}

static inline int64_t gemm_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t gemm_round_up(int64_t a, int64_t b) { return gemm_ceil_div(a, b) * b; }

}  // namespace lp
