// The one error type of the communication layer. Python sees it as lepton_core.distributed.CommError
// (a RuntimeError): registered in csrc/bindings/comm_bind.cc.
#pragma once
#include <stdexcept>
#include <string>

namespace lp {

struct CommFault : std::runtime_error {
  // fatal: the communicator cannot be used again (a peer died, timed out or aborted). A mismatch of
  // numel/dtype/op is not fatal: every rank raises at the same call and the next call works.
  CommFault(const std::string& what, bool fatal_) : std::runtime_error(what), fatal(fatal_) {}
  bool fatal;
};

}  // namespace lp
