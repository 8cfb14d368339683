#include "bindings/bindings.h"
#include "common/codes.h"
#include "common/cpu_features.h"
#include "common/host_pool.h"
#include "common/parallel.h"

namespace lp {
namespace {

// A writable byte buffer from the host pool, exposed through the buffer protocol so that
// torch.frombuffer / numpy.frombuffer can wrap it without a copy; the block goes back to the pool
// when the last tensor or array viewing it is freed.
struct PooledBuffer {
  void* ptr = nullptr;
  size_t n_bytes = 0, block_bytes = 0;
  explicit PooledBuffer(size_t n) : n_bytes(n) { ptr = host_pool_acquire(n, &block_bytes); }
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;
  ~PooledBuffer() { host_pool_release(ptr, block_bytes); }
};

}  // namespace

// The code tables of codes.h as plain Python values (lepton_core/_codes.py builds on them).
py::dict codes_dict() {
  auto dtype_name = [](int code) -> std::string {
    for (const DtypeInfo& d : kDtypes)
      if (d.code == code) return d.name;
    return "";
  };
  py::dict dtypes, formats, reduce_ops, compressions, call_kinds, codes;
  for (const DtypeInfo& d : kDtypes) dtypes[d.name] = d.code;
  for (const FormatInfo& f : kFormats)
    formats[f.name] = py::make_tuple(f.code, dtype_name(f.storage_dtype), f.bits, f.qmax, f.zero_point, f.stochastic);
  for (int op = 0; op < int(sizeof(kReduceOpNames) / sizeof(kReduceOpNames[0])); ++op) reduce_ops[kReduceOpNames[op]] = op;
  for (int c = 0; c < int(sizeof(kCompressionNames) / sizeof(kCompressionNames[0])); ++c)
    compressions[kCompressionNames[c]] = c;
  for (int k = 0; k < kNumCallKinds; ++k) call_kinds[kCallKindNames[k]] = k;
  py::list isas;
  for (const char* name : kIsaNames) isas.append(name);
  codes["isa"] = isas;
  codes["dtype"] = dtypes;
  codes["format"] = formats;
  codes["reduce_op"] = reduce_ops;
  codes["compression"] = compressions;
  codes["call_kind"] = call_kinds;
  codes["block_limits"] = py::make_tuple(kMinBlockElems, kMaxBlockElems);
  codes["int8_max_k"] = kInt8MaxK;
  codes["q8_scales_align"] = kQ8ScalesAlign;
  py::dict qlinear_schemes;
  for (int s = 0; s < int(sizeof(kQLinearSchemeNames) / sizeof(kQLinearSchemeNames[0])); ++s)
    qlinear_schemes[kQLinearSchemeNames[s]] = s;
  codes["qlinear_scheme"] = qlinear_schemes;
  codes["qlinear_panel"] = kQLinearPanel;
  codes["qlinear_group_limits"] = py::make_tuple(kQLinearMinGroup, kQLinearMaxGroup);
  return codes;
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

void bind_runtime(py::module_& m) {
  m.attr("codes") = codes_dict();
  m.attr("compiler") = compiler_name();
#ifdef LP_GIT_REVISION
  m.attr("git_revision") = LP_GIT_REVISION;
#else
  m.attr("git_revision") = py::none();
#endif
  py::class_<PooledBuffer>(m, "PooledBuffer", py::buffer_protocol(),
                           "Writable bytes from the host buffer pool (large op outputs)")
      .def(py::init<size_t>(), py::arg("n_bytes"))
      .def_readonly("n_bytes", &PooledBuffer::n_bytes)
      .def_buffer([](PooledBuffer& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.n_bytes)}, {static_cast<py::ssize_t>(1)}, false);
      });
  m.attr("host_pool_min_bytes") = kHostPoolMinBytes;
  m.def("host_pool_limit_bytes", &host_pool_limit_bytes);
  m.def("host_pool_cached_bytes", &host_pool_cached_bytes);
  m.def("host_pool_trim", &host_pool_trim, py::call_guard<py::gil_scoped_release>(),
        "Frees every cached block (lc.empty_cache)");
#ifdef LP_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.def("cpu_isa_detected", &cpu_isa_detected);
  m.def("cpu_isa_compiled", &cpu_isa_compiled);
  m.def("cpu_isa_active", &cpu_isa_active);
  m.def("cpu_isa_set_active", &cpu_isa_set_active, py::arg("isa"));
  m.def("cpu_isa_name", [](int isa) { return std::string(cpu_isa_name(isa)); }, py::arg("isa"));
  m.def("set_num_threads", &runtime_set_num_threads, py::arg("n"));
  m.def("get_num_threads", &runtime_num_threads);
  m.def("cpu_features", []() {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["vendor"] = f.vendor;
    d["brand"] = f.brand;
    d["avx2"] = f.avx2 && f.os_avx;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f && f.os_avx512;
    d["avx512bw"] = f.avx512bw && f.os_avx512;
    d["avx512_bf16"] = f.avx512_bf16 && f.os_avx512;
    d["avx512_vnni"] = f.avx512_vnni && f.os_avx512;
    d["avx512_fp16"] = f.avx512_fp16 && f.os_avx512;
    d["amx_tile"] = f.amx_tile && f.os_amx;
    d["amx_bf16"] = f.amx_bf16 && f.os_amx;
    d["amx_int8"] = f.amx_int8 && f.os_amx;
    d["amx_fp16"] = f.amx_fp16 && f.os_amx;
    d["l1d_bytes"] = f.l1d_bytes;
    d["l2_bytes"] = f.l2_bytes;
    d["l3_bytes"] = f.l3_bytes;
    return d;
  });
}

}  // namespace lp
