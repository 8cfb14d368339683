// Weight-quantized linear on the GPU (API.md §5, schemes "w8" and "w4"): out = x W^T + bias with W in
// the packed layout of csrc/cpu/qlinear/qlinear.h (the same buffers as the CPU, so model.to("cuda")
// just moves them). Activations f32 / f16 / bf16 of any element strides, float32 accumulation, output
// rounded once to out_dtype. The weight is dequantized in registers; no float copy of it exists.
//
// One kernel for every M: a CTA owns one 32-column output panel, up to kRowTileMax rows at a time, and
// a range of K (a split). Its 256 threads stream the panel's codes with 16-byte loads: thread t reads
// the 16 columns (t & 1) * 16.. of k row (t >> 1) + 128 j (w4: of nibble-pair row, i.e. k = 2 row and
// 2 row + 1), so a warp reads 512 contiguous bytes, and 4 loads are in flight before their FMAs.
// Each thread keeps rows x 16 float32 sums; the block reduces them in a fixed order (warp shuffles
// with fixed partners, then warps in index order through shared memory), so the result depends only
// on the shapes and the plan (qlinear_plan), never on scheduling: no atomics. Many-row (prefill)
// shapes run the same FMA kernel, 8 rows x 16 columns per thread (no tensor cores), the weight panel
// re-read from L2 once per 8 rows.
//
// Math per element (float32):
//   w8: partial = scale[j] * sum_k x[i][k] * q[j][k]                 (as the CPU kernels)
//   w4: partial = sum_k x[i][k] * ((q[j][k] - zero[g][j]) * scale[g][j])  (the weight term is exactly
//       dequantize_weight()'s float32 value; the CPU sums per group and subtracts zero * sum(x): the
//       same exact products in another float32 order, API.md §1's tolerance)
// With one split the CTA adds the bias and stores; with S splits (decode shapes: too few panels to
// fill the GPU) each split writes its partial to a float32 workspace (S, m, n) and qlinear_reduce_kernel
// sums the S partials in split order, adds the bias and stores.
#include "api.h"
#include "common.cuh"

#include <algorithm>
#include <climits>
#include <stdexcept>

#include <cuda_fp16.h>

namespace lp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kHalves = 2;                     // a thread covers 16 of the panel's 32 columns
constexpr int kKLanes = kThreads / kHalves;    // k rows a block covers per step
constexpr int kUnroll = 4;                     // 16-byte loads in flight per thread
constexpr int kWarps = kThreads / 32;
constexpr int kRowTileMax = 8;                 // rows per pass (8 x 16 float32 sums per thread)
// Decode shapes get split along K until about this many CTAs run (a fixed number: the plan, and
// so the summation order, depends only on the shapes).
constexpr int64_t kTargetCtas = 512;

struct QLinearParams {
  int64_t m, n, k, n_groups, group_size;
  const void* x;
  int64_t x_row, x_col;
  const uint8_t* codes;
  const float* scale;
  const uint8_t* zero;
  const float* bias;
  void* out;
  int out_dtype;
  float* ws;          // (splits, m, n) partials, or null with one split
  int64_t k_chunk;    // k values per split (a multiple of the k step and of group_size)
};

template <int DT> __device__ __forceinline__ float load_x(const void* x, int64_t idx) {
  if constexpr (DT == LP_DTYPE_F32) return __ldg(static_cast<const float*>(x) + idx);
  else if constexpr (DT == LP_DTYPE_BF16) return bf16_to_f32(__ldg(static_cast<const unsigned short*>(x) + idx));
  else return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(x) + idx)));
}

__device__ __forceinline__ int8_t byte_s8(const uint4& w, int c) {
  const uint32_t word = c < 4 ? w.x : c < 8 ? w.y : c < 12 ? w.z : w.w;
  return int8_t(uint8_t(word >> (8 * (c & 3))));
}
__device__ __forceinline__ uint32_t byte_u8(const uint4& w, int c) {
  const uint32_t word = c < 4 ? w.x : c < 8 ? w.y : c < 12 ? w.z : w.w;
  return (word >> (8 * (c & 3))) & 0xffu;
}

// The 16-byte halves `half` of packed rows rb, rb + kKLanes, ... (kUnroll of them; zero from r_end on),
// every load issued before any is used.
__device__ __forceinline__ void load_panel_rows(const uint8_t* panel, int64_t rb, int64_t r_end, int half,
                                                uint4 (&w)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t rr = rb + int64_t(u) * kKLanes;
    w[u] = rr < r_end ? __ldg(reinterpret_cast<const uint4*>(panel + rr * 32 + half * 16)) : make_uint4(0, 0, 0, 0);
  }
}

// w8: the sums of rows rows[0..R) over this thread's k rows of [k0, k1).
template <int DT, int R>
__device__ __forceinline__ void w8_accumulate(const QLinearParams& p, const uint8_t* panel, const int64_t (&xrow)[R],
                                              int64_t k0, int64_t k1, int lane_k, int half, float (&acc)[R][16]) {
  for (int64_t kb = k0 + lane_k; kb < k1; kb += int64_t(kKLanes) * kUnroll) {
    uint4 w[kUnroll];
    load_panel_rows(panel, kb, k1, half, w);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t kk = kb + int64_t(u) * kKLanes;
      if (kk < k1) {
        float xv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) xv[r] = load_x<DT>(p.x, xrow[r] + kk * p.x_col);
#pragma unroll
        for (int c = 0; c < 16; ++c) {
          const float wf = float(byte_s8(w[u], c));
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][c] = fmaf(xv[r], wf, acc[r][c]);
        }
      }
    }
  }
}

// w4: the same over nibble-pair rows [k0 / 2, ceil(k1 / 2)); k values >= p.k (the odd K's padding
// nibble) read x as 0, so their (0 - zero) * scale weight adds nothing.
template <int DT, int R>
__device__ __forceinline__ void w4_accumulate(const QLinearParams& p, const uint8_t* panel, const float* pscale,
                                              const uint8_t* pzero, const int64_t (&xrow)[R], int64_t k0, int64_t k1,
                                              int lane_k, int half, float (&acc)[R][16]) {
  const int64_t r0 = k0 / 2, r1 = (k1 + 1) / 2;
  for (int64_t rb = r0 + lane_k; rb < r1; rb += int64_t(kKLanes) * kUnroll) {
    uint4 w[kUnroll];
    load_panel_rows(panel, rb, r1, half, w);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = rb + int64_t(u) * kKLanes;
      if (rr < r1) {
        const int64_t kk = 2 * rr;
        const int64_t g = kk / p.group_size;  // group_size is even: k and k + 1 share the group
        const float4* s4 = reinterpret_cast<const float4*>(pscale + g * 32 + half * 16);
        const uint4 z16 = __ldg(reinterpret_cast<const uint4*>(pzero + g * 32 + half * 16));
        float xv0[R], xv1[R];
        const bool has_odd = kk + 1 < p.k;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          xv0[r] = load_x<DT>(p.x, xrow[r] + kk * p.x_col);
          xv1[r] = has_odd ? load_x<DT>(p.x, xrow[r] + (kk + 1) * p.x_col) : 0.0f;
        }
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) {
          const float4 s = __ldg(s4 + c4);
          const float sv[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = 4 * c4 + e;
            const uint32_t b = byte_u8(w[u], c);
            const float zf = float(byte_u8(z16, c));
            const float w_lo = (float(b & 15u) - zf) * sv[e];
            const float w_hi = (float(b >> 4) - zf) * sv[e];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][c] = fmaf(xv1[r], w_hi, fmaf(xv0[r], w_lo, acc[r][c]));
          }
        }
      }
    }
  }
}

// grid: (panels, row-tile slots, splits). R rows per pass; rows past m repeat row m - 1 (computed,
// never stored) so the inner loops have no row checks.
template <int SCHEME, int DT, int R>
__global__ void __launch_bounds__(kThreads) qlinear_kernel(const QLinearParams p) {
  __shared__ float red[kWarps][R][32];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int half = t & 1, lane_k = t >> 1;
  const int64_t panel_idx = blockIdx.x;
  const int64_t k0 = int64_t(blockIdx.z) * p.k_chunk, k1 = k0 + p.k_chunk < p.k ? k0 + p.k_chunk : p.k;
  const uint8_t* panel;
  const float* pscale = nullptr;
  const uint8_t* pzero = nullptr;
  if constexpr (SCHEME == LP_QLINEAR_W8) {
    panel = p.codes + panel_idx * p.k * 32;
  } else {
    panel = p.codes + panel_idx * ((p.k + 1) / 2) * 32;
    pscale = p.scale + panel_idx * p.n_groups * 32;
    pzero = p.zero + panel_idx * p.n_groups * 32;
  }
  for (int64_t i0 = int64_t(blockIdx.y) * R; i0 < p.m; i0 += int64_t(gridDim.y) * R) {
    int64_t xrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) xrow[r] = (i0 + r < p.m ? i0 + r : p.m - 1) * p.x_row;
    float acc[R][16];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < 16; ++c) acc[r][c] = 0.0f;
    if constexpr (SCHEME == LP_QLINEAR_W8) w8_accumulate<DT, R>(p, panel, xrow, k0, k1, lane_k, half, acc);
    else w4_accumulate<DT, R>(p, panel, pscale, pzero, xrow, k0, k1, lane_k, half, acc);
    // Lanes of one parity hold the same columns: a fixed xor tree leaves the warp's sum in lanes 0 / 1.
#pragma unroll
    for (int off = 16; off >= 2; off >>= 1)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 16; ++c) acc[r][c] += __shfl_xor_sync(0xffffffffu, acc[r][c], off);
    if (lane < 2) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 16; ++c) red[warp][r][lane * 16 + c] = acc[r][c];
    }
    __syncthreads();
    if (t < R * 32) {
      const int r = t >> 5, col = t & 31;
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][r][col];
      const int64_t i = i0 + r, j = panel_idx * 32 + col;
      if (i < p.m && j < p.n) {
        if constexpr (SCHEME == LP_QLINEAR_W8) v = mul_rn(v, __ldg(p.scale + j));  // not fused with the bias
        if (p.ws) {
          p.ws[(int64_t(blockIdx.z) * p.m + i) * p.n + j] = v;
        } else {
          if (p.bias) v += __ldg(p.bias + j);
          store_f32_as(p.out, p.out_dtype, size_t(i * p.n + j), v);
        }
      }
    }
    __syncthreads();  // red is reused by the next row tile
  }
}

// out[i][j] = sum_s ws[s][i][j] (in split order) + bias[j], rounded once.
__global__ void __launch_bounds__(kThreads) qlinear_reduce_kernel(const float* __restrict__ ws, int64_t splits,
                                                                  int64_t mn, int64_t n, const float* __restrict__ bias,
                                                                  void* out, int out_dtype) {
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < mn; idx += int64_t(gridDim.x) * kThreads) {
    float v = 0.0f;
    for (int64_t s = 0; s < splits; ++s) v += ws[s * mn + idx];
    if (bias) v += bias[idx % n];
    store_f32_as(out, out_dtype, size_t(idx), v);
  }
}

int row_tile(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : kRowTileMax; }

template <int SCHEME, int DT, int R>
void launch_rows(const QLinearParams& p, dim3 grid, cudaStream_t s) {
  qlinear_kernel<SCHEME, DT, R><<<grid, kThreads, 0, s>>>(p);
  check_launch("qlinear_kernel");
}

template <int SCHEME, int DT>
void launch_dtype(const QLinearParams& p, int rows, dim3 grid, cudaStream_t s) {
  switch (rows) {
    case 1: launch_rows<SCHEME, DT, 1>(p, grid, s); break;
    case 2: launch_rows<SCHEME, DT, 2>(p, grid, s); break;
    case 4: launch_rows<SCHEME, DT, 4>(p, grid, s); break;
    default: launch_rows<SCHEME, DT, kRowTileMax>(p, grid, s); break;
  }
}

template <int SCHEME>
void launch_scheme(const QLinearParams& p, int x_dtype, int rows, dim3 grid, cudaStream_t s) {
  if (x_dtype == LP_DTYPE_F32) launch_dtype<SCHEME, LP_DTYPE_F32>(p, rows, grid, s);
  else if (x_dtype == LP_DTYPE_F16) launch_dtype<SCHEME, LP_DTYPE_F16>(p, rows, grid, s);
  else launch_dtype<SCHEME, LP_DTYPE_BF16>(p, rows, grid, s);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

QLinearPlan qlinear_plan(int scheme, int64_t m, int64_t n, int64_t k, int64_t group_size) {
  QLinearPlan plan;
  // A split covers whole unrolled steps (and, for w4, whole groups).
  const int64_t unit = scheme == LP_QLINEAR_W4 ? std::max<int64_t>(group_size, 2 * kKLanes * kUnroll)
                                               : int64_t(kKLanes) * kUnroll;
  plan.k_chunk = std::max<int64_t>(k, 1);
  plan.splits = 1;
  const int64_t ctas = ceil_div(n, 32) * ceil_div(m, row_tile(m));
  if (m <= 2 * kRowTileMax && ctas < kTargetCtas && k > unit) {
    const int64_t want = std::min(ceil_div(kTargetCtas, ctas), ceil_div(k, unit));
    plan.k_chunk = ceil_div(ceil_div(k, want), unit) * unit;
    plan.splits = ceil_div(k, plan.k_chunk);
  }
  return plan;
}

void qlinear(const QLinearGpuArgs& a) {
  if (a.scheme != LP_QLINEAR_W8 && a.scheme != LP_QLINEAR_W4)
    throw std::invalid_argument("lepton_core CUDA qlinear: scheme must be w8 or w4");
  if (a.x_dtype != LP_DTYPE_F32 && a.x_dtype != LP_DTYPE_F16 && a.x_dtype != LP_DTYPE_BF16)
    throw std::invalid_argument("lepton_core CUDA qlinear: activations must be float32, float16 or bfloat16");
  if (a.out_dtype != LP_DTYPE_F32 && a.out_dtype != LP_DTYPE_F16 && a.out_dtype != LP_DTYPE_BF16)
    throw std::invalid_argument("lepton_core CUDA qlinear: output must be float32, float16 or bfloat16");
  if (a.m < 0 || a.n < 0 || a.k < 0 || a.x_row < 0 || a.x_col < 0)
    throw std::invalid_argument("lepton_core CUDA qlinear: negative size or stride");
  if (a.scheme == LP_QLINEAR_W4 &&
      (a.group_size < kQLinearMinGroup || a.group_size > kQLinearMaxGroup || (a.group_size & (a.group_size - 1))))
    throw std::invalid_argument("lepton_core CUDA qlinear: group_size must be a power of two in 32..1024");
  if (a.m == 0 || a.n == 0) return;
  const QLinearPlan plan = qlinear_plan(a.scheme, a.m, a.n, a.k, a.group_size);
  if (plan.splits != a.splits)
    throw std::invalid_argument("lepton_core CUDA qlinear: splits does not match qlinear_plan");
  if (a.out == 0 || (a.k > 0 && (a.x == 0 || a.codes == 0 || a.scale == 0)) ||
      (a.scheme == LP_QLINEAR_W4 && a.k > 0 && a.zero == 0) || (plan.splits > 1 && a.ws == 0))
    throw std::invalid_argument("lepton_core CUDA qlinear: null buffer pointer");
  if (a.codes % 16 || (a.scheme == LP_QLINEAR_W4 && (a.scale % 16 || a.zero % 16)))
    throw std::invalid_argument("lepton_core CUDA qlinear: codes, scale and zero must be 16-byte aligned");
  DeviceGuard guard(a.device);
  QLinearParams p{};
  p.m = a.m, p.n = a.n, p.k = a.k;
  p.group_size = a.scheme == LP_QLINEAR_W4 ? a.group_size : 1;
  p.n_groups = a.scheme == LP_QLINEAR_W4 ? ceil_div(a.k, a.group_size) : 0;
  p.x = reinterpret_cast<const void*>(a.x);
  p.x_row = a.x_row, p.x_col = a.x_col;
  p.codes = reinterpret_cast<const uint8_t*>(a.codes);
  p.scale = reinterpret_cast<const float*>(a.scale);
  p.zero = reinterpret_cast<const uint8_t*>(a.zero);
  p.bias = reinterpret_cast<const float*>(a.bias);
  p.out = reinterpret_cast<void*>(a.out);
  p.out_dtype = a.out_dtype;
  p.ws = plan.splits > 1 ? reinterpret_cast<float*>(a.ws) : nullptr;
  p.k_chunk = plan.k_chunk;
  const int rows = row_tile(a.m);
  const dim3 grid(unsigned(ceil_div(a.n, 32)), unsigned(std::min<int64_t>(ceil_div(a.m, rows), 65535)),
                  unsigned(plan.splits));
  if (ceil_div(a.n, 32) > INT_MAX || plan.splits > 65535)
    throw std::invalid_argument("lepton_core CUDA qlinear: too many output columns or splits for one launch");
  const cudaStream_t s = as_stream(a.stream);
  if (a.scheme == LP_QLINEAR_W8) launch_scheme<LP_QLINEAR_W8>(p, a.x_dtype, rows, grid, s);
  else launch_scheme<LP_QLINEAR_W4>(p, a.x_dtype, rows, grid, s);
  if (plan.splits > 1) {
    const int64_t mn = a.m * a.n;
    const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(mn, kThreads), 65535));
    qlinear_reduce_kernel<<<blocks, kThreads, 0, s>>>(p.ws, plan.splits, mn, a.n, p.bias, p.out, p.out_dtype);
    check_launch("qlinear_reduce_kernel");
  }
}

}  // namespace cuda
}  // namespace lp
