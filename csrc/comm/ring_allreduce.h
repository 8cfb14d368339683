// All-reduce of one host's ranks over a ShmTransport (API.md §3).
//
// Two algorithms; which one runs depends only on (n_elems, dtype, compression, block size, number of
// ranks), so every rank picks the same one and results are reproducible:
//   * latency path (payload <= the transport's latency slot): every rank copies its input into its
//     latency slot and announces the call; then every rank reduces all slots in rank order 0..W-1.
//     One synchronisation; the same arithmetic on every rank, hence the same bits.
//   * ring: reduce-scatter then all-gather around the ring r -> r + 1, pipelined. The message is cut
//     into W chunks of whole units (16 elements, or one compression block) and each chunk into P
//     pieces that fit a ring slot. For each piece index p, a rank runs 2(W - 1) hops:
//       RS 0          send its own chunk r                                      (widen / quantize)
//       RS 1..W-2     receive chunk r-k, add its own, send it on                (recvReduceSend)
//       RS W-1        receive chunk r+1, add its own: the result; keep it and send it on
//       AG 1..W-2     receive a result chunk, keep it, send it on              (recvCopySend)
//       AG W-1        receive the last result chunk                             (recvCopy)
//     Ring slots are a queue of depth >= 2 per rank, so a rank's copy of piece p overlaps its
//     successor's reduction of piece p - 1. Chunk c is summed in ring order starting at rank c and
//     computed by exactly one rank (r = c - 1); every other rank receives its bits.
// Partial sums travel in the accumulator type (float32 for 16-bit inputs) and results in the
// tensor's dtype. With int8 compression every hop carries codes + scales (reduce.h): each RS hop
// dequantizes, adds its own input in float32 and requantizes; the owner quantizes the final sum
// once and every rank, the owner included, keeps the dequantized value of those same codes.
//
// The hierarchical path (several hosts) runs the two halves separately: kind REDUCE_SCATTER stops
// after RS and leaves the exact partial sums of the chunk this rank owns in `shard` (accumulator
// type; float32 when compressed); kind ALL_GATHER starts from a `shard` already reduced across hosts.
#pragma once
#include <cstdint>
#include <utility>

#include "comm/transport.h"
#include "common/codes.h"

namespace lp {

struct AllreduceArgs {
  void* data = nullptr;      // contiguous, reduced in place
  int64_t n_elems = 0;
  int dtype = 0;             // lp_dtype
  int op = 0;                // lp_reduce_op
  int compression = LP_COMPRESSION_NONE;
  int64_t block_elems = 256;
  int kind = LP_CALL_ALLREDUCE;
  void* shard = nullptr;     // REDUCE_SCATTER: out; ALL_GATHER: in (see above)
  int divisor = 0;           // AVG divides by this (the whole group's size); 0: this host's ranks
};

// How a message of n_elems is cut into chunks and pieces.
struct RingPlan {
  int n_ranks = 1;
  int64_t n_elems = 0, unit_elems = 1, n_units = 0, piece_units = 0, n_pieces = 0;
  RingPlan(int n_ranks, int64_t n_elems, int64_t unit_elems, int64_t slot_units);
  // Elements [begin, end) of chunk c.
  std::pair<int64_t, int64_t> chunk(int c) const;
  // Elements [begin, end) of piece p of chunk c (possibly empty).
  std::pair<int64_t, int64_t> piece(int c, int64_t p) const;
};

class RingAllreduce {
 public:
  explicit RingAllreduce(ShmTransport& t) : t_(t) {}
  // One call: every rank of the transport must make the same sequence of calls.
  void run(const AllreduceArgs& a, double timeout_s);
  // Elements [begin, end) of the chunk this rank owns after REDUCE_SCATTER.
  std::pair<int64_t, int64_t> owned_range(int64_t n_elems, int dtype, int compression,
                                          int64_t block_elems) const;
  // Whether a message takes the latency path (the same answer on every rank).
  bool latency_path(int64_t n_elems, int dtype, int compression, int64_t block_elems) const;

 private:
  RingPlan plan(int64_t n_elems, int dtype, int compression, int64_t block_elems) const;
  void check_headers(uint64_t call) const;
  void run_latency(const AllreduceArgs& a, uint64_t call);
  void run_ring(const AllreduceArgs& a);
  void run_single(const AllreduceArgs& a);

  ShmTransport& t_;
  uint64_t calls_ = 0;
};

}  // namespace lp
