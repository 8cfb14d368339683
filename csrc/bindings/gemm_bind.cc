// GEMM bindings: marshalling only (pointers as integers, sizes and strides in elements, lp_dtype
// codes). lepton_core/gemm.py checks the whole contract before calling; kernels run without the GIL.
#include "bindings/bindings.h"
#include "cpu/quant/quant.h"
#include "common/cpu_features.h"
#include "common/dtypes.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"

namespace lp {
namespace {

GemmOperand operand(uintptr_t ptr, int dtype, int64_t stride_batch, int64_t stride_row, int64_t stride_col) {
  return {as_ptr<const void>(ptr), dtype, stride_batch, stride_row, stride_col};
}

// The fields every GEMM call has: sizes, operands and output.
template <class Args>
Args gemm_args(int64_t n_batch, int64_t m, int64_t n, int64_t k, const GemmOperand& a, const GemmOperand& b,
               uintptr_t out_ptr, int out_dtype) {
  Args g;
  g.n_batch = n_batch, g.m = m, g.n = n, g.k = k;
  g.a = a, g.b = b;
  g.out = as_ptr<void>(out_ptr), g.out_dtype = out_dtype;
  return g;
}

}  // namespace

void bind_gemm(py::module_& m) {
  m.def(
      "gemm_float",
      [](int64_t n_batch, int64_t rows, int64_t cols, int64_t depth,
         uintptr_t a_ptr, int in_dtype, int64_t a_stride_batch, int64_t a_stride_row, int64_t a_stride_col,
         uintptr_t b_ptr, int64_t b_stride_batch, int64_t b_stride_row, int64_t b_stride_col,
         uintptr_t bias_ptr, uintptr_t out_ptr, int out_dtype) {
        auto g = gemm_args<GemmFloatArgs>(n_batch, rows, cols, depth,
                                          operand(a_ptr, in_dtype, a_stride_batch, a_stride_row, a_stride_col),
                                          operand(b_ptr, in_dtype, b_stride_batch, b_stride_row, b_stride_col),
                                          out_ptr, out_dtype);
        g.bias = as_ptr<const float>(bias_ptr);
        py::gil_scoped_release release;
        gemm_float(g);
      },
      py::arg("n_batch"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("in_dtype"),
      py::arg("a_stride_batch"), py::arg("a_stride_row"), py::arg("a_stride_col"), py::arg("b"),
      py::arg("b_stride_batch"), py::arg("b_stride_row"), py::arg("b_stride_col"), py::arg("bias"), py::arg("out"),
      py::arg("out_dtype"), "out[b] = round_once(a[b] @ b[b] + bias): f32/f16/bf16 inputs, float32 accumulation");
  m.def(
      "gemm_int8",
      [](int64_t n_batch, int64_t rows, int64_t cols, int64_t depth,
         uintptr_t a_ptr, int64_t a_stride_batch, int64_t a_stride_row, int64_t a_stride_col,
         uintptr_t b_ptr, int64_t b_stride_batch, int64_t b_stride_row, int64_t b_stride_col, uintptr_t out_ptr) {
        const auto g = gemm_args<GemmInt8Args>(
            n_batch, rows, cols, depth, operand(a_ptr, LP_DTYPE_I8, a_stride_batch, a_stride_row, a_stride_col),
            operand(b_ptr, LP_DTYPE_I8, b_stride_batch, b_stride_row, b_stride_col), out_ptr, LP_DTYPE_I32);
        py::gil_scoped_release release;
        gemm_int8(g);
      },
      py::arg("n_batch"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("a_stride_batch"),
      py::arg("a_stride_row"), py::arg("a_stride_col"), py::arg("b"), py::arg("b_stride_batch"),
      py::arg("b_stride_row"), py::arg("b_stride_col"), py::arg("out"), "out[b] = a[b] @ b[b], int8 x int8 -> int32, exact");
  m.def(
      "scaled_gemm_int8",
      [](int64_t rows, int64_t cols, int64_t depth,
         uintptr_t a_ptr, int64_t a_stride_row, int64_t a_stride_col, uintptr_t b_ptr, int64_t b_stride_row,
         int64_t b_stride_col, uintptr_t scale_a_ptr, int64_t scale_a_n_elems, uintptr_t scale_b_ptr,
         int64_t scale_b_n_elems, uintptr_t bias_ptr, uintptr_t out_ptr, int out_dtype, uintptr_t b_packed_ptr) {
        auto g = gemm_args<GemmInt8Args>(1, rows, cols, depth, operand(a_ptr, LP_DTYPE_I8, 0, a_stride_row, a_stride_col),
                                         operand(b_ptr, LP_DTYPE_I8, 0, b_stride_row, b_stride_col), out_ptr, out_dtype);
        g.scale_a = as_ptr<const float>(scale_a_ptr);
        g.scale_a_n_elems = scale_a_n_elems;
        g.scale_b = as_ptr<const float>(scale_b_ptr);
        g.scale_b_n_elems = scale_b_n_elems;
        g.bias = as_ptr<const float>(bias_ptr);
        g.b_packed = as_ptr<const void>(b_packed_ptr);
        py::gil_scoped_release release;
        gemm_int8(g);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("a_stride_row"), py::arg("a_stride_col"),
      py::arg("b"), py::arg("b_stride_row"), py::arg("b_stride_col"), py::arg("scale_a"), py::arg("scale_a_n_elems"),
      py::arg("scale_b"), py::arg("scale_b_n_elems"), py::arg("bias"), py::arg("out"), py::arg("out_dtype"),
      py::arg("b_packed") = 0,
      "out = round_once((float(a @ b) * scale_a[i]) * scale_b[j] + bias[j]), int32 accumulation; b_packed: "
      "b as gemm_int8_pack_b packed it (then b is not read), or 0");
  m.def(
      "w8a8_linear",
      [](int64_t rows, int64_t cols, int64_t depth, uintptr_t x_ptr, int x_dtype, int int8_fmt, uintptr_t b_ptr,
         int64_t b_stride_row, int64_t b_stride_col, uintptr_t scale_b_ptr, int64_t scale_b_n_elems, uintptr_t bias_ptr,
         uintptr_t out_ptr, int out_dtype, uintptr_t b_packed_ptr) -> int64_t {
        // QuantLinear w8a8 in one call (a batch-1 call is mostly fixed cost): x (rows, depth),
        // contiguous, quantized to int8 per row as quantize_into(x, 1, rows, depth, block 0, int8) would,
        // into this thread's GEMM scratch (gemm_scratch's slot 2: [codes | scales]), then
        // scaled_gemm_int8 with those scales as scale_a. Returns the first non-finite flat index of x
        // (nothing written) or -1.
        py::gil_scoped_release release;
        const size_t codes_bytes = (size_t(rows * depth) + 63) & ~size_t(63);
        auto* data = static_cast<uint8_t*>(gemm_scratch(2, codes_bytes + size_t(rows) * sizeof(float)));
        auto* scale_a = reinterpret_cast<float*>(data + codes_bytes);
        QuantizeArgs q{as_ptr<const void>(x_ptr), x_dtype, 1, rows, depth, 0, int8_fmt, false, 0, data, scale_a, nullptr};
        const int64_t first_bad = quantize(q);
        if (first_bad >= 0) return first_bad;
        auto g = gemm_args<GemmInt8Args>(1, rows, cols, depth,
                                         operand(reinterpret_cast<uintptr_t>(data), LP_DTYPE_I8, 0, depth, 1),
                                         operand(b_ptr, LP_DTYPE_I8, 0, b_stride_row, b_stride_col), out_ptr, out_dtype);
        g.scale_a = scale_a;
        g.scale_a_n_elems = rows;
        g.scale_b = as_ptr<const float>(scale_b_ptr);
        g.scale_b_n_elems = scale_b_n_elems;
        g.bias = as_ptr<const float>(bias_ptr);
        g.b_packed = as_ptr<const void>(b_packed_ptr);
        gemm_int8(g);
        return -1;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("x_dtype"), py::arg("int8_fmt"), py::arg("b"),
      py::arg("b_stride_row"), py::arg("b_stride_col"), py::arg("scale_b"), py::arg("scale_b_n_elems"), py::arg("bias"),
      py::arg("out"), py::arg("out_dtype"), py::arg("b_packed") = 0,
      "QuantLinear w8a8: x quantized per row to int8 (format code int8_fmt) in a per-thread scratch, then "
      "scaled_gemm_int8 with B = b (or b_packed); returns x's first non-finite flat index or -1");
  m.def(
      "gemm_int8_packed_b_bytes",
      [](int64_t k, int64_t n) { return py::make_tuple(std::string(gemm_kernels().name), gemm_int8_packed_b_bytes(k, n)); },
      py::arg("k"), py::arg("n"),
      "(active GEMM table's name, bytes of a pre-packed (k, n) int8 B under it; 0: the table takes none)");
  m.def(
      "gemm_int8_pack_b",
      [](int64_t depth, int64_t cols, uintptr_t b_ptr, int64_t b_stride_row, int64_t b_stride_col, uintptr_t dst) {
        auto g = gemm_args<GemmInt8Args>(1, 1, cols, depth, operand(0, LP_DTYPE_I8, 0, 0, 0),
                                         operand(b_ptr, LP_DTYPE_I8, 0, b_stride_row, b_stride_col), 0, LP_DTYPE_I32);
        py::gil_scoped_release release;
        gemm_int8_pack_b(g, as_ptr<void>(dst));
      },
      py::arg("k"), py::arg("n"), py::arg("b"), py::arg("b_stride_row"), py::arg("b_stride_col"), py::arg("dst"),
      "Packs the int8 (k, n) b once into dst (64-byte aligned, gemm_int8_packed_b_bytes bytes) for scaled_gemm_int8");
  m.def(
      "gemm_share_testing", [](int64_t delay_us) { return gemm_share_testing(delay_us); }, py::arg("delay_us"),
      "Tests only: the thread running a GEMM's first unit sleeps delay_us before the first K block's A blocks "
      "(0: never); returns the A blocks run by a thread other than their unit's owner since the last call");
  m.def(
      "gemm_peak_probe",
      [](int64_t n_iters, int n_threads, const std::string& kind) -> py::object {
        const int k = kind == "float" ? LP_GEMM_PROBE_FLOAT
                      : kind == "bf16" ? LP_GEMM_PROBE_BF16
                      : kind == "int8" ? LP_GEMM_PROBE_INT8
                                       : -1;
        if (k < 0) throw py::value_error("gemm_peak_probe: kind must be 'float', 'bf16' or 'int8', got '" + kind + "'");
        const GemmKernels& kernels = gemm_kernels();
        if (!kernels.peak_probe) return py::none();
        double n_ops;
        {
          py::gil_scoped_release release;
          n_ops = kernels.peak_probe(n_iters, n_threads, k);
        }
        return py::float_(n_ops);
      },
      py::arg("n_iters"), py::arg("n_threads"), py::arg("kind") = "float",
      "Runs the active kernels' microkernel arithmetic without loads (kind 'float': FMA, 'bf16': vdpbf16ps "
      "on AVX-512 (FMA in the 'avx512-bf16fma' table), tdpbf16ps on AMX, FMA on AVX2, 'int8': vpdpbusd on AVX-512, tdpbssd on AMX, madd + add "
      "on AVX2) for n_iters steps on "
      "n_threads threads; returns the operations executed (time it to get the peak), or None when the "
      "active kernels (scalar) have no probe");
  m.def(
      "gemm_blocking",
      [](bool is_int8, int64_t rows) {
        GemmBlocking b = gemm_packed_blocking(is_int8, rows);
        py::dict d;
        d["mr"] = b.mr;
        d["nr"] = b.nr;
        d["kc"] = b.kc;
        d["mc"] = b.mc;
        d["nc"] = b.nc;
        d["kchunk"] = b.kchunk;
        return d;
      },
      py::arg("is_int8") = false, py::arg("rows") = 1,
      "Cache blocking of the packed kernels for a product of `rows` rows (for tests and benchmarks)");
  m.def(
      "gemm_kernels_name", [](int isa) { return std::string((isa < 0 ? gemm_kernels() : gemm_kernels_for(isa)).name); },
      py::arg("isa") = -1,
      "Name of the GEMM kernel table an lp_isa level runs (-1: the table calls run now), capped at what "
      "this build and CPU offer (for tests)");
  // The kernel tables that are no ISA level (tests route calls through them): the AMX kernels on the
  // software tile model, and the avx512 level's table that this CPU does not pick (gemm.h).
  auto testing_tables = [] {
    std::vector<const GemmKernels*> tables;
    for (const GemmKernels* t : {gemm_kernels_amx_model(), gemm_kernels_avx512_other()})
      if (t && t->isa <= cpu_isa_detected()) tables.push_back(t);
    return tables;
  };
  m.def(
      "gemm_testing_tables",
      [testing_tables] {
        std::vector<std::string> names;
        for (const GemmKernels* t : testing_tables()) names.push_back(t->name);
        return names;
      },
      "Kernel tables that are no ISA level and that tests can route calls through on this machine "
      "(gemm_testing_table): 'amx-model', the AMX kernels on the software tile model (needs AVX2), and on "
      "an AVX-512 CPU the avx512 level's table it does not pick ('avx512-bf16dot' multiplies bf16 with vdpbf16ps, "
      "'avx512-bf16fma' widens it to float32 and uses FMA)");
  m.def(
      "gemm_testing_table",
      [testing_tables](const std::string& name) {
        if (name.empty()) return gemm_set_testing_table(nullptr);
        for (const GemmKernels* t : testing_tables())
          if (name == t->name) return gemm_set_testing_table(t);
        throw py::value_error("gemm_testing_table: '" + name + "' is not one of gemm_testing_tables() here");
      },
      py::arg("name"),
      "Testing hook: route every GEMM call through the named table of gemm_testing_tables() ('': back "
      "to the active ISA level's table)");
  m.def(
      "gemm_amx_model_exec",
      [](const std::string& op, const std::vector<int64_t>& args) { return gemm_amx_model_exec(op, args); },
      py::arg("op"), py::arg("args"),
      "Testing hook: runs one instruction of the software AMX tile model on the calling thread (op: "
      "ldtilecfg, sttilecfg, tilerelease, tilezero, tileloadd, tilestored, tdpbf16ps, tdpfp16ps, "
      "tdpb[s|u][s|u]d; args: tile numbers, addresses, strides in bytes); returns '' or the fault");
}

}  // namespace lp
