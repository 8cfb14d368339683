// One bind_* function per kernel family; module.cc calls them all. Bindings only marshal:
// pointers arrive as integers (tensor.data_ptr()), sizes and strides in elements, dtypes as
// lp_dtype codes. Every contract check happens in Python before the call; kernels run with the
// GIL released.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

namespace lp {
namespace py = pybind11;

template <class T>
static inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void bind_runtime(py::module_& m);
void bind_gemm(py::module_& m);
void bind_quant(py::module_& m);
void bind_qlinear(py::module_& m);
void bind_comm(py::module_& m);

}  // namespace lp
