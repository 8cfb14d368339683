// The uncompressed kernels of reduce.h (widen, accumulate, finish, narrow, gather), written once over
// per-dtype vector traits V<DT> that an ISA file supplies:
//   L, vec                     lanes and register type of the accumulator dtype
//   load(x) / store(y, v)      L storage elements widened / narrowed (Ty<DT>'s rules, bit for bit)
//   load_acc / store_acc       L accumulator elements
//   apply<OP>(a, b)            reduce_elem::apply on L lanes (NaN rules included)
//   finalize<OP>(v, n_ranks)   reduce_elem::finalize on L lanes
// Each kernel runs full vectors of V, then the remaining elements with One, the same interface on a
// single element made of reduce_elem.h's rules. The scalar table is PlainKernels<One>.
//
// Anonymous namespace: every ISA file instantiates its own copy, compiled with its own flags (the
// linker must never hand the scalar file a copy auto-vectorized with wider instructions). The
// including file turns off FMA contraction before the include (see reduce_scalar.cc).
#pragma once
#include <cstdint>

#include "cpu/reduce/reduce_dispatch.h"
#include "cpu/reduce/reduce_elem.h"

namespace lp {
namespace {

template <int DT> struct One {
  using T = typename reduce_elem::Ty<DT>::T;
  using vec = typename reduce_elem::Ty<DT>::A;
  static constexpr int L = 1;
  static vec load(const T* p) { return reduce_elem::Ty<DT>::widen(*p); }
  static void store(T* p, vec v) { *p = reduce_elem::Ty<DT>::narrow(v); }
  static vec load_acc(const vec* p) { return *p; }
  static void store_acc(vec* p, vec v) { *p = v; }
  template <int OP> static vec apply(vec a, vec b) { return reduce_elem::apply<OP>(a, b); }
  template <int OP> static vec finalize(vec v, int n_ranks) { return reduce_elem::finalize<OP>(v, n_ranks); }
};

template <template <int> class V> struct PlainKernels {
  template <int DT> using T = typename reduce_elem::Ty<DT>::T;
  template <int DT> using A = typename reduce_elem::Ty<DT>::A;

  // Each *_from runs W's full vectors from element i and returns where it stopped.
  template <int DT, template <int> class W>
  static int64_t widen_from(A<DT>* acc, const T<DT>* x, int64_t i, int64_t n) {
    for (; i + W<DT>::L <= n; i += W<DT>::L) W<DT>::store_acc(acc + i, W<DT>::load(x + i));
    return i;
  }
  template <int DT, int OP, template <int> class W>
  static int64_t accumulate_from(A<DT>* out, const A<DT>* in, const T<DT>* x, int64_t i, int64_t n) {
    using Wd = W<DT>;
    for (; i + Wd::L <= n; i += Wd::L)
      Wd::store_acc(out + i, Wd::template apply<OP>(Wd::load_acc(in + i), Wd::load(x + i)));
    return i;
  }
  template <int DT, int OP, template <int> class W>
  static int64_t finish_from(T<DT>* y, T<DT>* y2, const A<DT>* in, const T<DT>* x, int64_t i, int64_t n,
                             int n_ranks) {
    using Wd = W<DT>;
    for (; i + Wd::L <= n; i += Wd::L) {
      auto v = Wd::template finalize<OP>(Wd::template apply<OP>(Wd::load_acc(in + i), Wd::load(x + i)), n_ranks);
      Wd::store(y + i, v);
      if (y2) Wd::store(y2 + i, v);
    }
    return i;
  }
  template <int DT, int OP, template <int> class W>
  static int64_t narrow_from(T<DT>* y, T<DT>* y2, const A<DT>* acc, int64_t i, int64_t n, int n_ranks) {
    using Wd = W<DT>;
    for (; i + Wd::L <= n; i += Wd::L) {
      auto v = Wd::template finalize<OP>(Wd::load_acc(acc + i), n_ranks);
      Wd::store(y + i, v);
      if (y2) Wd::store(y2 + i, v);
    }
    return i;
  }
  template <int DT, int OP, template <int> class W>
  static int64_t gather_from(T<DT>* y, const void* const* srcs, int n_srcs, int64_t i, int64_t n, int n_ranks) {
    using Wd = W<DT>;
    for (; i + Wd::L <= n; i += Wd::L) {
      auto v = Wd::load(static_cast<const T<DT>*>(srcs[0]) + i);
      for (int k = 1; k < n_srcs; ++k)
        v = Wd::template apply<OP>(v, Wd::load(static_cast<const T<DT>*>(srcs[k]) + i));
      Wd::store(y + i, Wd::template finalize<OP>(v, n_ranks));
    }
    return i;
  }

  // The ReduceKernels entries: runtime dtype / op -> the loops above, V first, then One.
  static void widen(void* acc, const void* x, int64_t n, int dtype) {
    reduce_dispatch::on_dtype(dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      auto* a = static_cast<A<DT>*>(acc);
      auto* xs = static_cast<const T<DT>*>(x);
      widen_from<DT, One>(a, xs, widen_from<DT, V>(a, xs, 0, n), n);
    });
  }
  static void accumulate(void* out, const void* in, const void* x, int64_t n, int dtype, int op) {
    on_dtype_op(dtype, op, [&](auto dt, auto o) {
      constexpr int DT = decltype(dt)::value, OP = decltype(o)::value;
      auto* po = static_cast<A<DT>*>(out);
      auto* pi = static_cast<const A<DT>*>(in);
      auto* xs = static_cast<const T<DT>*>(x);
      accumulate_from<DT, OP, One>(po, pi, xs, accumulate_from<DT, OP, V>(po, pi, xs, 0, n), n);
    });
  }
  static void finish(void* y, void* y2, const void* in, const void* x, int64_t n, int dtype, int op,
                     int n_ranks) {
    on_dtype_op(dtype, op, [&](auto dt, auto o) {
      constexpr int DT = decltype(dt)::value, OP = decltype(o)::value;
      auto* py = static_cast<T<DT>*>(y);
      auto* py2 = static_cast<T<DT>*>(y2);
      auto* pi = static_cast<const A<DT>*>(in);
      auto* xs = static_cast<const T<DT>*>(x);
      int64_t i = finish_from<DT, OP, V>(py, py2, pi, xs, 0, n, n_ranks);
      finish_from<DT, OP, One>(py, py2, pi, xs, i, n, n_ranks);
    });
  }
  static void narrow(void* y, void* y2, const void* acc, int64_t n, int dtype, int op, int n_ranks) {
    on_dtype_op(dtype, op, [&](auto dt, auto o) {
      constexpr int DT = decltype(dt)::value, OP = decltype(o)::value;
      auto* py = static_cast<T<DT>*>(y);
      auto* py2 = static_cast<T<DT>*>(y2);
      auto* pa = static_cast<const A<DT>*>(acc);
      narrow_from<DT, OP, One>(py, py2, pa, narrow_from<DT, OP, V>(py, py2, pa, 0, n, n_ranks), n, n_ranks);
    });
  }
  static void gather(void* y, const void* const* srcs, int n_srcs, int64_t n, int dtype, int op, int n_ranks) {
    on_dtype_op(dtype, op, [&](auto dt, auto o) {
      constexpr int DT = decltype(dt)::value, OP = decltype(o)::value;
      auto* py = static_cast<T<DT>*>(y);
      gather_from<DT, OP, One>(py, srcs, n_srcs, gather_from<DT, OP, V>(py, srcs, n_srcs, 0, n, n_ranks), n,
                               n_ranks);
    });
  }

 private:
  template <class F> static void on_dtype_op(int dtype, int op, F&& f) {
    reduce_dispatch::on_dtype(dtype, [&](auto dt) { reduce_dispatch::on_op(op, [&](auto o) { f(dt, o); }); });
  }
};

}  // namespace
}  // namespace lp
