"""Every tolerance the tests use, with where it comes from. Nothing here is tuned to make a test pass.

Unit roundoff u (half an ulp at 1.0): float32 2^-24, float16 2^-11, bfloat16 2^-8.

GEMM (API.md §1). Inputs are first rounded to the kernel dtype, and the float64 reference is computed
from those rounded values, so only the kernel's own error is measured:
  * products of fp16/bf16 inputs are exact in float32, so the error is the float32 accumulation
    (normwise, about sqrt(K) * 2^-24 for random data, worst case K * 2^-24) plus one final rounding
    to out_dtype (<= u_out relative per element);
  * the contract's normwise bounds below cover K up to a few thousand with margin:
      float32 out 1e-5   (sqrt(4096) * 6e-8 = 3.8e-6)
      float16 out 2e-3   (u = 4.9e-4, plus accumulation)
      bfloat16 out 1e-2  (u = 3.9e-3, plus accumulation)
  * the integer path is exact: compared with int64 arithmetic for equality.
"""
import math

U = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

# ||out - ref|| / ||ref|| bounds of API.md §1, by output dtype name.
GEMM_REL_NORM = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

# Spacing of the output dtype's subnormals. A result that lands in that range is rounded to a multiple
# of it, an absolute error of up to half of it per element that no relative bound covers (a float16
# output of 1.69e-6 is 28 * 2^-24: 1.3% off, and correctly rounded).
SUBNORMAL_SPACING = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}


def gemm_rel_norm_bound(out_dtype: str, k: int) -> float:
    """The contract bound; asserts it is at least the derived typical error for this K (so a test
    with a huge K would be flagged rather than silently loose)."""
    derived = U[out_dtype] + 4 * math.sqrt(max(k, 1)) * U["float32"]
    bound = GEMM_REL_NORM[out_dtype]
    assert derived <= bound, f"K={k} is too large for the contract bound of {out_dtype}"
    return bound


def gemm_rel_denominator(ref_norm: float, terms_norm: float, k: int) -> float:
    """The denominator of the normwise relative error: ||ref||, but never below half the typical size
    of a random product's output, ||(|A| |B| + |bias|)|| / sqrt(K). With only a few outputs one of
    them can cancel (|ref| much smaller than its terms), and then no float32 accumulation meets a
    relative bound; for random data with many outputs the floor sits below ||ref|| and the contract
    bound applies unchanged."""
    return max(ref_norm, 0.5 * terms_norm / math.sqrt(max(k, 1)))


def rel_err(out, ref, terms=None, k: int = 1) -> float:
    """||out - ref|| / ||ref|| (torch tensors, ref in float64); with `terms` (|x| |W|^T (+ |bias|)) the
    denominator is floored against cancellation (gemm_rel_denominator): a 1 x 1 output can cancel to
    near zero."""
    den = ref.norm().item()
    if terms is not None:
        den = gemm_rel_denominator(den, terms.norm().item(), k)
    return (out.double() - ref).norm().item() / (den if den > 0 else 1.0)


# Quantization (API.md §2): nearest rounding of integer formats errs by at most scale/2 per element.
# The quotient x/scale is rounded once in float32 and dequantization multiplies once, so we allow
# the float32 rounding of those two steps on top: |x - x_hat| <= scale/2 + 2 * u32 * (|x| + scale).
def quant_nearest_bound(abs_x, scale):
    return scale / 2 + 2 * U["float32"] * (abs_x + scale)


# Stochastic rounding: strictly below one scale (same float32 slack).
def quant_stochastic_bound(abs_x, scale):
    return scale + 2 * U["float32"] * (abs_x + scale)


# FP8 (normal range): relative error <= 2^-4 (E4M3, 3 mantissa bits) / 2^-3 (E5M2, 2 bits), i.e. half
# an ulp of the format, as the contract states.
FP8_REL = {"fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}
