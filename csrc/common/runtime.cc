// Process-wide settings read by the kernels.
#include <atomic>
#include <thread>

#include "common/parallel.h"

namespace lp {
namespace {
std::atomic<int> g_num_threads{0};
}

int runtime_num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n < 1) {
    unsigned hw = std::thread::hardware_concurrency();
    n = hw ? int(hw) : 1;
  }
  return n;
}

void runtime_set_num_threads(int n) { g_num_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace lp
