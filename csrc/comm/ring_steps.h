// The ring's building blocks, shared by every collective of csrc/comm (API.md §3), in the style of
// NCCL's runRing primitives and gloo's allreduce_ring.h:
//   * RingPlan: how a message is cut into W chunks and each chunk into pieces that fit a ring slot;
//   * wire codecs: how a piece travels (PlainCodec: partial sums in the accumulator type, results in
//     the tensor's dtype; Q8Codec: blockwise int8 codes + float32 scales, csrc/cpu/reduce/reduce.h);
//   * RingSteps<Codec>: the named hops over the transport (send to the successor, receive from the
//     predecessor), each one piece:
//       send                   my contribution                               (first reduce hop)
//       recv_reduce_send       partial + mine, on to the successor            (middle reduce hops)
//       recv_reduce_copy_send  partial + mine = the result: keep it, send it  (all-reduce's last)
//       recv_reduce_copy       partial + mine = the result: keep it           (reduce-scatter's last)
//       recv_reduce_partial    partial + mine, kept in the accumulator type   (a host's half)
//       finish_send            a partial reduced elsewhere: finish, keep, send
//       copy_send              a result I hold: send it                       (all-gather)
//       recv_copy_send         a result: keep it, send it on
//       recv_copy              a result: keep it                               (the last hop)
// Every hop posts what it sends before consuming what it received, so a rank's copy of piece p
// overlaps its successor's work on piece p - 1 (ring slots are a queue of depth >= 2).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "comm/transport.h"
#include "common/codes.h"
#include "common/dtypes.h"
#include "cpu/reduce/reduce.h"

namespace lp {

struct RingPlan {
  int n_ranks = 1;
  int64_t n_elems = 0, unit_elems = 1, chunk_elems = 0, n_units = 0, piece_units = 0, n_pieces = 0;

  // W chunks of whole units, as equal as possible (the all-reduce: chunk c = units
  // [n_units c / W, n_units (c + 1) / W)); chunk_elems stays 0.
  static RingPlan balanced(int n_ranks, int64_t n_elems, int64_t unit_elems, int64_t slot_units) {
    RingPlan p;
    p.n_ranks = n_ranks;
    p.n_elems = n_elems;
    p.unit_elems = unit_elems;
    p.n_units = (n_elems + unit_elems - 1) / unit_elems;
    p.set_pieces((p.n_units + n_ranks - 1) / n_ranks, slot_units);
    return p;
  }
  // W chunks of exactly chunk_elems each, chunk c at c * chunk_elems (reduce-scatter and all-gather,
  // whose chunks are the ranks' tensors; broadcast: one chunk). Pieces are whole units from the
  // chunk's first element (int8 blocks restart at each chunk).
  static RingPlan equal(int n_ranks, int64_t chunk_elems, int64_t unit_elems, int64_t slot_units) {
    RingPlan p;
    p.n_ranks = n_ranks;
    p.n_elems = chunk_elems * n_ranks;
    p.unit_elems = unit_elems;
    p.chunk_elems = chunk_elems;
    p.set_pieces((chunk_elems + unit_elems - 1) / unit_elems, slot_units);
    return p;
  }
  // Elements [begin, end) of chunk c.
  std::pair<int64_t, int64_t> chunk(int c) const {
    if (chunk_elems > 0 || n_units == 0) return {c * chunk_elems, (c + 1) * chunk_elems};
    int64_t u0 = n_units * c / n_ranks, u1 = n_units * (c + 1) / n_ranks;
    return {std::min(u0 * unit_elems, n_elems), std::min(u1 * unit_elems, n_elems)};
  }
  // Elements [begin, end) of piece p of chunk c (possibly empty).
  std::pair<int64_t, int64_t> piece(int c, int64_t p) const {
    auto [b, e] = chunk(c);
    int64_t a = std::min(e, b + p * piece_units * unit_elems);
    return {a, std::min(e, a + piece_units * unit_elems)};
  }

 private:
  void set_pieces(int64_t max_chunk_units, int64_t slot_units) {
    n_pieces = max_chunk_units == 0 ? 0 : (max_chunk_units + slot_units - 1) / slot_units;
    piece_units = n_pieces == 0 ? 0 : (max_chunk_units + n_pieces - 1) / n_pieces;  // balanced pieces
  }
};

// Partial sums travel in the accumulator type (reduce_acc_dtype), results in the tensor's dtype.
struct PlainCodec {
  static constexpr bool kRawResults = true;  // a finished piece on the wire is the dtype's bytes
  const ReduceKernels& K;
  int dt, op, divisor;
  int64_t dsz, asz;  // bytes per element: dtype, accumulator
  PlainCodec(int dtype, int op_, int divisor_)
      : K(reduce_kernels()), dt(dtype), op(op_), divisor(divisor_), dsz(dtype_n_bytes(dtype)),
        asz(dtype_n_bytes(reduce_acc_dtype(dtype))) {}
  // Elements of one unit per ring slot (units of unit_elems).
  static int64_t slot_units(uint64_t slot_bytes, int64_t unit_elems, int64_t elem_bytes) {
    return std::max<int64_t>(1, int64_t(slot_bytes) / (unit_elems * elem_bytes));
  }
  int64_t result_bytes(int64_t n) const { return n * dsz; }
  void encode(uint8_t* out, const void* x, int64_t n) const { K.widen(out, x, n, dt); }
  void reduce(uint8_t* out, const uint8_t* in, const void* x, int64_t n) const {
    K.accumulate(out, in, x, n, dt, op);
  }
  // y = finished(in + x); the same bits into out unless it is null.
  void reduce_finish(void* y, uint8_t* out, const uint8_t* in, const void* x, int64_t n) {
    K.finish(y, out, in, x, n, dt, op, divisor);
  }
  void reduce_partial(void* acc, const uint8_t* in, const void* x, int64_t n) const {
    K.accumulate(acc, in, x, n, dt, op);
  }
  void finish_partial(void* y, uint8_t* out, const void* acc, int64_t n) const {
    K.narrow(y, out, acc, n, dt, op, divisor);
  }
  void decode(void* y, const uint8_t* in, int64_t n) const { std::memcpy(y, in, size_t(n * dsz)); }
};

// Every hop carries a q8 message: codes, then float32 scales (common/codes.h). Each reduce hop
// dequantizes, adds its own input in float32 and requantizes; the result is quantized once more and
// every rank keeps the dequantized value of those codes (so all ranks hold the same bits).
struct Q8Codec {
  static constexpr bool kRawResults = false;
  const ReduceKernels& K;
  int dt;
  int64_t B;
  int divisor;  // avg: the group's size; sum: 1
  int64_t dsz, asz = 4;
  std::vector<uint8_t> scratch;  // the codes of a result that is kept but not sent
  Q8Codec(int dtype, int64_t block, int divisor_)
      : K(reduce_kernels()), dt(dtype), B(block), divisor(divisor_), dsz(dtype_n_bytes(dtype)) {}
  // Blocks per ring slot.
  static int64_t slot_units(uint64_t slot_bytes, int64_t block) {
    int64_t k = std::max<int64_t>(1, (int64_t(slot_bytes) - 64) / (block + 4));
    while (k > 1 && q8_message_bytes(k * block, block) > int64_t(slot_bytes)) --k;
    return k;
  }
  static int8_t* codes(uint8_t* m) { return reinterpret_cast<int8_t*>(m); }
  static const int8_t* codes(const uint8_t* m) { return reinterpret_cast<const int8_t*>(m); }
  static float* scales(uint8_t* m, int64_t n) { return reinterpret_cast<float*>(m + q8_scales_offset(n)); }
  static const float* scales(const uint8_t* m, int64_t n) {
    return reinterpret_cast<const float*>(m + q8_scales_offset(n));
  }
  int64_t result_bytes(int64_t n) const { return q8_message_bytes(n, B); }
  void encode(uint8_t* out, const void* x, int64_t n) const { K.q8_quantize(codes(out), scales(out, n), x, n, dt, B); }
  void reduce(uint8_t* out, const uint8_t* in, const void* x, int64_t n) const {
    K.q8_accumulate(codes(out), scales(out, n), codes(in), scales(in, n), x, n, dt, B);
  }
  void reduce_finish(void* y, uint8_t* out, const uint8_t* in, const void* x, int64_t n) {
    if (out == nullptr) {
      scratch.resize(size_t(result_bytes(n)));
      out = scratch.data();
    }
    K.q8_finish(codes(out), scales(out, n), y, codes(in), scales(in, n), x, n, dt, B, divisor);
  }
  void reduce_partial(void* acc, const uint8_t* in, const void* x, int64_t n) const {
    K.q8_partial(static_cast<float*>(acc), codes(in), scales(in, n), x, n, dt, B);
  }
  void finish_partial(void* y, uint8_t* out, const void* acc, int64_t n) const {
    K.q8_quantize(codes(out), scales(out, n), acc, n, LP_DTYPE_F32, B);
    K.q8_dequantize(y, codes(out), scales(out, n), n, dt, B, divisor);
  }
  void decode(void* y, const uint8_t* in, int64_t n) const {
    K.q8_dequantize(y, codes(in), scales(in, n), n, dt, B, divisor);
  }
};

template <class Codec>
class RingSteps {
 public:
  RingSteps(ShmTransport& t, Codec& c) : t_(t), c_(c) {}

  void send(const void* x, int64_t n) {
    c_.encode(t_.send_slot(), x, n);
    t_.post();
  }
  void recv_reduce_send(const void* x, int64_t n) {
    const uint8_t* in = t_.recv_slot();
    c_.reduce(t_.send_slot(), in, x, n);
    t_.post();
    t_.consume();
  }
  void recv_reduce_copy_send(void* y, const void* x, int64_t n) {
    const uint8_t* in = t_.recv_slot();
    c_.reduce_finish(y, t_.send_slot(), in, x, n);
    t_.post();
    t_.consume();
  }
  void recv_reduce_copy(void* y, const void* x, int64_t n) {
    c_.reduce_finish(y, nullptr, t_.recv_slot(), x, n);
    t_.consume();
  }
  void recv_reduce_partial(void* acc, const void* x, int64_t n) {
    c_.reduce_partial(acc, t_.recv_slot(), x, n);
    t_.consume();
  }
  void finish_send(void* y, const void* acc, int64_t n) {
    c_.finish_partial(y, t_.send_slot(), acc, n);
    t_.post();
  }
  // y = src (unless they are one), and src to the successor: results that travel as raw bytes.
  void copy_send(void* y, const void* src, int64_t n) {
    static_assert(Codec::kRawResults, "copy_send needs a codec whose results are the dtype's bytes");
    const size_t bytes = size_t(c_.result_bytes(n));
    if (y != src) std::memcpy(y, src, bytes);
    std::memcpy(t_.send_slot(), src, bytes);
    t_.post();
  }
  void recv_copy_send(void* y, int64_t n) {
    const uint8_t* in = t_.recv_slot();
    uint8_t* out = t_.send_slot();
    c_.decode(y, in, n);
    std::memcpy(out, in, size_t(c_.result_bytes(n)));
    t_.post();
    t_.consume();
  }
  void recv_copy(void* y, int64_t n) {
    c_.decode(y, t_.recv_slot(), n);
    t_.consume();
  }

 private:
  ShmTransport& t_;
  Codec& c_;
};

// Byte offset `e` elements of `esz` bytes into p.
inline uint8_t* at(void* p, int64_t e, int64_t esz) { return static_cast<uint8_t*>(p) + e * esz; }
inline const uint8_t* at(const void* p, int64_t e, int64_t esz) { return static_cast<const uint8_t*>(p) + e * esz; }

}  // namespace lp
