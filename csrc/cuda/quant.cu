// Quantize / dequantize on the GPU (API.md §2), byte-identical to the CPU path.
//
// Bitwise rules (this file is compiled WITHOUT fast math, with --fmad=false, and without
// flush-to-zero): every step is a single IEEE float32 operation in round-to-nearest-even, in the
// order the contract writes it:
//   group stats  hi = max(max(x), 0), nlo = max(-min(x), 0)   (exact, order-independent; +0 for 0)
//   symmetric    scale = max(hi, nlo) / qmax                   (true division)
//   uint8        scale = (hi - lo) / 255 = (hi + nlo) / 255,  zero_point = rint(nlo / scale);
//                when hi + nlo overflows, 2 * ((hi/2 + nlo/2) / 255): the same roundings with an
//                unbounded exponent (csrc/cpu/quant/quant.h's group_scale says why)
//   code         q = x / scale; nearest: rint(q) (half to even); stochastic: floor(q + u) of the
//                exact sum (stochastic_floor below: the float32 sum could round across an integer);
//                integer formats clamp to the range (uint8 after adding zero_point); fp8 casts q
//                with the saturating round-to-nearest-even conversion of dtypes.h
//   zero scale   (an all-zero group, or one whose absmax / qmax underflows to 0): every code 0 and
//                zero_point 0, so the group dequantizes to exact zeros
//   dequantize   float(q - zero_point) * scale (fp8: decoded value * scale), integer formats
//                saturating to +-FLT_MAX (quant.h's scale_code), rounded once to the output dtype
// u is rng.h's counter-based uniform for the element's flat C-order index, so stochastic rounding
// matches the CPU for the same seed.
//
// Layout: x is contiguous and described as (n_outer, n_channels, n_inner); the group of flat index
// i is (i / n_inner) % n_channels. Per-tensor is (1, 1, n), per-channel (prod(shape[:k]), shape[k],
// prod(shape[k+1:])), and blockwise is run as (1, ceil(n / B), B), which gives group i / B.
#include "api.h"
#include "common.cuh"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdio>
#include <vector>

#include "common/dtypes.h"
#include "common/rng.h"

namespace lp {
namespace cuda {
namespace {

// ---- the arithmetic, shared by the kernels and their host twins ----

__host__ __device__ inline float format_qmax(int fmt) {
  switch (fmt) {
    case LP_QFMT_INT8: return 127.0f;
    case LP_QFMT_UINT8: return 255.0f;
    case LP_QFMT_INT4: return 7.0f;
    case LP_QFMT_FP8_E4M3: return 448.0f;
    default: return 57344.0f;
  }
}

__host__ __device__ inline bool is_finite_bits(float x) {
  return (f32_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// A zero result of fmaxf may be -0.0 on some paths; scales must be +0.0 bit for bit.
__host__ __device__ inline float positive_zero(float v) { return v == 0.0f ? 0.0f : v; }

// hi = max(max(x), 0) and nlo = max(-min(x), 0) of a group -> its scale and zero point.
__host__ __device__ inline void group_params(int fmt, float hi, float nlo, float* scale, int32_t* zero_point) {
  hi = positive_zero(hi);
  nlo = positive_zero(nlo);
  // A non-zero group whose scale underflows gets 2^-149 (csrc/cpu/quant/quant.h, scale_at_least_min).
  const float min_scale = (hi > 0.0f || nlo > 0.0f) ? 1.40129846e-45f : 0.0f;
  if (fmt == LP_QFMT_UINT8) {
    const float range = add_rn(hi, nlo);
    float s = is_finite_bits(range) ? div_rn(range, 255.0f)
                                    : mul_rn(2.0f, div_rn(add_rn(mul_rn(hi, 0.5f), mul_rn(nlo, 0.5f)), 255.0f));
    s = s == 0.0f ? min_scale : s;
    *scale = s;
    *zero_point = s != 0.0f ? int32_t(round_even(div_rn(nlo, s))) : 0;
  } else {
    const float s = div_rn(hi > nlo ? hi : nlo, format_qmax(fmt));
    *scale = s == 0.0f ? min_scale : s;
    *zero_point = 0;
  }
}

__host__ __device__ inline float clamp_f32(float v, float lo, float hi) {
  return fminf(fmaxf(v, lo), hi);  // NaN (only from a NaN input, which raises anyway) -> lo
}

// floor(q + u) in exact arithmetic for u = m * 2^-24: csrc/cpu/quant/quant.h's stochastic_floor,
// where the proof is (every step exact: the carry of frac(q) + u is taken on u's 2^-24 grid).
__host__ __device__ inline float stochastic_floor(float q, float u) {
  const float f = floor_f32(q);
  const float d = add_rn(mul_rn(floor_f32(mul_rn(q, 16777216.0f)), 5.9604644775390625e-08f), -f);
  return add_rn(f, floor_f32(add_rn(d, u)));
}

// The stored byte (int4: the low nibble) of one element.
__host__ __device__ inline uint32_t quantize_code(int fmt, float x, float scale, int32_t zero_point,
                                                  bool stochastic, float u) {
  if (scale == 0.0f) return 0;
  const float q = div_rn(x, scale);
  if (fmt == LP_QFMT_FP8_E4M3) return f32_to_fp8_e4m3(q);
  if (fmt == LP_QFMT_FP8_E5M2) return f32_to_fp8_e5m2(q);
  float r = stochastic ? stochastic_floor(q, u) : round_even(q);
  if (fmt == LP_QFMT_UINT8) return uint32_t(int32_t(clamp_f32(add_rn(r, float(zero_point)), 0.0f, 255.0f)));
  const float qmax = format_qmax(fmt);
  const int32_t c = int32_t(clamp_f32(r, -qmax, qmax));
  return fmt == LP_QFMT_INT4 ? uint32_t(c) & 0xfu : uint32_t(uint8_t(int8_t(c)));
}

// value * scale saturated to +-FLT_MAX, NaN kept (explicit compares: fminf / fmaxf would drop NaN).
__host__ __device__ inline float mul_saturate(float value, float scale) {
  const float v = mul_rn(value, scale);
  return v > FLT_MAX ? FLT_MAX : (v < -FLT_MAX ? -FLT_MAX : v);
}

__host__ __device__ inline float dequantize_code(int fmt, uint32_t code, float scale, int32_t zero_point) {
  switch (fmt) {
    case LP_QFMT_INT8: return mul_saturate(float(int32_t(int8_t(uint8_t(code)))), scale);
    case LP_QFMT_UINT8: return mul_saturate(float(int32_t(code) - zero_point), scale);
    case LP_QFMT_INT4: return mul_saturate(float(int32_t(code & 0xfu) - (code & 0x8u ? 16 : 0)), scale);
    case LP_QFMT_FP8_E4M3: return mul_rn(fp8_e4m3_to_f32(uint8_t(code)), scale);
    default: return mul_rn(fp8_e5m2_to_f32(uint8_t(code)), scale);
  }
}

__host__ __device__ inline float load_as_f32(const void* x, int dtype, int64_t i) {
  if (dtype == LP_DTYPE_F32) return static_cast<const float*>(x)[i];
  const uint16_t h = static_cast<const uint16_t*>(x)[i];
  return dtype == LP_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__host__ __device__ inline uint32_t store_bits_of(float v, int dtype) {
  return dtype == LP_DTYPE_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

// Walks the groups of consecutive flat indices: group = (i / n_inner) % n_channels.
struct GroupWalker {
  int64_t group, inner, n_channels, n_inner;
  __host__ __device__ GroupWalker(int64_t i, int64_t n_channels_, int64_t n_inner_)
      : n_channels(n_channels_), n_inner(n_inner_) {
    const int64_t row = i / n_inner;
    inner = i - row * n_inner;
    group = row % n_channels;
  }
  // A walker that stays on `group` (for runs known to lie in one group).
  __host__ __device__ static GroupWalker single(int64_t group) {
    GroupWalker w(0, 1, 1);
    w.group = group;
    w.n_inner = INT64_MAX;
    return w;
  }
  __host__ __device__ void next() {
    if (++inner == n_inner) {
      inner = 0;
      if (++group == n_channels) group = 0;
    }
  }
};

// ---- device helpers ----

constexpr int kThreads = 256;
constexpr int kRun = 8;                            // consecutive elements per thread and step
constexpr int kTile = 2 * kThreads * kRun;         // blockwise: elements per CTA (= max block size)
constexpr uint64_t kNoBadIndex = uint64_t(INT64_MAX);

// Loads elements [start, start + 8) as float32 (zeros past n). `vec` when x is 16-byte aligned;
// start is always a multiple of 8, so full runs are 16- (16-bit) or 2x16-byte (float32) loads.
template <int DT>
__device__ inline int load_run(const void* x, int64_t start, int64_t n, bool vec, float (&v)[kRun]) {
  const int count = n - start >= kRun ? kRun : int(n - start);
  if (vec && count == kRun) {
    if constexpr (DT == LP_DTYPE_F32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + start);
      const float4 a = p[0], b = p[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 w = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + start);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint16_t lo = uint16_t(words[j] & 0xffffu), hi = uint16_t(words[j] >> 16);
        v[2 * j] = DT == LP_DTYPE_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
        v[2 * j + 1] = DT == LP_DTYPE_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
      }
    }
    return count;
  }
#pragma unroll
  for (int j = 0; j < kRun; ++j) v[j] = j < count ? load_as_f32(x, DT, start + j) : 0.0f;
  return count;
}

// Stores the codes of elements [start, start + count): one byte each, or for int4 a nibble each
// packed low-first into byte i / 2 (the padding nibble past n is 0).
__device__ inline void store_run(int fmt, uint8_t* data, int64_t start, int count, const uint32_t (&c)[kRun]) {
  if (fmt == LP_QFMT_INT4) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < kRun; ++j) word |= (j < count ? c[j] & 0xfu : 0u) << (4 * j);
    uint8_t* dst = data + start / 2;
    if (count == kRun && (reinterpret_cast<uintptr_t>(dst) & 3u) == 0) {
      *reinterpret_cast<uint32_t*>(dst) = word;
    } else {
#pragma unroll
      for (int b = 0; b < kRun / 2; ++b)
        if (2 * b < count) dst[b] = uint8_t(word >> (8 * b));
    }
    return;
  }
  uint8_t* dst = data + start;
  if (count == kRun && (reinterpret_cast<uintptr_t>(dst) & 7u) == 0) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(c[0] | c[1] << 8 | c[2] << 16 | c[3] << 24,
                                                c[4] | c[5] << 8 | c[6] << 16 | c[7] << 24);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j)
      if (j < count) dst[j] = uint8_t(c[j]);
  }
}

// Folds the elements of a run into (hi, nlo); returns the first non-finite index or kNoBadIndex.
__device__ inline uint64_t fold_run(const float (&v)[kRun], int count, int64_t start, float& hi, float& nlo) {
  uint64_t bad = kNoBadIndex;
#pragma unroll
  for (int j = 0; j < kRun; ++j) {
    if (j >= count) continue;
    if (!is_finite_bits(v[j])) {
      if (bad == kNoBadIndex) bad = uint64_t(start + j);
      continue;
    }
    hi = fmaxf(hi, v[j]);
    nlo = fmaxf(nlo, -v[j]);
  }
  return bad;
}

__device__ inline void report_bad(unsigned long long* bad_index, uint64_t bad) {
  if (bad != kNoBadIndex) atomicMin(bad_index, static_cast<unsigned long long>(bad));
}

struct QuantKernelArgs {
  const void* x;
  uint8_t* data;
  float* scale;
  int32_t* zero_point;          // uint8 only
  uint32_t* stats;              // 2 per group: bits of hi, bits of nlo (non-negative floats)
  unsigned long long* bad_index;
  int64_t n, n_channels, n_inner, n_outer;
  int fmt;
  bool stochastic;
  uint32_t key;                 // rng_key(seed)
  bool x_vec;                   // x 16-byte aligned
};

__device__ inline void quantize_run(const QuantKernelArgs& a, int64_t start, int count, const float (&v)[kRun],
                                    GroupWalker w, const float* scales, const int32_t* zps) {
  uint32_t codes[kRun];
  // rng.h's key_hi changes every 2^32 elements; a run (8-aligned) never straddles that boundary.
  const uint32_t key_hi = a.stochastic ? rng_key_hi(a.key, uint64_t(start)) : 0u;
#pragma unroll
  for (int j = 0; j < kRun; ++j) {
    codes[j] = 0;
    if (j < count) {
      const float u = a.stochastic ? rng_uniform_bits(a.key, key_hi, uint32_t(uint64_t(start + j))) : 0.0f;
      codes[j] = quantize_code(a.fmt, v[j], scales[w.group], zps != nullptr ? zps[w.group] : 0, a.stochastic, u);
      w.next();
    }
  }
  store_run(a.fmt, a.data, start, count, codes);
}

// ---- kernels ----

// Blockwise, one pass over memory. Contract: a CTA of 256 threads owns a tile of 4096 consecutive
// elements (4096 / B whole blocks, B a power of two in 32..4096); each thread holds two runs of 8
// (elements tile + r*2048 + tid*8 .. +7), which never straddle a block. Block stats are reduced in
// registers: xor-shuffles within B/8 lanes when B <= 256, else per-warp partials in shared memory
// combined per block. Scales are written by the thread whose run starts the block; codes are
// computed from the registers and stored as 8 bytes (int4: 4) per run. Elements past n count as
// absent; the last block may be short.
template <int DT>
__global__ void __launch_bounds__(kThreads) quant_blockwise_kernel(const QuantKernelArgs a, int block_shift) {
  __shared__ float part_hi[2][kThreads / 32], part_nlo[2][kThreads / 32];
  __shared__ float blk_scale[kTile / 32];
  __shared__ int32_t blk_zp[kTile / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n_tiles = (a.n + kTile - 1) / kTile;
  const int block_size = 1 << block_shift;  // a power of two: divisions below are shifts
  const int lanes_per_block = block_size / kRun;  // threads sharing one block in one run (4..512)

  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t tile0 = tile * kTile;
    float v[2][kRun], hi[2], nlo[2];
    int count[2];
    uint64_t bad = kNoBadIndex;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t start = tile0 + r * (kThreads * kRun) + tid * kRun;
      count[r] = start < a.n ? load_run<DT>(a.x, start, a.n, a.x_vec, v[r]) : 0;
      if (start >= a.n) {
#pragma unroll
        for (int j = 0; j < kRun; ++j) v[r][j] = 0.0f;
      }
      hi[r] = 0.0f;
      nlo[r] = 0.0f;
      const uint64_t b = fold_run(v[r], count[r], start, hi[r], nlo[r]);
      if (b < bad) bad = b;
    }
    report_bad(a.bad_index, bad);

    if (lanes_per_block <= 32) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        for (int off = 1; off < lanes_per_block; off <<= 1) {
          hi[r] = fmaxf(hi[r], __shfl_xor_sync(0xffffffffu, hi[r], off));
          nlo[r] = fmaxf(nlo[r], __shfl_xor_sync(0xffffffffu, nlo[r], off));
        }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        for (int off = 1; off < 32; off <<= 1) {
          hi[r] = fmaxf(hi[r], __shfl_xor_sync(0xffffffffu, hi[r], off));
          nlo[r] = fmaxf(nlo[r], __shfl_xor_sync(0xffffffffu, nlo[r], off));
        }
        if (lane == 0) {
          part_hi[r][warp] = hi[r];
          part_nlo[r][warp] = nlo[r];
        }
      }
      __syncthreads();
      // Warp partial (r, w) covers elements [r*2048 + w*256, +256) of the tile; a block of B >= 512
      // elements is B/256 consecutive partials.
      const int parts = block_size / 256;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int my_part = r * (kThreads / 32) + warp;
        const int first = my_part / parts * parts;
        float h = 0.0f, l = 0.0f;
        for (int q = first; q < first + parts; ++q) {
          h = fmaxf(h, part_hi[q / (kThreads / 32)][q % (kThreads / 32)]);
          l = fmaxf(l, part_nlo[q / (kThreads / 32)][q % (kThreads / 32)]);
        }
        hi[r] = h;
        nlo[r] = l;
      }
    }

    // Block scales: the first thread of each block computes and publishes them.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t start = tile0 + r * (kThreads * kRun) + tid * kRun;
      const int local = r * (kThreads * kRun) + tid * kRun;  // offset in the tile
      if (start < a.n && (start & (block_size - 1)) == 0) {
        float s;
        int32_t zp;
        group_params(a.fmt, hi[r], nlo[r], &s, &zp);
        const int64_t g = start >> block_shift;
        a.scale[g] = s;
        if (a.zero_point != nullptr) a.zero_point[g] = zp;
        blk_scale[local >> block_shift] = s;
        blk_zp[local >> block_shift] = zp;
      }
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t start = tile0 + r * (kThreads * kRun) + tid * kRun;
      if (count[r] <= 0) continue;
      const int local_block = (r * (kThreads * kRun) + tid * kRun) >> block_shift;
      // A run lies in one block: index local_block of the tile's shared scale arrays.
      quantize_run(a, start, count[r], v[r], GroupWalker::single(local_block), blk_scale,
                   a.zero_point != nullptr ? blk_zp : nullptr);
    }
    __syncthreads();  // blk_scale / part_* are reused by the next tile
  }
}

// Per-tensor / per-channel stats over long rows (n_inner >= 256, or per-tensor): work item = (row,
// chunk of 8192 elements); each CTA folds its chunk, reduces in the block, and raises the row's
// channel stats with one atomicMax per value (non-negative floats order like their bit patterns).
template <int DT>
__global__ void __launch_bounds__(kThreads) quant_stats_rows_kernel(const QuantKernelArgs a) {
  constexpr int64_t kChunk = 4 * kThreads * kRun;
  __shared__ float red_hi[kThreads / 32], red_nlo[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t rows = a.n_outer * a.n_channels;
  const int64_t chunks_per_row = (a.n_inner + kChunk - 1) / kChunk;
  const bool vec = a.x_vec && a.n_inner % kRun == 0;
  for (int64_t item = blockIdx.x; item < rows * chunks_per_row; item += gridDim.x) {
    const int64_t row = item / chunks_per_row, chunk = item % chunks_per_row;
    const int64_t row0 = row * a.n_inner;
    float hi = 0.0f, nlo = 0.0f;
    uint64_t bad = kNoBadIndex;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = chunk * kChunk + r * (kThreads * kRun) + tid * kRun;  // index within the row
      if (i >= a.n_inner) continue;
      float v[kRun];
      // Loads stay inside the row: load_run stops at row0 + n_inner.
      const int count = load_run<DT>(a.x, row0 + i, row0 + a.n_inner, vec, v);
      const uint64_t b = fold_run(v, count, row0 + i, hi, nlo);
      if (b < bad) bad = b;
    }
    report_bad(a.bad_index, bad);
    for (int off = 16; off > 0; off >>= 1) {
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
      nlo = fmaxf(nlo, __shfl_xor_sync(0xffffffffu, nlo, off));
    }
    if (lane == 0) {
      red_hi[warp] = hi;
      red_nlo[warp] = nlo;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kThreads / 32; ++w) {
        hi = fmaxf(hi, red_hi[w]);
        nlo = fmaxf(nlo, red_nlo[w]);
      }
      const int64_t ch = row % a.n_channels;
      atomicMax(&a.stats[2 * ch], f32_bits(positive_zero(hi)));
      atomicMax(&a.stats[2 * ch + 1], f32_bits(positive_zero(nlo)));
    }
    __syncthreads();
  }
}

// Per-channel stats over short rows (n_inner < 256): x as a matrix (n_outer, n_channels * n_inner);
// a thread owns one column over a slab of up to 256 rows (coalesced across the warp), then raises
// its channel's stats with atomicMax.
template <int DT>
__global__ void __launch_bounds__(kThreads) quant_stats_cols_kernel(const QuantKernelArgs a, int64_t rows_per_slab) {
  const int64_t width = a.n_channels * a.n_inner;
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= width) return;
  const int64_t ch = col / a.n_inner;
  for (int64_t o0 = int64_t(blockIdx.y) * rows_per_slab; o0 < a.n_outer; o0 += int64_t(gridDim.y) * rows_per_slab) {
    const int64_t o1 = o0 + rows_per_slab < a.n_outer ? o0 + rows_per_slab : a.n_outer;
    float hi = 0.0f, nlo = 0.0f;
    uint64_t bad = kNoBadIndex;
    for (int64_t o = o0; o < o1; ++o) {
      const float x = load_as_f32(a.x, DT, o * width + col);
      if (!is_finite_bits(x)) {
        if (bad == kNoBadIndex) bad = uint64_t(o * width + col);
        continue;
      }
      hi = fmaxf(hi, x);
      nlo = fmaxf(nlo, -x);
    }
    report_bad(a.bad_index, bad);
    atomicMax(&a.stats[2 * ch], f32_bits(positive_zero(hi)));
    atomicMax(&a.stats[2 * ch + 1], f32_bits(positive_zero(nlo)));
  }
}

// One thread per group: stats -> scale (and zero point).
__global__ void quant_finalize_kernel(const QuantKernelArgs a, int64_t n_groups) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_groups) return;
  float s;
  int32_t zp;
  group_params(a.fmt, bits_f32(a.stats[2 * g]), bits_f32(a.stats[2 * g + 1]), &s, &zp);
  a.scale[g] = s;
  if (a.zero_point != nullptr) a.zero_point[g] = zp;
}

// Per-tensor / per-channel codes, once the scales exist: grid-stride over runs of 8 elements.
template <int DT>
__global__ void __launch_bounds__(kThreads) quant_codes_kernel(const QuantKernelArgs a) {
  const int64_t n_runs = (a.n + kRun - 1) / kRun;
  for (int64_t run = int64_t(blockIdx.x) * kThreads + threadIdx.x; run < n_runs;
       run += int64_t(gridDim.x) * kThreads) {
    const int64_t start = run * kRun;
    float v[kRun];
    const int count = load_run<DT>(a.x, start, a.n, a.x_vec, v);
    quantize_run(a, start, count, v, GroupWalker(start, a.n_channels, a.n_inner), a.scale, a.zero_point);
  }
}

struct DequantKernelArgs {
  const uint8_t* data;
  const float* scale;
  const int32_t* zero_point;
  void* out;
  int64_t n, n_channels, n_inner;
  int fmt, out_dtype;
};

// Contract: out[i] = dequantize_code(code[i], scale[g], zp[g]) rounded once to out_dtype, for runs
// of 8 elements per thread (codes read as 8 bytes, int4 as 4; outputs stored as 32 / 16 bytes when
// aligned), grid-stride.
__global__ void __launch_bounds__(kThreads) dequant_kernel(const DequantKernelArgs a) {
  const int64_t n_runs = (a.n + kRun - 1) / kRun;
  for (int64_t run = int64_t(blockIdx.x) * kThreads + threadIdx.x; run < n_runs;
       run += int64_t(gridDim.x) * kThreads) {
    const int64_t start = run * kRun;
    const int count = a.n - start >= kRun ? kRun : int(a.n - start);
    uint32_t codes[kRun];
    if (a.fmt == LP_QFMT_INT4) {
      const uint8_t* src = a.data + start / 2;
      uint32_t word = 0;
      if (count == kRun && (reinterpret_cast<uintptr_t>(src) & 3u) == 0) {
        word = *reinterpret_cast<const uint32_t*>(src);
      } else {
#pragma unroll
        for (int b = 0; b < kRun / 2; ++b)
          if (2 * b < count) word |= uint32_t(src[b]) << (8 * b);
      }
#pragma unroll
      for (int j = 0; j < kRun; ++j) codes[j] = (word >> (4 * j)) & 0xfu;
    } else {
      const uint8_t* src = a.data + start;
      if (count == kRun && (reinterpret_cast<uintptr_t>(src) & 7u) == 0) {
        const uint2 w = *reinterpret_cast<const uint2*>(src);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          codes[j] = (w.x >> (8 * j)) & 0xffu;
          codes[j + 4] = (w.y >> (8 * j)) & 0xffu;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kRun; ++j) codes[j] = j < count ? src[j] : 0u;
      }
    }
    float v[kRun];
    GroupWalker w(start, a.n_channels, a.n_inner);
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      v[j] = 0.0f;
      if (j < count) {
        v[j] = dequantize_code(a.fmt, codes[j], a.scale[w.group], a.zero_point != nullptr ? a.zero_point[w.group] : 0);
        w.next();
      }
    }
    if (a.out_dtype == LP_DTYPE_F32) {
      float* dst = static_cast<float*>(a.out) + start;
      if (count == kRun && (reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
        reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
#pragma unroll
        for (int j = 0; j < kRun; ++j)
          if (j < count) dst[j] = v[j];
      }
    } else {
      uint16_t* dst = static_cast<uint16_t*>(a.out) + start;
      uint32_t h[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j) h[j] = store_bits_of(v[j], a.out_dtype);
      if (count == kRun && (reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16,
                                                    h[6] | h[7] << 16);
      } else {
#pragma unroll
        for (int j = 0; j < kRun; ++j)
          if (j < count) dst[j] = uint16_t(h[j]);
      }
    }
  }
}

// ---- launchers ----

unsigned grid_for(int64_t items, int64_t per_cta) {
  const int64_t g = (items + per_cta - 1) / per_cta;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(g, int64_t(INT32_MAX))));
}

void check_quant_args(int fmt, int in_dtype, int64_t n_outer, int64_t n_channels, int64_t n_inner, int64_t block_size) {
  if (fmt < LP_QFMT_INT8 || fmt > LP_QFMT_FP8_E5M2)
    throw std::invalid_argument("lepton_core CUDA quantize: unknown format code " + std::to_string(fmt));
  if (in_dtype != LP_DTYPE_F32 && in_dtype != LP_DTYPE_F16 && in_dtype != LP_DTYPE_BF16)
    throw std::invalid_argument("lepton_core CUDA quantize: input must be float32, float16 or bfloat16");
  if (n_outer < 0 || n_channels < 0 || n_inner < 0)
    throw std::invalid_argument("lepton_core CUDA quantize: negative size");
  if (block_size != 0) {
    if (block_size < 32 || block_size > kTile || (block_size & (block_size - 1)) != 0)
      throw std::invalid_argument("lepton_core CUDA quantize: block_size must be a power of two in 32..4096");
    if (n_outer != 1 || n_channels != 1)
      throw std::invalid_argument("lepton_core CUDA quantize: blockwise takes (1, 1, n) layouts");
  }
}

// Blockwise runs through the channel walker as (1, ceil(n / B), B).
void group_layout(int64_t n_outer, int64_t n_channels, int64_t n_inner, int64_t block_size, int64_t* n_groups,
                  int64_t* walk_channels, int64_t* walk_inner) {
  const int64_t n = n_outer * n_channels * n_inner;
  if (block_size != 0) {
    *n_groups = (n + block_size - 1) / block_size;
    *walk_channels = std::max<int64_t>(*n_groups, 1);
    *walk_inner = block_size;
  } else {
    *n_groups = n_channels;
    *walk_channels = std::max<int64_t>(n_channels, 1);
    *walk_inner = std::max<int64_t>(n_inner, 1);
  }
}

template <int DT>
void launch_quantize(const QuantArgs& q, QuantKernelArgs& a, cudaStream_t s) {
  if (q.block_size != 0) {
    int shift = 0;
    while ((int64_t(1) << shift) < q.block_size) ++shift;
    quant_blockwise_kernel<DT><<<grid_for(a.n, kTile), kThreads, 0, s>>>(a, shift);
    check_launch("quant_blockwise_kernel");
    return;
  }
  if (q.n_inner >= 256 || (q.n_outer == 1 && q.n_channels == 1)) {
    constexpr int64_t kChunk = 4 * kThreads * kRun;
    const int64_t items = q.n_outer * q.n_channels * ((q.n_inner + kChunk - 1) / kChunk);
    quant_stats_rows_kernel<DT><<<grid_for(items, 1), kThreads, 0, s>>>(a);
    check_launch("quant_stats_rows_kernel");
  } else {
    const int64_t width = q.n_channels * q.n_inner;
    const int64_t rows_per_slab = 256;
    const dim3 grid(grid_for(width, kThreads),
                    unsigned(std::min<int64_t>((q.n_outer + rows_per_slab - 1) / rows_per_slab, 65535)));
    quant_stats_cols_kernel<DT><<<grid, kThreads, 0, s>>>(a, rows_per_slab);
    check_launch("quant_stats_cols_kernel");
  }
  quant_finalize_kernel<<<grid_for(q.n_channels, kThreads), kThreads, 0, s>>>(a, q.n_channels);
  check_launch("quant_finalize_kernel");
  quant_codes_kernel<DT><<<grid_for((a.n + kRun - 1) / kRun, kThreads), kThreads, 0, s>>>(a);
  check_launch("quant_codes_kernel");
}

}  // namespace

void quantize(const QuantArgs& q) {
  check_quant_args(q.format, q.in_dtype, q.n_outer, q.n_channels, q.n_inner, q.block_size);
  const int64_t n = q.n_outer * q.n_channels * q.n_inner;
  if (n == 0) return;
  if (q.format == LP_QFMT_UINT8 && q.zero_point == 0)
    throw std::invalid_argument("lepton_core CUDA quantize: uint8 needs a zero_point buffer");
  if (q.x == 0 || q.data == 0 || q.scale == 0 || q.bad_index == 0 || (q.block_size == 0 && q.stats == 0))
    throw std::invalid_argument("lepton_core CUDA quantize: null buffer pointer");
  int64_t n_groups, walk_channels, walk_inner;
  group_layout(q.n_outer, q.n_channels, q.n_inner, q.block_size, &n_groups, &walk_channels, &walk_inner);
  DeviceGuard guard(q.device);
  QuantKernelArgs a{};
  a.x = reinterpret_cast<const void*>(q.x);
  a.data = reinterpret_cast<uint8_t*>(q.data);
  a.scale = reinterpret_cast<float*>(q.scale);
  a.zero_point = q.format == LP_QFMT_UINT8 ? reinterpret_cast<int32_t*>(q.zero_point) : nullptr;
  a.stats = reinterpret_cast<uint32_t*>(q.stats);
  a.bad_index = reinterpret_cast<unsigned long long*>(q.bad_index);
  a.n = n;
  a.n_outer = q.n_outer;
  a.n_channels = q.block_size != 0 ? walk_channels : q.n_channels;
  a.n_inner = q.block_size != 0 ? walk_inner : q.n_inner;
  a.fmt = q.format;
  a.stochastic = q.stochastic;
  a.key = rng_key(q.seed);
  a.x_vec = q.x % 16 == 0;
  const cudaStream_t s = as_stream(q.stream);
  if (q.in_dtype == LP_DTYPE_F32) launch_quantize<LP_DTYPE_F32>(q, a, s);
  else if (q.in_dtype == LP_DTYPE_F16) launch_quantize<LP_DTYPE_F16>(q, a, s);
  else launch_quantize<LP_DTYPE_BF16>(q, a, s);
}

void dequantize(const DequantArgs& d) {
  check_quant_args(d.format, LP_DTYPE_F32, d.n_outer, d.n_channels, d.n_inner, d.block_size);
  if (d.out_dtype != LP_DTYPE_F32 && d.out_dtype != LP_DTYPE_F16 && d.out_dtype != LP_DTYPE_BF16)
    throw std::invalid_argument("lepton_core CUDA dequantize: output must be float32, float16 or bfloat16");
  const int64_t n = d.n_outer * d.n_channels * d.n_inner;
  if (n == 0) return;
  if (d.data == 0 || d.scale == 0 || d.out == 0 || (d.format == LP_QFMT_UINT8 && d.zero_point == 0))
    throw std::invalid_argument("lepton_core CUDA dequantize: null buffer pointer");
  int64_t n_groups, walk_channels, walk_inner;
  group_layout(d.n_outer, d.n_channels, d.n_inner, d.block_size, &n_groups, &walk_channels, &walk_inner);
  DeviceGuard guard(d.device);
  DequantKernelArgs a{};
  a.data = reinterpret_cast<const uint8_t*>(d.data);
  a.scale = reinterpret_cast<const float*>(d.scale);
  a.zero_point = d.format == LP_QFMT_UINT8 ? reinterpret_cast<const int32_t*>(d.zero_point) : nullptr;
  a.out = reinterpret_cast<void*>(d.out);
  a.n = n;
  a.n_channels = walk_channels;
  a.n_inner = walk_inner;
  a.fmt = d.format;
  a.out_dtype = d.out_dtype;
  dequant_kernel<<<grid_for((n + kRun - 1) / kRun, kThreads), kThreads, 0, as_stream(d.stream)>>>(a);
  check_launch("dequant_kernel");
}

// ---- host twins (no GPU needed): the same arithmetic, serially ----

void host_quantize(const QuantArgs& q) {
  check_quant_args(q.format, q.in_dtype, q.n_outer, q.n_channels, q.n_inner, q.block_size);
  const int64_t n = q.n_outer * q.n_channels * q.n_inner;
  int64_t n_groups, walk_channels, walk_inner;
  group_layout(q.n_outer, q.n_channels, q.n_inner, q.block_size, &n_groups, &walk_channels, &walk_inner);
  const void* x = reinterpret_cast<const void*>(q.x);
  std::vector<float> hi(size_t(n_groups), 0.0f), nlo(size_t(n_groups), 0.0f);
  int64_t bad = INT64_MAX;
  GroupWalker w(0, walk_channels, walk_inner);
  for (int64_t i = 0; i < n; ++i, w.next()) {
    const float v = load_as_f32(x, q.in_dtype, i);
    if (!is_finite_bits(v)) {
      if (bad == INT64_MAX) bad = i;
      continue;
    }
    hi[size_t(w.group)] = std::fmax(hi[size_t(w.group)], v);
    nlo[size_t(w.group)] = std::fmax(nlo[size_t(w.group)], -v);
  }
  *reinterpret_cast<int64_t*>(q.bad_index) = bad;
  float* scale = reinterpret_cast<float*>(q.scale);
  int32_t* zp = q.format == LP_QFMT_UINT8 ? reinterpret_cast<int32_t*>(q.zero_point) : nullptr;
  for (int64_t g = 0; g < n_groups; ++g) {
    int32_t z;
    group_params(q.format, hi[size_t(g)], nlo[size_t(g)], &scale[g], &z);
    if (zp != nullptr) zp[g] = z;
  }
  uint8_t* data = reinterpret_cast<uint8_t*>(q.data);
  if (q.format == LP_QFMT_INT4) std::fill(data, data + (n + 1) / 2, uint8_t(0));
  const uint32_t key = rng_key(q.seed);
  GroupWalker wq(0, walk_channels, walk_inner);
  for (int64_t i = 0; i < n; ++i, wq.next()) {
    const float u = q.stochastic ? rng_uniform_bits(key, rng_key_hi(key, uint64_t(i)), uint32_t(uint64_t(i))) : 0.0f;
    const uint32_t c = quantize_code(q.format, load_as_f32(x, q.in_dtype, i), scale[wq.group],
                                     zp != nullptr ? zp[wq.group] : 0, q.stochastic, u);
    if (q.format == LP_QFMT_INT4) data[i / 2] = uint8_t(data[i / 2] | (c << (4 * (i & 1))));
    else data[i] = uint8_t(c);
  }
}

void host_dequantize(const DequantArgs& d) {
  check_quant_args(d.format, LP_DTYPE_F32, d.n_outer, d.n_channels, d.n_inner, d.block_size);
  const int64_t n = d.n_outer * d.n_channels * d.n_inner;
  int64_t n_groups, walk_channels, walk_inner;
  group_layout(d.n_outer, d.n_channels, d.n_inner, d.block_size, &n_groups, &walk_channels, &walk_inner);
  const uint8_t* data = reinterpret_cast<const uint8_t*>(d.data);
  const float* scale = reinterpret_cast<const float*>(d.scale);
  const int32_t* zp = d.format == LP_QFMT_UINT8 ? reinterpret_cast<const int32_t*>(d.zero_point) : nullptr;
  GroupWalker w(0, walk_channels, walk_inner);
  for (int64_t i = 0; i < n; ++i, w.next()) {
    const uint32_t code = d.format == LP_QFMT_INT4 ? (data[i / 2] >> (4 * (i & 1))) & 0xfu : data[i];
    const float v = dequantize_code(d.format, code, scale[w.group], zp != nullptr ? zp[w.group] : 0);
    if (d.out_dtype == LP_DTYPE_F32) reinterpret_cast<float*>(d.out)[i] = v;
    else reinterpret_cast<uint16_t*>(d.out)[i] = uint16_t(store_bits_of(v, d.out_dtype));
  }
}

std::string host_selftest(int64_t n_samples) {
  // Bit patterns: every 16-bit pattern (as f16 / bf16 inputs and as the high half of a float32),
  // then a multiplicative walk over all 2^32 float32 patterns, plus the edges of each format.
  auto mismatch = [](const char* what, uint32_t in, uint32_t got, uint32_t want) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s(0x%08x): port gives 0x%x, dtypes.h gives 0x%x", what, in, got, want);
    return std::string(buf);
  };
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = f16_to_f32(uint16_t(h)), b = lp::f16_to_f32(uint16_t(h));
    if (f32_bits(a) != f32_bits(b)) return mismatch("f16_to_f32", h, f32_bits(a), f32_bits(b));
    const float c = bf16_to_f32(uint16_t(h)), d = lp::bf16_to_f32(uint16_t(h));
    if (f32_bits(c) != f32_bits(d)) return mismatch("bf16_to_f32", h, f32_bits(c), f32_bits(d));
  }
  for (uint32_t b = 0; b < 256; ++b) {
    const float a = fp8_e4m3_to_f32(uint8_t(b)), c = lp::fp8_e4m3_to_f32(uint8_t(b));
    if (f32_bits(a) != f32_bits(c)) return mismatch("fp8_e4m3_to_f32", b, f32_bits(a), f32_bits(c));
    const float e = fp8_e5m2_to_f32(uint8_t(b)), f = lp::fp8_e5m2_to_f32(uint8_t(b));
    if (f32_bits(e) != f32_bits(f)) return mismatch("fp8_e5m2_to_f32", b, f32_bits(e), f32_bits(f));
  }
  std::vector<uint32_t> patterns;
  for (uint32_t h = 0; h < 65536; ++h) {
    patterns.push_back(h << 16);
    patterns.push_back((h << 16) | 0x8000u);  // exact ties for bf16
    patterns.push_back((h << 16) | 0x7fffu);
    patterns.push_back((h << 16) | 0x8001u);
    patterns.push_back((h << 16) | 0x1000u);  // ties and neighbours for f16 (13 dropped bits)
    patterns.push_back((h << 16) | 0x0fffu);
  }
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int64_t i = 0; i < n_samples; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    patterns.push_back(uint32_t(x >> 32));
  }
  for (const uint32_t u : patterns) {
    const float f = bits_f32(u);
    if (f32_to_bf16(f) != lp::f32_to_bf16(f)) return mismatch("f32_to_bf16", u, f32_to_bf16(f), lp::f32_to_bf16(f));
    if (f32_to_f16(f) != lp::f32_to_f16(f)) return mismatch("f32_to_f16", u, f32_to_f16(f), lp::f32_to_f16(f));
    if (f32_to_fp8_e4m3(f) != lp::f32_to_fp8_e4m3(f))
      return mismatch("f32_to_fp8_e4m3", u, f32_to_fp8_e4m3(f), lp::f32_to_fp8_e4m3(f));
    if (f32_to_fp8_e5m2(f) != lp::f32_to_fp8_e5m2(f))
      return mismatch("f32_to_fp8_e5m2", u, f32_to_fp8_e5m2(f), lp::f32_to_fp8_e5m2(f));
  }
  return "";
}

}  // namespace cuda
}  // namespace lp
