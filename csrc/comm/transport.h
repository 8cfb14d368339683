// Shared-memory transport of one host's ranks: the segment layout, and the verbs the algorithms are
// written in.
//
// Layout (one segment per communicator, created by local rank 0):
//   SegHeader | RankCtl x n_ranks | per rank: 2 latency slots of lat_bytes, ring_slots ring slots
// A rank that maps the segment trusts nothing in it: the owner and mode of the file are checked
// (ShmSegment::open), the header's layout against the mapping (ShmLayout::read), and indices read
// from peers' control blocks against n_ranks.
// Every RankCtl field is written only by its own rank (except `sleepers`, a counter of waiters).
// A rank's slots are written only by that rank and read by the others.
//
// Protocol. Each call has a number `call` (the same on every rank). A rank announces a call by
// publishing its CallHeader in hdr[call % 2]; the header's `seq` (call + 1) is stored last, with
// release order, so whoever sees it also sees the fields and any latency-slot data written before.
// Ring slots form a bounded queue from each rank to its successor: `posted` counts the pieces a
// rank has put in its own slots (piece s lives in slot s % ring_slots), `consumed` counts the
// pieces it has taken from its predecessor's slots. Counters only grow, across calls.
// Star (broadcast): the root's ring slots form a bounded queue from the root to every other rank at
// once. `star` counts the star pieces a rank is done with, over all calls: as the root, those it
// has put in its slots (piece s in slot s % ring_slots); otherwise those it has read from the
// root's. Every rank of a call moves the same pieces, so all start each call at the same count, and
// the root reuses a slot once every other rank's count has passed the piece in it. A call moves
// data only after every rank has announced it, so by then every rank has finished the previous
// call: neither queue holds a piece of another call, and the two may share the slots.
// Why two header / latency slots suffice: a rank publishes call c + 1 only after it has read
// everything of call c, and nobody writes slot (c % 2) again before seeing every rank's call c + 1.
//
// Waiting. Spin for an adaptive budget (none when there are more ranks than cores), yield twice,
// then sleep on a futex (the `bell` of the rank waited on, bumped by that rank on every change;
// woken only when someone sleeps on it). While waiting, a rank checks every ~ms: peers' abort flags,
// peers' liveness (pidfd of each pid: a killed peer is seen at once, not at the timeout), and the
// call's deadline; on a timeout it blames the rank at the end of the "waits for" chain (or one that
// stopped refreshing its heartbeat while waiting). On a fault it records the reason in its own
// abort flag, so every other rank fails fast with the same culprit.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/comm_error.h"
#include "comm/shm_segment.h"

namespace lp {

constexpr uint64_t kSegMagic = 0x31474e4952504c4cull;  // "LLPRING1"
// RankCtl::waiting_on of a rank inside a collective between hosts (the hierarchical path): its own
// timeout and diagnosis name whoever is missing there, so its local peers give it time to (see
// ShmTransport::set_remote) instead of blaming it.
constexpr int32_t kWaitingRemote = -2;

struct alignas(64) SegHeader {
  uint64_t magic;
  int32_t n_ranks;
  int32_t ring_slots;
  uint64_t ring_slot_bytes;
  uint64_t lat_bytes;
  uint64_t ctl_offset;     // first RankCtl
  uint64_t data_offset;    // first rank's data region
  uint64_t rank_data_bytes;
  uint64_t total_bytes;
  alignas(64) std::atomic<int32_t> n_mapped;
};

// What a rank announces for a call; every rank checks all of them before moving data.
struct alignas(64) CallHeader {
  std::atomic<uint64_t> seq;  // call + 1 once published
  int64_t numel;
  int32_t dtype, op, compression, block_elems, kind, root;  // root: broadcast's source (local rank)
};

struct RankCtl {
  alignas(64) int32_t pid;
  int32_t reserved0;
  uint64_t pid_ns;  // inode of /proc/self/ns/pid: pids are comparable only within one namespace
  alignas(64) CallHeader hdr[2];
  alignas(64) std::atomic<uint64_t> posted;
  alignas(64) std::atomic<uint64_t> consumed;
  alignas(64) std::atomic<uint64_t> star;
  alignas(64) std::atomic<uint32_t> bell;
  std::atomic<uint32_t> sleepers;
  alignas(64) std::atomic<int32_t> waiting_on;  // rank this one waits for, -1 when not, or kWaitingRemote
  std::atomic<int64_t> heartbeat_ns;            // CLOCK_MONOTONIC, refreshed while waiting
  std::atomic<uint64_t> done;                   // calls this rank has completed
  alignas(64) std::atomic<int32_t> aborted;
  int32_t culprit;
  char reason[256];
};

struct ShmLayout {
  int n_ranks;
  int ring_slots;
  uint64_t ring_slot_bytes, lat_bytes;
  uint64_t ctl_offset, data_offset, rank_data_bytes, total_bytes;
  // The layout for a geometry (sizes rounded up to pages). Throws CommFault when the geometry
  // cannot work: fewer than 2 ring slots (the ring's queue depth), a slot smaller than one int8
  // block of the largest size, or sizes that overflow.
  static ShmLayout plan(int n_ranks, uint64_t ring_slot_bytes, int ring_slots, uint64_t lat_bytes);
  // The layout in an existing segment's header, checked before any offset in it is used: it must
  // be exactly what plan() gives for the header's geometry and fill the mapping, so every control
  // block and slot lies inside it. Throws CommFault saying what does not fit.
  static ShmLayout read(const ShmSegment& seg, int n_ranks);
};

class ShmTransport {
 public:
  // Maps the segment (creating it on `create`). Throws CommFault.
  // rank_names: how messages name each local rank (the process group's global ranks; empty: 0..n-1).
  ShmTransport(const std::string& name, bool create, int rank, int n_ranks, uint64_t ring_slot_bytes,
               int ring_slots, uint64_t lat_bytes, const std::vector<int>& rank_names = {});
  // Waits until all n_ranks ranks have mapped the segment, then unlinks its name. Throws CommFault
  // (naming the ranks that never came, after unlinking) after timeout_s.
  void attach(double timeout_s);
  // Unlinks the name now (setup failed elsewhere).
  void unlink();
  ~ShmTransport();
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  int rank() const { return rank_; }
  int n_ranks() const { return n_ranks_; }
  // "rank <global rank>" of local rank r, for messages.
  std::string rank_text(int r) const;
  int next() const { return (rank_ + 1) % n_ranks_; }
  int prev() const { return (rank_ + n_ranks_ - 1) % n_ranks_; }
  uint64_t ring_slot_bytes() const { return layout_.ring_slot_bytes; }
  int ring_slots() const { return layout_.ring_slots; }
  uint64_t lat_bytes() const { return layout_.lat_bytes; }

  RankCtl& ctl(int r) const { return ctls_[r]; }
  uint8_t* lat_slot(int r, uint64_t call) const;
  uint8_t* ring_slot(int r, uint64_t piece) const;

  // ---- per call ----
  // Starts a call: fails fast when a peer has aborted; arms the deadline (now + timeout_s).
  void begin_call(uint64_t call, double timeout_s, const char* op_name);
  void publish_header(uint64_t call, int64_t numel, int dtype, int op, int compression,
                      int block_elems, int kind, int root);
  // Waits until every rank has published its header of `call`.
  void wait_headers(uint64_t call);
  // Marks the call complete (a peer that exits after this is not a fault for the others).
  void end_call();

  // ---- ring verbs (to next / from prev) ----
  // The slot the next send goes to, once the successor has freed it.
  uint8_t* send_slot();
  // Publishes the piece written into send_slot().
  void post();
  // The predecessor's next piece, once it is there.
  const uint8_t* recv_slot();
  // Releases the piece returned by recv_slot().
  void consume();

  // ---- star verbs (from the root to every other rank at once, through the root's ring slots) ----
  // The root: the slot its next piece goes to, once every other rank has read what was there.
  uint8_t* star_send_slot();
  // The root: publishes the piece written into star_send_slot().
  void star_post();
  // The others: the root's next piece, once it is there.
  const uint8_t* star_recv_slot(int root);
  // The others: releases the piece returned by star_recv_slot().
  void star_consume();

  // Records a fault for the peers (they raise with the same culprit), then throws it.
  // `note` is added to the raised message only (not to the record the peers read).
  [[noreturn]] void fail(int culprit, const std::string& why, const std::string& note = "");
  // Records a fault found outside this transport (the hierarchical path's torch.distributed part),
  // so that the peers waiting on this rank raise it at once rather than at their timeout.
  void abort(const std::string& why);
  // Says whether this rank is inside a collective between hosts (between calls of this transport).
  // A peer whose deadline passes while waiting on such a rank waits up to kRemoteGraceNs more for
  // its verdict (abort), since that rank only learns who is missing at its own timeout, as long as
  // it stays alive: keep_alive() (from its heartbeat thread) refreshes its heartbeat meanwhile.
  void set_remote(bool inside);
  void keep_alive();

 private:
  template <class Ready> void wait_for(int peer, Ready ready, const char* what);
  void check_faults(int peer, const char* what);
  int stalled_rank(int peer) const;
  bool peer_dead(int r);
  void ring_bell();
  int64_t now_ns() const;

  ShmSegment seg_;
  ShmLayout layout_{};
  int rank_ = 0, n_ranks_ = 1;
  std::vector<int> rank_names_;
  SegHeader* head_ = nullptr;
  RankCtl* ctls_ = nullptr;
  uint8_t* data_ = nullptr;
  std::vector<int> pidfds_;      // per rank, -1 for self or when unavailable
  bool check_pids_ = true;       // false when ranks live in different pid namespaces
  int64_t spin_max_ns_ = 0, spin_budget_ns_ = 0;  // adaptive spinning (see wait_for)
  int yield_rounds_ = 0;

  // per call
  uint64_t call_ = 0;
  double timeout_s_ = 0;
  int64_t deadline_ns_ = 0;
  const char* op_name_ = "ld.all_reduce";
};

}  // namespace lp
