// One communicator per (process group, host): the shared-memory transport, the collectives, and
// a communication thread that runs asynchronous calls in order (DDP's overlap of communication with
// backward). Synchronous and asynchronous calls share one queue order, so every rank sees the same
// sequence of calls whatever mix it issues.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/collectives.h"
#include "comm/transport.h"

namespace lp {

struct ShmCommConfig {
  uint64_t ring_slot_bytes = 256 << 10;
  int ring_slots = 4;
  uint64_t lat_bytes = 64 << 10;
};

class ShmComm {
 public:
  // ok: true on success; otherwise `error` holds the message and `fatal` whether the communicator
  // is now unusable (see CommFault).
  using Done = std::function<void(bool ok, bool fatal, const std::string& error)>;

  // Maps the segment (creating it on `create`); attach() completes the setup (see ShmTransport).
  ShmComm(const std::string& name, bool create, int rank, int n_ranks, const ShmCommConfig& cfg,
          const std::vector<int>& rank_names = {});
  ~ShmComm();
  void attach(double timeout_s) { t_.attach(timeout_s); }
  void unlink() { t_.unlink(); }

  // Runs a call on the caller's thread, after every call queued before it. Throws CommFault.
  void run(const CollArgs& a, double timeout_s);
  // Queues a call for the communication thread; `done` runs on that thread when it ends.
  void submit(const CollArgs& a, double timeout_s, Done done);
  // Waits for queued calls, then stops the thread (queued calls still run). Idempotent.
  void shutdown();
  // Marks the communicator failed for a reason found elsewhere (see ShmTransport::abort): the
  // peers raise it at once, and every later call here raises too. Waits for a running call.
  void abort(const std::string& why);
  // See ShmTransport::set_remote (called between calls, by the hierarchical path; keep_alive from
  // any thread).
  void set_remote(bool inside) { t_.set_remote(inside); }
  void keep_alive() { t_.keep_alive(); }

  int rank() const { return t_.rank(); }
  int n_ranks() const { return t_.n_ranks(); }
  // Whether a fatal fault ended this communicator (see CommFault).
  bool broken() {
    std::lock_guard<std::mutex> lk(mu_);
    return broken_;
  }
  std::pair<int64_t, int64_t> owned_range(int64_t n_elems, int dtype, int compression, int64_t block) const {
    return colls_.owned_range(n_elems, dtype, compression, block);
  }

 private:
  struct Item {
    CollArgs args;
    double timeout_s;
    Done done;
  };
  void execute(const CollArgs& a, double timeout_s);
  void worker_loop();

  ShmTransport t_;
  ShmCollectives colls_;
  bool broken_ = false;
  std::string broken_why_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool busy_ = false;   // a call is executing (on the worker or inline)
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace lp
