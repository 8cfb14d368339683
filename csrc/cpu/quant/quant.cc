// Quantize / dequantize drivers: group geometry, chunking, threads, and the ISA picker.
//
// Work is cut into chunks of kChunkElems flat elements (a power of two, so a chunk never straddles a
// multiple of 2^32 in index, never splits an int4 byte, and holds whole blocks). Each chunk is cut
// into segments that share one scale (or, per-channel on the last axis, one row of per-element
// scales). Memory passes:
//   blockwise          ONE pass: per block, statistics then quantization while the block is in L1.
//   channel, one row each (quantize_rows): ONE pass, row by row.
//   tensor / channel   two passes: statistics (per thread, then merged), then quantization.
// Bytes never depend on the thread count: max / min are exact, so merging partial statistics in any
// order gives the same scales, and every code depends only on its element, scale and index.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "cpu/kernel_table.h"
#include "cpu/quant/quant.h"

namespace lp {
namespace {

constexpr int64_t kChunkElems = 4096;        // the largest block; 16 KiB of f32 stays in L1; divides 2^32
constexpr double kMinElemsPerThread = 65536;  // below this a second thread costs more than it saves
constexpr uint32_t kNonFiniteBits = 0x7f800000u;

// How a chunk splits into segments that share a scale.
enum SegMode { SEG_TENSOR, SEG_BLOCK, SEG_ROW, SEG_ELEM };

struct Geometry {
  int64_t n_elems, n_channels, n_inner, block_size, n_groups;
  SegMode mode;
};

Geometry geometry(int64_t n_outer, int64_t n_channels, int64_t n_inner, int64_t block_size) {
  Geometry g;
  g.n_elems = n_outer * n_channels * n_inner;
  g.n_channels = n_channels;
  g.n_inner = n_inner;
  g.block_size = block_size;
  if (block_size > 0) {
    g.mode = SEG_BLOCK;
    g.n_groups = (g.n_elems + block_size - 1) / block_size;
  } else if (n_channels == 1) {
    g.mode = SEG_TENSOR;  // per-tensor, or per-channel over an axis of length 1
    g.n_groups = 1;
  } else {
    g.mode = n_inner == 1 ? SEG_ELEM : SEG_ROW;  // SEG_ELEM: channels contiguous, scales vary per element
    g.n_groups = n_channels;
  }
  return g;
}

// Calls fn(index0, n_elems, group) for each segment of [begin, end). SEG_ELEM segments are pieces of
// one row of n_channels elements and `group` is the channel of their first element.
template <class Fn>
inline void for_each_segment(const Geometry& g, int64_t begin, int64_t end, const Fn& fn) {
  switch (g.mode) {
    case SEG_TENSOR:
      fn(begin, end - begin, int64_t(0));
      return;
    case SEG_BLOCK:
      for (int64_t s = begin; s < end;) {
        int64_t b = s / g.block_size, e = std::min(end, (b + 1) * g.block_size);
        fn(s, e - s, b);
        s = e;
      }
      return;
    case SEG_ROW:
      for (int64_t s = begin; s < end;) {
        int64_t r = s / g.n_inner, e = std::min(end, (r + 1) * g.n_inner);
        fn(s, e - s, r % g.n_channels);
        s = e;
      }
      return;
    case SEG_ELEM:
      for (int64_t s = begin; s < end;) {
        int64_t r = s / g.n_channels, e = std::min(end, (r + 1) * g.n_channels);
        fn(s, e - s, s - r * g.n_channels);
        s = e;
      }
      return;
  }
}

// Outputs are usually fresh pages from the allocator, and on first touch every 4 KiB page faults
// (microseconds each on a VM: for a 64 MiB output that costs more than the kernel). Asking for
// transparent huge pages on the 2 MiB-aligned interior of a large output makes that 512x fewer faults.
// Advice only: the bytes written are the same, and a refusal (THP off) changes nothing.
void advise_huge_pages(void* p, int64_t n_bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (n_bytes < int64_t(2 * kHuge)) return;
  uintptr_t begin = (uintptr_t(p) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (uintptr_t(p) + uintptr_t(n_bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)n_bytes;
#endif
}

int64_t first_non_finite(const void* x, int x_dtype, int64_t n_elems) {
  for (int64_t i = 0; i < n_elems; ++i) {
    if ((f32_to_bits(load_elem(x_dtype, x, i)) & 0x7fffffffu) >= kNonFiniteBits) return i;
  }
  return -1;
}

// Sets the padding nibble of an odd-length int4 buffer (the high nibble of its last byte) to 0.
void clear_int4_padding(int fmt, uint8_t* data, int64_t n_elems) {
  if (fmt == LP_QFMT_INT4 && (n_elems & 1)) data[n_elems >> 1] &= 0x0f;
}

int64_t quantize_blockwise(const QuantizeArgs& a, const Geometry& g, const QuantKernels& k) {
  const bool minmax = a.fmt == LP_QFMT_UINT8;
  StatsFn stats = k.stats(a.x_dtype, minmax);
  QuantSpanFn quant = k.quantize(a.fmt, a.x_dtype, a.stochastic, false);
  const uint32_t key = rng_key(a.seed);
  const int64_t n_chunks = (g.n_elems + kChunkElems - 1) / kChunkElems;
  std::atomic<bool> bad{false};
  int nt = threads_for(n_chunks, double(kChunkElems), kMinElemsPerThread);
  parallel_for_claimed(n_chunks, nt, [&](int64_t c) {
    // A chunk holds whole blocks and fits in L1: all its statistics and scales first (independent
    // reductions and divisions overlap instead of each block waiting on its own), then its codes.
    const int64_t begin = c * kChunkElems, end = std::min(g.n_elems, begin + kChunkElems);
    const int64_t b0 = begin / g.block_size, b1 = (end + g.block_size - 1) / g.block_size;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * g.block_size, n = std::min(end, i0 + g.block_size) - i0;
      SpanStats st = {0, 0.0f, 0.0f};
      stats(a.x, i0, n, &st);
      if (st.abs_bits >= kNonFiniteBits) {  // reported below, after the parallel region
        bad.store(true, std::memory_order_relaxed);
        return;
      }
      group_scale(a.fmt, st, &a.scale[b], minmax ? &a.zero_point[b] : nullptr);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * g.block_size, n = std::min(end, i0 + g.block_size) - i0;
      quant(QuantSpan{a.x, i0, n, &a.scale[b], minmax ? &a.zero_point[b] : nullptr, key, a.data});
    }
  });
  if (bad.load()) return first_non_finite(a.x, a.x_dtype, g.n_elems);
  clear_int4_padding(a.fmt, a.data, g.n_elems);
  return -1;
}

// Per-channel where each channel is one contiguous row (n_outer 1, SEG_ROW: per-row activations of
// w8a8, per-output-channel weights): ONE pass, a row at a time, its statistics, scale and codes while
// it is in L1 / L2, on one parallel region. The same bytes as the two passes (a row's max is its
// chunks' max; a code depends on its element, scale and index only). Not for int4 rows of odd length
// (a byte would straddle two rows, two threads), nor for fewer rows than kMinRowsPerThread per thread
// (rows are not split, so few rows would leave threads idle).
constexpr int64_t kMinRowsPerThread = 4;
bool rows_one_pass(const QuantizeArgs& a, const Geometry& g) {
  return g.mode == SEG_ROW && g.n_elems == g.n_channels * g.n_inner && !(a.fmt == LP_QFMT_INT4 && (g.n_inner & 1)) &&
         g.n_channels >= kMinRowsPerThread * threads_for(g.n_channels, double(g.n_inner), kMinElemsPerThread);
}

int64_t quantize_rows(const QuantizeArgs& a, const Geometry& g, const QuantKernels& k) {
  const bool minmax = a.fmt == LP_QFMT_UINT8;
  StatsFn stats = k.stats(a.x_dtype, minmax);
  QuantSpanFn quant = k.quantize(a.fmt, a.x_dtype, a.stochastic, false);
  const uint32_t key = rng_key(a.seed);
  std::atomic<bool> bad{false};
  const int nt = threads_for(g.n_channels, double(g.n_inner), kMinElemsPerThread);
  parallel_for_claimed(g.n_channels, nt, [&](int64_t r) {
    const int64_t i0 = r * g.n_inner;
    SpanStats st = {0, 0.0f, 0.0f};
    stats(a.x, i0, g.n_inner, &st);
    if (st.abs_bits >= kNonFiniteBits) {  // reported below, after the parallel region
      bad.store(true, std::memory_order_relaxed);
      return;
    }
    group_scale(a.fmt, st, &a.scale[r], minmax ? &a.zero_point[r] : nullptr);
    quant(QuantSpan{a.x, i0, g.n_inner, &a.scale[r], minmax ? &a.zero_point[r] : nullptr, key, a.data});
  });
  if (bad.load()) return first_non_finite(a.x, a.x_dtype, g.n_elems);
  return -1;
}

int64_t quantize_two_pass(const QuantizeArgs& a, const Geometry& g, const QuantKernels& k) {
  const bool minmax = a.fmt == LP_QFMT_UINT8;
  const int64_t n_chunks = (g.n_elems + kChunkElems - 1) / kChunkElems;
  const int64_t n_groups = g.n_groups;
  int nt = threads_for(n_chunks, double(kChunkElems), kMinElemsPerThread);

  // 1. Statistics: thread t reduces the ranges of chunks it takes into its own per-group slots.
  std::vector<uint32_t> abs_bits(size_t(nt * n_groups), 0u);
  std::vector<float> mins(minmax ? size_t(nt * n_groups) : 0, 0.0f), maxs(mins.size(), 0.0f);
  StatsFn stats = k.stats(a.x_dtype, minmax);
  StatsElemFn stats_elem = k.stats_elem(a.x_dtype, minmax);
  parallel_ranges_claimed(n_chunks, nt, [&](int t, int64_t c0, int64_t c1) {
    int64_t begin = std::min(g.n_elems, c0 * kChunkElems), end = std::min(g.n_elems, c1 * kChunkElems);
    uint32_t* ab = &abs_bits[size_t(t * n_groups)];
    float* mn = minmax ? &mins[size_t(t * n_groups)] : nullptr;
    float* mx = minmax ? &maxs[size_t(t * n_groups)] : nullptr;
    for_each_segment(g, begin, end, [&](int64_t i0, int64_t n, int64_t grp) {
      if (g.mode == SEG_ELEM) {
        stats_elem(a.x, i0, n, ab + grp, minmax ? mn + grp : nullptr, minmax ? mx + grp : nullptr);
        return;
      }
      SpanStats st = {ab[grp], minmax ? mn[grp] : 0.0f, minmax ? mx[grp] : 0.0f};
      stats(a.x, i0, n, &st);
      ab[grp] = st.abs_bits;
      if (minmax) mn[grp] = st.min, mx[grp] = st.max;
    });
  });

  // 2. Merge the partial statistics (exact, so the order does not matter) and compute the scales.
  for (int64_t grp = 0; grp < n_groups; ++grp) {
    SpanStats st = {0, 0.0f, 0.0f};
    for (int t = 0; t < nt; ++t) {
      size_t s = size_t(t * n_groups + grp);
      st.abs_bits = std::max(st.abs_bits, abs_bits[s]);
      if (minmax) st.min = std::min(st.min, mins[s]), st.max = std::max(st.max, maxs[s]);
    }
    if (st.abs_bits >= kNonFiniteBits) return first_non_finite(a.x, a.x_dtype, g.n_elems);
    group_scale(a.fmt, st, &a.scale[grp], minmax ? &a.zero_point[grp] : nullptr);
  }

  // 3. Quantize, chunk by chunk.
  QuantSpanFn quant = k.quantize(a.fmt, a.x_dtype, a.stochastic, g.mode == SEG_ELEM);
  const uint32_t key = rng_key(a.seed);
  parallel_for_claimed(n_chunks, nt, [&](int64_t c) {
    int64_t begin = c * kChunkElems, end = std::min(g.n_elems, begin + kChunkElems);
    for_each_segment(g, begin, end, [&](int64_t i0, int64_t n, int64_t grp) {
      quant(QuantSpan{a.x, i0, n, &a.scale[grp], minmax ? &a.zero_point[grp] : nullptr, key, a.data});
    });
  });
  clear_int4_padding(a.fmt, a.data, g.n_elems);
  return -1;
}

}  // namespace

const QuantKernels& quant_kernels_for(int isa) {
  return pick_kernel_table(isa, {quant_kernels_avx2()}, quant_kernels_scalar());
}

const QuantKernels& quant_kernels() { return quant_kernels_for(cpu_isa_active()); }

int64_t quantize(const QuantizeArgs& a) {
  Geometry g = geometry(a.n_outer, a.n_channels, a.n_inner, a.block_size);
  if (g.n_elems == 0) {  // empty x: every group is an all-zero group
    std::fill(a.scale, a.scale + g.n_groups, 0.0f);
    if (a.zero_point) std::fill(a.zero_point, a.zero_point + g.n_groups, 0);
    return -1;
  }
  advise_huge_pages(a.data, a.fmt == LP_QFMT_INT4 ? (g.n_elems + 1) / 2 : g.n_elems);
  const QuantKernels& k = quant_kernels();
  if (g.mode == SEG_BLOCK) return quantize_blockwise(a, g, k);
  if (rows_one_pass(a, g)) return quantize_rows(a, g, k);
  return quantize_two_pass(a, g, k);
}

void dequantize(const DequantizeArgs& a) {
  Geometry g = geometry(a.n_outer, a.n_channels, a.n_inner, a.block_size);
  if (g.n_elems == 0) return;
  advise_huge_pages(a.out, g.n_elems * dtype_n_bytes(a.out_dtype));
  const QuantKernels& k = quant_kernels();
  DequantSpanFn deq = k.dequantize(a.fmt, a.out_dtype, g.mode == SEG_ELEM);
  const bool has_zp = a.fmt == LP_QFMT_UINT8;
  const int64_t n_chunks = (g.n_elems + kChunkElems - 1) / kChunkElems;
  int nt = threads_for(n_chunks, double(kChunkElems), kMinElemsPerThread);
  parallel_for_claimed(n_chunks, nt, [&](int64_t c) {
    int64_t begin = c * kChunkElems, end = std::min(g.n_elems, begin + kChunkElems);
    for_each_segment(g, begin, end, [&](int64_t i0, int64_t n, int64_t grp) {
      deq(DequantSpan{a.data, i0, n, &a.scale[grp], has_zp ? &a.zero_point[grp] : nullptr, a.out});
    });
  });
}

}  // namespace lp
