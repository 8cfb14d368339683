// CPU GEMM family: mixed-precision float GEMM and exact int8 GEMM (plain and with a scaled epilogue).
//
// Contract (API.md §1), shared by every ISA version:
//   float:  out[b, i, j] = round_once( sum_k float(A[b, i, k]) * float(B[b, k, j]) + bias[j] )
//           A and B share one dtype (f32 / f16 / bf16); products and sums in float32 (16-bit inputs
//           are widened to float32 when packed, so products are exact); bias is float32 or absent;
//           out is f32 / f16 / bf16, rounded once (round to nearest even). Partial sums stay float32.
//   int8:   acc[b, i, j] = sum_k int32(A[b, i, k]) * int32(B[b, k, j]), exact (K <= 131071).
//           Without scales, out is int32 = acc. With scales (scaled_gemm):
//           out[i, j] = round_once( (float(acc) * scale_a[i]) * scale_b[j] + bias[j] ) evaluated in
//           float32 in exactly that order (no fused multiply-add); scale_a has m or 1 entries,
//           scale_b n or 1 entries.
// Layouts: A and B are read through arbitrary element strides (batch, row, column), so transposed,
// sliced and broadcast (stride 0) views need no copy. out is contiguous (n_batch, m, n). Every
// argument has been checked in Python; kernels do not validate.
// Threads: the output is cut into tiles whose edges do not depend on the thread count, and K is
// never split across threads, so results are bitwise identical for any thread count.
//
// Files: gemm.cc (kernel table picker, routing of a call), gemm_scalar.cc (the reference kernels),
// gemm_driver.h (what the packed SIMD kernels share: macro-loop, tiles and their epilogues, edge
// tiles, packing's panel loop and scalar rest, traits from an ISA's kernel set), gemm_common.h
// (element loads / stores, the scaled epilogue, scratch); shared with quant and reduce:
// cpu/simd256.h / simd512.h (one vector vocabulary per register width), cpu/kernel_table.h (the
// picker), cpu/kernel_tables_absent.cc (null tables of ISAs a build leaves out). Per ISA, only what is
// its own: gemm_avx2.cc / gemm_avx512.cc (kernel sets: packing + microkernel, and the table),
// gemm_gemv_avx2.cc (matrix-vector path), gemm_small_m_avx512.cc (few rows times W^T),
// gemm_peak_avx2.cc / gemm_peak_avx512.cc (benchmark peak probes), gemm_amx.cc (the AMX table) with
// gemm_amx_kernels.h (the AMX kernels, compiled again against amx_tile_model.h, the software tile
// model, by gemm_amx_model_avx2.cc for tests on every machine).
// Adding an ISA: CONTRIBUTING.md, "Add an ISA kernel".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lp {

struct GemmOperand {
  const void* ptr = nullptr;
  int dtype = 0;  // lp_dtype
  int64_t stride_batch_elems = 0, stride_row_elems = 0, stride_col_elems = 0;
};

struct GemmFloatArgs {
  int64_t n_batch = 1, m = 0, n = 0, k = 0;
  GemmOperand a, b;            // a: (m, k) per batch, b: (k, n) per batch; f32 / f16 / bf16
  const float* bias = nullptr;  // (n,) contiguous or null
  void* out = nullptr;         // contiguous (n_batch, m, n)
  int out_dtype = 0;           // LP_DTYPE_F32 / F16 / BF16
};

struct GemmInt8Args {
  int64_t n_batch = 1, m = 0, n = 0, k = 0;
  GemmOperand a, b;                 // int8
  const float* scale_a = nullptr;   // null: plain int8 GEMM, out is int32
  int64_t scale_a_n_elems = 0;      // 1 or m
  const float* scale_b = nullptr;
  int64_t scale_b_n_elems = 0;      // 1 or n
  const float* bias = nullptr;      // (n,) or null (scaled only)
  void* out = nullptr;              // contiguous (n_batch, m, n)
  int out_dtype = 0;                // int32 without scales; f32 / f16 / bf16 with scales
  // B (n_batch 1) pre-packed by gemm_int8_pack_b under the active kernel table, or null (b is then
  // not read; a weight packed once instead of on every call: lc.nn.QuantLinear "w8a8").
  const void* b_packed = nullptr;
};

// B given as lc.nn.QuantLinear's packed w8 / w4 weight (layout: cpu/qlinear/qlinear.h; B = W^T, k x n)
// for the float GEMM: each B panel is dequantized to float32 while it is packed, (code - zero) *
// scale exactly as dequantize_weight computes it, so no float copy of the weight exists.
struct GemmQuantB {
  int scheme = 0;                 // LP_QLINEAR_W8 / LP_QLINEAR_W4
  int64_t group_size = 0;         // w4
  const void* codes = nullptr;
  const float* scale = nullptr;
  const uint8_t* zero = nullptr;  // w4
};

// Cache blocking of the packed (BLIS-style) kernels, derived from the detected cache sizes.
struct GemmBlocking {
  int64_t mr, nr;  // register tile
  int64_t kc;      // depth of one packed block: a kc x nr B micro-panel fills about half of L1d
  int64_t mc;      // rows of one packed A block: about half of L2
  int64_t nc;      // columns of one packed B block (shared L3)
  int64_t kchunk = 0;  // AMX: depth of an A block's chunk where K runs inside each B panel (a multiple
                       // of kc; amx_run_units_k_inside); 0 for the kernel sets without that loop
};
// elem_bytes: bytes of one packed element (4 for float32 panels, 2 for bf16 or int8 packed as int16
// pairs, 1 for int8 quads). l1_share: the kc x nr B micro-panel takes 1 / l1_share of L1d.
GemmBlocking gemm_blocking(int64_t mr, int64_t nr, int64_t elem_bytes, int64_t l1_share = 2);

// Register tiles of the AVX2 microkernels (12 of the 16 ymm registers hold accumulators).
constexpr int64_t kGemmAvx2Mr = 6, kGemmAvx2Nr = 16;
// Register tiles of the AVX-512 microkernels (24 of the 32 zmm registers hold accumulators).
constexpr int64_t kGemmAvx512Mr = 12, kGemmAvx512Nr = 32;
// The AVX-512 kernels' deeper K blocks for tall products (gemm_avx512.cc).
constexpr int64_t kGemmDeepKcMinRows = 256, kGemmDeepKcFactor = 4;

// Entry points: route every call through the kernel table of cpu_isa_active() (gemm.cc).
void gemm_float(const GemmFloatArgs& args);
void gemm_int8(const GemmInt8Args& args);
// A pre-packed B for gemm_int8 (GemmInt8Args::b_packed): its bytes for a (k, n) B under the active
// table (0: the table does not take one; then pass b as usual), and the packing of args.b (sizes
// args.k, args.n) into dst (64-byte aligned, that many bytes). The layout is the table's packed
// panels, K block by K block: valid only in this process, for this table (gemm_kernels().name).
int64_t gemm_int8_packed_b_bytes(int64_t k, int64_t n);
void gemm_int8_pack_b(const GemmInt8Args& args, void* dst);
// The blocking of the packed kernels of the active ISA (float path, or int8 when is_int8) for a
// product of `rows` rows with B packed per call (per batch; the AVX-512 kernels go deeper in K from
// kGemmDeepKcMinRows rows on, and a pre-packed int8 B always does). The scalar kernels do not block;
// for them this is the AVX2 tile's blocking (tests size their cases by it).
GemmBlocking gemm_packed_blocking(bool is_int8, int64_t rows);

// What a peak probe measures: the arithmetic of the float (FMA), bf16 (pair dot product) or int8
// microkernel, without its loads.
enum GemmProbeKind { LP_GEMM_PROBE_FLOAT = 0, LP_GEMM_PROBE_BF16 = 1, LP_GEMM_PROBE_INT8 = 2 };

// One ISA's GEMM kernels. gemm.cc routes a call: empty output -> nothing; k == 0 -> the scalar
// kernels (zeros plus bias); then the first special path that takes the shape; else the general
// kernel. Optional entries are null when the ISA has no such path.
struct GemmKernels {
  const char* name;
  int isa;  // the lp_isa level the table needs
  // The general kernels: any shape with m, n, n_batch, k >= 1 (the scalar ones: any shape).
  void (*gemm_float)(const GemmFloatArgs& args);
  void (*gemm_int8)(const GemmInt8Args& args);
  // Optional special paths of the float GEMM, tried in this order.
  void (*gemv_float)(const GemmFloatArgs& args);     // m == 1 or n == 1, or a few rows (gemm_gemv_takes)
  bool (*small_m_float)(const GemmFloatArgs& args);  // few rows: returns false (nothing done) when it
                                                     // does not take the shape
  GemmBlocking (*blocking)(bool is_int8, int64_t rows);  // of the packed kernels (optional)
  // Runs the microkernel arithmetic of `kind` (GemmProbeKind) without its loads for n_iters steps on
  // n_threads threads; returns the operations executed (to time for "% of peak"). Optional.
  double (*peak_probe)(int64_t n_iters, int n_threads, int kind);
  // The pre-packed B of gemm_int8 (see gemm_int8_pack_b); optional (null: no pre-packed B).
  int64_t (*int8_packed_b_bytes)(int64_t k, int64_t n);
  void (*int8_pack_b)(const GemmInt8Args& args, void* dst);
  // The float GEMM with a quantized B (args.b unused; float32 / float16 A); optional (null: none).
  void (*float_quant_b)(const GemmFloatArgs& args, const GemmQuantB& qb);
};

// The table for an lp_isa level, capped at what this build and CPU offer; a level without a table of
// its own runs the one below it. gemm_kernels(): for cpu_isa_active() (or the testing table).
const GemmKernels& gemm_kernels_for(int isa);
const GemmKernels& gemm_kernels();

// Per-ISA tables (gemm_<isa>.cc); null when this build lacks the ISA.
const GemmKernels* gemm_kernels_scalar();
const GemmKernels* gemm_kernels_avx2();
const GemmKernels* gemm_kernels_avx512();
const GemmKernels* gemm_kernels_amx();  // gemm_amx.cc
// The avx512 level's two tables (gemm_avx512.cc): bf16 by vdpbf16ps ("avx512-bf16dot") or widened to float32
// and FMA ("avx512-bf16fma"). gemm_kernels_avx512() is the one this CPU runs faster, _other() the
// other (a testing table: tests run both on every AVX-512 machine).
const GemmKernels* gemm_kernels_avx512_other();

// Testing hooks. The AMX kernels compiled against the software tile model (gemm_amx_model_avx2.cc,
// needs AVX2; null when the build lacks it); it is no ISA level and the picker never returns it.
const GemmKernels* gemm_kernels_amx_model();
// Routes every call through `t` instead of the active level's table (null: back to that).
void gemm_set_testing_table(const GemmKernels* t);
// Tests of the threads' work sharing (gemm_driver.h, GemmUnitShare): the thread running the first unit
// sleeps delay_us before it claims the first K block's A blocks (0: never), so that another takes them
// and the next K block's are run by both; gemm_share_testing sets it and returns the A blocks run by a
// thread other than their unit's owner since its last call.
int64_t gemm_share_testing(int64_t delay_us);
void gemm_share_test_delay();
void gemm_share_count_taken();
// Runs one instruction of the tile model on the calling thread (op: its mnemonic; args: tile numbers,
// addresses, strides in bytes); returns "" or the fault it raises (#GP / #UD and why).
std::string gemm_amx_model_exec(const std::string& op, const std::vector<int64_t>& args);

// Pieces one ISA's table borrows from another file.
void gemm_float_scalar(const GemmFloatArgs& args);  // also the k == 0 path of every ISA
void gemm_int8_scalar(const GemmInt8Args& args);
#ifdef LP_BUILD_AVX2
// The matrix-vector product (gemm_gemv_avx2.cc): memory-bound, so the AVX-512 table uses it too.
void gemm_gemv_float_avx2(const GemmFloatArgs& args);
// Whether the matrix-vector path takes a product: m == 1, n == 1, or up to 4 rows (float32 / float16)
// times a row-major B; with all_few_rows (for a table without a few-rows path of its own: AVX2) bf16
// there too, and up to 8 rows of any float dtype times a column-contiguous B (B = W^T: x @ W^T)
// (gemm_gemv_avx2.cc). Asked only where a table has gemv_float.
bool gemm_gemv_takes(const GemmFloatArgs& args, bool all_few_rows);
// The int8 GEMM's matrix-vector path (gemm_gemv.h): up to kGemvInt8MaxRows (8) rows times B = W^T, or
// A times one column; the weight read in place (the AVX2 and AVX-512 tables' gemm_int8 ask it first;
// gemm_gemv_int8_avx512 below is its vpdpbusd version).
bool gemm_gemv_int8_takes(const GemmInt8Args& args);
void gemm_gemv_int8_avx2(const GemmInt8Args& args);
double gemm_peak_probe_avx2(int64_t n_iters, int n_threads, int kind);  // gemm_peak_avx2.cc
#endif
#ifdef LP_BUILD_AVX512
bool gemm_small_m_float_avx512(const GemmFloatArgs& args, bool bf16_by_fma);  // gemm_small_m_avx512.cc
void gemm_gemv_int8_avx512(const GemmInt8Args& args);  // the int8 matrix-vector path by vpdpbusd (same file)
double gemm_peak_probe_avx512(int64_t n_iters, int n_threads, int kind);  // gemm_peak_avx512.cc
// Whether this core's vdpbf16ps gives fewer flops than its vfmadd231ps (one thread, timed once per
// process, best of 3 each; gemm_peak_avx512.cc): the avx512 level then multiplies bf16 in float32.
bool gemm_bf16_dot_slower_than_fma_avx512();
// float32 few rows x @ W^T on the Xeons with two 512-bit FMA ports (the AMX table, and the avx512 level's
// bf16fma table, which those CPUs pick): the few-rows kernel up to this many rows, then the packed
// AVX-512 tiles, which win there because the few-rows kernel waits on L2 (11 of its loads for 24 FMAs, A
// and 3 W rows of 4096 float32 beyond L1). Packed / few-rows, 2-core Xeon, 2 threads (1 thread), 4096 x
// 4096: 12 rows 1.18 (1.10), 16 rows 0.92 (1.02), 20 rows 1.16 (1.25), 24 1.13 (1.10), 28 1.35 (1.20), 32
// 1.29, 48 1.26; 4-8 rows 0.52-0.58; 32 x 1024 -> 1024 1.19 (bench/notes_gemm.md session 22); at the
// avx512 level (session 24) 12 / 16 / 20 / 32 / 48 rows 0.97 / 0.85 / 1.12 / 1.19 / 1.43, 32 x 1024 ->
// 1024 1.41, 24 x 4096 -> 11008 1.13. The bf16dot table (Zen 4: 512-bit FMAs as two 256-bit halves)
// keeps the kernel's own 48.
constexpr int64_t kSmallMMaxRowsF32TwoFma = 16;
// The AVX-512 int8 GEMM's pre-packed B in K blocks of depth kc (a multiple of 64) instead of its deep
// ones, and the GEMM reading it (gemm_avx512.cc): the AMX table's pre-packed weight, whose panels
// its tiles read as they are, and its kernels for fewer rows than the tiles take.
int64_t int8_packed_b_bytes_avx512_kc(int64_t k, int64_t n, int64_t kc);
void int8_pack_b_avx512_kc(const GemmInt8Args& args, int64_t kc, void* dst);
void gemm_int8_prepacked_avx512_kc(const GemmInt8Args& args, int64_t kc);
#endif

}  // namespace lp
