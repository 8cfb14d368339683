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

__host__ __device__ inline uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t x = f32_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (ax >= 0x43e80000u) return uint8_t(sign | 0x7eu);
  if (ax < 0x3c800000u) {
    uint32_t m = uint32_t(round_even(mul_rn(bits_f32(ax), 512.0f)));
    return uint8_t(sign | m);
  }
  ax += 0x7ffffu + ((ax >> 20) & 1u);
  uint32_t exp = (ax >> 23) - 120u;
  return uint8_t(sign | (exp << 3) | ((ax >> 20) & 7u));
}
__host__ __device__ inline uint8_t f32_to_fp8_e5m2(float f) {
  uint32_t x = f32_bits(f);
  uint8_t sign = uint8_t((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (ax >= 0x47700000u) return uint8_t(sign | 0x7bu);
  if (ax < 0x38800000u) {
    uint32_t m = uint32_t(round_even(mul_rn(bits_f32(ax), 65536.0f)));
    return uint8_t(sign | m);
  }
  ax += 0xfffffu + ((ax >> 21) & 1u);
  uint32_t exp = (ax >> 23) - 112u;
  return uint8_t(sign | (exp << 2) | ((ax >> 21) & 3u));
}
// NaN as produced by std::nanf(""): the default quiet NaN 0x7fc00000 on every target we build for.
__host__ __device__ inline float fp8_e4m3_to_f32(uint8_t b) {
  uint32_t exp = (b >> 3) & 0xfu, mant = b & 7u;
  float v;
  if (exp == 0) v = mul_rn(float(mant), 0.001953125f);
  else if (exp == 15 && mant == 7) v = bits_f32(0x7fc00000u);
  else v = bits_f32(((exp + 120u) << 23) | (mant << 20));
  return (b & 0x80u) ? -v : v;
}
__host__ __device__ inline float fp8_e5m2_to_f32(uint8_t b) {
  uint32_t exp = (b >> 2) & 0x1fu, mant = b & 3u;
  float v;
  if (exp == 0) v = mul_rn(float(mant), 1.52587890625e-05f);
  else if (exp == 31) v = mant ? bits_f32(0x7fc00000u) : bits_f32(0x7f800000u);
  else v = bits_f32(((exp + 112u) << 23) | (mant << 21));
  return (b & 0x80u) ? -v : v;
}

// ---- storing one float32 result in an output dtype (lp_dtype codes, rounded once) ----

__device__ inline void store_f32_as(void* base, int dtype, size_t idx, float v) {
  if (dtype == LP_DTYPE_F32) static_cast<float*>(base)[idx] = v;
  else if (dtype == LP_DTYPE_BF16) static_cast<uint16_t*>(base)[idx] = f32_to_bf16(v);
  else static_cast<uint16_t*>(base)[idx] = f32_to_f16(v);
}

}  // namespace cuda
}  // namespace lp
