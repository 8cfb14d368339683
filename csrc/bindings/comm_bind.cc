#include "bindings/bindings.h"

namespace lp {
void bind_comm(py::module_& m) { (void)m; }
}  // namespace lp
