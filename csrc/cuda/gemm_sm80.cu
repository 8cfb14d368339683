// GEMM on sm_80+ (Ampere, Ada, Hopper): tensor-core mma.sync for f16/bf16 (m16n8k16, float32
// accumulators) and int8 (m16n8k32, int32 accumulators), float32 on CUDA cores (FFMA, no TF32),
// plus the packing pre-pass that brings any strided operand into the layouts the kernels read.
//
// Three layers, as everywhere in csrc/cuda: kernels (device code), launchers (grid, block, shared
// memory, stream), and the entry gemm() that checks preconditions and picks a configuration.
#include "api.h"
#include "common.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>

namespace lp {
namespace cuda {
namespace {

enum MmaKind : int { MMA_F16 = 0, MMA_BF16 = 1, MMA_S8 = 2 };

// Everything a GEMM kernel needs, passed by value. Strides in bytes: the tensor-core kernels work
// on byte tiles (a 16-bit and an 8-bit fragment have the same byte layout).
struct GemmParams {
  const char* a;
  const char* b;
  void* out;
  int64_t m, n, k;
  int64_t lda_bytes, ldb_bytes;
  int64_t a_batch_bytes, b_batch_bytes;
  int64_t batch_base;  // first batch index of this launch (grid.y covers at most 65535)
  int out_dtype;
  bool out_pairs;  // two neighbouring outputs may be stored as one aligned vector
  const float* bias;
  const float* scale_a;
  const float* scale_b;
  int scale_a_step, scale_b_step;  // 1: one scale per row / column, 0: one for all
  int tiles_m, tiles_n;
};

// Output tile (tm, tn) of this CTA: rasterized in groups of 8 tile-rows so that CTAs running at the
// same time share A and B panels in L2.
__device__ inline void tile_coords(const GemmParams& p, int& tm, int& tn) {
  constexpr int kGroup = 8;
  const int id = blockIdx.x;
  const int per_group = kGroup * p.tiles_n;
  const int first_m = (id / per_group) * kGroup;
  const int group_m = min(p.tiles_m - first_m, kGroup);
  const int in_group = id % per_group;
  tm = first_m + in_group % group_m;
  tn = in_group / group_m;
}

// Bytes of a 16-byte chunk that lie inside the matrix, given the bytes left in its row.
__device__ inline int chunk_bytes(int64_t bytes_left) {
  return bytes_left <= 0 ? 0 : (bytes_left >= 16 ? 16 : int(bytes_left));
}

// ---- PTX wrappers ----

__device__ inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared.
__device__ inline void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// A 16-byte chunk of a tile: whole chunks through cp.async; an edge chunk (0..15 bytes inside the
// matrix) is zeroed with one st.shared and its bytes copied one by one with plain loads and stores.
// cp.async's src-size would zero-fill the tail as well, but compute-sanitizer counts its whole 16-byte
// window as read (seen on an H200), and a zero-byte copy still needs a source address: this way no
// instruction addresses memory outside the matrix. The edge loop is not unrolled, so that it costs the
// main loop no registers. Both kinds of store are complete once cp.async.wait_group and the
// __syncthreads after it have run, which is when the tile is read.
__device__ inline void copy_chunk_16(uint32_t dst, const char* src, int src_bytes) {
  if (src_bytes == 16) {
    cp_async_16(dst, src);
    return;
  }
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0u) : "memory");
#pragma unroll 1
  for (int i = 0; i < src_bytes; ++i) {
    const uint32_t byte = static_cast<uint8_t>(src[i]);
    asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(dst + i), "r"(byte) : "memory");
  }
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// One m16n8 tensor-core mma.sync, c += a * b: INSTR names the shape and types, CC is the asm
// constraint of the four accumulators ("+f" float32, "+r" int32).
#define LP_MMA_SYNC(INSTR, CC)                                                              \
  asm volatile(INSTR " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : CC(c[0]), CC(c[1]), CC(c[2]), CC(c[3])                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// f16 / bf16: m16n8k16 with float32 accumulators; int8: m16n8k32 with int32 accumulators.
template <int KIND>
struct Mma {
  using Acc = std::conditional_t<KIND == MMA_S8, int32_t, float>;
  static constexpr int kElemBytes = KIND == MMA_S8 ? 1 : 2;
  __device__ static void run(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (KIND == MMA_F16)
      LP_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "+f");
    else if constexpr (KIND == MMA_BF16)
      LP_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "+f");
    else
      LP_MMA_SYNC("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32", "+r");
  }
};
#undef LP_MMA_SYNC

// ---- epilogue shared by every GEMM kernel ----

// Float result of one accumulator: `acc (+ bias)` or `(float(acc) * sa) * sb (+ bias)`, each
// operation a single float32 rounding (no contraction into FMA), so the only other rounding is the
// final one to out_dtype.
template <typename Acc>
__device__ inline float epilogue_value(const GemmParams& p, Acc acc, int64_t row, int64_t col) {
  float v;
  if (p.scale_a != nullptr) {
    v = mul_rn(mul_rn(float(acc), p.scale_a[row * p.scale_a_step]), p.scale_b[col * p.scale_b_step]);
  } else {
    v = float(acc);
  }
  if (p.bias != nullptr) v = add_rn(v, p.bias[col]);
  return v;
}

// Stores out[row, col] and out[row, col + 1] (the pair an mma accumulator fragment holds).
template <typename Acc>
__device__ inline void epilogue_store_pair(const GemmParams& p, size_t batch_offset, int64_t row,
                                           int64_t col, Acc v0, Acc v1) {
  if (row >= p.m || col >= p.n) return;
  const size_t idx = batch_offset + size_t(row) * size_t(p.n) + size_t(col);
  const bool both = col + 1 < p.n;
  if (p.out_dtype == LP_DTYPE_I32 && p.scale_a == nullptr) {  // plain int8 GEMM: exact int32 sums
    int32_t* out = static_cast<int32_t*>(p.out);
    if (both && p.out_pairs) {
      *reinterpret_cast<int2*>(out + idx) = make_int2(int32_t(v0), int32_t(v1));
    } else {
      out[idx] = int32_t(v0);
      if (both) out[idx + 1] = int32_t(v1);
    }
    return;
  }
  const float f0 = epilogue_value(p, v0, row, col);
  if (!both) {
    store_f32_as(p.out, p.out_dtype, idx, f0);
    return;
  }
  const float f1 = epilogue_value(p, v1, row, col + 1);
  if (!p.out_pairs) {
    store_f32_as(p.out, p.out_dtype, idx, f0);
    store_f32_as(p.out, p.out_dtype, idx + 1, f1);
  } else if (p.out_dtype == LP_DTYPE_F32) {
    *reinterpret_cast<float2*>(static_cast<float*>(p.out) + idx) = make_float2(f0, f1);
  } else {
    const uint32_t lo = p.out_dtype == LP_DTYPE_BF16 ? f32_to_bf16(f0) : f32_to_f16(f0);
    const uint32_t hi = p.out_dtype == LP_DTYPE_BF16 ? f32_to_bf16(f1) : f32_to_f16(f1);
    *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.out) + idx) = lo | (hi << 16);
  }
}

// ---- tensor-core GEMM ----
//
// Contract: one CTA computes a BM x BN tile of out for batch blockIdx.y + batch_base.
//   * A tile: BM rows x 128 bytes of K (64 halves or 128 int8) per pipeline stage, K-major.
//   * B tile: K-major: BN rows (n) x 128 bytes of K; N-major (16-bit only): 64 rows (k) x BN*2 bytes.
//   * Shared memory is XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) so that the 8 row
//     addresses of every ldmatrix hit 8 distinct bank groups, and cp.async stores stay conflict-free.
//   * STAGES-deep cp.async pipeline, one __syncthreads per k-tile. Edges (M, N, K not multiples of
//     the tile) are zero-filled while loading (copy_chunk_16), so the math never branches.
//   * Warps: WM x WN, each owning a (BM/WM) x (BN/WN) sub-tile of m16n8 accumulators.
// Two CTAs per SM (16 warps) for the 128 x 128 tiles: caps registers at 128 per thread.
template <int BM, int BN, int WM, int WN, int STAGES, int KIND, bool B_K_MAJOR>
__global__ void __launch_bounds__(WM* WN * 32, BM* BN >= 128 * 128 ? 2 : 1) gemm_tc_kernel(const GemmParams p) {
  using MmaT = Mma<KIND>;
  using Acc = typename MmaT::Acc;
  constexpr int kThreads = WM * WN * 32;
  constexpr int kRowBytes = 128;                        // K bytes per stage in a K-major tile
  constexpr int kEsize = MmaT::kElemBytes;
  constexpr int kBk = kRowBytes / kEsize;               // K elements per stage
  constexpr int kAStageBytes = BM * kRowBytes;
  constexpr int kBStageBytes = BN * kRowBytes;          // N-major: kBk rows x BN*2 bytes, the same
  constexpr int kStageBytes = kAStageBytes + kBStageBytes;
  constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  constexpr int kMi = kWarpM / 16, kNi = kWarpN / 8;
  constexpr int kBRowBytesN = BN * 2;                   // N-major B row (one k)
  constexpr int kBChunksPerRowN = kBRowBytesN / 16;
  static_assert(B_K_MAJOR || KIND != MMA_S8, "int8 B must be K-major (ldmatrix.trans is 16-bit only)");
  static_assert(kMi >= 1 && kNi % 2 == 0, "warp tile must be a multiple of 16 x 16");
  static_assert((kAStageBytes / 16) % kThreads == 0 && (kBStageBytes / 16) % kThreads == 0,
                "every thread copies the same number of 16-byte chunks");
  static_assert(B_K_MAJOR || kBChunksPerRowN % 8 == 0, "N-major swizzle works on 8-chunk groups");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = smem_addr(smem);

  int tm, tn;
  tile_coords(p, tm, tn);
  const int64_t z = int64_t(blockIdx.y) + p.batch_base;
  const int64_t m0 = int64_t(tm) * BM, n0 = int64_t(tn) * BN;
  const int64_t k_bytes = p.k * kEsize;
  const char* a_tile = p.a + z * p.a_batch_bytes + m0 * p.lda_bytes;
  const char* b_batch = p.b + z * p.b_batch_bytes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m0 = (warp / WN) * kWarpM, warp_n0 = (warp % WN) * kWarpN;

  // Issue the cp.async copies of k-tile `kt` into pipeline stage `stage`.
  auto load_stage = [&](int stage, int64_t kt) {
    const uint32_t a_smem = smem_base + stage * kStageBytes;
    const uint32_t b_smem = a_smem + kAStageBytes;
    const int64_t kb0 = kt * kRowBytes;
    // A K-major tile of ROWS rows (row r is row0 + r of its matrix, at tile + r * ld_bytes) x
    // kRowBytes of K into smem; rows from n_rows on and bytes past k_bytes are zero-filled.
    // A tile wholly inside the matrix (every tile but the edge ones; the test is uniform across the
    // CTA) takes the straight cp.async loop.
    auto load_k_major = [&](auto rows, uint32_t smem, const char* tile, int64_t ld_bytes, int64_t row0,
                            int64_t n_rows) {
      constexpr int kChunks = decltype(rows)::value * kRowBytes / 16 / kThreads;
      if (row0 + decltype(rows)::value <= n_rows && kb0 + kRowBytes <= k_bytes) {
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
          const int chunk = tid + i * kThreads, row = chunk >> 3, col = chunk & 7;
          cp_async_16(smem + row * kRowBytes + ((col ^ (row & 7)) << 4), tile + row * ld_bytes + kb0 + col * 16);
        }
        return;
      }
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int chunk = tid + i * kThreads, row = chunk >> 3, col = chunk & 7;
        const int64_t kb = kb0 + col * 16;
        const int bytes = row0 + row < n_rows ? chunk_bytes(k_bytes - kb) : 0;
        const char* src = bytes > 0 ? tile + row * ld_bytes + kb : nullptr;
        copy_chunk_16(smem + row * kRowBytes + ((col ^ (row & 7)) << 4), src, bytes);
      }
    };
    load_k_major(std::integral_constant<int, BM>{}, a_smem, a_tile, p.lda_bytes, m0, p.m);
    if constexpr (B_K_MAJOR) {
      load_k_major(std::integral_constant<int, BN>{}, b_smem, b_batch + n0 * p.ldb_bytes, p.ldb_bytes, n0, p.n);
    } else {
      const int64_t n_bytes = p.n * 2, nb0 = n0 * 2, k0 = kt * kBk;
      if (k0 + kBk <= p.k && nb0 + kBRowBytesN <= n_bytes) {  // interior tile: straight cp.async
#pragma unroll
        for (int i = 0; i < kBStageBytes / 16 / kThreads; ++i) {
          const int chunk = tid + i * kThreads;
          const int row = chunk / kBChunksPerRowN, col = chunk % kBChunksPerRowN;
          const int phys = (col & ~7) | ((col ^ row) & 7);
          cp_async_16(b_smem + row * kBRowBytesN + (phys << 4), b_batch + (k0 + row) * p.ldb_bytes + nb0 + col * 16);
        }
        return;
      }
#pragma unroll
      for (int i = 0; i < kBStageBytes / 16 / kThreads; ++i) {
        const int chunk = tid + i * kThreads;
        const int row = chunk / kBChunksPerRowN, col = chunk % kBChunksPerRowN;
        const int64_t nb = nb0 + col * 16;
        const int bytes = k0 + row < p.k ? chunk_bytes(n_bytes - nb) : 0;
        const char* src = bytes > 0 ? b_batch + (k0 + row) * p.ldb_bytes + nb : nullptr;
        const int phys = (col & ~7) | ((col ^ row) & 7);
        copy_chunk_16(b_smem + row * kBRowBytesN + (phys << 4), src, bytes);
      }
    }
  };

  Acc acc[kMi][kNi][4];
#pragma unroll
  for (int i = 0; i < kMi; ++i)
#pragma unroll
    for (int j = 0; j < kNi; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = Acc(0);

  // One k-tile from shared memory: kRowBytes / 32 mma k-steps (k16 for 16-bit, k32 for int8).
  auto compute_stage = [&](int stage) {
    const uint32_t a_smem = smem_base + stage * kStageBytes;
    const uint32_t b_smem = a_smem + kAStageBytes;
#pragma unroll
    for (int ks = 0; ks < kRowBytes / 32; ++ks) {
      uint32_t af[kMi][4];
      uint32_t bf[kNi][2];
#pragma unroll
      for (int i = 0; i < kMi; ++i) {
        // matrices: rows 0-7 / 8-15 of the m16 tile x the low / high 16 bytes of the k-step
        const int row = warp_m0 + i * 16 + (lane & 15);
        const int col = ks * 2 + (lane >> 4);
        ldmatrix_x4(af[i], a_smem + row * kRowBytes + ((col ^ (row & 7)) << 4));
      }
#pragma unroll
      for (int j = 0; j < kNi; j += 2) {
        uint32_t r[4];
        if constexpr (B_K_MAJOR) {
          // matrices: n tile j (lo, hi k bytes), n tile j+1 (lo, hi)
          const int row = warp_n0 + j * 8 + (lane & 7) + ((lane >> 4) << 3);
          const int col = ks * 2 + ((lane >> 3) & 1);
          ldmatrix_x4(r, b_smem + row * kRowBytes + ((col ^ (row & 7)) << 4));
        } else {
          // matrices (transposed on load): k rows 0-7 / 8-15 of the k16 step x n tiles j, j+1
          const int row = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int col = (warp_n0 + j * 8) / 8 + (lane >> 4);
          const int phys = (col & ~7) | ((col ^ row) & 7);
          ldmatrix_x4_trans(r, b_smem + row * kBRowBytesN + (phys << 4));
        }
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMi; ++i)
#pragma unroll
        for (int j = 0; j < kNi; ++j) MmaT::run(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  };

  const int64_t k_tiles = (p.k + kBk - 1) / kBk;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // k-tile kt has landed (for this thread's copies) ...
    __syncthreads();              // ... for every thread's, and stage (kt-1) % STAGES is free
    const int64_t next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(int(next % STAGES), next);
    cp_async_commit();
    compute_stage(int(kt % STAGES));
  }
  cp_async_wait<0>();

  // Accumulator fragment: c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at row g + 8.
  const size_t batch_offset = size_t(z) * size_t(p.m) * size_t(p.n);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMi; ++i)
#pragma unroll
    for (int j = 0; j < kNi; ++j) {
      const int64_t row = m0 + warp_m0 + i * 16 + g;
      const int64_t col = n0 + warp_n0 + j * 8 + t * 2;
      epilogue_store_pair<Acc>(p, batch_offset, row, col, acc[i][j][0], acc[i][j][1]);
      epilogue_store_pair<Acc>(p, batch_offset, row + 8, col, acc[i][j][2], acc[i][j][3]);
    }
}

// ---- float32 GEMM on CUDA cores ----
//
// Contract: 256 threads as 16 x 16; one CTA computes a (16*TM) x (16*TN) tile with a float32 FMA
// per product (exact product, one rounding per add: no TF32). A K-major; B K-major or N-major; the
// tiles go through registers into double-buffered shared memory (A and a K-major B transposed to
// [k][row], padded by 4 floats so the transposing stores are conflict-free). Each thread owns
// TM x TN outputs as 4x4 blocks spaced 64 rows / columns apart, read as float4 from shared memory.
template <int TM, int TN, bool B_K_MAJOR>
__global__ void __launch_bounds__(256) gemm_f32_simt_kernel(const GemmParams p) {
  constexpr int BM = 16 * TM, BN = 16 * TN, BK = 8;
  constexpr int kLoadA = BM * BK / 256, kLoadB = BN * BK / 256;
  __shared__ __align__(16) float a_s[2][BK][BM + 4];
  __shared__ __align__(16) float b_s[2][BK][BN + 4];

  int tm, tn;
  tile_coords(p, tm, tn);
  const int64_t z = int64_t(blockIdx.y) + p.batch_base;
  const int64_t m0 = int64_t(tm) * BM, n0 = int64_t(tn) * BN;
  const float* a = reinterpret_cast<const float*>(p.a + z * p.a_batch_bytes);
  const float* b = reinterpret_cast<const float*>(p.b + z * p.b_batch_bytes);
  const int64_t lda = p.lda_bytes / 4, ldb = p.ldb_bytes / 4;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  float ra[kLoadA], rb[kLoadB];
  auto load_global = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kLoadA; ++i) {
      const int e = tid + i * 256, row = e >> 3, kk = e & 7;
      ra[i] = (m0 + row < p.m && k0 + kk < p.k) ? a[(m0 + row) * lda + k0 + kk] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kLoadB; ++i) {
      const int e = tid + i * 256;
      if constexpr (B_K_MAJOR) {
        const int col = e >> 3, kk = e & 7;
        rb[i] = (n0 + col < p.n && k0 + kk < p.k) ? b[(n0 + col) * ldb + k0 + kk] : 0.0f;
      } else {
        const int kk = e / BN, col = e % BN;
        rb[i] = (n0 + col < p.n && k0 + kk < p.k) ? b[(k0 + kk) * ldb + n0 + col] : 0.0f;
      }
    }
  };
  auto store_shared = [&](int buf) {
#pragma unroll
    for (int i = 0; i < kLoadA; ++i) {
      const int e = tid + i * 256;
      a_s[buf][e & 7][e >> 3] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < kLoadB; ++i) {
      const int e = tid + i * 256;
      if constexpr (B_K_MAJOR) b_s[buf][e & 7][e >> 3] = rb[i];
      else b_s[buf][e / BN][e % BN] = rb[i];
    }
  };

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  const int64_t k_tiles = (p.k + BK - 1) / BK;
  int buf = 0;
  if (k_tiles > 0) {
    load_global(0);
    store_shared(0);
    __syncthreads();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) load_global((kt + 1) * BK);  // in flight while this tile is computed
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float av[TM], bv[TN];
#pragma unroll
      for (int g = 0; g < TM / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&a_s[buf][kk][g * 64 + ty * 4]);
        av[g * 4 + 0] = v.x; av[g * 4 + 1] = v.y; av[g * 4 + 2] = v.z; av[g * 4 + 3] = v.w;
      }
#pragma unroll
      for (int g = 0; g < TN / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&b_s[buf][kk][g * 64 + tx * 4]);
        bv[g * 4 + 0] = v.x; bv[g * 4 + 1] = v.y; bv[g * 4 + 2] = v.z; bv[g * 4 + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (kt + 1 < k_tiles) store_shared(buf ^ 1);  // that buffer was last read before the barrier below
    __syncthreads();
    buf ^= 1;
  }

  const size_t batch_offset = size_t(z) * size_t(p.m) * size_t(p.n);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = m0 + (i / 4) * 64 + ty * 4 + (i % 4);
#pragma unroll
    for (int j = 0; j < TN; j += 2) {
      const int64_t col = n0 + (j / 4) * 64 + tx * 4 + (j % 4);
      epilogue_store_pair<float>(p, batch_offset, row, col, acc[i][j], acc[i][j + 1]);
    }
  }
}

// ---- packing pre-pass ----
//
// Contract: dst[(z * rows + r) * dst_ld + c] = src[z * sb + r * sr + c * sc] for c < cols, 0 for
// cols <= c < dst_ld. 32 x 32 tiles through shared memory: global reads are coalesced along
// whichever source axis is contiguous (`col_fast`), writes always along c.
template <typename T>
__global__ void __launch_bounds__(256) pack_rows_kernel(const T* __restrict__ src, T* __restrict__ dst,
                                                        int64_t batch, int64_t rows, int64_t cols,
                                                        int64_t sb, int64_t sr, int64_t sc,
                                                        int64_t dst_ld, bool col_fast) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
  const int64_t row_tiles = (rows + 31) / 32;
  const int64_t c0 = int64_t(blockIdx.x) * 32;
  for (int64_t z = blockIdx.z; z < batch; z += gridDim.z) {
    for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      const int64_t r0 = rt * 32;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ly = ty + 8 * j;
        const int64_t r = r0 + (col_fast ? ly : tx), c = c0 + (col_fast ? tx : ly);
        const T v = (r < rows && c < cols) ? src[z * sb + r * sr + c * sc] : T(0);
        if (col_fast) tile[ly][tx] = v;
        else tile[tx][ly] = v;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ly = ty + 8 * j;
        const int64_t r = r0 + ly, c = c0 + tx;
        if (r < rows && c < dst_ld) dst[(z * rows + r) * dst_ld + c] = tile[ly][tx];
      }
      __syncthreads();
    }
  }
}

// ---- launchers ----

constexpr int kMaxDevices = 64;

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];  // zero-initialized (static storage)
  if (device < 0 || device >= kMaxDevices) {
    int v = 0;
    LP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    return v;
  }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    LP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Raises a kernel's dynamic shared-memory limit once per device (the default cap is 48 KiB).
template <typename Kernel>
void allow_smem(Kernel kernel, int device, int n_bytes, std::atomic<bool>* done) {
  if (n_bytes <= 48 * 1024) return;
  if (device >= 0 && device < kMaxDevices && done[device].load(std::memory_order_acquire)) return;
  int optin = 0;
  LP_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (optin < n_bytes) {
    throw std::runtime_error("lepton_core CUDA backend: this GPU allows " + std::to_string(optin) +
                             " bytes of shared memory per block, the GEMM tile needs " +
                             std::to_string(n_bytes));
  }
  LP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n_bytes));
  if (device >= 0 && device < kMaxDevices) done[device].store(true, std::memory_order_release);
}

// Runs `launch(params, grid)` over the batch in chunks of at most 65535 (grid.y's limit).
template <typename Launch>
void for_batch_chunks(GemmParams p, int64_t batch, int64_t tiles, Launch launch) {
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t z0 = 0; z0 < batch; z0 += kMaxGridY) {
    p.batch_base = z0;
    launch(p, dim3(unsigned(tiles), unsigned(std::min(kMaxGridY, batch - z0)), 1));
  }
}

template <int BM, int BN, int WM, int WN, int STAGES, int KIND, bool B_K_MAJOR>
void launch_tc(GemmParams p, int64_t batch, int device, cudaStream_t stream, const char* name) {
  constexpr int kSmemBytes = STAGES * (BM + BN) * 128;
  static std::atomic<bool> smem_done[kMaxDevices];  // zero-initialized (static storage)
  auto kernel = gemm_tc_kernel<BM, BN, WM, WN, STAGES, KIND, B_K_MAJOR>;
  allow_smem(kernel, device, kSmemBytes, smem_done);
  p.tiles_m = int((p.m + BM - 1) / BM);
  p.tiles_n = int((p.n + BN - 1) / BN);
  const int64_t tiles = int64_t(p.tiles_m) * p.tiles_n;
  for_batch_chunks(p, batch, tiles, [&](const GemmParams& q, dim3 grid) {
    kernel<<<grid, WM * WN * 32, kSmemBytes, stream>>>(q);
    check_launch(name);
  });
}

template <int TM, int TN, bool B_K_MAJOR>
void launch_simt(GemmParams p, int64_t batch, cudaStream_t stream, const char* name) {
  constexpr int BM = 16 * TM, BN = 16 * TN;
  p.tiles_m = int((p.m + BM - 1) / BM);
  p.tiles_n = int((p.n + BN - 1) / BN);
  const int64_t tiles = int64_t(p.tiles_m) * p.tiles_n;
  for_batch_chunks(p, batch, tiles, [&](const GemmParams& q, dim3 grid) {
    gemm_f32_simt_kernel<TM, TN, B_K_MAJOR><<<grid, 256, 0, stream>>>(q);
    check_launch(name);
  });
}

// Tile configurations. "large": 128 x 128 tiles (8 warps of 64 x 32, 3 stages, 96 KiB of shared
// memory: fits every sm_80+ part, 2 CTAs per SM on sm_80/90). "small": 64 x 64 tiles (4 warps of
// 32 x 32, 4 stages, 64 KiB) when the large tiles would leave SMs idle (small or skinny problems).
// (128 x 256 tiles, 8 warps of 64 x 64, one CTA per SM, were measured on an H200 at 0.55-0.7x the
// 128 x 128 ones' speed: bench/RESULTS.md, "GPU".)
bool use_large_tiles(const GemmArgs& g, int device) {
  const int64_t large_tiles = ((g.m + 127) / 128) * ((g.n + 127) / 128) * g.batch;
  return large_tiles >= sm_count(device);
}

void check_tc_alignment(const GemmArgs& g, int esize) {
  auto bad = [&](uintptr_t ptr, int64_t stride_elems) {
    return ptr % 16 != 0 || (stride_elems * esize) % 16 != 0;
  };
  if (bad(g.a, g.lda) || bad(g.a, g.a_batch_stride) || bad(g.b, g.ldb) || bad(g.b, g.b_batch_stride)) {
    throw std::invalid_argument(
        "lepton_core CUDA gemm: tensor-core operands need 16-byte aligned pointers and row / batch "
        "strides (pack them with pack_rows first)");
  }
}

GemmParams make_params(const GemmArgs& g, int esize) {
  GemmParams p{};
  p.a = reinterpret_cast<const char*>(g.a);
  p.b = reinterpret_cast<const char*>(g.b);
  p.out = reinterpret_cast<void*>(g.out);
  p.m = g.m;
  p.n = g.n;
  p.k = g.k;
  p.lda_bytes = g.lda * esize;
  p.ldb_bytes = g.ldb * esize;
  p.a_batch_bytes = g.a_batch_stride * esize;
  p.b_batch_bytes = g.b_batch_stride * esize;
  p.out_dtype = g.out_dtype;
  const int out_esize = (g.out_dtype == LP_DTYPE_F32 || g.out_dtype == LP_DTYPE_I32) ? 4 : 2;
  p.out_pairs = g.n % 2 == 0 && g.out % (2 * out_esize) == 0;
  p.bias = reinterpret_cast<const float*>(g.bias);
  p.scale_a = reinterpret_cast<const float*>(g.scale_a);
  p.scale_b = reinterpret_cast<const float*>(g.scale_b);
  p.scale_a_step = g.scale_a_n > 1 ? 1 : 0;
  p.scale_b_step = g.scale_b_n > 1 ? 1 : 0;
  return p;
}

enum class Path { kSimtLarge, kSimtSmall, kTcLarge, kTcSmall };

Path choose_path(const GemmArgs& g) {
  const bool large = use_large_tiles(g, g.device);
  if (g.in_dtype == LP_DTYPE_F32) return large ? Path::kSimtLarge : Path::kSimtSmall;
  return large ? Path::kTcLarge : Path::kTcSmall;
}

void validate(const GemmArgs& g, bool check_pointers) {
  const bool float_in = g.in_dtype == LP_DTYPE_F32 || g.in_dtype == LP_DTYPE_F16 || g.in_dtype == LP_DTYPE_BF16;
  if (!float_in && g.in_dtype != LP_DTYPE_I8)
    throw std::invalid_argument("lepton_core CUDA gemm: unsupported input dtype code " + std::to_string(g.in_dtype));
  const bool scaled = g.scale_a != 0 || g.scale_b != 0;
  if (scaled && (g.in_dtype != LP_DTYPE_I8 || g.scale_a == 0 || g.scale_b == 0))
    throw std::invalid_argument("lepton_core CUDA gemm: scales need int8 inputs and both scale vectors");
  const bool float_out = g.out_dtype == LP_DTYPE_F32 || g.out_dtype == LP_DTYPE_F16 || g.out_dtype == LP_DTYPE_BF16;
  if (g.in_dtype == LP_DTYPE_I8 && !scaled && (g.out_dtype != LP_DTYPE_I32 || g.bias != 0))
    throw std::invalid_argument("lepton_core CUDA gemm: plain int8 GEMM writes int32 without bias");
  if ((float_in || scaled) && !float_out)
    throw std::invalid_argument("lepton_core CUDA gemm: float results are float32, float16 or bfloat16");
  if (g.in_dtype == LP_DTYPE_I8 && !g.b_k_major)
    throw std::invalid_argument("lepton_core CUDA gemm: int8 B must be K-major");
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0)
    throw std::invalid_argument("lepton_core CUDA gemm: negative size");
  if (check_pointers && g.m > 0 && g.n > 0 && g.batch > 0 && (g.out == 0 || (g.k > 0 && (g.a == 0 || g.b == 0))))
    throw std::invalid_argument("lepton_core CUDA gemm: null operand or output pointer");
  // tile_coords() works in int: keep 8 * (64x64 tiles) within int32.
  if ((g.m + 63) / 64 * ((g.n + 63) / 64) > int64_t(INT32_MAX) / 8)
    throw std::invalid_argument("lepton_core CUDA gemm: problem too large for one launch");
}

}  // namespace

std::string gemm_config(const GemmArgs& g) {
  validate(g, /*check_pointers=*/false);
  DeviceGuard guard(g.device);
  const char* layout = g.b_k_major ? "b_kmajor" : "b_nmajor";
  switch (choose_path(g)) {
    case Path::kSimtLarge: return std::string("f32_simt_128x128_") + layout;
    case Path::kSimtSmall: return std::string("f32_simt_64x64_") + layout;
    case Path::kTcLarge: return std::string("mma_sm80_128x128x3_") + layout;
    case Path::kTcSmall: return std::string("mma_sm80_64x64x4_") + layout;
  }
  return "";
}

void gemm(const GemmArgs& g) {
  validate(g, /*check_pointers=*/true);
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  DeviceGuard guard(g.device);
  const cudaStream_t stream = as_stream(g.stream);
  const Path path = choose_path(g);
  const bool large = path == Path::kSimtLarge || path == Path::kTcLarge;

  if (g.in_dtype == LP_DTYPE_F32) {
    GemmParams p = make_params(g, 4);
    if (large) {
      if (g.b_k_major) launch_simt<8, 8, true>(p, g.batch, stream, "gemm_f32_simt_kernel<8,8,kmajor>");
      else launch_simt<8, 8, false>(p, g.batch, stream, "gemm_f32_simt_kernel<8,8,nmajor>");
    } else {
      if (g.b_k_major) launch_simt<4, 4, true>(p, g.batch, stream, "gemm_f32_simt_kernel<4,4,kmajor>");
      else launch_simt<4, 4, false>(p, g.batch, stream, "gemm_f32_simt_kernel<4,4,nmajor>");
    }
    return;
  }

  const int esize = g.in_dtype == LP_DTYPE_I8 ? 1 : 2;
  check_tc_alignment(g, esize);
  GemmParams p = make_params(g, esize);
  const int dev = g.device;
  // Tile configurations: 128 x 128 (8 warps, 3 stages) for large problems, else 64 x 64 (4 warps, 4
  // stages); one kernel per input kind and B layout (int8 B is always K-major).
#define LP_TC(BM, BN, WM, WN, ST, KIND, KMAJ) \
  launch_tc<BM, BN, WM, WN, ST, KIND, KMAJ>(p, g.batch, dev, stream, "gemm_tc_kernel<" #BM "," #BN "," #KIND "," #KMAJ ">")
#define LP_TC_SIZED(KIND, KMAJ)                        \
  do {                                                 \
    if (large) LP_TC(128, 128, 2, 4, 3, KIND, KMAJ);   \
    else LP_TC(64, 64, 2, 2, 4, KIND, KMAJ);           \
  } while (0)
#define LP_TC_16BIT(KIND)                                                      \
  do {                                                                         \
    if (g.b_k_major) LP_TC_SIZED(KIND, true);                                  \
    else LP_TC_SIZED(KIND, false);                                             \
  } while (0)
  if (g.in_dtype == LP_DTYPE_I8) LP_TC_SIZED(MMA_S8, true);
  else if (g.in_dtype == LP_DTYPE_F16) LP_TC_16BIT(MMA_F16);
  else LP_TC_16BIT(MMA_BF16);
#undef LP_TC_16BIT
#undef LP_TC_SIZED
#undef LP_TC
}

void pack_rows(int device, uintptr_t stream, int elem_bytes, int64_t batch, int64_t rows, int64_t cols,
               uintptr_t src, int64_t src_batch_stride, int64_t src_row_stride, int64_t src_col_stride,
               uintptr_t dst, int64_t dst_ld) {
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4)
    throw std::invalid_argument("lepton_core CUDA pack_rows: elem_bytes must be 1, 2 or 4");
  if (cols < 0 || dst_ld < cols || rows < 0 || batch < 0)
    throw std::invalid_argument("lepton_core CUDA pack_rows: bad sizes");
  if (batch == 0 || rows == 0 || dst_ld == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  // Read along the source axis with the smaller stride (the contiguous one for a plain view).
  const bool col_fast = std::llabs(src_col_stride) <= std::llabs(src_row_stride) || rows == 1;
  const dim3 block(32, 8);
  const dim3 grid(unsigned((dst_ld + 31) / 32), unsigned(std::min<int64_t>((rows + 31) / 32, 65535)),
                  unsigned(std::min<int64_t>(batch, 65535)));
  if ((dst_ld + 31) / 32 > int64_t(INT32_MAX))
    throw std::invalid_argument("lepton_core CUDA pack_rows: rows too long");
  auto launch = [&](auto elem) {
    using T = decltype(elem);
    pack_rows_kernel<T><<<grid, block, 0, s>>>(reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst), batch, rows,
                                                cols, src_batch_stride, src_row_stride, src_col_stride, dst_ld,
                                                col_fast);
  };
  switch (elem_bytes) {
    case 1: launch(uint8_t()); break;
    case 2: launch(uint16_t()); break;
    default: launch(uint32_t()); break;
  }
  check_launch("pack_rows_kernel");
}

}  // namespace cuda
}  // namespace lp
