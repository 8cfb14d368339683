// All-gather (API.md §3): `data` holds this rank's m = n_elems elements; `out` receives the W
// ranks' inputs in rank order. Nothing is reduced: the bytes travel as they are.
//   * latency path (m elements fit the latency slot): every rank copies its input into its latency
//     slot and announces the call; then every rank copies all slots into `out`.
//   * ring: for each piece index p, rank r copies its own chunk into `out` and sends it
//     (copy_send), then keeps and forwards chunks r-1 .. r+2 as they pass (recv_copy_send) and
//     keeps chunk r+1 (recv_copy).
#include <cstring>

#include "comm/collectives.h"
#include "comm/ring_steps.h"

namespace lp {

void all_gather_call(ShmTransport& t, const CollArgs& a, uint64_t call) {
  const int W = t.n_ranks(), r = t.rank();
  const int64_t m = a.n_elems, dsz = dtype_n_bytes(a.dtype);
  if (W > 1 && fits_latency_slot(t, m * dsz)) {
    std::memcpy(t.lat_slot(r, call), a.data, size_t(m * dsz));
    announce(t, a, call);
    for (int k = 0; k < W; ++k) std::memcpy(at(a.out, k * m, dsz), t.lat_slot(k, call), size_t(m * dsz));
    return;
  }
  announce(t, a, call);
  if (m == 0) return;
  if (W == 1) {
    std::memcpy(a.out, a.data, size_t(m * dsz));
    return;
  }
  PlainCodec c(a.dtype, a.op, a.divisor);
  RingSteps<PlainCodec> step(t, c);
  const RingPlan pl = RingPlan::equal(W, m, 1, PlainCodec::slot_units(t.ring_slot_bytes(), 1, dsz));
  auto mod = [W](int k) { return ((k % W) + W) % W; };
  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    {
      auto [e0, e1] = pl.piece(r, p);
      step.copy_send(at(a.out, e0, dsz), at(a.data, e0 - r * m, dsz), e1 - e0);
    }
    for (int k = 1; k <= W - 2; ++k) {
      auto [e0, e1] = pl.piece(mod(r - k), p);
      step.recv_copy_send(at(a.out, e0, dsz), e1 - e0);
    }
    auto [e0, e1] = pl.piece(mod(r + 1), p);
    step.recv_copy(at(a.out, e0, dsz), e1 - e0);
  }
}

}  // namespace lp
