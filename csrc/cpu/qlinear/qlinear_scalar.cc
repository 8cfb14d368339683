// Weight-quantized linear, the scalar reference (qlinear.h's math, element by element).
#include <algorithm>

#include "common/codes.h"
#include "cpu/qlinear/qlinear.h"

namespace lp {
namespace {

// Every output element of panels [p0, p1): dot(p, x_row, j) gives column j of panel p for the row's
// float32 activations; the results are stored row by row.
template <class Dot>
void each_output(const QLinearCall& c, int64_t p0, int64_t p1, const Dot& dot) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col0 = p * kQLinearPanel, cols = std::min(kQLinearPanel, c.n - col0);
    for (int64_t i = 0; i < c.m; ++i) {
      float v[kQLinearPanel];
      for (int64_t j = 0; j < cols; ++j) v[j] = dot(p, i, j);
      qlinear_store_row(c, i, col0, cols, v);
    }
  }
}

void w8_scalar(const QLinearCall& c, int64_t p0, int64_t p1) {
  each_output(c, p0, p1, [&](int64_t p, int64_t i, int64_t j) {
    const int8_t* panel = static_cast<const int8_t*>(c.codes) + p * c.k * kQLinearPanel;
    const float* x = c.x + i * c.k_pad;
    float acc = 0.0f;
    for (int64_t kk = 0; kk < c.k; ++kk) acc += x[kk] * float(panel[kk * kQLinearPanel + j]);
    return acc * c.scale[p * kQLinearPanel + j];
  });
}

void w4_scalar(const QLinearCall& c, int64_t p0, int64_t p1) {
  each_output(c, p0, p1, [&](int64_t p, int64_t i, int64_t j) {
    const uint8_t* panel = static_cast<const uint8_t*>(c.codes) + p * (c.k_pad / 2) * kQLinearPanel;
    const float* scale = c.scale + p * c.n_groups * kQLinearPanel;
    const uint8_t* zero = c.zero + p * c.n_groups * kQLinearPanel;
    const float* x = c.x + i * c.k_pad;
    float acc = 0.0f;
    for (int64_t g = 0; g < c.n_groups; ++g) {
      float gacc = 0.0f;
      for (int64_t kk = g * c.group_size; kk < std::min(c.k_pad, (g + 1) * c.group_size); kk += 2) {
        const uint8_t b = panel[(kk / 2) * kQLinearPanel + j];
        gacc += x[kk] * float(b & 15);
        gacc += x[kk + 1] * float(b >> 4);
      }
      const int64_t gj = g * kQLinearPanel + j;
      acc += scale[gj] * (gacc - float(zero[gj]) * c.xsum[i * c.n_groups + g]);
    }
    return acc;
  });
}

const QLinearKernels kScalar = {"scalar", LP_ISA_SCALAR, w8_scalar, w4_scalar, nullptr, nullptr, nullptr, nullptr, 0, 0};

}  // namespace

const QLinearKernels* qlinear_kernels_scalar() { return &kScalar; }

}  // namespace lp
