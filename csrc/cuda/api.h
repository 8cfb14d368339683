// Host entry points of the CUDA kernels, called by module.cc (plain C++: no CUDA types here).
//
// Conventions: pointers are device addresses passed as integers; sizes and strides are in elements
// unless the name says bytes; `stream` is a cudaStream_t as an integer (torch's current stream);
// `device` is the CUDA device index the tensors live on. Every launch is asynchronous on `stream`;
// launch errors throw std::runtime_error, violated preconditions std::invalid_argument.
#pragma once
#include <cstdint>
#include <string>
#include <utility>

#include "common/codes.h"

namespace lp {
namespace cuda {

// ---- runtime ----
// (number of devices, "" or the CUDA runtime's error text when there is none).
std::pair<int, std::string> device_count();
// "" when `device` can run this module's kernels, else a sentence saying why not.
std::string device_check(int device);
std::string device_name(int device);
// cudaDriverGetVersion / cudaRuntimeGetVersion (1000 * major + 10 * minor; driver 0 when none).
int driver_version();
int runtime_version();
// The LEPTON_CUDA_ARCHS this module was compiled for.
const char* built_archs();

// ---- GEMM (gemm_sm80.cu) ----
// out[z, m, n] = sum_k A[z, m, k] * B[z, k, n], accumulated in float32 (int32 for int8), then
// epilogue: float path `acc (+ bias[n])`, scaled path `(float(acc) * scale_a[m]) * scale_b[n]
// (+ bias[n])`, each rounded once to out_dtype; plain int8 path stores the int32 sum.
// Layouts: A K-major (a[z*a_batch + m*lda + k]); B K-major (b[z*b_batch + n*ldb + k]) or, for
// 16-bit and float32 inputs, N-major (b[z*b_batch + k*ldb + n]); out contiguous (batch, M, N).
// Tensor-core paths (f16/bf16/int8) need a, b 16-byte aligned and lda, ldb, batch strides a
// multiple of 16 bytes (pack_rows makes such copies).
struct GemmArgs {
  int device = 0;
  uintptr_t stream = 0;
  int in_dtype = 0;   // lp_dtype: F32, F16, BF16 or I8
  int out_dtype = 0;  // F32, F16, BF16 (I32 for plain int8)
  int64_t batch = 1, m = 0, n = 0, k = 0;
  uintptr_t a = 0, b = 0, out = 0;
  int64_t a_batch_stride = 0, lda = 0;
  int64_t b_batch_stride = 0, ldb = 0;
  bool b_k_major = true;
  uintptr_t bias = 0;     // float32 (n,) or 0
  uintptr_t scale_a = 0;  // float32, (m,) or (1,), or 0 when not scaled
  int64_t scale_a_n = 0;
  uintptr_t scale_b = 0;  // float32, (n,) or (1,)
  int64_t scale_b_n = 0;
};
void gemm(const GemmArgs& args);
// Name of the kernel configuration gemm() would pick (for tests and benchmarks).
std::string gemm_config(const GemmArgs& args);

// dst[(z * rows + r) * dst_ld + c] = src[z * src_batch + r * src_row + c * src_col] for c < cols,
// and 0 for cols <= c < dst_ld. elem_bytes is 1, 2 or 4.
void pack_rows(int device, uintptr_t stream, int elem_bytes, int64_t batch, int64_t rows, int64_t cols,
               uintptr_t src, int64_t src_batch_stride, int64_t src_row_stride, int64_t src_col_stride,
               uintptr_t dst, int64_t dst_ld);

// ---- quantization (quant.cu) ----
// Formats are lp_qfmt codes (common/codes.h).

// x: contiguous (n_outer, n_channels, n_inner) of in_dtype (F32/F16/BF16). block_size > 0 means
// blockwise over the flat index (then n_outer = n_channels = 1); otherwise one group per channel.
// Writes data (n bytes; int4 ceil(n/2)), scale (n_groups float32), zero_point (n_groups int32, uint8
// only). `stats` is device scratch of 2 * n_groups uint32 set to 0 and `bad_index` one int64 set to
// INT64_MAX before the call; afterwards bad_index holds the first flat index of a NaN/Inf in x, or
// stays INT64_MAX.
struct QuantArgs {
  int device = 0;
  uintptr_t stream = 0;
  int in_dtype = 0;
  int format = 0;
  int64_t n_outer = 1, n_channels = 1, n_inner = 0, block_size = 0;
  bool stochastic = false;
  uint64_t seed = 0;
  uintptr_t x = 0, data = 0, scale = 0, zero_point = 0, stats = 0, bad_index = 0;
};
void quantize(const QuantArgs& args);

// out (contiguous, out_dtype F32/F16/BF16) = dequantized codes, computed in float32, rounded once.
struct DequantArgs {
  int device = 0;
  uintptr_t stream = 0;
  int format = 0;
  int64_t n_outer = 1, n_channels = 1, n_inner = 0, block_size = 0;
  uintptr_t data = 0, scale = 0, zero_point = 0, out = 0;
  int out_dtype = 0;
};
void dequantize(const DequantArgs& args);

// ---- weight-quantized linear (qlinear.cu) ----
// out (m, n) contiguous, out_dtype F32/F16/BF16 = x (m, k) (F32/F16/BF16, element strides x_row,
// x_col) times the packed w8 / w4 weight of csrc/cpu/qlinear/qlinear.h (codes, scale, zero; 16-byte
// aligned) plus bias (float32 (n,) or 0), accumulated in float32 and rounded once. `splits` and a
// float32 workspace `ws` of splits * m * n elements (0 when splits == 1) come from qlinear_plan.
struct QLinearPlan {
  int64_t splits = 1;   // K ranges summed by a second kernel in a fixed order
  int64_t k_chunk = 1;  // k values per range
};
QLinearPlan qlinear_plan(int scheme, int64_t m, int64_t n, int64_t k, int64_t group_size);
struct QLinearGpuArgs {
  int device = 0;
  uintptr_t stream = 0;
  int scheme = LP_QLINEAR_W8;
  int64_t m = 0, n = 0, k = 0, group_size = 0;
  uintptr_t x = 0;
  int x_dtype = 0;
  int64_t x_row = 0, x_col = 0;
  uintptr_t codes = 0, scale = 0, zero = 0, bias = 0, out = 0, ws = 0;
  int out_dtype = 0;
  int64_t splits = 1;
};
void qlinear(const QLinearGpuArgs& args);

// Host twins of the kernels' arithmetic, on host memory, used by tests on machines without a GPU:
// the same __host__ __device__ functions the kernels call, run serially over the same indexing.
void host_quantize(const QuantArgs& args);
void host_dequantize(const DequantArgs& args);
// Compares the ported conversions against csrc/common/dtypes.h over `n_samples`
// bit patterns; returns "" or a description of the first mismatch.
std::string host_selftest(int64_t n_samples);

}  // namespace cuda
}  // namespace lp
