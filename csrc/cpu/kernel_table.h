// The one dispatch idiom of the CPU kernel families (gemm, quant, reduce): each ISA file of a family
// defines a table of function pointers whose first members are `const char* name; int isa;` (the
// lp_isa level it needs) and exports it through `const Table* <family>_kernels_<isa>()`, which returns
// null in a build without that ISA. The family's `<family>_kernels_for(level)` picks with this.
#pragma once
#include <algorithm>
#include <initializer_list>

#include "common/cpu_features.h"

namespace lp {

// The first table (best first) built into this module whose level the CPU has and `isa` allows;
// `fallback` (the scalar table, level 0) when none is.
template <class Table>
const Table& pick_kernel_table(int isa, std::initializer_list<const Table*> best_first, const Table* fallback) {
  isa = std::min(isa, cpu_isa_detected());
  for (const Table* t : best_first) {
    if (t && t->isa <= isa) return *t;
  }
  return *fallback;
}

}  // namespace lp
