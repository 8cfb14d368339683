// Broadcast (API.md §3): `data` (n_elems elements) of local rank `root` into every rank's `data`.
//   * latency path (fits the latency slot): the root copies its tensor into its latency slot and
//     announces the call; every other rank copies it out once everyone has announced.
//   * star: the root copies its tensor into its ring slots piece by piece (star_send_slot waits
//     for a slot every rank has read), and every other rank copies each piece out of the root's
//     slot as soon as it is posted, all at once. The bytes cross memory once per rank (a chain
//     through the ring slots copies them twice on each rank in between: 1.5x the traffic at 4
//     ranks, and W - 1 hand-offs before the last rank starts).
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
  const RingPlan pl = RingPlan::equal(1, n, 1, PlainCodec::slot_units(t.ring_slot_bytes(), 1, dsz));
  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    auto [e0, e1] = pl.piece(0, p);
    const size_t bytes = size_t((e1 - e0) * dsz);
    if (r == a.root) {
      std::memcpy(t.star_send_slot(), at(a.data, e0, dsz), bytes);
      t.star_post();
    } else {
      std::memcpy(at(a.data, e0, dsz), t.star_recv_slot(a.root), bytes);
      t.star_consume();
    }
  }
}

}  // namespace lp
