// Broadcast (API.md §3): `data` (n_elems elements) of local rank `root` into every rank's `data`.
//   * latency path (fits the latency slot): the root copies its tensor into its latency slot and
//     announces the call; every other rank copies it out once everyone has announced.
//   * ring: a pipelined chain root -> root+1 -> ... -> root-1, piece by piece: the root sends
//     (copy_send), the ranks in between keep and forward (recv_copy_send), the last keeps (recv_copy).
#include <cstring>

#include "comm/collectives.h"
#include "comm/ring_steps.h"

namespace lp {

void broadcast_call(ShmTransport& t, const CollArgs& a, uint64_t call) {
  const int W = t.n_ranks(), r = t.rank();
  const int64_t n = a.n_elems, dsz = dtype_n_bytes(a.dtype);
  if (W > 1 && fits_latency_slot(t, n * dsz)) {
    if (r == a.root) std::memcpy(t.lat_slot(r, call), a.data, size_t(n * dsz));
    announce(t, a, call);
    if (r != a.root) std::memcpy(a.data, t.lat_slot(a.root, call), size_t(n * dsz));
    return;
  }
  announce(t, a, call);
  if (W == 1 || n == 0) return;
  PlainCodec c(a.dtype, a.op, a.divisor);
  RingSteps<PlainCodec> step(t, c);
  const RingPlan pl = RingPlan::equal(1, n, 1, PlainCodec::slot_units(t.ring_slot_bytes(), 1, dsz));
  const int pos = (r - a.root + W) % W;  // hops from the root
  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    auto [e0, e1] = pl.piece(0, p);
    if (pos == 0) step.copy_send(at(a.data, e0, dsz), at(a.data, e0, dsz), e1 - e0);
    else if (pos == W - 1) step.recv_copy(at(a.data, e0, dsz), e1 - e0);
    else step.recv_copy_send(at(a.data, e0, dsz), e1 - e0);
  }
}

}  // namespace lp
