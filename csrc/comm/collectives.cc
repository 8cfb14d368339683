#include "comm/collectives.h"

#include <string>

namespace lp {
namespace {

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
std::string quoted(const char* const* names, int n, int i) {
  return i >= 0 && i < n ? std::string("'") + names[i] + "'" : "?";
}
#define LP_COUNT(a) int(sizeof(a) / sizeof((a)[0]))

// Compares everyone's header of `call` with rank 0's, so every rank reports the same mismatch.
void check_headers(const ShmTransport& t, uint64_t call) {
  const CallHeader& h0 = t.ctl(0).hdr[call % 2];
  auto src_text = [&t](int root) {  // a peer's index is checked before it names anything
    return root >= 0 && root < t.n_ranks() ? t.rank_text(root) : "rank ?";
  };
  for (int r = 1; r < t.n_ranks(); ++r) {
    const CallHeader& h = t.ctl(r).hdr[call % 2];
    std::string field, v0, v;
    if (h.kind != h0.kind) {
      field = "the collective";
      v0 = call_op_name(h0.kind);
      v = call_op_name(h.kind);
    } else if (h.numel != h0.numel) {
      field = "numel"; v0 = std::to_string(h0.numel); v = std::to_string(h.numel);
    } else if (h.dtype != h0.dtype) {
      field = "dtype"; v0 = dtype_text(h0.dtype); v = dtype_text(h.dtype);
    } else if (h.op != h0.op) {
      field = "op";
      v0 = quoted(kReduceOpNames, LP_COUNT(kReduceOpNames), h0.op);
      v = quoted(kReduceOpNames, LP_COUNT(kReduceOpNames), h.op);
    } else if (h.compression != h0.compression) {
      field = "compression";
      v0 = h0.compression ? "'int8'" : "None";
      v = h.compression ? "'int8'" : "None";
    } else if (h.compression && h.block_elems != h0.block_elems) {
      field = "block_size"; v0 = std::to_string(h0.block_elems); v = std::to_string(h.block_elems);
    } else if (h.root != h0.root) {
      field = "src"; v0 = src_text(h0.root); v = src_text(h.root);
    } else {
      continue;
    }
    throw CommFault(std::string(call_op_name(h0.kind)) + ": ranks disagree on " + field + ": " + t.rank_text(0) +
                        " has " + v0 + ", " + t.rank_text(r) + " has " + v,
                    false);
  }
}

}  // namespace

void announce(ShmTransport& t, const CollArgs& a, uint64_t call) {
  t.publish_header(call, a.n_elems, a.dtype, a.op, a.compression, int(a.block_elems), a.kind, a.root);
  t.wait_headers(call);
  check_headers(t, call);
}

void ShmCollectives::run(const CollArgs& args, double timeout_s) {
  CollArgs a = args;
  if (a.divisor <= 0) a.divisor = t_.n_ranks();
  const uint64_t call = calls_++;
  t_.begin_call(call, timeout_s, call_op_name(a.kind));
  try {
    switch (a.kind) {
      case LP_CALL_REDUCE_SCATTER: reduce_scatter_call(t_, a, call); break;
      case LP_CALL_ALL_GATHER: all_gather_call(t_, a, call); break;
      case LP_CALL_BROADCAST: broadcast_call(t_, a, call); break;
      default: all_reduce_call(t_, a, call); break;  // ALLREDUCE and its HOST_ halves
    }
  } catch (const CommFault& e) {
    if (!e.fatal) t_.end_call();  // a mismatch: every rank stops at this call, cleanly
    throw;
  }
  t_.end_call();
}

std::pair<int64_t, int64_t> ShmCollectives::owned_range(int64_t n_elems, int dtype, int compression,
                                                        int64_t block_elems) const {
  return all_reduce_owned_range(t_, n_elems, dtype, compression, block_elems);
}

}  // namespace lp
