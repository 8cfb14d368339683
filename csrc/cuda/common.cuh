// Shared by the CUDA kernels: error checks, the device guard, and bit-exact ports of the scalar
// conversions (csrc/common/dtypes.h). The stochastic-rounding generator is csrc/common/rng.h itself.
//
// Every function marked __host__ __device__ here computes exactly what its dtypes.h twin
// computes, bit for bit, on the GPU and on the host; _C_cuda.host_selftest() compares them over
// large samples of bit patterns on a machine without a GPU. Keep the two files in step: a change in
// either changes user-visible bytes.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/codes.h"
#include "common/dtypes.h"  // host twins (for the self-test) and the fp8 format parameters
#include "common/rng.h"  // compiled for the device as it is (see there)

namespace lp {
namespace cuda {

// ---- errors and devices ----

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("lepton_core CUDA backend: ") + what + " failed: " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

#define LP_CUDA_CHECK(expr)                                     \
  do {                                                          \
    cudaError_t lp_err_ = (expr);                               \
    if (lp_err_ != cudaSuccess) ::lp::cuda::throw_cuda_error(lp_err_, #expr); \
  } while (0)

// After every launch: a bad configuration or a sticky error from an earlier kernel surfaces here.
inline void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(err, kernel_name);
}

// This module links its own (static) CUDA runtime, whose "current device" is separate from
// PyTorch's: every entry point makes the tensors' device current for its calls and restores it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    LP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) LP_CUDA_CHECK(cudaSetDevice(device));
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// ---- exact arithmetic helpers (identical on host and device) ----

__host__ __device__ inline uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
__host__ __device__ inline float bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
// IEEE float32 division / addition / multiplication, round to nearest even, never contracted.
__host__ __device__ inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
// Round half to even (std::nearbyint in the default rounding mode; cvt.rni on the GPU).
__host__ __device__ inline float round_even(float f) {
#ifdef __CUDA_ARCH__
  return rintf(f);
#else
  return std::nearbyint(f);
#endif
}
__host__ __device__ inline float floor_f32(float f) {
#ifdef __CUDA_ARCH__
  return floorf(f);
#else
  return std::floor(f);
#endif
}

// ---- conversions: ports of csrc/common/dtypes.h ----

__host__ __device__ inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }
__host__ __device__ inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__host__ __device__ inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    float v = mul_rn(float(mant), 5.9604644775390625e-08f);  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}
__host__ __device__ inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (ax < 0x38800000u) {
    uint32_t m = uint32_t(round_even(mul_rn(bits_f32(ax), 16777216.0f)));
    return uint16_t(sign | m);
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);
  return uint16_t(sign | (ax >> 13));
}

// The fp8 formats through dtypes.h's template and format parameters (lp::Fp8E4M3 / lp::Fp8E5M2),
// with the device's exact helpers.
template <class FP8> __host__ __device__ inline uint8_t f32_to_fp8(float f) {
  constexpr uint32_t shift = 23 - FP8::kMant;
  constexpr uint32_t min_normal_bits = (128u - FP8::kBias) << 23;
  constexpr float inv_subnormal_unit = float(1u << (FP8::kBias - 1 + FP8::kMant));
  uint32_t x = f32_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (ax >= FP8::kSatBits) return uint8_t(sign | FP8::kMaxCode);
  if (ax < min_normal_bits) return uint8_t(sign | uint32_t(round_even(mul_rn(bits_f32(ax), inv_subnormal_unit))));
  ax += ((1u << shift) >> 1) - 1u + ((ax >> shift) & 1u);
  return uint8_t(sign | (((ax >> 23) - (127u - FP8::kBias)) << FP8::kMant) | ((ax >> shift) & ((1u << FP8::kMant) - 1u)));
}
// NaN as produced by std::nanf(""): the default quiet NaN 0x7fc00000 on every target we build for.
template <class FP8> __host__ __device__ inline float fp8_to_f32(uint8_t b) {
  constexpr uint32_t exp_max = (1u << (7 - FP8::kMant)) - 1u, mant_max = (1u << FP8::kMant) - 1u;
  constexpr float subnormal_unit = 1.0f / float(1u << (FP8::kBias - 1 + FP8::kMant));
  const uint32_t exp = (b >> FP8::kMant) & exp_max, mant = b & mant_max;
  const bool nan = exp == exp_max && (FP8::kIeee ? mant != 0 : mant == mant_max);
  float v = exp == 0 ? mul_rn(float(mant), subnormal_unit)
            : nan ? bits_f32(0x7fc00000u)
            : (exp == exp_max && FP8::kIeee) ? bits_f32(0x7f800000u)
            : bits_f32(((exp + 127u - FP8::kBias) << 23) | (mant << (23 - FP8::kMant)));
  return (b & 0x80u) ? -v : v;
}
__host__ __device__ inline uint8_t f32_to_fp8_e4m3(float f) { return f32_to_fp8<Fp8E4M3>(f); }
__host__ __device__ inline uint8_t f32_to_fp8_e5m2(float f) { return f32_to_fp8<Fp8E5M2>(f); }
__host__ __device__ inline float fp8_e4m3_to_f32(uint8_t b) { return fp8_to_f32<Fp8E4M3>(b); }
__host__ __device__ inline float fp8_e5m2_to_f32(uint8_t b) { return fp8_to_f32<Fp8E5M2>(b); }

// ---- storing one float32 result in an output dtype (lp_dtype codes, rounded once) ----

__device__ inline void store_f32_as(void* base, int dtype, size_t idx, float v) {
  if (dtype == LP_DTYPE_F32) static_cast<float*>(base)[idx] = v;
  else if (dtype == LP_DTYPE_BF16) static_cast<uint16_t*>(base)[idx] = f32_to_bf16(v);
  else static_cast<uint16_t*>(base)[idx] = f32_to_f16(v);
}

}  // namespace cuda
}  // namespace lp
