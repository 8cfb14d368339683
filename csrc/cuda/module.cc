// lepton_core._C_cuda: bindings of the CUDA kernels. Marshalling only: pointers, sizes, strides
// (elements), lp_dtype codes and the stream handle arrive as integers from
// lepton_core/_cuda_backend.py, which checks every contract before calling. Kernels are launched
// with the GIL released; std::invalid_argument becomes ValueError, CUDA errors RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "cuda/api.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

void bind_runtime(py::module_& m) {
  m.def("device_count", []() {
    auto r = lp::cuda::device_count();
    return py::make_tuple(r.first, r.second);
  }, "(number of CUDA devices, '' or the CUDA runtime's error when there is none)");
  m.def("driver_version", &lp::cuda::driver_version, "cudaDriverGetVersion (0 without a driver)");
  m.def("runtime_version", &lp::cuda::runtime_version, "version of the statically linked CUDA runtime");
  m.def("built_archs", []() { return std::string(lp::cuda::built_archs()); });
  m.def("device_name", &lp::cuda::device_name, "device"_a);
  m.def("device_check", &lp::cuda::device_check, "device"_a,
        "'' when the device can run these kernels, else why not");
}

// The GemmArgs fields that pick a kernel (gemm and gemm_config alike); pointers are set by the caller.
lp::cuda::GemmArgs gemm_args(int device, int in_dtype, int out_dtype, int64_t batch, int64_t m, int64_t n, int64_t k,
                             bool b_k_major) {
  lp::cuda::GemmArgs g;
  g.device = device;
  g.in_dtype = in_dtype, g.out_dtype = out_dtype;
  g.batch = batch, g.m = m, g.n = n, g.k = k;
  g.b_k_major = b_k_major;
  return g;
}

void bind_gemm(py::module_& m) {
  m.def(
      "gemm",
      [](int device, uintptr_t stream, int in_dtype, int out_dtype, int64_t batch, int64_t m_, int64_t n,
         int64_t k, uintptr_t a, int64_t a_batch_stride, int64_t lda, uintptr_t b, int64_t b_batch_stride,
         int64_t ldb, bool b_k_major, uintptr_t out, uintptr_t bias, uintptr_t scale_a, int64_t scale_a_n,
         uintptr_t scale_b, int64_t scale_b_n) {
        lp::cuda::GemmArgs g = gemm_args(device, in_dtype, out_dtype, batch, m_, n, k, b_k_major);
        g.stream = stream;
        g.a = a, g.a_batch_stride = a_batch_stride, g.lda = lda;
        g.b = b, g.b_batch_stride = b_batch_stride, g.ldb = ldb;
        g.out = out, g.bias = bias;
        g.scale_a = scale_a, g.scale_a_n = scale_a_n, g.scale_b = scale_b, g.scale_b_n = scale_b_n;
        py::gil_scoped_release release;
        lp::cuda::gemm(g);
      },
      "device"_a, "stream"_a, "in_dtype"_a, "out_dtype"_a, "batch"_a, "m"_a, "n"_a, "k"_a, "a"_a,
      "a_batch_stride"_a, "lda"_a, "b"_a, "b_batch_stride"_a, "ldb"_a, "b_k_major"_a, "out"_a, "bias"_a = 0,
      "scale_a"_a = 0, "scale_a_n"_a = 0, "scale_b"_a = 0, "scale_b_n"_a = 0);
  m.def(
      "gemm_config",
      [](int device, int in_dtype, int out_dtype, int64_t batch, int64_t m_, int64_t n, int64_t k, bool b_k_major) {
        return lp::cuda::gemm_config(gemm_args(device, in_dtype, out_dtype, batch, m_, n, k, b_k_major));
      },
      "device"_a, "in_dtype"_a, "out_dtype"_a, "batch"_a, "m"_a, "n"_a, "k"_a, "b_k_major"_a);
  m.def(
      "pack_rows",
      [](int device, uintptr_t stream, int elem_bytes, int64_t batch, int64_t rows, int64_t cols, uintptr_t src,
         int64_t src_batch_stride, int64_t src_row_stride, int64_t src_col_stride, uintptr_t dst, int64_t dst_ld) {
        py::gil_scoped_release release;
        lp::cuda::pack_rows(device, stream, elem_bytes, batch, rows, cols, src, src_batch_stride, src_row_stride,
                            src_col_stride, dst, dst_ld);
      },
      "device"_a, "stream"_a, "elem_bytes"_a, "batch"_a, "rows"_a, "cols"_a, "src"_a, "src_batch_stride"_a,
      "src_row_stride"_a, "src_col_stride"_a, "dst"_a, "dst_ld"_a);
}

lp::cuda::QuantArgs quant_args(int device, uintptr_t stream, int in_dtype, int format, int64_t n_outer,
                               int64_t n_channels, int64_t n_inner, int64_t block_size, bool stochastic,
                               uint64_t seed, uintptr_t x, uintptr_t data, uintptr_t scale, uintptr_t zero_point,
                               uintptr_t stats, uintptr_t bad_index) {
  lp::cuda::QuantArgs q;
  q.device = device, q.stream = stream;
  q.in_dtype = in_dtype, q.format = format;
  q.n_outer = n_outer, q.n_channels = n_channels, q.n_inner = n_inner, q.block_size = block_size;
  q.stochastic = stochastic, q.seed = seed;
  q.x = x, q.data = data, q.scale = scale, q.zero_point = zero_point;
  q.stats = stats, q.bad_index = bad_index;
  return q;
}

lp::cuda::DequantArgs dequant_args(int device, uintptr_t stream, int format, int64_t n_outer, int64_t n_channels,
                                   int64_t n_inner, int64_t block_size, uintptr_t data, uintptr_t scale,
                                   uintptr_t zero_point, uintptr_t out, int out_dtype) {
  lp::cuda::DequantArgs d;
  d.device = device, d.stream = stream;
  d.format = format;
  d.n_outer = n_outer, d.n_channels = n_channels, d.n_inner = n_inner, d.block_size = block_size;
  d.data = data, d.scale = scale, d.zero_point = zero_point;
  d.out = out, d.out_dtype = out_dtype;
  return d;
}

void bind_quant(py::module_& m) {
  m.def(
      "quantize",
      [](int device, uintptr_t stream, int in_dtype, int format, int64_t n_outer, int64_t n_channels,
         int64_t n_inner, int64_t block_size, bool stochastic, uint64_t seed, uintptr_t x, uintptr_t data,
         uintptr_t scale, uintptr_t zero_point, uintptr_t stats, uintptr_t bad_index) {
        auto q = quant_args(device, stream, in_dtype, format, n_outer, n_channels, n_inner, block_size, stochastic,
                            seed, x, data, scale, zero_point, stats, bad_index);
        py::gil_scoped_release release;
        lp::cuda::quantize(q);
      },
      "device"_a, "stream"_a, "in_dtype"_a, "format"_a, "n_outer"_a, "n_channels"_a, "n_inner"_a,
      "block_size"_a, "stochastic"_a, "seed"_a, "x"_a, "data"_a, "scale"_a, "zero_point"_a, "stats"_a,
      "bad_index"_a);
  m.def(
      "dequantize",
      [](int device, uintptr_t stream, int format, int64_t n_outer, int64_t n_channels, int64_t n_inner,
         int64_t block_size, uintptr_t data, uintptr_t scale, uintptr_t zero_point, uintptr_t out, int out_dtype) {
        auto d = dequant_args(device, stream, format, n_outer, n_channels, n_inner, block_size, data, scale,
                              zero_point, out, out_dtype);
        py::gil_scoped_release release;
        lp::cuda::dequantize(d);
      },
      "device"_a, "stream"_a, "format"_a, "n_outer"_a, "n_channels"_a, "n_inner"_a, "block_size"_a, "data"_a,
      "scale"_a, "zero_point"_a, "out"_a, "out_dtype"_a);

  // Host twins on CPU memory (tests on machines without a GPU): bad_index is a host int64 pointer.
  m.def(
      "host_quantize",
      [](int in_dtype, int format, int64_t n_outer, int64_t n_channels, int64_t n_inner, int64_t block_size,
         bool stochastic, uint64_t seed, uintptr_t x, uintptr_t data, uintptr_t scale, uintptr_t zero_point,
         uintptr_t bad_index) {
        auto q = quant_args(-1, 0, in_dtype, format, n_outer, n_channels, n_inner, block_size, stochastic, seed, x,
                            data, scale, zero_point, 0, bad_index);
        py::gil_scoped_release release;
        lp::cuda::host_quantize(q);
      },
      "in_dtype"_a, "format"_a, "n_outer"_a, "n_channels"_a, "n_inner"_a, "block_size"_a, "stochastic"_a,
      "seed"_a, "x"_a, "data"_a, "scale"_a, "zero_point"_a, "bad_index"_a);
  m.def(
      "host_dequantize",
      [](int format, int64_t n_outer, int64_t n_channels, int64_t n_inner, int64_t block_size, uintptr_t data,
         uintptr_t scale, uintptr_t zero_point, uintptr_t out, int out_dtype) {
        auto d = dequant_args(-1, 0, format, n_outer, n_channels, n_inner, block_size, data, scale, zero_point,
                              out, out_dtype);
        py::gil_scoped_release release;
        lp::cuda::host_dequantize(d);
      },
      "format"_a, "n_outer"_a, "n_channels"_a, "n_inner"_a, "block_size"_a, "data"_a, "scale"_a, "zero_point"_a,
      "out"_a, "out_dtype"_a);
  m.def(
      "host_selftest",
      [](int64_t n_samples) {
        py::gil_scoped_release release;
        return lp::cuda::host_selftest(n_samples);
      },
      "n_samples"_a = 1 << 24,
      "'' when the CUDA ports of dtypes.h match them bit for bit, else the first mismatch");
}


void bind_qlinear(py::module_& m) {
  m.def(
      "qlinear_plan",
      [](int scheme, int64_t m_, int64_t n, int64_t k, int64_t group_size) {
        const lp::cuda::QLinearPlan plan = lp::cuda::qlinear_plan(scheme, m_, n, k, group_size);
        return py::make_tuple(plan.splits, plan.k_chunk);
      },
      "scheme"_a, "m"_a, "n"_a, "k"_a, "group_size"_a,
      "(splits, k_chunk): the K split qlinear runs for this shape (splits > 1 needs a workspace)");
  m.def(
      "qlinear",
      [](int device, uintptr_t stream, int scheme, int64_t m_, int64_t n, int64_t k, int64_t group_size, uintptr_t x,
         int x_dtype, int64_t x_row, int64_t x_col, uintptr_t codes, uintptr_t scale, uintptr_t zero, uintptr_t bias,
         uintptr_t out, int out_dtype, uintptr_t ws, int64_t splits) {
        lp::cuda::QLinearGpuArgs a;
        a.device = device, a.stream = stream, a.scheme = scheme;
        a.m = m_, a.n = n, a.k = k, a.group_size = group_size;
        a.x = x, a.x_dtype = x_dtype, a.x_row = x_row, a.x_col = x_col;
        a.codes = codes, a.scale = scale, a.zero = zero, a.bias = bias;
        a.out = out, a.out_dtype = out_dtype, a.ws = ws, a.splits = splits;
        py::gil_scoped_release release;
        lp::cuda::qlinear(a);
      },
      "device"_a, "stream"_a, "scheme"_a, "m"_a, "n"_a, "k"_a, "group_size"_a, "x"_a, "x_dtype"_a, "x_row"_a,
      "x_col"_a, "codes"_a, "scale"_a, "zero"_a, "bias"_a, "out"_a, "out_dtype"_a, "ws"_a, "splits"_a);
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lepton_core CUDA kernels (no libtorch: pointers, sizes, strides and streams from Python)";
  bind_runtime(m);
  bind_gemm(m);
  bind_quant(m);
  bind_qlinear(m);
}
