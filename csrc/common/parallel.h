// Threading for the CPU kernels: OpenMP when the build found it, one thread otherwise.
// The thread count is a process-wide setting (lc.set_num_threads), read at each call.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#ifdef LP_HAVE_OPENMP
#include <omp.h>
#endif

namespace lp {

int runtime_num_threads();            // the current lc.set_num_threads value (>= 1)
void runtime_set_num_threads(int n);  // called from Python after validation

// Threads worth using for `n_tasks` independent tasks of roughly `work_per_task` units (elements,
// flops...) when one thread should get at least `min_work` units: small calls stay on one thread and
// do not pay the fork/join cost.
static inline int threads_for(int64_t n_tasks, double work_per_task, double min_work) {
  int nt = runtime_num_threads();
  double total = double(n_tasks) * work_per_task;
  int64_t by_work = int64_t(total / min_work);
  int64_t cap = std::min<int64_t>(n_tasks, std::max<int64_t>(1, by_work));
  return int(std::max<int64_t>(1, std::min<int64_t>(nt, cap)));
}

// A memory-bound kernel earns a thread by the bytes it streams too, not only by its work: a thread
// per this many bytes. 2 threads over 1 on the 2-core AMX Xeon (session 22): GEMM float32 1 x 1024 x
// 1024 2.03x, 1 x 4096 x 256 2.43x, 1 x 512 x 512 1.23x, 2 x 1024 x 1024 2.08x, bf16 1 x 1024 x 1024
// 2.05x (64 KiB: 1 x 4096 x 256 2.04x; 1 MiB: 512 x 512 0.94x); QuantLinear 1 row x 1024 -> 1024 w8 / w4
// 1.46-1.52x.
constexpr double kMinStreamBytesPerThread = 256.0 * 1024;

// Threads for n_tasks tasks of work_per_task units (min_work a thread, as threads_for) that each
// stream bytes_per_task bytes: whichever of the two earns more.
static inline int threads_for_stream(int64_t n_tasks, double work_per_task, double min_work, double bytes_per_task) {
  return std::max(threads_for(n_tasks, work_per_task, min_work),
                  threads_for(n_tasks, bytes_per_task, kMinStreamBytesPerThread));
}

// Tasks [0, n_tasks) handed out in chunks of consecutive tasks (about 4 chunks a thread) from a
// counter, so that a thread whose core is slower (a busy neighbour on a shared host) takes fewer of
// them than a static split would give it (AMX few-row x @ W^T at 32 rows 1.27x on a 2-core Xeon,
// bench/RESULTS.md session 20). For tasks whose results do not depend on the thread that runs them.
class ClaimedChunks {
 public:
  ClaimedChunks(int64_t n_tasks, int n_threads)
      : n_tasks_(n_tasks), chunk_(std::max<int64_t>(1, n_tasks / (int64_t(std::max(1, n_threads)) * 4))) {}
  // The calling thread's next chunk [begin, end); false once every task is handed out.
  bool next(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    end = std::min(n_tasks_, begin + chunk_);
    return begin < n_tasks_;
  }

 private:
  const int64_t n_tasks_, chunk_;
  std::atomic<int64_t> next_{0};
};

// Runs body(thread_index, n_threads) once per thread (for kernels that split work themselves).
template <class Body>
static inline void parallel_region(int n_threads, const Body& body) {
#ifdef LP_HAVE_OPENMP
  if (n_threads > 1) {
#pragma omp parallel num_threads(n_threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

// Runs body(thread, begin, end) over ranges [begin, end) that together cover [0, n_tasks) once, handed
// out by ClaimedChunks on n_threads threads (thread: the running thread's index, for its own
// workspace). For kernels that do some work per range (a workspace to clear, a row chunk to walk)
// and whose results do not depend on the ranges.
template <class Body>
static inline void parallel_ranges_claimed(int64_t n_tasks, int n_threads, const Body& body) {
  if (n_tasks <= 0) return;
  if (n_threads <= 1 || n_tasks <= 1) return body(0, int64_t(0), n_tasks);
  ClaimedChunks claims(n_tasks, n_threads);
  parallel_region(n_threads, [&](int t, int) {
    for (int64_t t0, t1; claims.next(t0, t1);) body(t, t0, t1);
  });
}

// body(task) for every task in [0, n_tasks), the tasks handed out as by parallel_ranges_claimed.
template <class Body>
static inline void parallel_for_claimed(int64_t n_tasks, int n_threads, const Body& body) {
  parallel_ranges_claimed(n_tasks, n_threads, [&](int, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(t);
  });
}

}  // namespace lp
