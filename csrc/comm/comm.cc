#include "comm/comm.h"

namespace lp {

ShmComm::ShmComm(const std::string& name, bool create, int rank, int n_ranks, const ShmCommConfig& cfg,
                 const std::vector<int>& rank_names)
    : t_(name, create, rank, n_ranks, cfg.ring_slot_bytes, cfg.ring_slots, cfg.lat_bytes, rank_names),
      colls_(t_) {}

ShmComm::~ShmComm() { shutdown(); }

void ShmComm::execute(const CollArgs& a, double timeout_s) {
  if (broken_)
    throw CommFault(std::string(call_op_name(a.kind)) +
                        ": this process group's communicator failed earlier and cannot be used: " +
                        broken_why_,
                    true);
  try {
    colls_.run(a, timeout_s);
  } catch (const CommFault& e) {
    if (e.fatal) {
      broken_ = true;
      broken_why_ = e.what();
    }
    throw;
  }
}

void ShmComm::run(const CollArgs& a, double timeout_s) {
  {
    // Calls queued earlier go first; then this one runs here, holding the communicator.
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
    busy_ = true;
  }
  try {
    execute(a, timeout_s);
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
    cv_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> lk(mu_);
  busy_ = false;
  cv_.notify_all();
}

void ShmComm::submit(const CollArgs& a, double timeout_s, Done done) {
  std::lock_guard<std::mutex> lk(mu_);
  if (stop_) {
    done(false, true, std::string(call_op_name(a.kind)) + ": the communicator was shut down");
    return;
  }
  if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
  queue_.push_back(Item{a, timeout_s, std::move(done)});
  cv_.notify_all();
}

void ShmComm::worker_loop() {
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return (!queue_.empty() && !busy_) || (stop_ && queue_.empty()); });
      if (queue_.empty()) return;  // stopping
      item = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    bool ok = true, fatal = false;
    std::string err;
    try {
      execute(item.args, item.timeout_s);
    } catch (const CommFault& e) {
      ok = false;
      fatal = e.fatal;
      err = e.what();
    } catch (const std::exception& e) {
      ok = false;
      fatal = true;
      err = e.what();
    }
    // The callback runs before the next call starts (it may copy results back into the tensor).
    item.done(ok, fatal, err);
    item.done = nullptr;
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
    cv_.notify_all();
  }
}

void ShmComm::abort(const std::string& why) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return !busy_; });
  if (broken_) return;
  broken_ = true;
  broken_why_ = why;
  t_.abort(why);
}

void ShmComm::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (worker_.joinable() && worker_.get_id() != std::this_thread::get_id()) worker_.join();
}

}  // namespace lp
