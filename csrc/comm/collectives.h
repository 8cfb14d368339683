// The collectives of one host's ranks over a ShmTransport (API.md §3): one call of any kind, run by
// ShmCollectives::run on every rank of the transport in the same order. Each collective lives in a
// file of its own, written in the ring hops of ring_steps.h (broadcast: the transport's star verbs):
//   ring_allreduce.cc   all-reduce, and its two halves for the hierarchical path
//   reduce_scatter.cc   reduce-scatter
//   all_gather.cc       all-gather
//   broadcast.cc        broadcast
// Each has a latency path (one synchronisation through the latency slots) for small payloads and a
// pipelined ring (broadcast: star) for large ones; the choice depends only on (kind, sizes, dtype, compression, block
// size, number of ranks), so every rank picks the same one and results are reproducible.
//
// Every call first publishes a header (kind, numel, dtype, op, compression, block size, root) and
// checks everyone's against rank 0's before moving data, so ranks that disagree all raise the same
// CommFault (not fatal) instead of corrupting memory or hanging.
#pragma once
#include <cstdint>
#include <utility>

#include "comm/transport.h"
#include "common/codes.h"

namespace lp {

struct CollArgs {
  void* data = nullptr;      // all-reduce, broadcast: the tensor (in place); otherwise the input
  void* out = nullptr;       // reduce-scatter, all-gather: the output; HOST_*: the shard (below)
  int64_t n_elems = 0;       // elements of `data`
  int dtype = 0;             // lp_dtype
  int op = 0;                // lp_reduce_op
  int compression = LP_COMPRESSION_NONE;
  int64_t block_elems = 256;
  int kind = LP_CALL_ALLREDUCE;
  int root = 0;              // broadcast: the source (local rank)
  int divisor = 0;           // AVG divides by this (the whole group's size); 0: this host's ranks
};
// HOST_REDUCE_SCATTER stops after the all-reduce's reduce-scatter and leaves the exact partial sums
// of the chunk this rank owns (owned_range) in `out`, in the accumulator type (float32 when
// compressed); HOST_ALL_GATHER starts from an `out` already reduced across hosts.

class ShmCollectives {
 public:
  explicit ShmCollectives(ShmTransport& t) : t_(t) {}
  // One call: every rank of the transport must make the same sequence of calls.
  void run(const CollArgs& a, double timeout_s);
  // Elements [begin, end) of the chunk this rank owns after HOST_REDUCE_SCATTER.
  std::pair<int64_t, int64_t> owned_range(int64_t n_elems, int dtype, int compression, int64_t block_elems) const;

 private:
  ShmTransport& t_;
  uint64_t calls_ = 0;
};

// ---- for the collectives' files ----
// Publishes this rank's header of `call`, waits for everyone's and checks them (throws CommFault).
void announce(ShmTransport& t, const CollArgs& a, uint64_t call);
// Whether a payload of `bytes` takes the latency path.
inline bool fits_latency_slot(const ShmTransport& t, int64_t bytes) { return bytes <= int64_t(t.lat_bytes()); }

void all_reduce_call(ShmTransport& t, const CollArgs& a, uint64_t call);
void reduce_scatter_call(ShmTransport& t, const CollArgs& a, uint64_t call);
void all_gather_call(ShmTransport& t, const CollArgs& a, uint64_t call);
void broadcast_call(ShmTransport& t, const CollArgs& a, uint64_t call);
std::pair<int64_t, int64_t> all_reduce_owned_range(const ShmTransport& t, int64_t n_elems, int dtype,
                                                   int compression, int64_t block_elems);

}  // namespace lp
