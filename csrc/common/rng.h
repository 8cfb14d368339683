// Counter-based uniform generator for stochastic rounding.
//
// u(seed, i) in [0, 1) depends only on the 64-bit seed and the element's C-order index i, so the
// same seed gives the same bytes on every backend, ISA path and thread count. It is built from
// 32-bit multiply/xor-shift rounds (Wellons' "lowbias32" mixer) so that AVX2/AVX-512 and CUDA can
// evaluate it lane by lane with 32-bit integer multiplies:
//   key      = mix32(uint32(seed) ^ mix32(uint32(seed >> 32) + 0x9e3779b9))     (once per call)
//   key_hi   = mix32(key ^ mix32(uint32(i >> 32) + 0x85ebca6b))                 (once per 2^32 elems)
//   h        = mix32(mix32(uint32(i) ^ key_hi) + key)
//   u        = float(h >> 8) * 2^-24        (24 random bits: exact in float32, never 1.0)
// Stochastic rounding relies on u lying on the 2^-24 grid (stochastic_floor in cpu/quant/quant.h).
// Any change here changes user-visible bytes.
//
// The CUDA kernels compile this same file for the device (LP_HOST_DEVICE): it is 32-bit integer
// arithmetic plus one exact conversion and one multiply by a power of two, so no device rounding
// mode or contraction can make the GPU's u differ from the CPU's.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define LP_HOST_DEVICE __host__ __device__
#else
#define LP_HOST_DEVICE
#endif

namespace lp {

LP_HOST_DEVICE static inline uint32_t rng_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
LP_HOST_DEVICE static inline uint32_t rng_key(uint64_t seed) {
  return rng_mix32(uint32_t(seed) ^ rng_mix32(uint32_t(seed >> 32) + 0x9e3779b9u));
}
LP_HOST_DEVICE static inline uint32_t rng_key_hi(uint32_t key, uint64_t index) {
  return rng_mix32(key ^ rng_mix32(uint32_t(index >> 32) + 0x85ebca6bu));
}
LP_HOST_DEVICE static inline uint32_t rng_bits(uint32_t key, uint32_t key_hi, uint32_t index_lo) {
  return rng_mix32(rng_mix32(index_lo ^ key_hi) + key);
}
// u for the index whose high word gave key_hi and whose low word is index_lo.
LP_HOST_DEVICE static inline float rng_uniform_bits(uint32_t key, uint32_t key_hi, uint32_t index_lo) {
  return float(rng_bits(key, key_hi, index_lo) >> 8) * 5.9604644775390625e-08f;
}
LP_HOST_DEVICE static inline float rng_uniform(uint64_t seed, uint64_t index) {
  uint32_t key = rng_key(seed);
  return rng_uniform_bits(key, rng_key_hi(key, index), uint32_t(index));
}

}  // namespace lp
