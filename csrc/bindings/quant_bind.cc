// Bindings for the quantize / dequantize kernels (marshalling only: lepton_core/quant.py checks the
// contract and passes contiguous buffers as data_ptr() integers).
#include "bindings/bindings.h"
#include "cpu/quant/quant.h"

namespace lp {

void bind_quant(py::module_& m) {
  m.def(
      "quantize_into",
      [](uintptr_t x, int x_dtype, int64_t n_outer, int64_t n_channels, int64_t n_inner,
         int64_t block_size, int fmt, bool stochastic, uint64_t seed, uintptr_t data, uintptr_t scale,
         uintptr_t zero_point) {
        QuantizeArgs a{as_ptr<const void>(x), x_dtype,     n_outer,
                       n_channels,            n_inner,     block_size,
                       fmt,                   stochastic,  seed,
                       as_ptr<uint8_t>(data), as_ptr<float>(scale), as_ptr<int32_t>(zero_point)};
        py::gil_scoped_release release;
        return quantize(a);
      },
      "Quantizes contiguous x into data/scale/zero_point; returns the first non-finite flat index "
      "or -1.",
      py::arg("x"), py::arg("x_dtype"), py::arg("n_outer"), py::arg("n_channels"), py::arg("n_inner"),
      py::arg("block_size"), py::arg("fmt"), py::arg("stochastic"), py::arg("seed"), py::arg("data"),
      py::arg("scale"), py::arg("zero_point"));
  m.def(
      "dequantize_into",
      [](uintptr_t data, uintptr_t scale, uintptr_t zero_point, int fmt, int64_t n_outer,
         int64_t n_channels, int64_t n_inner, int64_t block_size, uintptr_t out, int out_dtype) {
        DequantizeArgs a{as_ptr<const uint8_t>(data), as_ptr<const float>(scale),
                         as_ptr<const int32_t>(zero_point), fmt, n_outer, n_channels, n_inner,
                         block_size, as_ptr<void>(out), out_dtype};
        py::gil_scoped_release release;
        dequantize(a);
      },
      "Dequantizes data/scale/zero_point into contiguous out.", py::arg("data"), py::arg("scale"),
      py::arg("zero_point"), py::arg("fmt"), py::arg("n_outer"), py::arg("n_channels"),
      py::arg("n_inner"), py::arg("block_size"), py::arg("out"), py::arg("out_dtype"));
}

}  // namespace lp
