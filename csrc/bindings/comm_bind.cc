// Bindings of the communication layer (csrc/comm) and of the reduce kernels (csrc/cpu/reduce).
// Marshalling only: every argument was checked in lepton_core/distributed before the call.
#include <memory>
#include <vector>

#include "bindings/bindings.h"
#include "comm/comm.h"
#include "comm/comm_error.h"
#include "comm/shm_segment.h"
#include "cpu/reduce/reduce.h"

namespace lp {
namespace {

// The table for an lp_isa level, or the active one for isa < 0.
const ReduceKernels& kernels(int isa) { return isa < 0 ? reduce_kernels() : reduce_kernels_for(isa); }

CollArgs make_args(uintptr_t data, int64_t n_elems, int dtype, int op, int compression, int64_t block, int kind,
                   uintptr_t out, int root, int divisor) {
  CollArgs a;
  a.data = as_ptr<void>(data);
  a.n_elems = n_elems;
  a.dtype = dtype;
  a.op = op;
  a.compression = compression;
  a.block_elems = block;
  a.kind = kind;
  a.out = as_ptr<void>(out);
  a.root = root;
  a.divisor = divisor;
  return a;
}

// A Python callable that may be released from any thread: its last reference is dropped under the GIL.
std::shared_ptr<py::object> hold(py::object o) {
  return std::shared_ptr<py::object>(new py::object(std::move(o)), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

}  // namespace

void bind_comm(py::module_& m) {
  // lepton_core.distributed.CommError: a RuntimeError subclass raised for every CommFault.
  py::register_exception<CommFault>(m, "CommError", PyExc_RuntimeError);

  m.def("shm_sweep_orphans", &shm_sweep_orphans, py::arg("prefix"),
        py::call_guard<py::gil_scoped_release>());

  py::class_<ShmComm>(m, "ShmComm")
      .def(py::init([](const std::string& name, bool create, int rank, int n_ranks, uint64_t ring_slot_bytes,
                       int ring_slots, uint64_t lat_bytes, const std::vector<int>& rank_names) {
             ShmCommConfig cfg;
             cfg.ring_slot_bytes = ring_slot_bytes;
             cfg.ring_slots = ring_slots;
             cfg.lat_bytes = lat_bytes;
             return std::make_unique<ShmComm>(name, create, rank, n_ranks, cfg, rank_names);
           }),
           py::arg("name"), py::arg("create"), py::arg("rank"), py::arg("n_ranks"), py::arg("ring_slot_bytes"),
           py::arg("ring_slots"), py::arg("lat_bytes"), py::arg("rank_names") = std::vector<int>{},
           py::call_guard<py::gil_scoped_release>())
      .def("attach", &ShmComm::attach, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("unlink", &ShmComm::unlink, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &ShmComm::rank)
      .def_property_readonly("n_ranks", &ShmComm::n_ranks)
      .def_property_readonly("broken", &ShmComm::broken)
      .def("owned_range", &ShmComm::owned_range, py::arg("n_elems"), py::arg("dtype"), py::arg("compression"),
           py::arg("block_elems"))
      .def(
          "run",
          [](ShmComm& c, uintptr_t data, int64_t n, int dtype, int op, int compression, int64_t block, int kind,
             uintptr_t out, int root, int divisor, double timeout_s) {
            c.run(make_args(data, n, dtype, op, compression, block, kind, out, root, divisor), timeout_s);
          },
          py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("op"), py::arg("compression"), py::arg("block"),
          py::arg("kind"), py::arg("out"), py::arg("root"), py::arg("divisor"), py::arg("timeout_s"),
          py::call_guard<py::gil_scoped_release>())
      .def("submit",
           [](ShmComm& c, uintptr_t data, int64_t n, int dtype, int op, int compression, int64_t block, int kind,
              uintptr_t out, int root, int divisor, double timeout_s, py::object callback) {
             std::shared_ptr<py::object> cb = hold(std::move(callback));
             CollArgs a = make_args(data, n, dtype, op, compression, block, kind, out, root, divisor);
             py::gil_scoped_release nogil;
             c.submit(a, timeout_s, [cb](bool ok, bool fatal, const std::string& err) {
               py::gil_scoped_acquire gil;
               try {
                 (*cb)(ok, fatal, err);
               } catch (py::error_already_set& e) {
                 e.discard_as_unraisable("lepton_core.distributed completion callback");
               }
             });
           },
           py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("op"), py::arg("compression"), py::arg("block"),
           py::arg("kind"), py::arg("out"), py::arg("root"), py::arg("divisor"), py::arg("timeout_s"),
           py::arg("callback"))
      .def("abort", &ShmComm::abort, py::arg("why"), py::call_guard<py::gil_scoped_release>())
      .def("set_remote", &ShmComm::set_remote, py::arg("inside"))
      .def("keep_alive", &ShmComm::keep_alive)
      .def("shutdown", &ShmComm::shutdown, py::call_guard<py::gil_scoped_release>());

  // ---- reduce kernels on raw pointers (isa: an lp_isa level, or -1 for the active one) ----
  m.def("q8_message_bytes", &q8_message_bytes, py::arg("n_elems"), py::arg("block_elems"));
  m.def(
      "reduce_widen",
      [](int isa, uintptr_t acc, uintptr_t x, int64_t n, int dtype) {
        kernels(isa).widen(as_ptr<void>(acc), as_ptr<const void>(x), n, dtype);
      },
      py::arg("isa"), py::arg("acc"), py::arg("x"), py::arg("n"), py::arg("dtype"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "reduce_accumulate",
      [](int isa, uintptr_t out, uintptr_t in, uintptr_t x, int64_t n, int dtype, int op) {
        kernels(isa).accumulate(as_ptr<void>(out), as_ptr<const void>(in), as_ptr<const void>(x), n, dtype, op);
      },
      py::arg("isa"), py::arg("out"), py::arg("in_"), py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("op"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "reduce_finish",
      [](int isa, uintptr_t y, uintptr_t y2, uintptr_t in, uintptr_t x, int64_t n, int dtype, int op, int n_ranks) {
        kernels(isa).finish(as_ptr<void>(y), as_ptr<void>(y2), as_ptr<const void>(in), as_ptr<const void>(x), n,
                            dtype, op, n_ranks);
      },
      py::arg("isa"), py::arg("y"), py::arg("y2"), py::arg("in_"), py::arg("x"), py::arg("n"), py::arg("dtype"),
      py::arg("op"), py::arg("n_ranks"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "reduce_narrow",
      [](int isa, uintptr_t y, uintptr_t y2, uintptr_t acc, int64_t n, int dtype, int op, int n_ranks) {
        kernels(isa).narrow(as_ptr<void>(y), as_ptr<void>(y2), as_ptr<const void>(acc), n, dtype, op, n_ranks);
      },
      py::arg("isa"), py::arg("y"), py::arg("y2"), py::arg("acc"), py::arg("n"), py::arg("dtype"), py::arg("op"),
      py::arg("n_ranks"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "reduce_gather",
      [](int isa, uintptr_t y, const std::vector<uintptr_t>& srcs, int64_t n, int dtype, int op, int n_ranks) {
        std::vector<const void*> p(srcs.size());
        for (size_t i = 0; i < srcs.size(); ++i) p[i] = as_ptr<const void>(srcs[i]);
        kernels(isa).gather(as_ptr<void>(y), p.data(), int(p.size()), n, dtype, op, n_ranks);
      },
      py::arg("isa"), py::arg("y"), py::arg("srcs"), py::arg("n"), py::arg("dtype"), py::arg("op"),
      py::arg("n_ranks"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_widen",
      [](int isa, uintptr_t acc, uintptr_t x, int64_t n, int dtype) {
        kernels(isa).q8_widen(as_ptr<float>(acc), as_ptr<const void>(x), n, dtype);
      },
      py::arg("isa"), py::arg("acc"), py::arg("x"), py::arg("n"), py::arg("dtype"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_quantize",
      [](int isa, uintptr_t q, uintptr_t s, uintptr_t x, int64_t n, int dtype, int64_t block) {
        kernels(isa).q8_quantize(as_ptr<int8_t>(q), as_ptr<float>(s), as_ptr<const void>(x), n, dtype, block);
      },
      py::arg("isa"), py::arg("q"), py::arg("s"), py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("block"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_accumulate",
      [](int isa, uintptr_t q_out, uintptr_t s_out, uintptr_t q_in, uintptr_t s_in, uintptr_t x, int64_t n,
         int dtype, int64_t block) {
        kernels(isa).q8_accumulate(as_ptr<int8_t>(q_out), as_ptr<float>(s_out), as_ptr<const int8_t>(q_in),
                                   as_ptr<const float>(s_in), as_ptr<const void>(x), n, dtype, block);
      },
      py::arg("isa"), py::arg("q_out"), py::arg("s_out"), py::arg("q_in"), py::arg("s_in"), py::arg("x"),
      py::arg("n"), py::arg("dtype"), py::arg("block"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_partial",
      [](int isa, uintptr_t acc, uintptr_t q_in, uintptr_t s_in, uintptr_t x, int64_t n, int dtype, int64_t block) {
        kernels(isa).q8_partial(as_ptr<float>(acc), as_ptr<const int8_t>(q_in), as_ptr<const float>(s_in),
                                as_ptr<const void>(x), n, dtype, block);
      },
      py::arg("isa"), py::arg("acc"), py::arg("q_in"), py::arg("s_in"), py::arg("x"), py::arg("n"),
      py::arg("dtype"), py::arg("block"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_finish",
      [](int isa, uintptr_t q_out, uintptr_t s_out, uintptr_t y, uintptr_t q_in, uintptr_t s_in, uintptr_t x,
         int64_t n, int dtype, int64_t block, int divisor) {
        kernels(isa).q8_finish(as_ptr<int8_t>(q_out), as_ptr<float>(s_out), as_ptr<void>(y),
                               as_ptr<const int8_t>(q_in), as_ptr<const float>(s_in), as_ptr<const void>(x), n,
                               dtype, block, divisor);
      },
      py::arg("isa"), py::arg("q_out"), py::arg("s_out"), py::arg("y"), py::arg("q_in"), py::arg("s_in"),
      py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("block"), py::arg("divisor"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_dequantize",
      [](int isa, uintptr_t y, uintptr_t q, uintptr_t s, int64_t n, int dtype, int64_t block, int divisor) {
        kernels(isa).q8_dequantize(as_ptr<void>(y), as_ptr<const int8_t>(q), as_ptr<const float>(s), n, dtype,
                                   block, divisor);
      },
      py::arg("isa"), py::arg("y"), py::arg("q"), py::arg("s"), py::arg("n"), py::arg("dtype"), py::arg("block"),
      py::arg("divisor"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_gather",
      [](int isa, uintptr_t y, const std::vector<uintptr_t>& qs, const std::vector<uintptr_t>& ss, int64_t n,
         int dtype, int64_t block, int divisor) {
        std::vector<const int8_t*> q(qs.size());
        std::vector<const float*> s(ss.size());
        for (size_t i = 0; i < qs.size(); ++i) q[i] = as_ptr<const int8_t>(qs[i]);
        for (size_t i = 0; i < ss.size(); ++i) s[i] = as_ptr<const float>(ss[i]);
        kernels(isa).q8_gather(as_ptr<void>(y), q.data(), s.data(), int(q.size()), n, dtype, block, divisor);
      },
      py::arg("isa"), py::arg("y"), py::arg("qs"), py::arg("ss"), py::arg("n"), py::arg("dtype"), py::arg("block"),
      py::arg("divisor"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_error_feedback",
      [](int isa, uintptr_t x, uintptr_t r, int64_t n, int64_t block) {
        kernels(isa).q8_error_feedback(as_ptr<float>(x), as_ptr<float>(r), n, block);
      },
      py::arg("isa"), py::arg("x"), py::arg("r"), py::arg("n"), py::arg("block"),
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace lp
