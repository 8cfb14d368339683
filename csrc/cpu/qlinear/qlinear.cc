// Weight-quantized linear: the kernel table picker, and what every ISA's call shares (activations
// widened to float32 once, w4's per-group activation sums, the split of output panels over threads).
#include "cpu/qlinear/qlinear.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/gemm_common.h"
#include "cpu/kernel_table.h"

namespace lp {

const QLinearKernels& qlinear_kernels_for(int isa) {
  return pick_kernel_table(isa, {qlinear_kernels_amx(), qlinear_kernels_avx512(), qlinear_kernels_avx2()},
                           qlinear_kernels_scalar());
}

namespace {
std::atomic<const QLinearKernels*> g_testing_table{nullptr};
}  // namespace

void qlinear_set_testing_table(const QLinearKernels* t) { g_testing_table.store(t, std::memory_order_relaxed); }

const QLinearKernels& qlinear_kernels() {
  const QLinearKernels* t = g_testing_table.load(std::memory_order_relaxed);
  return t ? *t : qlinear_kernels_for(cpu_isa_active());
}

void qlinear_store_row(const QLinearCall& c, int64_t row, int64_t col0, int64_t cols, const float* v) {
  for (int64_t j = 0; j < cols; ++j) {
    const float b = c.bias ? c.bias[col0 + j] : 0.0f;
    gemm_store_float(c.out, c.out_dtype, row * c.n + col0 + j, c.bias ? v[j] + b : v[j]);
  }
}

// A panel is worth a thread of its own past this many multiply-adds (fork/join costs microseconds).
constexpr double kQLinearMinWorkPerThread = 1.0e6;

// Threads for the n_panels output panels of a call: by multiply-adds, or by the bytes of codes a few
// rows stream (threads_for_stream; 1 row x 1024 -> 1024 on 2 threads instead of 1: w8 / w4 bf16 1.46 /
// 1.52x, float32 1.49 / 1.51x, 2-core Xeon, session 22).
static int qlinear_threads(const QLinearArgs& a, int64_t n_panels) {
  const double code_bytes = double(a.k) * double(kQLinearPanel) * (a.scheme == LP_QLINEAR_W4 ? 0.5 : 1.0);
  return threads_for_stream(n_panels, double(a.m) * double(a.k) * double(kQLinearPanel), kQLinearMinWorkPerThread,
                            code_bytes);
}

// Rows of the bf16 activations' copy: m rounded up to the AMX kernels' 32-row blocks, whose tiles
// read whole blocks (the rows past m are zeros).
static inline int64_t bf16_rows_alloc(int64_t m) { return gemm_round_up(m, 32); }

// The bf16 rows of x as they are, rows c.xb_ld apart, zero past k to the end of each row and in the
// rows past m up to bf16_rows_alloc(m) (the AMX tiles read whole steps of 32 k and blocks of 32 rows).
static void copy_bf16_rows(const QLinearArgs& a, const QLinearCall& c, uint16_t* xb) {
  const uint16_t* x_src = static_cast<const uint16_t*>(a.x);
  for (int64_t i = 0; i < a.m; ++i) {
    uint16_t* xi = xb + i * c.xb_ld;
    for (int64_t kk = 0; kk < a.k; ++kk) xi[kk] = x_src[i * a.x_stride_row + kk * a.x_stride_col];
    std::fill(xi + a.k, xi + c.xb_ld, uint16_t(0));
  }
  std::memset(xb + a.m * c.xb_ld, 0, size_t((bf16_rows_alloc(a.m) - a.m) * c.xb_ld) * 2);
}

// float32 / float16 activations as xb_pieces exact bf16 pieces (the split_min_rows path): per element
// v, p1 = v with its significand cut to bf16's 8 bits, p2 = (v - p1) cut likewise, p3 = v - p1 - p2;
// each difference is exact, and the rest after two cuts has at most 8 significant bits, so p1 + p2 +
// p3 == v (float16 has 11: p3 is zero, two pieces). A non-finite v is p1 alone. Like bf16 activations
// in the tiles, a piece below 2^-126 (bf16 subnormal) reads as zero: for a normal v that drops less
// than 2^-126 per element, relative to v at most 2^-8 only for |v| < 2^-110. Branch-free on the bits
// so that the compiler vectorizes it (written with branches it did not, and at 1024 x 384 the copy
// took as long as the tiles).
template <bool P3>
static void split_row(const float* x, int64_t k, uint16_t* __restrict p1, uint16_t* __restrict p2, uint16_t* __restrict p3) {
  for (int64_t kk = 0; kk < k; ++kk) {
    const uint32_t b = f32_to_bits(x[kk]);
    const uint32_t finite = uint32_t(-int32_t((b & 0x7f800000u) != 0x7f800000u));  // all ones or zero
    const uint32_t b1 = b & (0xffff0000u | ~finite);
    const uint32_t r1 = f32_to_bits(bits_to_f32(b) - bits_to_f32(b1)) & finite;
    const uint32_t b2 = r1 & 0xffff0000u;
    p1[kk] = uint16_t(b1 >> 16), p2[kk] = uint16_t(b2 >> 16);
    if constexpr (P3) p3[kk] = uint16_t(f32_to_bits(bits_to_f32(r1) - bits_to_f32(b2)) >> 16);
  }
}

// The rows of x split as above, rows xb_ld apart, piece q at q * xb_piece_ld, zeros past k in each
// piece and in the rows past m up to bf16_rows_alloc(m).
static void copy_split_rows(const QLinearArgs& a, const QLinearCall& c, uint16_t* xb) {
  const bool as_is = a.x_dtype == LP_DTYPE_F32 && a.x_stride_col == 1;
  const int nt = threads_for(a.m, double(a.k) * 8, kQLinearMinWorkPerThread);
  parallel_ranges_claimed(a.m, nt, [&](int, int64_t i0, int64_t i1) {
    std::vector<float> row(as_is ? 0 : size_t(a.k));  // a strided or float16 row widened first
    for (int64_t i = i0; i < i1; ++i) {
      const float* xi = static_cast<const float*>(a.x) + i * a.x_stride_row;
      if (!as_is) {
        for (int64_t kk = 0; kk < a.k; ++kk) row[kk] = gemm_load_float(a.x, a.x_dtype, i * a.x_stride_row + kk * a.x_stride_col);
        xi = row.data();
      }
      uint16_t* d = xb + i * c.xb_ld;
      if (c.xb_pieces == 3)
        split_row<true>(xi, a.k, d, d + c.xb_piece_ld, d + 2 * c.xb_piece_ld);
      else
        split_row<false>(xi, a.k, d, d + c.xb_piece_ld, nullptr);
      for (int64_t q = 0; q < c.xb_pieces; ++q) std::fill(d + q * c.xb_piece_ld + a.k, d + (q + 1) * c.xb_piece_ld, uint16_t(0));
      std::fill(d + c.xb_pieces * c.xb_piece_ld, d + c.xb_ld, uint16_t(0));
    }
  });
  std::memset(xb + a.m * c.xb_ld, 0, size_t((bf16_rows_alloc(a.m) - a.m) * c.xb_ld) * 2);
}

// w4's per-group sums of one row of activations (k values, zero past them), in float32 and k order,
// into xsum[0 .. n_groups): the same sums whichever kernel reads them.
template <class T, class ToFloat>
static void group_sums(const QLinearCall& c, const T* xi, int64_t k, const ToFloat& to_float, float* xsum) {
  for (int64_t g = 0; g < c.n_groups; ++g) {
    float s = 0.0f;
    for (int64_t kk = g * c.group_size; kk < std::min(k, (g + 1) * c.group_size); ++kk) s += to_float(xi[kk]);
    xsum[g] = s;
  }
}

void qlinear(const QLinearArgs& a) {
  if (a.m <= 0 || a.n <= 0) return;
  QLinearCall c;
  c.m = a.m, c.n = a.n, c.k = a.k;
  c.k_pad = gemm_round_up(std::max<int64_t>(a.k, 1), 2);
  c.group_size = a.scheme == LP_QLINEAR_W4 ? a.group_size : std::max<int64_t>(a.k, 1);
  c.n_groups = gemm_ceil_div(a.k, c.group_size);
  c.codes = a.codes, c.scale = a.scale, c.zero = a.zero, c.bias = a.bias;
  c.out = a.out, c.out_dtype = a.out_dtype;
  const QLinearKernels& kern = qlinear_kernels();
  const bool w4 = a.scheme == LP_QLINEAR_W4;
  auto run_bf16 = w4 ? kern.w4_bf16 : kern.w8_bf16;
  auto run_bf16_few = w4 ? kern.w4_bf16_few_rows : kern.w8_bf16_few_rows;
  const int64_t few_min = w4 ? 1 : kQLinearW8Bf16FewMinRows;
  const bool few_rows_bf16 = a.x_dtype == LP_DTYPE_BF16 && a.m >= few_min && a.m < kern.bf16_min_rows && a.k > 0 &&
                             run_bf16_few;
  if (few_rows_bf16) {
    // The bf16 rows as they are, zero-padded to k_pad, and their float32 group sums (in k order).
    c.xb_ld = gemm_round_up(c.k_pad, 32) + 32;
    const int64_t x_bytes = gemm_round_up(bf16_rows_alloc(a.m) * c.xb_ld * 2, 64);
    char* scratch = static_cast<char*>(gemm_scratch(1, size_t(x_bytes) + size_t(a.m * c.n_groups) * sizeof(float)));
    uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);
    float* xsum = reinterpret_cast<float*>(scratch + x_bytes);
    copy_bf16_rows(a, c, xb);
    if (w4)
      for (int64_t i = 0; i < a.m; ++i)
        group_sums(c, xb + i * c.xb_ld, a.k, [](uint16_t h) { return bf16_to_f32(h); }, xsum + i * c.n_groups);
    c.x = nullptr, c.xsum = w4 ? xsum : nullptr, c.xb = xb;
    const int64_t n_panels = gemm_ceil_div(a.n, kQLinearPanel);
    const int nt = qlinear_threads(a, n_panels);
    parallel_ranges_claimed(n_panels, nt, [&](int, int64_t p0, int64_t p1) { run_bf16_few(c, p0, p1); });
    return;
  }
  const int64_t split_min = w4 ? kern.split_min_rows_w4 : kern.split_min_rows_w8;
  const bool split = (a.x_dtype == LP_DTYPE_F32 || a.x_dtype == LP_DTYPE_F16) && split_min > 0 && a.m >= split_min;
  if (((a.x_dtype == LP_DTYPE_BF16 && a.m >= kern.bf16_min_rows) || split) && a.k > 0 && run_bf16) {
    // The bf16 rows as they are (or the bf16 pieces of float32 / float16 rows), zero-padded to k_pad
    // (rows 64 bytes past a multiple of 64 apart: a power-of-two K would put the rows of a 12-row block
    // in one L1 set); each thread gets its own workspace.
    const int64_t n_panels = gemm_ceil_div(a.n, kQLinearPanel);
    const int nt = qlinear_threads(a, n_panels);
    if (split) {
      c.xb_pieces = a.x_dtype == LP_DTYPE_F32 ? 3 : 2;
      c.xb_piece_ld = gemm_round_up(c.k_pad, 32);
    }
    c.xb_ld = c.xb_pieces * gemm_round_up(c.k_pad, 32) + 32;
    const int64_t x_bytes = gemm_round_up(bf16_rows_alloc(a.m) * c.xb_ld * 2, 64), ws_bytes = gemm_round_up(qlinear_bf16_ws_bytes(c), 64);
    char* scratch = static_cast<char*>(gemm_scratch(1, size_t(x_bytes + nt * ws_bytes)));
    uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);
    if (split)
      copy_split_rows(a, c, xb);
    else
      copy_bf16_rows(a, c, xb);
    c.x = nullptr, c.xsum = nullptr, c.xb = xb;
    parallel_ranges_claimed(n_panels, nt, [&](int t, int64_t p0, int64_t p1) {
      run_bf16(c, p0, p1, scratch + x_bytes + t * ws_bytes);
    });
    return;
  }
  // Many rows of float32 / float16 activations: the float GEMM with each B panel dequantized while it
  // is packed. The weight-only kernels convert every code for every 12-row block; here each code is
  // converted once per call, and the float GEMM's tiles run at its FMA peak.
  const GemmKernels& gk = gemm_kernels_for(cpu_isa_active());
  const int64_t gemm_min_rows = a.scheme == LP_QLINEAR_W4 ? kern.float_gemm_min_rows_w4 : kern.float_gemm_min_rows_w8;
  if ((a.x_dtype == LP_DTYPE_F32 || a.x_dtype == LP_DTYPE_F16) && gemm_min_rows > 0 &&
      a.m >= gemm_min_rows && a.k > 0 &&
      gk.float_quant_b) {
    GemmFloatArgs g;
    g.m = a.m, g.n = a.n, g.k = a.k;
    g.a = {a.x, a.x_dtype, 0, a.x_stride_row, a.x_stride_col};
    g.b = {nullptr, LP_DTYPE_F32, 0, 0, 0};
    g.bias = a.bias, g.out = a.out, g.out_dtype = a.out_dtype;
    GemmQuantB qb;
    qb.scheme = a.scheme, qb.group_size = a.group_size, qb.codes = a.codes, qb.scale = a.scale, qb.zero = a.zero;
    gk.float_quant_b(g, qb);
    return;
  }
  // The activations as contiguous float32 rows (exact), zero-padded to k_pad, and w4's group sums.
  const int64_t xsum_elems = a.scheme == LP_QLINEAR_W4 ? a.m * c.n_groups : 0;
  float* x = static_cast<float*>(gemm_scratch(1, size_t(a.m * c.k_pad + xsum_elems) * sizeof(float)));
  float* xsum = x + a.m * c.k_pad;
  for (int64_t i = 0; i < a.m; ++i) {
    float* xi = x + i * c.k_pad;
    if (a.x_dtype == LP_DTYPE_F32 && a.x_stride_col == 1)  // a row as it is: +2-5% on 608-row layers
      std::copy_n(static_cast<const float*>(a.x) + i * a.x_stride_row, a.k, xi);
    else
      for (int64_t kk = 0; kk < a.k; ++kk) xi[kk] = gemm_load_float(a.x, a.x_dtype, i * a.x_stride_row + kk * a.x_stride_col);
    for (int64_t kk = a.k; kk < c.k_pad; ++kk) xi[kk] = 0.0f;
    if (xsum_elems) group_sums(c, xi, a.k, [](float v) { return v; }, xsum + i * c.n_groups);
  }
  c.x = x, c.xsum = xsum_elems ? xsum : nullptr, c.xb = nullptr, c.xb_ld = 0;
  if (a.k == 0) {  // an empty sum: zeros plus bias
    const float zeros[kQLinearPanel] = {};
    for (int64_t i = 0; i < a.m; ++i)
      for (int64_t j = 0; j < a.n; j += kQLinearPanel) qlinear_store_row(c, i, j, std::min(kQLinearPanel, a.n - j), zeros);
    return;
  }
  auto run = a.scheme == LP_QLINEAR_W4 ? kern.w4 : kern.w8;
  // Threads take runs of output panels (every row of them) from a counter: columns never mix, so the
  // result is the same for any thread count and any split.
  const int64_t n_panels = gemm_ceil_div(a.n, kQLinearPanel);
  const int nt = qlinear_threads(a, n_panels);
  parallel_ranges_claimed(n_panels, nt, [&](int, int64_t p0, int64_t p1) { run(c, p0, p1); });
}

}  // namespace lp
