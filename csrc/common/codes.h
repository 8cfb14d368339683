// The one table of codes that cross the Python / native boundary: element types, quantization
// formats, reduce ops, compressions, collective call kinds, block-size limits and the int8 wire
// layout. The native module exports all of it (`_C.codes`, csrc/bindings/runtime_bind.cc) and
// lepton_core/_codes.py derives every Python table from that export, so nothing here is written
// twice; tests/test_codes.py checks the two agree. Header-only and free of ISA code: CPU, CUDA and
// binding files all include it.
#pragma once
#include <cstdint>

namespace lp {

// ---- CPU instruction-set levels (API.md §0), ordered: every level implies the ones below it ----
enum lp_isa : int { LP_ISA_SCALAR = 0, LP_ISA_AVX2 = 1, LP_ISA_AVX512 = 2, LP_ISA_AMX = 3 };
inline constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "amx"};

// ---- weight-quantized linear (API.md §5, csrc/cpu/qlinear/qlinear.h): the packed weight's schemes,
// the width of its column panels and the group sizes of w4 (powers of two in this range) ----
enum lp_qlinear_scheme : int { LP_QLINEAR_W8 = 0, LP_QLINEAR_W4 = 1 };
inline constexpr const char* kQLinearSchemeNames[] = {"w8", "w4"};
inline constexpr int64_t kQLinearPanel = 32;
inline constexpr int64_t kQLinearMinGroup = 32, kQLinearMaxGroup = 1024;

// ---- element types (the names are torch's) ----
enum lp_dtype : int {
  LP_DTYPE_F32 = 0,
  LP_DTYPE_F16 = 1,
  LP_DTYPE_BF16 = 2,
  LP_DTYPE_F64 = 3,
  LP_DTYPE_I8 = 4,
  LP_DTYPE_U8 = 5,
  LP_DTYPE_I32 = 6,
  LP_DTYPE_I64 = 7,
  LP_DTYPE_FP8_E4M3 = 8,
  LP_DTYPE_FP8_E5M2 = 9,
};
struct DtypeInfo {
  const char* name;
  int code;
  int n_bytes;
};
inline constexpr DtypeInfo kDtypes[] = {
    {"float32", LP_DTYPE_F32, 4},      {"float16", LP_DTYPE_F16, 2},   {"bfloat16", LP_DTYPE_BF16, 2},
    {"float64", LP_DTYPE_F64, 8},      {"int8", LP_DTYPE_I8, 1},       {"uint8", LP_DTYPE_U8, 1},
    {"int32", LP_DTYPE_I32, 4},        {"int64", LP_DTYPE_I64, 8},     {"float8_e4m3fn", LP_DTYPE_FP8_E4M3, 1},
    {"float8_e5m2", LP_DTYPE_FP8_E5M2, 1},
};

static inline constexpr int64_t dtype_n_bytes(int dtype) {
  for (const DtypeInfo& d : kDtypes)
    if (d.code == dtype) return d.n_bytes;
  return 1;
}

// ---- quantization formats (API.md §2) ----
enum lp_qfmt : int {
  LP_QFMT_INT8 = 0,
  LP_QFMT_UINT8 = 1,
  LP_QFMT_INT4 = 2,
  LP_QFMT_FP8_E4M3 = 3,
  LP_QFMT_FP8_E5M2 = 4,
};
struct FormatInfo {
  const char* name;     // what users pass to lc.quantize
  int code;             // lp_qfmt
  int storage_dtype;    // lp_dtype of QTensor.data for torch inputs (NumPy keeps fp8 as uint8)
  int bits;             // bits per element in storage (4: two per byte, low nibble first)
  float qmax;           // scale = absmax / qmax (asymmetric: (hi - lo) / qmax)
  bool zero_point;      // asymmetric: an int32 zero point per group
  bool stochastic;      // rounding="stochastic" allowed
};
inline constexpr FormatInfo kFormats[] = {
    {"int8", LP_QFMT_INT8, LP_DTYPE_I8, 8, 127.0f, false, true},
    {"uint8", LP_QFMT_UINT8, LP_DTYPE_U8, 8, 255.0f, true, true},
    {"int4", LP_QFMT_INT4, LP_DTYPE_U8, 4, 7.0f, false, true},
    {"fp8_e4m3", LP_QFMT_FP8_E4M3, LP_DTYPE_FP8_E4M3, 8, 448.0f, false, false},
    {"fp8_e5m2", LP_QFMT_FP8_E5M2, LP_DTYPE_FP8_E5M2, 8, 57344.0f, false, false},
};

static inline constexpr float qfmt_qmax(int fmt) {
  for (const FormatInfo& f : kFormats)
    if (f.code == fmt) return f.qmax;
  return 0.0f;
}

// Block sizes of blockwise quantization and of int8 compression: powers of two in this range.
inline constexpr int64_t kMinBlockElems = 32;
inline constexpr int64_t kMaxBlockElems = 4096;

// int8 x int8 products are at most 2^14 in magnitude: K * 2^14 < 2^31 keeps an int32 sum exact.
inline constexpr int64_t kInt8MaxK = 131071;

// ---- collectives (API.md §3) ----
enum lp_reduce_op : int { LP_REDUCE_SUM = 0, LP_REDUCE_AVG = 1, LP_REDUCE_MAX = 2, LP_REDUCE_MIN = 3 };
inline constexpr const char* kReduceOpNames[] = {"sum", "avg", "max", "min"};

enum lp_compression : int { LP_COMPRESSION_NONE = 0, LP_COMPRESSION_INT8 = 1 };
inline constexpr const char* kCompressionNames[] = {"none", "int8"};

// One shared-memory call. The two HOST_ kinds are the halves of a hierarchical all-reduce inside one
// host (csrc/comm/ring_allreduce.cc); the others are the public collectives of the same name.
enum lp_call_kind : int {
  LP_CALL_ALLREDUCE = 0,
  LP_CALL_HOST_REDUCE_SCATTER = 1,
  LP_CALL_HOST_ALL_GATHER = 2,
  LP_CALL_REDUCE_SCATTER = 3,
  LP_CALL_ALL_GATHER = 4,
  LP_CALL_BROADCAST = 5,
};
inline constexpr const char* kCallKindNames[] = {"all_reduce",     "host_reduce_scatter", "host_all_gather",
                                                 "reduce_scatter", "all_gather",          "broadcast"};
// The public function a call kind belongs to (error messages name it).
inline constexpr const char* kCallOpNames[] = {"ld.all_reduce",     "ld.all_reduce", "ld.all_reduce",
                                               "ld.reduce_scatter", "ld.all_gather", "ld.broadcast"};
inline constexpr int kNumCallKinds = int(sizeof(kCallKindNames) / sizeof(kCallKindNames[0]));
inline const char* call_op_name(int kind) {
  return kind >= 0 && kind < kNumCallKinds ? kCallOpNames[kind] : "lepton_core.distributed";
}

// The int8 wire layout (a "q8 message") of n_elems values cut into blocks of block_elems: the int8
// codes, then one float32 scale per block starting at the next 64-byte boundary.
inline constexpr int64_t kQ8ScalesAlign = 64;
static inline constexpr int64_t q8_scales_offset(int64_t n_elems) {
  return (n_elems + kQ8ScalesAlign - 1) / kQ8ScalesAlign * kQ8ScalesAlign;
}
static inline constexpr int64_t q8_n_blocks(int64_t n_elems, int64_t block_elems) {
  return (n_elems + block_elems - 1) / block_elems;
}
static inline constexpr int64_t q8_message_bytes(int64_t n_elems, int64_t block_elems) {
  return q8_scales_offset(n_elems) + 4 * q8_n_blocks(n_elems, block_elems);
}

}  // namespace lp
