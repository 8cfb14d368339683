// Reduce-scatter (API.md §3): `data` holds W chunks of m = n_elems / W elements; rank r receives
// chunk r reduced over the ranks in `out`. Written in the hops of ring_steps.h:
//   * latency path (payload <= the latency slot): every rank copies its input (int8: each chunk
//     quantized on its own) into its latency slot and announces the call; rank r then reduces chunk
//     r of every slot in rank order 0..W-1.
//   * ring: for each piece index p, rank r sends chunk r-1, adds its own to chunks r-2 .. r+1 as they
//     pass (recv_reduce_send), and keeps chunk r, summed in ring order starting at rank r+1
//     (recv_reduce_copy). Partial sums travel as in the all-reduce (accumulator type, or int8).
#include <cstring>
#include <vector>

#include "comm/collectives.h"
#include "comm/ring_steps.h"

namespace lp {
namespace {

// Bytes between the chunks' int8 messages in a latency slot.
int64_t q8_stride(int64_t m, int64_t block) { return (q8_message_bytes(m, block) + 63) / 64 * 64; }

void run_latency(ShmTransport& t, const CollArgs& a, int64_t m, uint64_t call) {
  const ReduceKernels& K = reduce_kernels();
  const int W = t.n_ranks(), me = t.rank();
  const int64_t dsz = dtype_n_bytes(a.dtype);
  const bool q8 = a.compression == LP_COMPRESSION_INT8;
  uint8_t* mine = t.lat_slot(me, call);
  if (q8) {
    const int64_t S = q8_stride(m, a.block_elems);
    for (int c = 0; c < W; ++c)
      K.q8_quantize(Q8Codec::codes(mine + c * S), Q8Codec::scales(mine + c * S, m), at(a.data, c * m, dsz), m,
                    a.dtype, a.block_elems);
  } else {
    std::memcpy(mine, a.data, size_t(a.n_elems * dsz));
  }
  announce(t, a, call);
  if (q8) {
    const int64_t S = q8_stride(m, a.block_elems);
    std::vector<const int8_t*> qs(W);
    std::vector<const float*> ss(W);
    for (int r = 0; r < W; ++r) {
      const uint8_t* s = t.lat_slot(r, call) + me * S;
      qs[r] = Q8Codec::codes(s);
      ss[r] = Q8Codec::scales(s, m);
    }
    K.q8_gather(a.out, qs.data(), ss.data(), W, m, a.dtype, a.block_elems, a.op == LP_REDUCE_AVG ? a.divisor : 1);
  } else {
    std::vector<const void*> srcs(W);
    for (int r = 0; r < W; ++r) srcs[r] = at(t.lat_slot(r, call), me * m, dsz);
    K.gather(a.out, srcs.data(), W, m, a.dtype, a.op, a.divisor);
  }
}

template <class Codec>
void run_ring(ShmTransport& t, const CollArgs& a, const RingPlan& pl, Codec& c) {
  const int W = t.n_ranks(), r = t.rank();
  RingSteps<Codec> step(t, c);
  auto mod = [W](int k) { return ((k % W) + W) % W; };
  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    {
      auto [e0, e1] = pl.piece(mod(r - 1), p);
      step.send(at(a.data, e0, c.dsz), e1 - e0);
    }
    for (int k = 1; k <= W - 2; ++k) {
      auto [e0, e1] = pl.piece(mod(r - 1 - k), p);
      step.recv_reduce_send(at(a.data, e0, c.dsz), e1 - e0);
    }
    auto [e0, e1] = pl.piece(r, p);
    step.recv_reduce_copy(at(a.out, e0 - r * pl.chunk_elems, c.dsz), at(a.data, e0, c.dsz), e1 - e0);
  }
}

}  // namespace

void reduce_scatter_call(ShmTransport& t, const CollArgs& a, uint64_t call) {
  const int W = t.n_ranks();
  const int64_t m = a.n_elems / W, dsz = dtype_n_bytes(a.dtype);
  const bool q8 = a.compression == LP_COMPRESSION_INT8;
  if (W > 1 && fits_latency_slot(t, q8 ? W * q8_stride(m, a.block_elems) : a.n_elems * dsz)) {
    run_latency(t, a, m, call);
    return;
  }
  announce(t, a, call);
  if (m == 0) return;
  if (W == 1) {
    std::memcpy(a.out, a.data, size_t(m * dsz));
  } else if (q8) {
    Q8Codec c(a.dtype, a.block_elems, a.op == LP_REDUCE_AVG ? a.divisor : 1);
    run_ring(t, a, RingPlan::equal(W, m, a.block_elems, Q8Codec::slot_units(t.ring_slot_bytes(), a.block_elems)), c);
  } else {
    PlainCodec c(a.dtype, a.op, a.divisor);
    run_ring(t, a, RingPlan::equal(W, m, 1, PlainCodec::slot_units(t.ring_slot_bytes(), 1, c.asz)), c);
  }
}

}  // namespace lp
