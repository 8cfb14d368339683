// Weight-quantized linear bindings: marshalling only (pointers as integers, sizes and strides in
// elements, lp_dtype / lp_qlinear_scheme codes). lepton_core/nn/quant_linear.py checks the contract
// and packs the weight (layout in csrc/cpu/qlinear/qlinear.h); kernels run without the GIL.
#include "bindings/bindings.h"
#include "common/cpu_features.h"
#include "cpu/qlinear/qlinear.h"

namespace lp {

void bind_qlinear(py::module_& m) {
  m.def(
      "qlinear",
      [](int64_t rows, int64_t cols, int64_t depth, uintptr_t x_ptr, int x_dtype, int64_t x_stride_row,
         int64_t x_stride_col, int scheme, int64_t group_size, uintptr_t codes_ptr, uintptr_t scale_ptr,
         uintptr_t zero_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int out_dtype) {
        QLinearArgs a;
        a.m = rows, a.n = cols, a.k = depth;
        a.x = as_ptr<const void>(x_ptr), a.x_dtype = x_dtype, a.x_stride_row = x_stride_row, a.x_stride_col = x_stride_col;
        a.scheme = scheme, a.group_size = group_size;
        a.codes = as_ptr<const void>(codes_ptr), a.scale = as_ptr<const float>(scale_ptr);
        a.zero = as_ptr<const uint8_t>(zero_ptr), a.bias = as_ptr<const float>(bias_ptr);
        a.out = as_ptr<void>(out_ptr), a.out_dtype = out_dtype;
        py::gil_scoped_release release;
        qlinear(a);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("x_dtype"), py::arg("x_stride_row"),
      py::arg("x_stride_col"), py::arg("scheme"), py::arg("group_size"), py::arg("codes"), py::arg("scale"),
      py::arg("zero"), py::arg("bias"), py::arg("out"), py::arg("out_dtype"),
      "out = round_once(x @ dequantized(W)^T + bias) from a packed w8 / w4 weight, float32 accumulation");
  m.def(
      "qlinear_kernels_name",
      [](int isa) { return std::string(qlinear_kernels_for(isa < 0 ? cpu_isa_active() : isa).name); },
      py::arg("isa") = -1,
      "Name of the weight-quantized linear kernel table an lp_isa level runs (-1: the active level)");
  m.def(
      "qlinear_testing_tables",
      [] {
        std::vector<std::string> names;
        const QLinearKernels* model = qlinear_kernels_amx_model();
        if (model && model->isa <= cpu_isa_detected()) names.push_back(model->name);
        return names;
      },
      "Kernel tables that are no ISA level and that tests can route calls through on this machine "
      "(qlinear_testing_table): 'amx-model', the AMX kernels on the software tile model (needs AVX2)");
  m.def(
      "qlinear_testing_table",
      [](const std::string& name) {
        const QLinearKernels* model = qlinear_kernels_amx_model();
        if (name.empty()) return qlinear_set_testing_table(nullptr);
        if (!model || name != model->name || model->isa > cpu_isa_detected())
          throw py::value_error("qlinear_testing_table: '" + name + "' is not one of qlinear_testing_tables() here");
        qlinear_set_testing_table(model);
      },
      py::arg("name"),
      "Testing hook: route every weight-quantized linear call through the named table of "
      "qlinear_testing_tables() ('': back to the active ISA level's table)");
  m.def(
      "qlinear_kernels_active_name", [] { return std::string(qlinear_kernels().name); },
      "Name of the table weight-quantized linear calls run now (the testing table while one is set)");
}

}  // namespace lp
