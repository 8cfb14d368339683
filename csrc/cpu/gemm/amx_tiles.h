// The AMX tile instructions as the policy `Tiles` of the AMX kernels (gemm_amx_kernels.h,
// qlinear_amx_kernels.h): inline assembly for the real instructions, and the two packing primitives
// with AVX-512 shuffles. The software model's policy with the same members is AmxModelTiles
// (amx_tile_model.h). Included by the AMX files only (compiled with -mamx-* and AVX-512).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/amx_tile_model.h"

namespace lp {
namespace {

// The tile instructions as inline assembly (GCC 12's intrinsics take tile numbers as macro tokens
// and tell the compiler neither what tileloadd reads nor all of what ldtilecfg reads): every load
// and store is a compiler memory barrier, ldtilecfg reads its whole 64-byte operand.
struct AmxTiles {
  static void configure(const AmxTileConfig* c) { asm volatile("ldtilecfg %0" ::"m"(*c)); }
  static void release() { asm volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void load_t1(const void* p, int64_t stride) {
    asm volatile("tileloaddt1 (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>
  static void dp_bf16() {
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  template <int C, int A, int B>
  static void dp_s8() {
    asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  // 16 x 16 dwords: dst row q, dword p = src row p, dword q (unpacks of dwords and qwords, then two
  // rounds of 128-bit lane shuffles).
  static void transpose_dwords_16x16(const void* src, int64_t src_stride, void* dst, int64_t dst_stride) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(static_cast<const char*>(src) + i * src_stride);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
      for (int i = 0; i < 4; ++i) {
        t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
        t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
      }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(static_cast<char*>(dst) + i * dst_stride, r[i]);
  }
  // 32 rows x 32 k of 16-bit values, m-major source: k rows 2p and 2p + 1 interleaved into the dwords
  // of pair p for all 32 rows, then those 16 x 32 dwords transposed into the rows.
  static void pairs_32x32(const uint16_t* src, int64_t k_stride, uint16_t* dst) {
    alignas(64) uint32_t pairs[16 * 32];
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                        5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int p = 0; p < 16; ++p) {
      const __m512i a = _mm512_loadu_si512(src + 2 * p * k_stride);
      const __m512i b = _mm512_loadu_si512(src + (2 * p + 1) * k_stride);
      _mm512_store_si512(pairs + p * 32, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(pairs + p * 32 + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
    transpose_dwords_16x16(pairs, 128, dst, 64);
    transpose_dwords_16x16(pairs + 16, 128, dst + 16 * 32, 64);
  }
  // One 128-byte B row of a row-major source: 32 columns of KU rows (src, src_stride bytes apart), each
  // column's KU values together (bf16 pairs: KU 2, 16-bit elements; int8 quads: KU 4, bytes).
  template <int KU>
  static void interleave_rows_32(const void* src, int64_t src_stride, void* dst) {
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    if constexpr (KU == 2) {
      // pair p of the output: row 0's and row 1's element p (vpermt2w picks them from the two rows)
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                          5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      const __m512i a = _mm512_loadu_si512(s), b = _mm512_loadu_si512(s + src_stride);
      _mm512_storeu_si512(d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(d + 64, _mm512_permutex2var_epi16(a, hi, b));
    } else {
      static_assert(KU == 4, "bf16 pairs or int8 quads");
      // bytes of rows 0 / 1 and 2 / 3 paired, the pairs paired into quads (per 128-bit lane: columns
      // 0-15 in lane 0, 16-31 in lane 1), then the lanes put in column order
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + src_stride));
      const __m256i r2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 2 * src_stride));
      const __m256i r3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 3 * src_stride));
      const __m256i a = _mm256_unpacklo_epi8(r0, r1), b = _mm256_unpackhi_epi8(r0, r1);
      const __m256i c = _mm256_unpacklo_epi8(r2, r3), e = _mm256_unpackhi_epi8(r2, r3);
      const __m256i q0 = _mm256_unpacklo_epi16(a, c), q1 = _mm256_unpackhi_epi16(a, c);  // columns 0-7 | 16-23
      const __m256i q2 = _mm256_unpacklo_epi16(b, e), q3 = _mm256_unpackhi_epi16(b, e);  // columns 8-15 | 24-31
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm256_permute2x128_si256(q0, q1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_permute2x128_si256(q2, q3, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 64), _mm256_permute2x128_si256(q0, q1, 0x31));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 96), _mm256_permute2x128_si256(q2, q3, 0x31));
    }
  }
  // tdpfp16ps tmmC, tmmA, tmmB as bytes (no GCC 12 intrinsic; assemblers before binutils 2.40 lack the
  // mnemonic): VEX.128.F2.0F38.W0 5C /r, vvvv = ~B, ModRM = 11 C A.
  template <int C, int A, int B>
  static void dp_fp16() {
    asm volatile(".byte 0xc4, 0xe2, %c0, 0x5c, %c1" ::"i"(((~B & 15) << 3) | 3), "i"(0xc0 | (C << 3) | A));
  }
};

}  // namespace
}  // namespace lp
