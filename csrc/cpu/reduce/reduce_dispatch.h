// Runtime dtype / op codes -> compile-time template arguments, for the kernel tables of every ISA.
#pragma once
#include <type_traits>

#include "common/dtypes.h"
#include "cpu/reduce/reduce.h"

namespace lp {
namespace reduce_dispatch {

template <int V> using IC = std::integral_constant<int, V>;

// f(IC<dtype>) for every dtype the uncompressed all-reduce takes.
template <class F> static inline void on_dtype(int dtype, F&& f) {
  switch (dtype) {
    case LP_DTYPE_F32: f(IC<LP_DTYPE_F32>{}); break;
    case LP_DTYPE_F16: f(IC<LP_DTYPE_F16>{}); break;
    case LP_DTYPE_BF16: f(IC<LP_DTYPE_BF16>{}); break;
    case LP_DTYPE_F64: f(IC<LP_DTYPE_F64>{}); break;
    case LP_DTYPE_I32: f(IC<LP_DTYPE_I32>{}); break;
    case LP_DTYPE_I64: f(IC<LP_DTYPE_I64>{}); break;
    default: break;  // unreachable: Python checks the dtype first
  }
}

// f(IC<dtype>) for the float dtypes the int8 compression takes.
template <class F> static inline void on_float_dtype(int dtype, F&& f) {
  switch (dtype) {
    case LP_DTYPE_F32: f(IC<LP_DTYPE_F32>{}); break;
    case LP_DTYPE_F16: f(IC<LP_DTYPE_F16>{}); break;
    case LP_DTYPE_BF16: f(IC<LP_DTYPE_BF16>{}); break;
    case LP_DTYPE_F64: f(IC<LP_DTYPE_F64>{}); break;
    default: break;
  }
}

template <class F> static inline void on_op(int op, F&& f) {
  switch (op) {
    case LP_REDUCE_SUM: f(IC<LP_REDUCE_SUM>{}); break;
    case LP_REDUCE_AVG: f(IC<LP_REDUCE_AVG>{}); break;
    case LP_REDUCE_MAX: f(IC<LP_REDUCE_MAX>{}); break;
    case LP_REDUCE_MIN: f(IC<LP_REDUCE_MIN>{}); break;
    default: break;
  }
}

}  // namespace reduce_dispatch
}  // namespace lp
