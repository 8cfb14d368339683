// Reduction kernels of the all-reduce (API.md §3): elementwise sum / avg / max / min, and the fused
// blockwise-int8 compression kernels. One table per CPU instruction set; every entry of every table
// gives the same bits for the same inputs (the scalar table is the reference the AVX2 one is tested
// against), so ranks running on different ISAs still agree bit for bit.
//
// Types. `dtype` is an lp_dtype code (F32, F16, BF16, F64, I32, I64). Partial results travel in the
// dtype's accumulator type: float32 for F16/BF16/F32, the dtype itself for F64/I32/I64. Integer sums
// wrap around (two's complement), as torch's do.
// Ops. LP_REDUCE_SUM and LP_REDUCE_AVG accumulate with +; AVG divides by `n_ranks` once, at the end
// (a true division in the accumulator type). MAX/MIN propagate NaN: op(a, b) is (a > b ? a : b)
// (resp. <), and a when a is NaN; the operand order is part of the contract (acc first, new value
// second), which fixes the result bits even for NaN payloads and signed zeros.
// Rounding. Widening is exact (a float16 signaling NaN comes out quiet, as F16C does). 16-bit
// results are rounded once, round-to-nearest-even, from the float32 accumulator; NaN becomes the
// quiet NaN of dtypes.h.
//
// int8 compression ("q8"). A message is cut into blocks of `block_elems` elements from its first
// element (the last block may be short). A block travels as int8 codes plus one float32 scale:
// scale = absmax / 127 (float32 division), q = clamp(round_half_even(v / scale), -127, 127) (a true
// division), value = float(q) * scale. A block of zeros has scale 0 and codes 0. A block holding
// NaN or +-Inf gets scale +Inf and codes 0, so it dequantizes to NaN (the non-finite value is never
// silently dropped, e.g. for loss scaling). All q8 arithmetic is float32 (float64 inputs are rounded
// to float32 first); no fused multiply-add anywhere, so every ISA gives the same bits.
//
// Pointers need no particular alignment. Every kernel accepts n_elems == 0.
#pragma once
#include <cstdint>

#include "common/codes.h"

namespace lp {

// Accumulator dtype of partial results (uncompressed path).
int reduce_acc_dtype(int dtype);

struct ReduceKernels {
  const char* name;
  int isa;  // the lp_isa level the table needs
  // acc[i] = widen(x[i])
  void (*widen)(void* acc, const void* x, int64_t n_elems, int dtype);
  // acc_out[i] = op(acc_in[i], widen(x[i]))       (acc_out may alias acc_in)
  void (*accumulate)(void* acc_out, const void* acc_in, const void* x, int64_t n_elems, int dtype,
                     int op);
  // v = op(acc_in[i], widen(x[i])), divided by n_ranks for AVG; y[i] = narrow(v), and the same
  // bits into y_copy[i] when y_copy is not null (the value a rank keeps and forwards).
  void (*finish)(void* y, void* y_copy, const void* acc_in, const void* x, int64_t n_elems, int dtype,
                 int op, int n_ranks);
  // y[i] = narrow(acc[i] (/ n_ranks for AVG)); y_copy as in finish.
  void (*narrow)(void* y, void* y_copy, const void* acc, int64_t n_elems, int dtype, int op,
                 int n_ranks);
  // Reduces n_srcs arrays of dtype in order: v = widen(s0); v = op(v, widen(s_k)) for k = 1..;
  // then as narrow. y may alias any source.
  void (*gather)(void* y, const void* const* srcs, int n_srcs, int64_t n_elems, int dtype, int op,
                 int n_ranks);

  // ---- int8 compression (dtype: F32, F16, BF16 or F64; sum only, `divisor` = n_ranks for avg) ----
  // acc[i] = float32(x[i])
  void (*q8_widen)(float* acc, const void* x, int64_t n_elems, int dtype);
  // (q, scales) = Q(float32(x))
  void (*q8_quantize)(int8_t* q, float* scales, const void* x, int64_t n_elems, int dtype,
                      int64_t block_elems);
  // (q_out, s_out) = Q(D(q_in, s_in) + float32(x))          the middle hops of the ring
  void (*q8_accumulate)(int8_t* q_out, float* s_out, const int8_t* q_in, const float* s_in,
                        const void* x, int64_t n_elems, int dtype, int64_t block_elems);
  // acc[i] = D(q_in, s_in)[i] + float32(x[i])                 the last reduce hop, exact partial sum
  void (*q8_partial)(float* acc, const int8_t* q_in, const float* s_in, const void* x,
                     int64_t n_elems, int dtype, int64_t block_elems);
  // (q_out, s_out) = Q(D(q_in, s_in) + float32(x)); y = narrow(D(q_out, s_out) / divisor)
  void (*q8_finish)(int8_t* q_out, float* s_out, void* y, const int8_t* q_in, const float* s_in,
                    const void* x, int64_t n_elems, int dtype, int64_t block_elems, int divisor);
  // y = narrow(D(q, s) / divisor)                             every rank's copy of the result
  void (*q8_dequantize)(void* y, const int8_t* q, const float* s, int64_t n_elems, int dtype,
                        int64_t block_elems, int divisor);
  // y = narrow((D(q0, s0) + D(q1, s1) + ...) / divisor), summed in source order
  void (*q8_gather)(void* y, const int8_t* const* qs, const float* const* ss, int n_srcs,
                    int64_t n_elems, int dtype, int64_t block_elems, int divisor);
  // Error feedback: x += residual; residual = x - D(Q(x)) (both float32, in place), block by block;
  // a block of x that is non-finite after the addition leaves its residual unchanged.
  void (*q8_error_feedback)(float* x, float* residual, int64_t n_elems, int64_t block_elems);
};

// Per-ISA tables (reduce_<isa>.cc); null when this build lacks the ISA.
const ReduceKernels* reduce_kernels_scalar();
const ReduceKernels* reduce_kernels_avx2();
// The table for an lp_isa level, capped at what this build and CPU offer (levels above AVX2 run the
// AVX2 kernels, which move data at the copy rate already); reduce_kernels(): for cpu_isa_active().
const ReduceKernels& reduce_kernels_for(int isa);
const ReduceKernels& reduce_kernels();

}  // namespace lp
