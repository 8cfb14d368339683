// All-reduce (API.md §3) over one host's ranks: csrc/comm/collectives.h.
//   * latency path (payload <= the latency slot): every rank copies its input (int8: quantized) into
//     its latency slot and announces the call; then every rank reduces all slots in rank order
//     0..W-1. One synchronisation; the same arithmetic on every rank, hence the same bits.
//   * ring: reduce-scatter then all-gather around the ring r -> r + 1, pipelined (ring_steps.h). The
//     message is cut into W chunks of whole units (16 elements, or one compression block) and each
//     chunk into pieces that fit a ring slot. For each piece index p a rank runs 2(W - 1) hops:
//       RS 0          send its own chunk r                                      send
//       RS 1..W-2     receive chunk r-k, add its own, send it on                recv_reduce_send
//       RS W-1        receive chunk r+1, add its own: the result; keep, send    recv_reduce_copy_send
//       AG 1..W-2     receive a result chunk, keep it, send it on              recv_copy_send
//       AG W-1        receive the last result chunk                             recv_copy
//     Chunk c is summed in ring order starting at rank c and computed by exactly one rank
//     (r = c - 1); every other rank receives its bits.
// The hierarchical path (several hosts) runs the two halves separately: HOST_REDUCE_SCATTER ends
// RS W-1 with recv_reduce_partial into `out`; HOST_ALL_GATHER starts with finish_send from it.
#include <cstring>
#include <vector>

#include "comm/collectives.h"
#include "comm/ring_steps.h"

namespace lp {
namespace {

constexpr int64_t kUnitElems = 16;  // chunk granularity of the uncompressed ring (whole vectors)

RingPlan plan(const ShmTransport& t, int64_t n_elems, int dtype, int compression, int64_t block) {
  if (compression == LP_COMPRESSION_INT8)
    return RingPlan::balanced(t.n_ranks(), n_elems, block, Q8Codec::slot_units(t.ring_slot_bytes(), block));
  return RingPlan::balanced(t.n_ranks(), n_elems, kUnitElems,
                            PlainCodec::slot_units(t.ring_slot_bytes(), kUnitElems,
                                                   dtype_n_bytes(reduce_acc_dtype(dtype))));
}

bool latency_path(const ShmTransport& t, const CollArgs& a) {
  if (a.kind != LP_CALL_ALLREDUCE || t.n_ranks() == 1) return false;
  return fits_latency_slot(t, a.compression == LP_COMPRESSION_INT8 ? q8_message_bytes(a.n_elems, a.block_elems)
                                                                   : a.n_elems * dtype_n_bytes(a.dtype));
}

void run_latency(ShmTransport& t, const CollArgs& a, uint64_t call) {
  const ReduceKernels& K = reduce_kernels();
  const int W = t.n_ranks();
  const int64_t n = a.n_elems;
  uint8_t* mine = t.lat_slot(t.rank(), call);
  if (a.compression == LP_COMPRESSION_INT8)
    K.q8_quantize(Q8Codec::codes(mine), Q8Codec::scales(mine, n), a.data, n, a.dtype, a.block_elems);
  else
    std::memcpy(mine, a.data, size_t(n * dtype_n_bytes(a.dtype)));
  announce(t, a, call);  // everyone's input is there once everyone has announced
  if (a.compression == LP_COMPRESSION_INT8) {
    std::vector<const int8_t*> qs(W);
    std::vector<const float*> ss(W);
    for (int r = 0; r < W; ++r) {
      const uint8_t* s = t.lat_slot(r, call);
      qs[r] = Q8Codec::codes(s);
      ss[r] = Q8Codec::scales(s, n);
    }
    K.q8_gather(a.data, qs.data(), ss.data(), W, n, a.dtype, a.block_elems, a.op == LP_REDUCE_AVG ? a.divisor : 1);
  } else {
    std::vector<const void*> srcs(W);
    for (int r = 0; r < W; ++r) srcs[r] = t.lat_slot(r, call);
    K.gather(a.data, srcs.data(), W, n, a.dtype, a.op, a.divisor);
  }
}

// One rank: the identity, except for the halves (a host of one rank).
void run_single(const CollArgs& a) {
  const ReduceKernels& K = reduce_kernels();
  const int64_t n = a.n_elems;
  const bool q8 = a.compression == LP_COMPRESSION_INT8;
  if (a.kind == LP_CALL_HOST_REDUCE_SCATTER) {
    if (q8) K.q8_widen(static_cast<float*>(a.out), a.data, n, a.dtype);
    else K.widen(a.out, a.data, n, a.dtype);
  } else if (a.kind == LP_CALL_HOST_ALL_GATHER) {
    if (q8) {
      Q8Codec c(a.dtype, a.block_elems, a.op == LP_REDUCE_AVG ? a.divisor : 1);
      std::vector<uint8_t> msg(size_t(c.result_bytes(n)));
      c.finish_partial(a.data, msg.data(), a.out, n);
    } else {
      K.narrow(a.data, nullptr, a.out, n, a.dtype, a.op, a.divisor);
    }
  }
}

template <class Codec>
void run_ring(ShmTransport& t, const CollArgs& a, Codec& c) {
  const int W = t.n_ranks(), r = t.rank();
  const RingPlan pl = plan(t, a.n_elems, a.dtype, a.compression, a.block_elems);
  RingSteps<Codec> step(t, c);
  const int64_t dsz = c.dsz;
  void* x = a.data;
  const int own = (r + 1) % W;  // the chunk this rank completes
  const int64_t own_begin = pl.chunk(own).first;
  auto mod = [W](int k) { return ((k % W) + W) % W; };
  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    if (a.kind != LP_CALL_HOST_ALL_GATHER) {
      {
        auto [e0, e1] = pl.piece(r, p);
        step.send(at(x, e0, dsz), e1 - e0);
      }
      for (int k = 1; k <= W - 2; ++k) {
        auto [e0, e1] = pl.piece(mod(r - k), p);
        step.recv_reduce_send(at(x, e0, dsz), e1 - e0);
      }
      auto [e0, e1] = pl.piece(own, p);
      if (a.kind == LP_CALL_HOST_REDUCE_SCATTER) {
        step.recv_reduce_partial(at(a.out, e0 - own_begin, c.asz), at(x, e0, dsz), e1 - e0);
        continue;
      }
      step.recv_reduce_copy_send(at(x, e0, dsz), at(x, e0, dsz), e1 - e0);
    } else {
      auto [e0, e1] = pl.piece(own, p);
      step.finish_send(at(x, e0, dsz), at(a.out, e0 - own_begin, c.asz), e1 - e0);
    }
    for (int k = 0; k <= W - 3; ++k) {
      auto [e0, e1] = pl.piece(mod(r - k), p);
      step.recv_copy_send(at(x, e0, dsz), e1 - e0);
    }
    auto [e0, e1] = pl.piece(mod(r + 2), p);
    step.recv_copy(at(x, e0, dsz), e1 - e0);
  }
}

}  // namespace

void all_reduce_call(ShmTransport& t, const CollArgs& a, uint64_t call) {
  if (latency_path(t, a)) {
    run_latency(t, a, call);
    return;
  }
  announce(t, a, call);
  if (t.n_ranks() == 1) {
    run_single(a);
  } else if (a.n_elems > 0) {
    if (a.compression == LP_COMPRESSION_INT8) {
      Q8Codec c(a.dtype, a.block_elems, a.op == LP_REDUCE_AVG ? a.divisor : 1);
      run_ring(t, a, c);
    } else {
      PlainCodec c(a.dtype, a.op, a.divisor);
      run_ring(t, a, c);
    }
  }
}

std::pair<int64_t, int64_t> all_reduce_owned_range(const ShmTransport& t, int64_t n_elems, int dtype,
                                                   int compression, int64_t block_elems) {
  return plan(t, n_elems, dtype, compression, block_elems).chunk((t.rank() + 1) % t.n_ranks());
}

}  // namespace lp
