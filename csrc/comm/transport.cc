#include "comm/transport.h"

#include "cpu/reduce/reduce.h"

#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <new>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace lp {
namespace {

constexpr uint64_t kAlign = 4096;
// Size arithmetic on values read from a segment header: an overflow is an error, not a wrap.
[[noreturn]] void size_overflow() {
  throw CommFault("ld.all_reduce: shared-memory segment sizes overflow", true);
}
uint64_t add(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) size_overflow();
  return r;
}
uint64_t mul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) size_overflow();
  return r;
}
uint64_t page_up(uint64_t v) { return mul(add(v, kAlign - 1) / kAlign, kAlign); }

long futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts;
  ts.tv_sec = time_t(timeout_ns / 1000000000);
  ts.tv_nsec = long(timeout_ns % 1000000000);
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected, &ts, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? uint64_t(st.st_ino) : 0;
}

int online_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? int(n) : 1;
}

int pidfd_of(int pid) {
#ifdef SYS_pidfd_open
  long fd = syscall(SYS_pidfd_open, pid, 0);
  return fd >= 0 ? int(fd) : -1;
#else
  (void)pid;
  return -1;
#endif
}

// Waiting policy (measured: bench/notes_allreduce.md). With no more ranks than cores a waiter spins
// for an adaptive budget of at most kSpinNs (the producer is probably running); oversubscribed, it
// does not spin (the producer may need this very core). Then two sched_yield()s (cheap hand-over
// to a runnable rank on this core), then it sleeps on a futex: a longer yield loop would keep
// competing with the rank it waits for.
constexpr int64_t kSpinNs = 20000, kSpinNsOversubscribed = 0;
constexpr int64_t kSpinStepNs = 500;  // the smallest spin budget (keeps probing whether spinning pays)
constexpr int kYieldRounds = 2, kYieldRoundsOversubscribed = 2;
constexpr int64_t kSleepNs = 1000000;       // futex timeout: fault checks at least this often
constexpr int64_t kCheckPeriodNs = 1000000;
constexpr int64_t kStaleHeartbeatNs = 500000000;  // a waiting rank refreshes it every ~ms
// How long past its deadline a rank waits for a live peer that is inside a collective between
// hosts: that peer's own timeout ends by about the same deadline, then the heartbeat diagnosis
// (lepton_core/distributed/_liveness.py: 2.5 s) names the missing rank and it aborts. Such a peer
// counts as live while its heartbeat thread (a beat per second) refreshes heartbeat_ns.
constexpr int64_t kRemoteGraceNs = 5000000000;
constexpr int64_t kRemoteStaleNs = 2500000000;

}  // namespace

ShmLayout ShmLayout::plan(int n_ranks, uint64_t ring_slot_bytes, int ring_slots, uint64_t lat_bytes) {
  // A ring slot must hold one piece: one block of the largest int8 block size (ring_allreduce.cc).
  const uint64_t min_slot_bytes = uint64_t(q8_message_bytes(kMaxBlockElems, kMaxBlockElems));
  if (n_ranks < 1 || ring_slots < 2 || ring_slot_bytes < min_slot_bytes || lat_bytes == 0)
    throw CommFault("ld.all_reduce: unusable shared-memory geometry: " + std::to_string(n_ranks) + " ranks, " +
                        std::to_string(ring_slots) + " ring slots of " + std::to_string(ring_slot_bytes) +
                        " bytes (at least 2 of " + std::to_string(min_slot_bytes) + "), latency slots of " +
                        std::to_string(lat_bytes) + " bytes",
                    true);
  ShmLayout l;
  l.n_ranks = n_ranks;
  l.ring_slots = ring_slots;
  l.ring_slot_bytes = page_up(ring_slot_bytes);
  l.lat_bytes = page_up(lat_bytes);
  l.ctl_offset = page_up(sizeof(SegHeader));
  l.data_offset = page_up(add(l.ctl_offset, mul(uint64_t(n_ranks), sizeof(RankCtl))));
  l.rank_data_bytes = add(mul(2, l.lat_bytes), mul(uint64_t(ring_slots), l.ring_slot_bytes));
  l.total_bytes = add(l.data_offset, mul(uint64_t(n_ranks), l.rank_data_bytes));
  return l;
}

ShmLayout ShmLayout::read(const ShmSegment& seg, int n_ranks) {
  auto bad = [&](const std::string& why) {
    return CommFault("ld.all_reduce: shared-memory segment " + seg.name() +
                         " does not have the expected layout (another job's segment?): " + why,
                     true);
  };
  if (seg.n_bytes() < sizeof(SegHeader))
    throw bad(std::to_string(seg.n_bytes()) + " bytes, smaller than its header");
  // Each field is read once, into this rank's own copy: what is checked is what is used.
  const SegHeader* h = static_cast<const SegHeader*>(seg.base());
  if (h->magic != kSegMagic) throw bad("wrong magic number");
  if (h->n_ranks != n_ranks)
    throw bad("made for " + std::to_string(h->n_ranks) + " ranks, not " + std::to_string(n_ranks));
  ShmLayout got;
  got.n_ranks = n_ranks;
  got.ring_slots = h->ring_slots;
  got.ring_slot_bytes = h->ring_slot_bytes;
  got.lat_bytes = h->lat_bytes;
  got.ctl_offset = h->ctl_offset;
  got.data_offset = h->data_offset;
  got.rank_data_bytes = h->rank_data_bytes;
  got.total_bytes = h->total_bytes;
  ShmLayout want;
  try {
    want = plan(n_ranks, got.ring_slot_bytes, got.ring_slots, got.lat_bytes);
  } catch (const CommFault& e) {
    std::string why = e.what();
    const std::string prefix = "ld.all_reduce: ";
    throw bad(why.compare(0, prefix.size(), prefix) == 0 ? why.substr(prefix.size()) : why);
  }
  if (want.ring_slot_bytes != got.ring_slot_bytes || want.lat_bytes != got.lat_bytes ||
      want.ctl_offset != got.ctl_offset || want.data_offset != got.data_offset ||
      want.rank_data_bytes != got.rank_data_bytes || want.total_bytes != got.total_bytes)
    throw bad("offsets or sizes in its header do not match its geometry");
  if (got.total_bytes != seg.n_bytes())
    throw bad("its header says " + std::to_string(got.total_bytes) + " bytes, the mapping has " +
              std::to_string(seg.n_bytes()));
  return got;
}

ShmTransport::ShmTransport(const std::string& name, bool create, int rank, int n_ranks,
                           uint64_t ring_slot_bytes, int ring_slots, uint64_t lat_bytes,
                           const std::vector<int>& rank_names)
    : rank_(rank), n_ranks_(n_ranks), rank_names_(rank_names) {
  if (!rank_names_.empty() && int(rank_names_.size()) != n_ranks)
    throw CommFault("ld.all_reduce: " + std::to_string(rank_names_.size()) + " rank names for " +
                        std::to_string(n_ranks) + " ranks",
                    true);
  // 1. Map the segment; its creator writes the layout every rank reads back.
  if (create) {
    layout_ = ShmLayout::plan(n_ranks, ring_slot_bytes, ring_slots, lat_bytes);
    seg_ = ShmSegment::create(name, layout_.total_bytes);
    head_ = new (seg_.base()) SegHeader();
    head_->n_ranks = n_ranks;
    head_->ring_slots = layout_.ring_slots;
    head_->ring_slot_bytes = layout_.ring_slot_bytes;
    head_->lat_bytes = layout_.lat_bytes;
    head_->ctl_offset = layout_.ctl_offset;
    head_->data_offset = layout_.data_offset;
    head_->rank_data_bytes = layout_.rank_data_bytes;
    head_->total_bytes = layout_.total_bytes;
    head_->n_mapped.store(0);
    for (int r = 0; r < n_ranks; ++r) {
      RankCtl* c = new (static_cast<uint8_t*>(seg_.base()) + layout_.ctl_offset + r * sizeof(RankCtl)) RankCtl();
      c->waiting_on.store(-1);
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    head_->magic = kSegMagic;
  } else {
    seg_ = ShmSegment::open(name);
    try {
      layout_ = ShmLayout::read(seg_, n_ranks);
    } catch (const CommFault&) {
      seg_.unlink();
      throw;
    }
    head_ = static_cast<SegHeader*>(seg_.base());
  }
  uint8_t* base = static_cast<uint8_t*>(seg_.base());
  ctls_ = reinterpret_cast<RankCtl*>(base + layout_.ctl_offset);
  data_ = base + layout_.data_offset;

  // 2. Say who we are (attach() waits for everyone).
  RankCtl& me = ctl(rank_);
  me.pid = int32_t(getpid());
  me.pid_ns = pid_namespace();
  me.waiting_on.store(-1);
  head_->n_mapped.fetch_add(1, std::memory_order_acq_rel);
}

void ShmTransport::attach(double timeout_s) {
  // The name goes as soon as every rank has mapped the segment.
  RankCtl& me = ctl(rank_);
  int64_t deadline = now_ns() + int64_t(timeout_s * 1e9);
  while (head_->n_mapped.load(std::memory_order_acquire) < n_ranks_) {
    if (now_ns() > deadline) {
      std::string missing;
      for (int r = 0; r < n_ranks_; ++r)
        if (ctl(r).pid == 0) missing += (missing.empty() ? "" : ", ") + rank_text(r);
      seg_.unlink();
      char secs[32];
      std::snprintf(secs, sizeof(secs), "%g", timeout_s);
      throw CommFault("ld.all_reduce: " + missing +
                          " did not map the shared-memory segment within the timeout of " + secs + " s",
                      true);
    }
    struct timespec ts = {0, 100000};
    nanosleep(&ts, nullptr);
  }
  seg_.unlink();

  // Liveness: pidfds of the peers, when all ranks share one pid namespace.
  pidfds_.assign(n_ranks_, -1);
  for (int r = 0; r < n_ranks_; ++r)
    if (ctl(r).pid_ns != me.pid_ns || me.pid_ns == 0) check_pids_ = false;
  if (check_pids_)
    for (int r = 0; r < n_ranks_; ++r)
      if (r != rank_) pidfds_[r] = pidfd_of(ctl(r).pid);

  bool oversubscribed = n_ranks_ > online_cpus();
  spin_max_ns_ = oversubscribed ? kSpinNsOversubscribed : kSpinNs;
  spin_budget_ns_ = spin_max_ns_;
  yield_rounds_ = oversubscribed ? kYieldRoundsOversubscribed : kYieldRounds;
}

void ShmTransport::unlink() { seg_.unlink(); }

ShmTransport::~ShmTransport() {
  for (int fd : pidfds_)
    if (fd >= 0) close(fd);
}

uint8_t* ShmTransport::lat_slot(int r, uint64_t call) const {
  return data_ + uint64_t(r) * layout_.rank_data_bytes + (call % 2) * layout_.lat_bytes;
}

uint8_t* ShmTransport::ring_slot(int r, uint64_t piece) const {
  return data_ + uint64_t(r) * layout_.rank_data_bytes + 2 * layout_.lat_bytes +
         (piece % uint64_t(layout_.ring_slots)) * layout_.ring_slot_bytes;
}

int64_t ShmTransport::now_ns() const {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void ShmTransport::ring_bell() {
  RankCtl& me = ctl(rank_);
  me.bell.fetch_add(1, std::memory_order_seq_cst);
  if (me.sleepers.load(std::memory_order_seq_cst) != 0) futex_wake_all(&me.bell);
}

void ShmTransport::begin_call(uint64_t call, double timeout_s, const char* op_name) {
  call_ = call;
  timeout_s_ = timeout_s;
  op_name_ = op_name;
  deadline_ns_ = now_ns() + int64_t(timeout_s * 1e9);
  for (int r = 0; r < n_ranks_; ++r)
    if (r != rank_ && ctl(r).aborted.load(std::memory_order_acquire)) check_faults(r, "start");
}

void ShmTransport::publish_header(uint64_t call, int64_t numel, int dtype, int op, int compression,
                                  int block_elems, int kind, int root) {
  CallHeader& h = ctl(rank_).hdr[call % 2];
  h.numel = numel;
  h.dtype = dtype;
  h.op = op;
  h.compression = compression;
  h.block_elems = block_elems;
  h.kind = kind;
  h.root = root;
  h.seq.store(call + 1, std::memory_order_release);
  ring_bell();
}

void ShmTransport::wait_headers(uint64_t call) {
  for (int r = 0; r < n_ranks_; ++r) {
    if (r == rank_) continue;
    const CallHeader& h = ctl(r).hdr[call % 2];
    wait_for(r, [&] { return h.seq.load(std::memory_order_acquire) == call + 1; }, "join");
  }
}

void ShmTransport::end_call() {
  ctl(rank_).done.store(call_ + 1, std::memory_order_release);
}

uint8_t* ShmTransport::send_slot() {
  RankCtl& me = ctl(rank_);
  uint64_t s = me.posted.load(std::memory_order_relaxed);
  if (s >= uint64_t(layout_.ring_slots)) {
    const RankCtl& nx = ctl(next());
    uint64_t need = s - uint64_t(layout_.ring_slots) + 1;
    wait_for(next(), [&] { return nx.consumed.load(std::memory_order_acquire) >= need; }, "free a slot");
  }
  return ring_slot(rank_, s);
}

void ShmTransport::post() {
  RankCtl& me = ctl(rank_);
  me.posted.store(me.posted.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  ring_bell();
}

const uint8_t* ShmTransport::recv_slot() {
  uint64_t j = ctl(rank_).consumed.load(std::memory_order_relaxed);
  const RankCtl& pv = ctl(prev());
  wait_for(prev(), [&] { return pv.posted.load(std::memory_order_acquire) > j; }, "send a piece");
  return ring_slot(prev(), j);
}

void ShmTransport::consume() {
  RankCtl& me = ctl(rank_);
  me.consumed.store(me.consumed.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  ring_bell();
}

uint8_t* ShmTransport::star_send_slot() {
  uint64_t s = ctl(rank_).star.load(std::memory_order_relaxed);
  if (s >= uint64_t(layout_.ring_slots)) {
    uint64_t need = s - uint64_t(layout_.ring_slots) + 1;
    for (int r = 0; r < n_ranks_; ++r) {
      if (r == rank_) continue;
      const RankCtl& c = ctl(r);
      wait_for(r, [&] { return c.star.load(std::memory_order_acquire) >= need; }, "free a slot");
    }
  }
  return ring_slot(rank_, s);
}

void ShmTransport::star_post() {
  RankCtl& me = ctl(rank_);
  me.star.store(me.star.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  ring_bell();
}

const uint8_t* ShmTransport::star_recv_slot(int root) {
  uint64_t j = ctl(rank_).star.load(std::memory_order_relaxed);
  const RankCtl& rc = ctl(root);
  wait_for(root, [&] { return rc.star.load(std::memory_order_acquire) > j; }, "send a piece");
  return ring_slot(root, j);
}

void ShmTransport::star_consume() { star_post(); }

template <class Ready> void ShmTransport::wait_for(int peer, Ready ready, const char* what) {
  if (ready()) return;
  int64_t t0 = now_ns();
  // 1. Spin, for an adaptive budget: it grows while spinning pays off (the peer runs on another
  //    core and delivers within it) and shrinks while it does not (the peer is descheduled: other
  //    load on the cores, or more ranks than cores), so a waiter stops burning a core its peer needs.
  if (spin_budget_ns_ > 0) {
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        cpu_relax();
        if (ready()) {
          spin_budget_ns_ = std::min(spin_max_ns_, spin_budget_ns_ + spin_budget_ns_ / 4 + kSpinStepNs);
          return;
        }
      }
      if (now_ns() - t0 > spin_budget_ns_) break;
    }
  }
  spin_budget_ns_ = spin_budget_ns_ / 2 > kSpinStepNs ? spin_budget_ns_ / 2 : (spin_max_ns_ ? kSpinStepNs : 0);
  RankCtl& me = ctl(rank_);
  RankCtl& pc = ctl(peer);
  me.heartbeat_ns.store(t0, std::memory_order_relaxed);
  me.waiting_on.store(peer, std::memory_order_relaxed);
  int64_t next_check = t0 + kCheckPeriodNs;
  for (int round = 0;; ++round) {
    if (ready()) break;
    int64_t now = now_ns();
    if (now >= next_check) {
      me.heartbeat_ns.store(now, std::memory_order_relaxed);
      check_faults(peer, what);
      next_check = now + kCheckPeriodNs;
    }
    if (round < yield_rounds_) {
      // 2. A few yields: cheap when another of our ranks is runnable on this core.
      sched_yield();
      continue;
    }
    // 3. Sleep on the peer's bell until it changes something (or the timeout, to check faults).
    pc.sleepers.fetch_add(1, std::memory_order_seq_cst);
    uint32_t b = pc.bell.load(std::memory_order_seq_cst);
    if (!ready()) futex_wait(&pc.bell, b, kSleepNs);
    pc.sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
  me.waiting_on.store(-1, std::memory_order_relaxed);
}

bool ShmTransport::peer_dead(int r) {
  if (!check_pids_) return false;
  int fd = pidfds_[r];
  if (fd >= 0) {
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0;  // readable once the process has exited (even before it is reaped)
  }
  int pid = ctl(r).pid;
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return true;
  size_t paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] == 'Z';
}

int ShmTransport::stalled_rank(int peer) const {
  // Follow "who waits for whom" from the peer to the rank holding things up: one that waits for
  // nobody (it is not in the call), or one that claims to wait but has stopped refreshing its
  // heartbeat (a stopped or wedged process). A cycle back to us blames the last rank reached.
  int r = peer;
  int64_t now = now_ns();
  for (int hops = 0; hops < n_ranks_; ++hops) {
    const RankCtl& c = ctl(r);
    int w = c.waiting_on.load(std::memory_order_relaxed);
    if (w < 0 || w >= n_ranks_ || w == rank_) return r;  // (read from a peer: checked before use)
    if (now - c.heartbeat_ns.load(std::memory_order_relaxed) > kStaleHeartbeatNs) return r;
    r = w;
  }
  return peer;
}

void ShmTransport::check_faults(int peer, const char* what) {
  // 1. A peer already failed: raise with its culprit and reason.
  for (int r = 0; r < n_ranks_; ++r) {
    if (r == rank_) continue;
    RankCtl& c = ctl(r);
    if (c.aborted.load(std::memory_order_acquire)) {
      char why[sizeof(c.reason)];
      std::memcpy(why, c.reason, sizeof(why));
      why[sizeof(why) - 1] = 0;
      fail(c.culprit, why, " (reported by " + rank_text(r) + ")");
    }
  }
  // 2. A peer exited before completing this call.
  for (int r = 0; r < n_ranks_; ++r) {
    if (r == rank_) continue;
    if (ctl(r).done.load(std::memory_order_acquire) < call_ + 1 && peer_dead(r))
      fail(r, std::string(op_name_) + ": " + rank_text(r) + " (pid " + std::to_string(ctl(r).pid) +
                  ") died or exited during call " + std::to_string(call_));
  }
  // 3. The deadline.
  int64_t now = now_ns();
  if (now > deadline_ns_) {
    int culprit = stalled_rank(peer);
    const RankCtl& c = ctl(culprit);
    if (c.waiting_on.load(std::memory_order_relaxed) == kWaitingRemote &&
        now - c.heartbeat_ns.load(std::memory_order_relaxed) < kRemoteStaleNs && now < deadline_ns_ + kRemoteGraceNs)
      return;  // alive between hosts: its verdict on who is missing there is due (set_remote)
    char secs[32];
    std::snprintf(secs, sizeof(secs), "%g", timeout_s_);
    fail(culprit, std::string(op_name_) + ": " + rank_text(culprit) + " did not take part in call " +
                      std::to_string(call_) + " within the timeout of " + secs + " s (" + rank_text(rank_) +
                      " was waiting for " + rank_text(peer) + " to " + what +
                      ")");
  }
}

std::string ShmTransport::rank_text(int r) const {
  return "rank " + std::to_string(rank_names_.empty() ? r : rank_names_[size_t(r)]);
}

void ShmTransport::set_remote(bool inside) {
  RankCtl& me = ctl(rank_);
  me.heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
  me.waiting_on.store(inside ? kWaitingRemote : -1, std::memory_order_relaxed);
}

void ShmTransport::keep_alive() {
  RankCtl& me = ctl(rank_);
  if (me.waiting_on.load(std::memory_order_relaxed) == kWaitingRemote)
    me.heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
}

void ShmTransport::abort(const std::string& why) {
  RankCtl& me = ctl(rank_);
  if (!me.aborted.load(std::memory_order_relaxed)) {
    me.culprit = -1;
    std::snprintf(me.reason, sizeof(me.reason), "%s", why.c_str());
    me.aborted.store(1, std::memory_order_release);
    ring_bell();
  }
}

void ShmTransport::fail(int culprit, const std::string& why, const std::string& note) {
  RankCtl& me = ctl(rank_);
  if (!me.aborted.load(std::memory_order_relaxed)) {
    me.culprit = culprit;
    std::snprintf(me.reason, sizeof(me.reason), "%s", why.c_str());
    me.aborted.store(1, std::memory_order_release);
    ring_bell();
  }
  me.waiting_on.store(-1, std::memory_order_relaxed);
  throw CommFault(why + note, true);
}

}  // namespace lp
