#include "bindings/bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lepton_core native CPU kernels (no libtorch: pointers, sizes and strides from Python)";
  lp::bind_runtime(m);
  lp::bind_gemm(m);
  lp::bind_quant(m);
  lp::bind_qlinear(m);
  lp::bind_comm(m);
}
