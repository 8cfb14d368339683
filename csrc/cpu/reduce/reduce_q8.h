// The blockwise-int8 kernels of reduce.h, written once over a per-ISA policy P that supplies the
// block-level primitives (all over float32 values of one block, len <= kMaxBlockElems):
//   P::to_f32<DT>(v, x, len)            v = float32(x)
//   P::sum<DT>(v, q, s, x, len)         v = D(q, s) + float32(x)
//   P::stat(v, len) -> BlockStat        largest |v| and whether a NaN/Inf was seen
//   P::to_f32_stat / P::sum_stat        the same as to_f32 / sum, returning stat(v) (one pass)
//   P::codes(q, v, len, scale)          q = Q(v) with `scale`
//   P::out<DT>(y, q, s, len, divisor)   y = narrow(D(q, s) / divisor)
// A block is always processed whole, so every ISA cuts the message into the same blocks.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/reduce/reduce_dispatch.h"
#include "cpu/reduce/reduce_generic.h"

namespace lp {

template <class P> struct Q8Kernels {
  template <int DT> using T = typename reduce_elem::Ty<DT>::T;
  using Stat = reduce_generic::BlockStat;

  static void widen(float* acc, const void* x, int64_t n, int dtype) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      P::template to_f32<DT>(acc, static_cast<const T<DT>*>(x), n);
    });
  }

  static void quantize(int8_t* q, float* s, const void* x, int64_t n, int dtype, int64_t block) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const T<DT>* xs = static_cast<const T<DT>*>(x);
      alignas(64) float v[kMaxBlockElems];
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        s[b] = P::template to_f32_stat<DT>(v, xs + off, len).scale();
        P::codes(q + off, v, len, s[b]);
      }
    });
  }

  static void accumulate(int8_t* q_out, float* s_out, const int8_t* q_in, const float* s_in,
                         const void* x, int64_t n, int dtype, int64_t block) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const T<DT>* xs = static_cast<const T<DT>*>(x);
      alignas(64) float v[kMaxBlockElems];
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        float scale = P::template sum_stat<DT>(v, q_in + off, s_in[b], xs + off, len).scale();
        s_out[b] = scale;
        P::codes(q_out + off, v, len, scale);
      }
    });
  }

  static void partial(float* acc, const int8_t* q_in, const float* s_in, const void* x, int64_t n,
                      int dtype, int64_t block) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const T<DT>* xs = static_cast<const T<DT>*>(x);
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        P::template sum<DT>(acc + off, q_in + off, s_in[b], xs + off, len);
      }
    });
  }

  static void finish(int8_t* q_out, float* s_out, void* y, const int8_t* q_in, const float* s_in,
                     const void* x, int64_t n, int dtype, int64_t block, int divisor) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const T<DT>* xs = static_cast<const T<DT>*>(x);
      T<DT>* ys = static_cast<T<DT>*>(y);
      alignas(64) float v[kMaxBlockElems];
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        float scale = P::template sum_stat<DT>(v, q_in + off, s_in[b], xs + off, len).scale();
        s_out[b] = scale;
        P::codes(q_out + off, v, len, scale);
        P::template out<DT>(ys + off, q_out + off, scale, len, divisor);
      }
    });
  }

  static void dequantize(void* y, const int8_t* q, const float* s, int64_t n, int dtype,
                         int64_t block, int divisor) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      T<DT>* ys = static_cast<T<DT>*>(y);
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        P::template out<DT>(ys + off, q + off, s[b], len, divisor);
      }
    });
  }

  // Sum in source order into a float32 block, then one division and one rounding.
  static void gather(void* y, const int8_t* const* qs, const float* const* ss, int n_srcs, int64_t n,
                     int dtype, int64_t block, int divisor) {
    reduce_dispatch::on_float_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      T<DT>* ys = static_cast<T<DT>*>(y);
      alignas(64) float v[kMaxBlockElems];
      for (int64_t b = 0, off = 0; off < n; ++b, off += block) {
        int64_t len = std::min(block, n - off);
        P::dequant_f32(v, qs[0] + off, ss[0][b], len);
        for (int k = 1; k < n_srcs; ++k) P::dequant_add_f32(v, qs[k] + off, ss[k][b], len);
        P::template store<DT>(ys + off, v, len, divisor);
      }
    });
  }

  // A block whose x + r holds NaN/Inf keeps its residual: the non-finite values go on to the
  // reduction (which makes that block non-finite on every rank, so a loss scaler skips the step)
  // while the residual stays what it was, instead of turning NaN for every later step.
  static void error_feedback(float* x, float* r, int64_t n, int64_t block) {
    alignas(64) int8_t q[kMaxBlockElems];
    for (int64_t off = 0; off < n; off += block) {
      int64_t len = std::min(block, n - off);
      P::add_f32(x + off, r + off, len);
      Stat st = P::stat(x + off, len);
      if (st.non_finite) continue;
      float scale = st.scale();
      P::codes(q, x + off, len, scale);
      P::residual(r + off, x + off, q, scale, len);
    }
  }
};

// One ISA's ReduceKernels table from its uncompressed kernels (a PlainKernels of reduce_plain.h) and
// its int8 kernels (a Q8Kernels).
template <class Plain, class Q8>
constexpr ReduceKernels reduce_table(const char* name, int isa) {
  return {name,         isa,          Plain::widen,   Plain::accumulate, Plain::finish,
          Plain::narrow, Plain::gather, Q8::widen,     Q8::quantize,      Q8::accumulate,
          Q8::partial,   Q8::finish,    Q8::dequantize, Q8::gather,        Q8::error_feedback};
}

}  // namespace lp
