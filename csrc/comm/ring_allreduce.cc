#include "comm/ring_allreduce.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/dtypes.h"
#include "cpu/reduce/reduce.h"

namespace lp {
namespace {

constexpr int64_t kUnitElems = 16;  // chunk granularity of the uncompressed ring (whole vectors)

const char* dtype_text(int d) {
  switch (d) {
    case LP_DTYPE_F32: return "float32";
    case LP_DTYPE_F16: return "float16";
    case LP_DTYPE_BF16: return "bfloat16";
    case LP_DTYPE_F64: return "float64";
    case LP_DTYPE_I32: return "int32";
    case LP_DTYPE_I64: return "int64";
    default: return "?";
  }
}
const char* op_text(int o) {
  switch (o) {
    case LP_REDUCE_SUM: return "'sum'";
    case LP_REDUCE_AVG: return "'avg'";
    case LP_REDUCE_MAX: return "'max'";
    case LP_REDUCE_MIN: return "'min'";
    default: return "?";
  }
}
const char* kind_text(int k) {
  switch (k) {
    case LP_CALL_ALLREDUCE: return "all-reduce";
    case LP_CALL_REDUCE_SCATTER: return "reduce-scatter";
    case LP_CALL_ALL_GATHER: return "all-gather";
    default: return "?";
  }
}

// q8 wire format of a piece: codes, then float32 scales (reduce.h: q8_message_bytes).
inline int8_t* q_codes(uint8_t* s) { return reinterpret_cast<int8_t*>(s); }
inline const int8_t* q_codes(const uint8_t* s) { return reinterpret_cast<const int8_t*>(s); }
inline float* q_scales(uint8_t* s, int64_t n) { return reinterpret_cast<float*>(s + q8_scales_offset(n)); }
inline const float* q_scales(const uint8_t* s, int64_t n) {
  return reinterpret_cast<const float*>(s + q8_scales_offset(n));
}

}  // namespace

RingPlan::RingPlan(int n_ranks_, int64_t n_elems_, int64_t unit_elems_, int64_t slot_units)
    : n_ranks(n_ranks_), n_elems(n_elems_), unit_elems(unit_elems_) {
  n_units = (n_elems + unit_elems - 1) / unit_elems;
  int64_t max_chunk = (n_units + n_ranks - 1) / n_ranks;
  n_pieces = max_chunk == 0 ? 0 : (max_chunk + slot_units - 1) / slot_units;
  piece_units = n_pieces == 0 ? 0 : (max_chunk + n_pieces - 1) / n_pieces;  // balanced pieces
}

std::pair<int64_t, int64_t> RingPlan::chunk(int c) const {
  int64_t u0 = n_units * c / n_ranks, u1 = n_units * (c + 1) / n_ranks;
  return {std::min(u0 * unit_elems, n_elems), std::min(u1 * unit_elems, n_elems)};
}

std::pair<int64_t, int64_t> RingPlan::piece(int c, int64_t p) const {
  int64_t u0 = n_units * c / n_ranks, u1 = n_units * (c + 1) / n_ranks;
  int64_t a = std::min(u1, u0 + p * piece_units), b = std::min(u1, a + piece_units);
  return {std::min(a * unit_elems, n_elems), std::min(b * unit_elems, n_elems)};
}

RingPlan RingAllreduce::plan(int64_t n_elems, int dtype, int compression, int64_t block_elems) const {
  int64_t slot_bytes = int64_t(t_.ring_slot_bytes());
  if (compression == LP_COMPRESSION_INT8) {
    int64_t k = std::max<int64_t>(1, (slot_bytes - 64) / (block_elems + 4));
    while (k > 1 && q8_message_bytes(k * block_elems, block_elems) > slot_bytes) --k;
    return RingPlan(t_.n_ranks(), n_elems, block_elems, k);
  }
  int64_t unit_bytes = kUnitElems * dtype_n_bytes(reduce_acc_dtype(dtype));
  return RingPlan(t_.n_ranks(), n_elems, kUnitElems, std::max<int64_t>(1, slot_bytes / unit_bytes));
}

bool RingAllreduce::latency_path(int64_t n_elems, int dtype, int compression, int64_t block_elems) const {
  int64_t payload = compression == LP_COMPRESSION_INT8 ? q8_message_bytes(n_elems, block_elems)
                                                       : n_elems * dtype_n_bytes(dtype);
  return payload <= int64_t(t_.lat_bytes());
}

std::pair<int64_t, int64_t> RingAllreduce::owned_range(int64_t n_elems, int dtype, int compression,
                                                       int64_t block_elems) const {
  return plan(n_elems, dtype, compression, block_elems).chunk((t_.rank() + 1) % t_.n_ranks());
}

void RingAllreduce::check_headers(uint64_t call) const {
  // Compare everyone with rank 0, so every rank reports the same mismatch.
  const CallHeader& h0 = t_.ctl(0).hdr[call % 2];
  for (int r = 1; r < t_.n_ranks(); ++r) {
    const CallHeader& h = t_.ctl(r).hdr[call % 2];
    std::string field, v0, v;
    if (h.kind != h0.kind) {
      field = "the collective"; v0 = kind_text(h0.kind); v = kind_text(h.kind);
    } else if (h.numel != h0.numel) {
      field = "numel"; v0 = std::to_string(h0.numel); v = std::to_string(h.numel);
    } else if (h.dtype != h0.dtype) {
      field = "dtype"; v0 = dtype_text(h0.dtype); v = dtype_text(h.dtype);
    } else if (h.op != h0.op) {
      field = "op"; v0 = op_text(h0.op); v = op_text(h.op);
    } else if (h.compression != h0.compression) {
      field = "compression";
      v0 = h0.compression ? "'int8'" : "None";
      v = h.compression ? "'int8'" : "None";
    } else if (h.compression && h.block_elems != h0.block_elems) {
      field = "block_size"; v0 = std::to_string(h0.block_elems); v = std::to_string(h.block_elems);
    } else {
      continue;
    }
    throw CommFault("ld.all_reduce: ranks disagree on " + field + ": " + t_.rank_text(0) + " has " + v0 + ", " +
                        t_.rank_text(r) + " has " + v,
                    false);
  }
}

void RingAllreduce::run(const AllreduceArgs& args, double timeout_s) {
  AllreduceArgs a = args;
  if (a.divisor <= 0) a.divisor = t_.n_ranks();
  const uint64_t call = calls_++;
  t_.begin_call(call, timeout_s, "ld.all_reduce");
  try {
    if (a.kind == LP_CALL_ALLREDUCE && t_.n_ranks() > 1 &&
        latency_path(a.n_elems, a.dtype, a.compression, a.block_elems)) {
      run_latency(a, call);
    } else {
      t_.publish_header(call, a.n_elems, a.dtype, a.op, a.compression, int(a.block_elems), a.kind);
      t_.wait_headers(call);
      check_headers(call);
      if (t_.n_ranks() == 1) run_single(a);
      else if (a.n_elems > 0) run_ring(a);
    }
  } catch (const CommFault& e) {
    if (!e.fatal) t_.end_call();  // a mismatch: every rank stops at this call, cleanly
    throw;
  }
  t_.end_call();
}

void RingAllreduce::run_latency(const AllreduceArgs& a, uint64_t call) {
  const ReduceKernels& K = reduce_kernels();
  const int W = t_.n_ranks();
  const int64_t n = a.n_elems;
  // 1. My input into my latency slot (quantized when compressing), then announce the call.
  uint8_t* mine = t_.lat_slot(t_.rank(), call);
  if (a.compression == LP_COMPRESSION_INT8)
    K.q8_quantize(q_codes(mine), q_scales(mine, n), a.data, n, a.dtype, a.block_elems);
  else
    std::memcpy(mine, a.data, size_t(n * dtype_n_bytes(a.dtype)));
  t_.publish_header(call, n, a.dtype, a.op, a.compression, int(a.block_elems), a.kind);
  // 2. Everyone's input is there once everyone has announced.
  t_.wait_headers(call);
  check_headers(call);
  // 3. Reduce all slots in rank order (the same arithmetic on every rank).
  if (a.compression == LP_COMPRESSION_INT8) {
    std::vector<const int8_t*> qs(W);
    std::vector<const float*> ss(W);
    for (int r = 0; r < W; ++r) {
      const uint8_t* s = t_.lat_slot(r, call);
      qs[r] = q_codes(s);
      ss[r] = q_scales(s, n);
    }
    K.q8_gather(a.data, qs.data(), ss.data(), W, n, a.dtype, a.block_elems,
                a.op == LP_REDUCE_AVG ? a.divisor : 1);
  } else {
    std::vector<const void*> srcs(W);
    for (int r = 0; r < W; ++r) srcs[r] = t_.lat_slot(r, call);
    K.gather(a.data, srcs.data(), W, n, a.dtype, a.op, a.divisor);
  }
}

void RingAllreduce::run_single(const AllreduceArgs& a) {
  const ReduceKernels& K = reduce_kernels();
  const int64_t n = a.n_elems;
  const bool q8 = a.compression == LP_COMPRESSION_INT8;
  if (a.kind == LP_CALL_REDUCE_SCATTER) {
    if (q8) K.q8_widen(static_cast<float*>(a.shard), a.data, n, a.dtype);
    else K.widen(a.shard, a.data, n, a.dtype);
  } else if (a.kind == LP_CALL_ALL_GATHER) {
    if (q8) {
      std::vector<uint8_t> msg(size_t(q8_message_bytes(n, a.block_elems)));
      K.q8_quantize(q_codes(msg.data()), q_scales(msg.data(), n), a.shard, n, LP_DTYPE_F32, a.block_elems);
      K.q8_dequantize(a.data, q_codes(msg.data()), q_scales(msg.data(), n), n, a.dtype, a.block_elems,
                      a.op == LP_REDUCE_AVG ? a.divisor : 1);
    } else {
      K.narrow(a.data, nullptr, a.shard, n, a.dtype, a.op, a.divisor);
    }
  }
  // A one-rank all-reduce is the identity (avg divides by 1).
}

void RingAllreduce::run_ring(const AllreduceArgs& a) {
  const ReduceKernels& K = reduce_kernels();
  const int W = t_.n_ranks(), r = t_.rank();
  const bool q8 = a.compression == LP_COMPRESSION_INT8;
  const int64_t B = a.block_elems;
  const int dt = a.dtype, op = a.op;
  const int64_t dsz = dtype_n_bytes(dt);
  const int64_t asz = q8 ? 4 : dtype_n_bytes(reduce_acc_dtype(dt));
  const int qdiv = op == LP_REDUCE_AVG ? a.divisor : 1;
  const RingPlan pl = plan(a.n_elems, dt, a.compression, B);
  uint8_t* x = static_cast<uint8_t*>(a.data);
  uint8_t* shard = static_cast<uint8_t*>(a.shard);
  const int own = (r + 1) % W;  // the chunk this rank completes
  const int64_t own_begin = pl.chunk(own).first;
  auto mod = [W](int c) { return ((c % W) + W) % W; };

  for (int64_t p = 0; p < pl.n_pieces; ++p) {
    if (a.kind != LP_CALL_ALL_GATHER) {
      // RS 0: send my own chunk.
      {
        auto [e0, e1] = pl.piece(r, p);
        const int64_t len = e1 - e0;
        uint8_t* out = t_.send_slot();
        if (q8) K.q8_quantize(q_codes(out), q_scales(out, len), x + e0 * dsz, len, dt, B);
        else K.widen(out, x + e0 * dsz, len, dt);
        t_.post();
      }
      // RS 1..W-2: receive the partial of chunk r-k, add mine, send it on.
      for (int k = 1; k <= W - 2; ++k) {
        auto [e0, e1] = pl.piece(mod(r - k), p);
        const int64_t len = e1 - e0;
        const uint8_t* in = t_.recv_slot();
        uint8_t* out = t_.send_slot();
        if (q8)
          K.q8_accumulate(q_codes(out), q_scales(out, len), q_codes(in), q_scales(in, len), x + e0 * dsz, len,
                          dt, B);
        else
          K.accumulate(out, in, x + e0 * dsz, len, dt, op);
        t_.post();
        t_.consume();
      }
      // RS W-1: the last contribution to chunk r+1 is mine: the result (or the host's partial).
      {
        auto [e0, e1] = pl.piece(own, p);
        const int64_t len = e1 - e0;
        const uint8_t* in = t_.recv_slot();
        if (a.kind == LP_CALL_ALLREDUCE) {
          uint8_t* out = t_.send_slot();
          if (q8)
            K.q8_finish(q_codes(out), q_scales(out, len), x + e0 * dsz, q_codes(in), q_scales(in, len),
                        x + e0 * dsz, len, dt, B, qdiv);
          else
            K.finish(x + e0 * dsz, out, in, x + e0 * dsz, len, dt, op, a.divisor);
          t_.post();
        } else {
          uint8_t* dst = shard + (e0 - own_begin) * asz;
          if (q8) K.q8_partial(reinterpret_cast<float*>(dst), q_codes(in), q_scales(in, len), x + e0 * dsz, len, dt, B);
          else K.accumulate(dst, in, x + e0 * dsz, len, dt, op);
        }
        t_.consume();
      }
      if (a.kind == LP_CALL_REDUCE_SCATTER) continue;
    } else {
      // AG 0 from a shard reduced elsewhere: finish my chunk and send it.
      auto [e0, e1] = pl.piece(own, p);
      const int64_t len = e1 - e0;
      const uint8_t* src = shard + (e0 - own_begin) * asz;
      uint8_t* out = t_.send_slot();
      if (q8) {
        K.q8_quantize(q_codes(out), q_scales(out, len), src, len, LP_DTYPE_F32, B);
        K.q8_dequantize(x + e0 * dsz, q_codes(out), q_scales(out, len), len, dt, B, qdiv);
      } else {
        K.narrow(x + e0 * dsz, out, src, len, dt, op, a.divisor);
      }
      t_.post();
    }
    // AG 1..W-2: receive a finished chunk, keep it, send it on.
    for (int k = 0; k <= W - 3; ++k) {
      auto [e0, e1] = pl.piece(mod(r - k), p);
      const int64_t len = e1 - e0;
      const uint8_t* in = t_.recv_slot();
      uint8_t* out = t_.send_slot();
      if (q8) {
        K.q8_dequantize(x + e0 * dsz, q_codes(in), q_scales(in, len), len, dt, B, qdiv);
        std::memcpy(out, in, size_t(q8_message_bytes(len, B)));
      } else {
        std::memcpy(x + e0 * dsz, in, size_t(len * dsz));
        std::memcpy(out, in, size_t(len * dsz));
      }
      t_.post();
      t_.consume();
    }
    // AG W-1: the last finished chunk.
    {
      auto [e0, e1] = pl.piece(mod(r + 2), p);
      const int64_t len = e1 - e0;
      const uint8_t* in = t_.recv_slot();
      if (q8) K.q8_dequantize(x + e0 * dsz, q_codes(in), q_scales(in, len), len, dt, B, qdiv);
      else std::memcpy(x + e0 * dsz, in, size_t(len * dsz));
      t_.consume();
    }
  }
}

}  // namespace lp
