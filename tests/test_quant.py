"""lc.quantize / lc.dequantize against a literal NumPy reference of API.md §2.

The reference (below) implements the contract in float32 with NumPy: scales per group, true division,
np.rint (half to even), clamps, zero points, int4 packing, fp8 by value (round the magnitude to the
format's grid, saturate), and the stochastic-rounding generator of csrc/common/rng.h re-done in
uint32 arithmetic. Kernels must match it BYTE FOR BYTE (data, scale, zero_point) on every ISA path
and thread count; the contract's error bounds are checked separately, from tests/tolerances.py.
"""
import io
import math
import re

import numpy as np
import pytest
import torch

import lepton_core as lc
from lepton_core import _runtime
from lepton_core.quant import FORMATS

from tolerances import FP8_REL, quant_nearest_bound, quant_stochastic_bound

FMTS = list(FORMATS)
INT_FMTS = ["int8", "uint8", "int4"]
QMAX = {"int8": 127.0, "uint8": 255.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# =============================================================================================
# NumPy reference
# =============================================================================================
def _u32(a):
    return np.asarray(a, dtype=np.uint32)


def rng_mix32(x):
    x = _u32(x)
    x = x ^ (x >> np.uint32(16))
    x = _u32(x.astype(np.uint64) * 0x7FEB352D & 0xFFFFFFFF)
    x = x ^ (x >> np.uint32(15))
    x = _u32(x.astype(np.uint64) * 0x846CA68B & 0xFFFFFFFF)
    return x ^ (x >> np.uint32(16))


def rng_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """u(seed, i) of csrc/common/rng.h, float32 in [0, 1)."""
    index = np.asarray(index, dtype=np.uint64)
    key = rng_mix32(_u32([seed & 0xFFFFFFFF]) ^ rng_mix32(_u32([((seed >> 32) + 0x9E3779B9) & 0xFFFFFFFF])))
    hi = _u32((index >> np.uint64(32)).astype(np.uint64) + 0x85EBCA6B & 0xFFFFFFFF)
    key_hi = rng_mix32(key ^ rng_mix32(hi))
    lo = _u32(index & np.uint64(0xFFFFFFFF))
    h = rng_mix32(_u32((rng_mix32(lo ^ key_hi).astype(np.uint64) + key.astype(np.uint64)) & 0xFFFFFFFF))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def exact_floor_plus_u(t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """floor(t + u) of the exact sum (API.md §2's stochastic rounding), t float32, u from rng_uniform
    (on the 2^-24 grid). floor(t + u) = floor((floor(t * 2^24) + u * 2^24) / 2^24), and every float64
    step of that is exact while |t| < 2^28: power-of-two scalings, floors, and a sum of integers below
    2^53. (The float32 sum t + u would round up across an integer when u is close to 1.)"""
    t64 = t.astype(np.float64)
    assert np.all(np.abs(t64) < 2.0**28)
    return np.floor((np.floor(t64 * 2.0**24) + u.astype(np.float64) * 2.0**24) / 2.0**24)


def f32_round_unbounded(a: np.ndarray) -> np.ndarray:
    """float64 -> nearest float32 significand (24 bits, ties to even) with no exponent limit, so a
    value past FLT_MAX stays finite (as float64). For normal-range values only."""
    m, e = np.frexp(a)
    return np.ldexp(np.rint(np.ldexp(m, 24)), e - 24)


def uint8_scale(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(hi - lo) / 255 in float32 arithmetic with an unbounded exponent (API.md §2's formula, even
    when hi - lo exceeds FLT_MAX, as with [2e38, -2e38]). Where hi - lo overflows, both are at least
    2^103, so the float64 difference is exact, and the float64 quotient of a 24-bit significand by
    255 is never close enough to a float32 halfway point for its own rounding to matter."""
    with np.errstate(over="ignore"):
        direct = ((hi - lo) / np.float32(255)).astype(np.float32)
    wide = f32_round_unbounded(f32_round_unbounded(hi.astype(np.float64) - lo.astype(np.float64)) / 255.0)
    return np.where(np.isfinite(direct), direct, wide.astype(np.float32))


def at_least_min(scale: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """API.md §2: only an all-zero group has scale 0; a non-zero group whose scale underflows gets
    the smallest positive float32 (2^-149), with which its values quantize exactly."""
    return np.where((scale == 0) & nonzero, np.float32(2.0**-149), scale).astype(np.float32)


def _fp8_table(fmt):
    """Non-negative finite values of the format, ascending, and their codes."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8_TORCH[fmt]).float().numpy()
    codes = np.arange(128)
    keep = np.isfinite(vals[:128])
    return vals[:128][keep].astype(np.float64), codes[keep]


def fp8_encode(t: np.ndarray, fmt: str) -> np.ndarray:
    """float32 -> fp8 code by value: round |t| to nearest-even on the format's grid (subnormals
    included), saturate at the largest finite value, then look the value up."""
    mbits, bias = (3, 7) if fmt == "fp8_e4m3" else (2, 15)
    a = np.abs(t.astype(np.float64))
    _, e2 = np.frexp(a)  # a = m * 2**e2, m in [0.5, 1)
    e = np.maximum(e2 - 1, 1 - bias)  # exponent of the leading bit, at least the smallest normal's
    ulp = np.ldexp(1.0, e - mbits)
    v = np.minimum(np.rint(a / ulp) * ulp, QMAX[fmt])
    vals, codes = _fp8_table(fmt)
    idx = np.searchsorted(vals, v)
    assert np.array_equal(vals[idx], v)
    return (codes[idx] | np.where(np.signbit(t), 0x80, 0)).astype(np.uint8)


def ref_groups(shape, axis, block_size):
    n = math.prod(shape)
    i = np.arange(n)
    if block_size is not None:
        return i // block_size, -(-n // block_size)
    if axis is None:
        return np.zeros(n, dtype=np.int64), 1
    n_inner = math.prod(shape[axis + 1:])
    return (i // n_inner) % shape[axis], shape[axis]


def ref_quantize(x32: np.ndarray, fmt, axis=None, block_size=None, stochastic=False, seed=0):
    """(data bytes as uint8, scale float32, zero_point int32 or None), all flat."""
    if axis is not None:
        axis %= x32.ndim
    flat = x32.reshape(-1).astype(np.float32)
    g, n_groups = ref_groups(x32.shape, axis, block_size)
    if fmt == "uint8":
        mn = np.zeros(n_groups, np.float32)
        mx = np.zeros(n_groups, np.float32)
        np.minimum.at(mn, g, flat)
        np.maximum.at(mx, g, flat)
        lo = np.where(mn < 0, mn, np.float32(0)).astype(np.float32)
        hi = np.where(mx > 0, mx, np.float32(0)).astype(np.float32)
        scale = at_least_min(uint8_scale(lo, hi), hi - lo.astype(np.float64) > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale == 0, 0, np.rint(-lo / scale)).astype(np.int32)
    else:
        amax = np.zeros(n_groups, np.float32)
        np.maximum.at(amax, g, np.abs(flat))
        scale = at_least_min((amax / np.float32(QMAX[fmt])).astype(np.float32), amax > 0)
        zp = None
    s = scale[g]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (flat / s).astype(np.float32)
    zero = s == 0
    if fmt.startswith("fp8"):
        codes = fp8_encode(np.where(zero, np.float32(0), t), fmt)
        codes[zero] = 0
        return codes, scale, zp
    if stochastic:
        r = exact_floor_plus_u(np.where(zero, np.float32(0), t), rng_uniform(seed, np.arange(flat.size)))
    else:
        r = np.rint(t)
    if fmt == "uint8":
        r = (r + zp[g].astype(np.float32)).astype(np.float32)
        q = np.clip(r, 0, 255)
    else:
        q = np.clip(r, -QMAX[fmt], QMAX[fmt])
    q = np.where(zero, 0, np.nan_to_num(q)).astype(np.int64)
    if fmt == "int8":
        return q.astype(np.int8).view(np.uint8), scale, zp
    if fmt == "uint8":
        return q.astype(np.uint8), scale, zp
    nib = (q & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8), scale, zp


def ref_code_values(data_u8: np.ndarray, fmt: str, n: int) -> np.ndarray:
    """code (int formats) or fp8 value of each element, float32."""
    if fmt == "int8":
        return data_u8.view(np.int8).astype(np.float32)
    if fmt == "uint8":
        return data_u8.astype(np.float32)
    if fmt == "int4":
        nib = np.stack([data_u8 & 0xF, data_u8 >> 4], axis=1).reshape(-1)[:n].astype(np.int32)
        return ((nib ^ 8) - 8).astype(np.float32)
    return torch.from_numpy(data_u8.copy()).view(FP8_TORCH[fmt]).float().numpy()


def ref_dequantize(data_u8, scale, zp, fmt, shape, axis=None, block_size=None):
    """float32, flat: float32(code - zero_point) * scale, rounded once (the float64 product of two
    float32 values is exact); integer formats saturate to +-FLT_MAX instead of overflowing."""
    n = math.prod(shape)
    g, _ = ref_groups(shape, axis, block_size)
    v = ref_code_values(data_u8, fmt, n)
    if fmt == "uint8":
        v = (data_u8.astype(np.int32) - zp.reshape(-1)[g]).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # fp8 NaN codes; fp8 infinity * scale
        p = v.astype(np.float64) * scale.reshape(-1)[g].astype(np.float64)
        if fmt in INT_FMTS:
            f32_max = float(np.finfo(np.float32).max)
            p = np.clip(p, -f32_max, f32_max)
        return p.astype(np.float32)


# =============================================================================================
# Helpers
# =============================================================================================
def as_bytes(a) -> np.ndarray:
    """Flat uint8 view of a QTensor array (torch or NumPy)."""
    if isinstance(a, torch.Tensor):
        a = a.contiguous()
        a = a.view(torch.uint8) if a.element_size() == 1 else a
        return a.numpy().reshape(-1).view(np.uint8).copy()
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy()


def to_np(a) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def f32_of(x) -> np.ndarray:
    """x's values in float32 (exact for f16/bf16)."""
    if isinstance(x, torch.Tensor):
        return x.float().numpy()
    return x.astype(np.float32)


def make_x(rng, shape, mode, dtype=torch.float32) -> torch.Tensor:
    n = math.prod(shape)
    if mode == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    elif mode == "ties":  # halves: x / scale lands exactly on .5 when the group's absmax is a multiple
        v = rng.integers(-254, 255, n) / 2.0
    elif mode == "wide":  # log-uniform magnitudes over 2^-24 .. 1: fp8 subnormals and every binade
        v = np.exp2(rng.uniform(-24, 0, n)) * rng.choice([-1.0, 1.0], n)
    elif mode == "positive":  # uint8 with lo = 0
        v = rng.uniform(0, 5, n)
    else:  # sparse: many exact zeros, so some groups are all zero (and -0.0 appears)
        v = rng.standard_normal(n) * (rng.uniform(size=n) < 0.05)
        v[rng.uniform(size=n) < 0.3] = -0.0
    return torch.from_numpy(v.astype(np.float32)).reshape(shape).to(dtype)


def check_against_ref(x, q, fmt, axis=None, block_size=None, stochastic=False, seed=0):
    x32 = f32_of(x)
    data, scale, zp = ref_quantize(x32, fmt, axis, block_size, stochastic, seed)
    assert np.array_equal(as_bytes(q.scale), scale.view(np.uint8)), "scale bytes differ"
    if fmt == "uint8":
        assert np.array_equal(as_bytes(q.zero_point), zp.view(np.uint8)), "zero_point differs"
    else:
        assert q.zero_point is None
    got = as_bytes(q.data)
    if not np.array_equal(got, data):
        bad = np.flatnonzero(got != data)
        raise AssertionError(f"{bad.size} data bytes differ, first at {bad[:5]}: got {got[bad[:5]]}, "
                             f"want {data[bad[:5]]}")


# Granularities: name -> (kwargs builder, shapes of sizes 1, 7, 33, 257 and a few thousand).
GRANS = {
    "tensor": (lambda nd: {}, [(), (1,), (7,), (3, 11), (257,), (61, 53)]),
    "ch_first": (lambda nd: {"axis": 0}, [(1,), (7,), (3, 11), (257, 1), (37, 81)]),
    "ch_mid": (lambda nd: {"axis": 1}, [(1, 1, 1), (1, 7, 1), (3, 11, 1), (1, 3, 11), (2, 3, 555), (5, 601, 1)]),
    "ch_last": (lambda nd: {"axis": nd - 1}, [(1,), (7,), (3, 11), (257,), (50, 61), (1000, 3)]),
    "ch_neg": (lambda nd: {"axis": -2}, [(7, 1), (3, 11), (2, 5, 3, 4), (33, 97)]),
    "b32": (lambda nd: {"block_size": 32}, [(1,), (7,), (33,), (257,), (3, 1001)]),
    "b256": (lambda nd: {"block_size": 256}, [(1,), (33,), (257,), (7, 450)]),
    "b4096": (lambda nd: {"block_size": 4096}, [(7,), (257,), (5001,), (3, 3001)]),
}
MODES = ["normal", "ties", "wide", "sparse", "positive"]


def _norm_axis(kw, nd):
    kw = dict(kw)
    if kw.get("axis") is not None:
        kw["axis"] %= nd
    return kw


# =============================================================================================
# Bytes against the reference: every format x granularity x dtype x ISA x threads
# =============================================================================================
@pytest.mark.parametrize("gran", list(GRANS))
@pytest.mark.parametrize("xdtype", X_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fmt,rounding", [(f, "nearest") for f in FMTS] + [(f, "stochastic") for f in INT_FMTS])
def test_quantize_matches_reference(fmt, rounding, xdtype, gran, isa, threads, rng):
    kw_of, shapes = GRANS[gran]
    stochastic = rounding == "stochastic"
    for shape in shapes:
        for mode in MODES:
            x = make_x(rng, shape, mode, xdtype)
            kw = kw_of(len(shape))
            seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))  # full 64-bit range
            q = lc.quantize(x, fmt, rounding=rounding, seed=seed, **kw)
            check_against_ref(x, q, fmt, stochastic=stochastic, seed=seed, **_norm_axis(kw, len(shape)))


# Inputs large enough for two threads and many chunks (threads and ISA must not change a byte).
# ch0_even: rows of even length, which int4 also quantizes row by row in one pass (quant.cc
# quantize_rows); ch0's odd rows keep int4 on the two passes.
BIG = [("tensor", (67, 2003), {}), ("ch0", (67, 2003), {"axis": 0}), ("ch0_even", (67, 2004), {"axis": 0}),
       ("ch1", (67, 2003), {"axis": 1}),
       ("ch_mid", (5, 41, 677), {"axis": 1}), ("b256", (134227,), {"block_size": 256})]


@pytest.mark.parametrize("case", BIG, ids=[c[0] for c in BIG])
@pytest.mark.parametrize("fmt,rounding", [(f, "nearest") for f in FMTS] + [(f, "stochastic") for f in INT_FMTS])
def test_quantize_large_matches_reference(fmt, rounding, case, isa, threads, rng):
    _, shape, kw = case
    x = make_x(rng, shape, "normal")
    x.view(-1)[rng.integers(0, x.numel(), 5000)] = 0.0
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    q = lc.quantize(x, fmt, rounding=rounding, seed=seed, **kw)
    check_against_ref(x, q, fmt, stochastic=rounding == "stochastic", seed=seed, **kw)
    check_dequantize(q, shape, kw, OUT_DTYPES)


def test_isa_and_threads_bitwise_identical(rng):
    """Every ISA path and thread count gives the scalar single-thread bytes (quantize and
    dequantize, NaN payloads of fp8 codes included)."""
    x = make_x(rng, (3, 45001), "normal", torch.bfloat16)
    before_isa, before_threads = _runtime.cpu_isa(), lc.get_num_threads()
    results = {}
    try:
        for isa in _runtime.available_isas():
            for nt in (1, 2, 3):
                _runtime._set_cpu_isa(isa)
                lc.set_num_threads(nt)
                out = []
                for fmt in FMTS:
                    for kw in ({}, {"axis": 1}, {"axis": 0}, {"block_size": 64}):
                        rounding = "stochastic" if fmt in INT_FMTS else "nearest"
                        q = lc.quantize(x, fmt, rounding=rounding, seed=12345, **kw)
                        out += [as_bytes(q.data), as_bytes(q.scale)]
                        for dt in OUT_DTYPES:
                            out.append(as_bytes(lc.dequantize(q, dt).view(torch.uint8)))
                # fp8 codes that decode to NaN, through every output dtype
                codes = torch.from_numpy((np.arange(256 * 40) % 256).astype(np.uint8))
                for fmt in ("fp8_e4m3", "fp8_e5m2"):
                    q = lc.QTensor(codes.view(FP8_TORCH[fmt]), torch.full((), 0.75), None, fmt, (256 * 40,))
                    for dt in OUT_DTYPES:
                        out.append(as_bytes(lc.dequantize(q, dt).view(torch.uint8)))
                results[(isa, nt)] = out
    finally:
        _runtime._set_cpu_isa(before_isa)
        lc.set_num_threads(before_threads)
    base = results[("scalar", 1)]
    for key, out in results.items():
        for i, (a, b) in enumerate(zip(base, out)):
            assert np.array_equal(a, b), f"{key} differs from scalar/1 thread in output {i}"


def test_fp8_codes_match_torch_cast(rng):
    """In range, x / scale cast by torch (RNE) gives the same fp8 codes."""
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        for mode in ("normal", "wide", "ties"):
            x = make_x(rng, (4099,), mode)
            for kw in ({}, {"block_size": 128}):
                q = lc.quantize(x, fmt, **kw)
                scale = q.scale.reshape(-1).repeat_interleave(kw.get("block_size", x.numel()))[: x.numel()]
                t = x / scale
                # in range (x / scale may exceed qmax by float32 rounding, still far below the
                # saturation threshold, where torch would give NaN / Inf instead)
                assert float(t.abs().max()) <= QMAX[fmt] * (1 + 2.0**-20)
                want = t.to(FP8_TORCH[fmt]).view(torch.uint8)
                assert torch.equal(q.data.view(torch.uint8), want)


def test_rng_reference_is_sane():
    """The NumPy generator: uniform in [0, 1), 24 bits, and it depends on the seed and index."""
    u = rng_uniform(0xDEADBEEF12345678, np.arange(1 << 16))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert np.all((u * 2**24) == np.floor(u * 2**24))
    assert not np.array_equal(u, rng_uniform(0xDEADBEEF12345679, np.arange(1 << 16)))
    assert not np.array_equal(rng_uniform(1, np.arange(4) + (1 << 32)), rng_uniform(1, np.arange(4)))


# =============================================================================================
# Dequantize
# =============================================================================================
def check_dequantize(q, x_shape, kw, out_dtypes):
    """lc.dequantize(q, dt) against the reference, bit for bit, for each dt in out_dtypes."""
    want32 = ref_dequantize(as_bytes(q.data), to_np(q.scale), None if q.zero_point is None else to_np(q.zero_point),
                            q.dtype, x_shape, **_norm_axis(kw, len(x_shape)))
    for out_dtype in out_dtypes:
        want = torch.from_numpy(want32).reshape(x_shape).to(out_dtype)  # one RNE rounding from float32
        got = lc.dequantize(q, out_dtype)
        assert got.dtype == out_dtype and tuple(got.shape) == tuple(x_shape)
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(got.reshape(-1).view(bits), want.reshape(-1).view(bits)), out_dtype


# Thread counts only matter for large inputs: test_quantize_large_matches_reference covers them.
@pytest.mark.parametrize("gran", ["tensor", "ch_first", "ch_mid", "ch_last", "b32", "b4096"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_matches_reference(fmt, out_dtype, gran, isa, rng):
    kw_of, shapes = GRANS[gran]
    for shape in shapes:
        kw = kw_of(len(shape))
        q = lc.quantize(make_x(rng, shape, "normal"), fmt, **kw)
        check_dequantize(q, shape, kw, [out_dtype])
        assert torch.equal(q.dequantize(out_dtype), lc.dequantize(q, out_dtype))


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_every_code(fmt, isa, rng):
    """Hand-made data covering every code byte (int4: every nibble, -8 included; fp8: NaN codes)."""
    n = 256 * 9 + 1
    raw = (np.arange(n) * 7 % 256).astype(np.uint8)
    data = torch.from_numpy(raw[: (n + 1) // 2] if fmt == "int4" else raw)
    zp = torch.tensor([3, 250], dtype=torch.int32) if fmt == "uint8" else None
    if fmt.startswith("fp8"):
        data = data.view(FP8_TORCH[fmt])
    elif fmt == "int8":
        data = data.view(torch.int8)
    scale = torch.tensor([0.37, 0.0], dtype=torch.float32)  # the second half has scale 0
    q = lc.QTensor(data, scale, zp, fmt, (n,), None, 2048)
    got = lc.dequantize(q)
    want = ref_dequantize(as_bytes(data), scale.numpy(), None if zp is None else zp.numpy(), fmt, (n,), None, 2048)
    assert np.array_equal(np.isnan(got.numpy()), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got.numpy()[ok].view(np.uint32), want[ok].view(np.uint32))
    for dt in (torch.float16, torch.bfloat16):
        got_h = lc.dequantize(q, dt)
        want_h = torch.from_numpy(want).to(dt)
        assert torch.equal(torch.isnan(got_h), torch.isnan(want_h))
        assert torch.equal(got_h[~torch.isnan(want_h)], want_h[~torch.isnan(want_h)])


def test_dequantize_default_float32_and_float64(rng):
    x = make_x(rng, (5, 9), "normal")
    q = lc.quantize(x, "uint8", axis=1)
    d = lc.dequantize(q)
    assert d.dtype == torch.float32
    assert torch.equal(lc.dequantize(q, torch.float64), d.double())
    qn = lc.quantize(x.numpy(), "int4", block_size=32)
    dn = lc.dequantize(qn)
    assert isinstance(dn, np.ndarray) and dn.dtype == np.float32 and dn.shape == (5, 9)
    assert lc.dequantize(qn, np.float16).dtype == np.float16
    assert lc.dequantize(qn, np.dtype("float64")).dtype == np.float64
    assert qn.dequantize(torch.float16).dtype == np.float16


# =============================================================================================
# Contract guarantees, checked directly
# =============================================================================================
def _group_scales(q, shape, axis=None, block_size=None):
    g, _ = ref_groups(shape, axis, block_size)
    return to_np(q.scale).reshape(-1)[g].astype(np.float64)


@pytest.mark.parametrize("fmt", INT_FMTS)
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"axis": 1}, {"block_size": 64}], ids=str)
def test_error_bounds_integer(fmt, kw, rng):
    shape = (37, 201)
    for mode in ("normal", "wide", "ties", "sparse"):
        x = make_x(rng, shape, mode)
        x64 = x.double().numpy().reshape(-1)
        s = _group_scales(lc.quantize(x, fmt, **kw), shape, **kw)
        dq = lc.dequantize(lc.quantize(x, fmt, **kw)).double().numpy().reshape(-1)
        err = np.abs(dq - x64)
        slack = 255 * s * 2.0**-23 if fmt == "uint8" else 0  # uint8: float32 rounding at the range ends
        assert np.all(err <= quant_nearest_bound(np.abs(x64), s) + slack)
        qs = lc.quantize(x, fmt, rounding="stochastic", seed=int(rng.integers(0, 2**62)), **kw)
        dqs = lc.dequantize(qs).double().numpy().reshape(-1)
        errs = np.abs(dqs - x64)
        assert np.all((errs < quant_stochastic_bound(np.abs(x64), s) + slack) | ((errs == 0) & (s == 0)))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_error_bounds_fp8(fmt, rng):
    min_normal = 2.0**-6 if fmt == "fp8_e4m3" else 2.0**-14
    for mode in ("normal", "wide"):
        x = make_x(rng, (64, 257), mode)
        for kw in ({}, {"axis": 1}, {"block_size": 256}):
            q = lc.quantize(x, fmt, **kw)
            s = _group_scales(q, tuple(x.shape), **kw)
            x64 = x.double().numpy().reshape(-1)
            dq = lc.dequantize(q).double().numpy().reshape(-1)
            normal = np.abs(x64) >= min_normal * s
            rel = np.abs(dq - x64)[normal] / np.abs(x64)[normal]
            # half an ulp of the format, plus float32 rounding of x / scale and of the product
            assert np.all(rel <= FP8_REL[fmt] * (1 + 4 * 2.0**-24) + 2 * 2.0**-24)


@pytest.mark.parametrize("fmt", INT_FMTS)
def test_stochastic_rounding_unbiased(fmt, rng):
    """The mean of N stochastically rounded copies of v approaches v. Each code is v/scale rounded
    down or up (values in [0, 1] after removing the floor), so by Hoeffding
    P(|mean - v| >= t * scale) <= 2 exp(-2 N t^2); with N = 2^20 and t = 0.01 that is 2e-91: the
    test cannot flake, while a biased rounding (e.g. nearest, off by up to scale/2) fails it."""
    n = 1 << 20
    for v in rng.uniform(-0.9, 0.9, 3):
        x = torch.full((n,), float(v), dtype=torch.float32)
        x[0] = 1.0  # absmax (and the uint8 range) set by one element
        x[1] = -1.0
        q = lc.quantize(x, fmt, rounding="stochastic", seed=int(rng.integers(0, 2**63)))
        dq = lc.dequantize(q).double()[2:]
        scale = float(q.scale)
        assert abs(float(dq.mean()) - float(x[2])) <= 0.01 * scale
        codes = torch.from_numpy(ref_code_values(as_bytes(q.data), fmt, n))[2:]
        assert float(codes.max() - codes.min()) <= 1  # only the two neighbours of v / scale occur
        # nearest rounding of the same data is biased, so the test can tell them apart
        qn = lc.quantize(x, fmt)
        frac = float(x[2]) / scale - math.floor(float(x[2]) / scale)
        if 0.1 < frac < 0.4 or 0.6 < frac < 0.9:
            assert abs(float(lc.dequantize(qn).double()[2:].mean()) - float(x[2])) > 0.05 * scale


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"axis": 1}, {"block_size": 32}], ids=str)
def test_all_zero_groups(fmt, kw, isa, rng):
    x = make_x(rng, (6, 64), "normal")
    x[2] = 0.0
    x[3] = -0.0
    x[:, 5] = 0.0
    x[:, 7] = -0.0
    if not kw:
        x.zero_()
    q = lc.quantize(x, fmt, **kw)
    check_against_ref(x, q, fmt, **kw)
    dq = lc.dequantize(q)
    zero_rows = [2, 3] if kw.get("axis") == 0 or kw.get("block_size") else []
    zero_cols = [5, 7] if kw.get("axis") == 1 else []
    s = to_np(q.scale).reshape(-1)
    if not kw:
        assert s.view(np.uint32)[0] == 0 and torch.equal(dq.view(torch.int32), torch.zeros_like(dq).view(torch.int32))
        assert not as_bytes(q.data).any()
    for r in zero_rows:  # rows 2, 3 are whole groups (axis 0) or whole blocks of 32 (64 per row)
        groups = [r] if kw.get("axis") == 0 else [2 * r, 2 * r + 1]
        assert np.all(s.view(np.uint32)[groups] == 0)  # +0.0, not -0.0
        assert np.all(dq[r].numpy().view(np.uint32) == 0)  # exact +0.0
        if fmt == "uint8":
            assert np.all(to_np(q.zero_point)[groups] == 0)
    for c in zero_cols:
        assert s.view(np.uint32)[c] == 0 and np.all(dq[:, c].numpy().view(np.uint32) == 0)


@pytest.mark.parametrize("n", [1, 7, 33, 257, 8193])
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"block_size": 32}], ids=str)
def test_int4_packing_and_padding(n, kw, isa, rng):
    x = make_x(rng, (n,), "normal")
    for rounding in ("nearest", "stochastic"):
        q = lc.quantize(x, "int4", rounding=rounding, seed=5, **kw)
        assert q.data.shape == ((n + 1) // 2,) and q.data.dtype == torch.uint8
        b = q.data.numpy()
        codes = np.stack([b & 0xF, b >> 4], axis=1).reshape(-1)
        if n % 2:
            assert codes[-1] == 0  # the padding nibble
        vals = (codes[:n].astype(np.int32) ^ 8) - 8
        assert vals.min() >= -7 and vals.max() <= 7
        s = _group_scales(q, (n,), **kw)
        assert np.array_equal(vals.astype(np.float32) * s.astype(np.float32), lc.dequantize(q).numpy())


def test_per_channel_int4_odd_rows(rng):
    """Channel boundaries that fall in the middle of a byte (odd n_inner and odd rows)."""
    for shape, axis in [((3, 5, 7), 1), ((7, 3), 1), ((5, 3, 1), 1), ((9, 11), 0), ((3, 3, 3, 3), 2)]:
        x = make_x(rng, shape, "normal")
        for rounding in ("nearest", "stochastic"):
            q = lc.quantize(x, "int4", axis=axis, rounding=rounding, seed=99)
            check_against_ref(x, q, "int4", axis=axis, stochastic=rounding == "stochastic", seed=99)


# =============================================================================================
# Inputs: kinds, layouts, dtypes, shapes of outputs
# =============================================================================================
@pytest.mark.parametrize("fmt", FMTS)
def test_numpy_inputs_and_outputs(fmt, rng):
    for npdt in (np.float32, np.float16):
        xt = make_x(rng, (13, 21), "normal").to(torch.float16 if npdt == np.float16 else torch.float32)
        xn = xt.numpy()
        for kw in ({}, {"axis": 1}, {"block_size": 64}):
            qn = lc.quantize(xn, fmt, **kw)
            qt = lc.quantize(xt, fmt, **kw)
            assert isinstance(qn.data, np.ndarray) and isinstance(qn.scale, np.ndarray)
            want_dt = {"int8": np.int8, "fp8_e4m3": np.uint8, "fp8_e5m2": np.uint8}.get(fmt, np.uint8)
            assert qn.data.dtype == want_dt and qn.scale.dtype == np.float32
            assert np.array_equal(as_bytes(qn.data), as_bytes(qt.data))
            assert np.array_equal(as_bytes(qn.scale), as_bytes(qt.scale))
            if fmt == "uint8":
                assert isinstance(qn.zero_point, np.ndarray) and qn.zero_point.dtype == np.int32
            if fmt.startswith("fp8"):
                assert qt.data.dtype == FP8_TORCH[fmt]
            dn = lc.dequantize(qn)
            assert isinstance(dn, np.ndarray) and np.array_equal(dn, lc.dequantize(qt).numpy())


def test_output_shapes_and_fields(rng):
    x = make_x(rng, (4, 6, 10), "normal")
    cases = [({}, (), None, None), ({"axis": 1}, (6,), 1, None), ({"axis": -1}, (10,), 2, None),
             ({"axis": -3}, (4,), 0, None), ({"block_size": 32}, (8,), None, 32)]
    for kw, sshape, axis, bs in cases:
        for fmt in FMTS:
            q = lc.quantize(x, fmt, **kw)
            assert q.dtype == fmt and q.shape == (4, 6, 10) and q.axis == axis and q.block_size == bs
            assert tuple(q.scale.shape) == sshape and q.scale.dtype == torch.float32
            assert q.data.shape == ((120,) if fmt == "int4" else (4, 6, 10))
            if fmt == "uint8":
                assert q.zero_point.shape == sshape and q.zero_point.dtype == torch.int32
            else:
                assert q.zero_point is None
            zp_bytes = 0 if q.zero_point is None else 4 * max(1, math.prod(sshape))
            assert q.nbytes == q.data.numel() * q.data.element_size() + 4 * max(1, math.prod(sshape)) + zp_bytes
            assert q.to("cpu").data is q.data


@pytest.mark.parametrize("fmt", FMTS)
def test_non_contiguous_inputs(fmt, rng):
    base = make_x(rng, (40, 70), "normal")
    views = [base.t(), base[::2, 1::3], base[:, 5], base.t()[3:],
             base.unsqueeze(0).expand(3, 40, 70)]
    for v in views:
        for kw in ({}, {"axis": 0}, {"axis": -1}, {"block_size": 32}):
            for rounding in (("nearest", "stochastic") if fmt in INT_FMTS else ("nearest",)):
                q = lc.quantize(v, fmt, rounding=rounding, seed=17, **kw)
                qc = lc.quantize(v.contiguous(), fmt, rounding=rounding, seed=17, **kw)
                assert np.array_equal(as_bytes(q.data), as_bytes(qc.data))
                assert np.array_equal(as_bytes(q.scale), as_bytes(qc.scale))
    xn = base.numpy()
    for v in (xn.T, xn[::-1, ::3], xn[:, ::-2].T):
        q = lc.quantize(v, fmt, axis=1)
        check_against_ref(v, q, fmt, axis=1)


def test_empty_inputs():
    for fmt in FMTS:
        q = lc.quantize(torch.empty(0), fmt)
        assert q.data.numel() == 0 and q.scale.shape == () and float(q.scale) == 0.0
        q = lc.quantize(torch.empty(3, 0, 2), fmt, axis=0)
        assert q.scale.shape == (3,) and torch.equal(q.scale, torch.zeros(3))
        if fmt == "uint8":
            assert torch.equal(q.zero_point, torch.zeros(3, dtype=torch.int32))
        assert q.data.shape == ((0,) if fmt == "int4" else (3, 0, 2))
        assert lc.dequantize(q).shape == (3, 0, 2)
        q = lc.quantize(torch.empty(0, 5), fmt, axis=1)
        assert torch.equal(q.scale, torch.zeros(5))
        q = lc.quantize(np.empty((2, 0), np.float32), fmt, block_size=64)
        assert q.scale.shape == (0,) and isinstance(q.scale, np.ndarray)
        assert lc.dequantize(q).shape == (2, 0)


def test_requires_grad_input(rng):
    x = make_x(rng, (8, 33), "normal").requires_grad_()
    q = lc.quantize(x, "int8", axis=0)
    check_against_ref(x.detach(), q, "int8", axis=0)


# =============================================================================================
# Non-finite values
# =============================================================================================
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"axis": 1}, {"block_size": 32}, {"block_size": 4096}], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "uint8", "fp8_e4m3"])
def test_non_finite_reports_first_index(fmt, kw, isa, threads, rng):
    for bad in (float("nan"), float("inf"), float("-inf")):
        for shape, pos in [((5,), (0,)), ((5,), (4,)), ((130, 1031), (0, 0)), ((130, 1031), (129, 1030)),
                           ((130, 1031), (64, 3))]:
            x = make_x(rng, shape, "normal")
            x[pos] = bad
            if len(shape) == 2:
                x[-1, -1] = float("nan")  # a later offending element must not be the one reported
                x[pos] = bad
            with pytest.raises(ValueError, match=re.escape(f"at index {pos}")) as e:
                lc.quantize(x, fmt, **{k: v for k, v in kw.items() if k != "axis" or v < len(shape)})
            assert "lc.quantize" in str(e.value)
            assert ("NaN" if bad != bad else "Inf") in str(e.value)


def test_non_finite_index_in_c_order_of_given_view(rng):
    """Reported in C order of x as given: a transposed view's first bad element is not the first in
    memory."""
    base = make_x(rng, (50, 40), "normal")
    base[0, 30] = float("nan")  # memory-first, but in base.t() it is at (30, 0)
    base[20, 1] = float("inf")  # in base.t() at (1, 20): C-order first
    x = base.t()
    for kw in ({}, {"axis": 1}, {"block_size": 64}):
        with pytest.raises(ValueError, match=re.escape("at index (1, 20) (flat index 70 in C order)")):
            lc.quantize(x, "int4", **kw)
    with pytest.raises(ValueError, match=re.escape("at index (1, 20)")):
        lc.quantize(x.numpy(), "uint8")
    h = torch.tensor([1.0, 2.0, 70000.0], dtype=torch.float32).to(torch.float16)  # f16 overflow -> inf
    with pytest.raises(ValueError, match=re.escape("at index (2,)")):
        lc.quantize(h, "int8")


# =============================================================================================
# Argument errors
# =============================================================================================
def test_errors_quantize():
    x = torch.randn(4, 8)
    cases = [
        (lambda: lc.quantize([1.0, 2.0]), TypeError, "x must be a torch.Tensor or numpy.ndarray"),
        (lambda: lc.quantize(torch.ones(3, dtype=torch.float64)), TypeError, "float64"),
        (lambda: lc.quantize(np.ones(3)), TypeError, "float64"),
        (lambda: lc.quantize(torch.ones(3, dtype=torch.int32)), TypeError, "int32"),
        (lambda: lc.quantize(x, "int3"), ValueError, "'int3'"),
        (lambda: lc.quantize(x, "INT8"), ValueError, "dtype must be one of"),
        (lambda: lc.quantize(x, 8), TypeError, "dtype"),
        (lambda: lc.quantize(x, torch.float32), TypeError, "dtype"),
        (lambda: lc.quantize(x, axis=2), ValueError, "axis 2 is out of range for x of shape (4, 8)"),
        (lambda: lc.quantize(x, axis=-3), ValueError, "axis -3"),
        (lambda: lc.quantize(torch.tensor(1.0), axis=0), ValueError, "axis 0"),
        (lambda: lc.quantize(x, axis=1.0), TypeError, "axis must be an int"),
        (lambda: lc.quantize(x, axis=True), TypeError, "axis must be an int"),
        (lambda: lc.quantize(x, axis=0, block_size=32), ValueError, "axis and block_size"),
        (lambda: lc.quantize(x, block_size=48), ValueError, "block_size must be a power of two in 32..4096, got 48"),
        (lambda: lc.quantize(x, block_size=16), ValueError, "got 16"),
        (lambda: lc.quantize(x, block_size=8192), ValueError, "got 8192"),
        (lambda: lc.quantize(x, block_size=0), ValueError, "got 0"),
        (lambda: lc.quantize(x, block_size=-64), ValueError, "got -64"),
        (lambda: lc.quantize(x, block_size=64.0), TypeError, "block_size must be an int"),
        (lambda: lc.quantize(x, block_size="64"), TypeError, "block_size must be an int"),
        (lambda: lc.quantize(x, rounding="up"), ValueError, "rounding must be 'nearest' or 'stochastic', got 'up'"),
        (lambda: lc.quantize(x, rounding=None), ValueError, "rounding"),
        (lambda: lc.quantize(x, "fp8_e4m3", rounding="stochastic"), ValueError, "integer formats only"),
        (lambda: lc.quantize(x, "fp8_e5m2", rounding="stochastic"), ValueError, "fp8_e5m2"),
        (lambda: lc.quantize(x, rounding="stochastic", seed=-1), ValueError, "seed must be in [0, 2**64), got -1"),
        (lambda: lc.quantize(x, rounding="stochastic", seed=2**64), ValueError, "seed"),
        (lambda: lc.quantize(x, rounding="stochastic", seed=1.5), TypeError, "seed must be an int"),
        (lambda: lc.quantize(x.to("meta").to(torch.float64)), TypeError, "float64"),
        (lambda: lc.quantize(x.to_sparse()), ValueError, "x must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)) as e:
            fn()
        assert str(e.value).startswith("lc.quantize:"), str(e.value)


def test_errors_dequantize(rng):
    x = make_x(rng, (4, 8), "normal")
    q = lc.quantize(x, "uint8", axis=1)
    qn = lc.quantize(x.numpy(), "int8")
    import dataclasses

    rep = dataclasses.replace
    cases = [
        (lambda: lc.dequantize(x), TypeError, "q must be a lepton_core.QTensor"),
        (lambda: lc.dequantize(q, torch.int8), TypeError, "dtype must be float32, float16, bfloat16 or float64"),
        (lambda: lc.dequantize(q, "float32"), TypeError, "dtype must be a torch or NumPy dtype"),
        (lambda: lc.dequantize(q, np.int32), TypeError, "dtype"),
        (lambda: lc.dequantize(qn, torch.bfloat16), TypeError, "bfloat16"),
        (lambda: q.dequantize(torch.int32), TypeError, "dtype"),
        (lambda: lc.dequantize(rep(q, dtype="int5")), ValueError, "q.dtype"),
        (lambda: lc.dequantize(rep(q, data=q.data.to_sparse())), ValueError, "q.data must be a dense (strided) tensor"),
        (lambda: lc.dequantize(rep(q, scale=q.scale[:3])), ValueError, "q.scale must be float32 with 8 elements"),
        (lambda: lc.dequantize(rep(q, scale=q.scale.double())), TypeError, "q.scale"),
        (lambda: lc.dequantize(rep(q, zero_point=None)), ValueError, "q.zero_point"),
        (lambda: lc.dequantize(rep(q, data=q.data[:2])), ValueError, "q.data has 16 elements, expected 32"),
        (lambda: lc.dequantize(rep(q, data=q.data.view(torch.int8))), TypeError, "q.data"),
        (lambda: lc.dequantize(rep(q, scale=q.scale.numpy())), TypeError, "q.scale"),
        (lambda: lc.dequantize(rep(q, axis=2)), ValueError, "q.axis"),
        (lambda: lc.dequantize(rep(qn, zero_point=np.zeros((), np.int32))), ValueError, "zero_point must be None"),
        (lambda: lc.dequantize(rep(qn, block_size=33)), ValueError, "q.block_size"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)) as e:
            fn()
        assert str(e.value).startswith("lc.dequantize:"), str(e.value)


# =============================================================================================
# Seeds
# =============================================================================================
def test_seed_none_draws_from_torch_generator(rng):
    x = make_x(rng, (1000,), "normal")
    torch.manual_seed(1234)
    a = lc.quantize(x, "int8", rounding="stochastic")
    b = lc.quantize(x, "int8", rounding="stochastic")
    torch.manual_seed(1234)
    a2 = lc.quantize(x, "int8", rounding="stochastic")
    assert torch.equal(a.data, a2.data) and not torch.equal(a.data, b.data)
    same = lc.quantize(x, "int8", rounding="stochastic", seed=2**64 - 1)
    check_against_ref(x, same, "int8", stochastic=True, seed=2**64 - 1)
    assert torch.equal(same.data, lc.quantize(x, "int8", rounding="stochastic", seed=np.uint64(2**64 - 1)).data)
    assert torch.equal(lc.quantize(x, "int8", seed=5).data, lc.quantize(x, "int8").data)  # nearest ignores it


# =============================================================================================
# Serialization, torch.library, torch.compile
# =============================================================================================
@pytest.mark.parametrize("fmt", FMTS)
def test_torch_save_load_weights_only(fmt, rng):
    x = make_x(rng, (6, 10), "normal")
    for q in (lc.quantize(x, fmt, axis=0), lc.quantize(x.numpy(), fmt, block_size=32)):
        buf = io.BytesIO()
        torch.save({"q": q, "list": [q]}, buf)
        buf.seek(0)
        r = torch.load(buf, weights_only=True)["q"]
        assert type(r) is lc.QTensor and type(r.data) is type(q.data)
        assert (r.dtype, r.shape, r.axis, r.block_size) == (q.dtype, q.shape, q.axis, q.block_size)
        assert np.array_equal(as_bytes(r.data), as_bytes(q.data)) and np.array_equal(as_bytes(r.scale), as_bytes(q.scale))
        assert (r.zero_point is None) == (q.zero_point is None)
        assert np.array_equal(to_np(lc.dequantize(r)), to_np(lc.dequantize(q)))


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck(fmt, rng):
    x = make_x(rng, (4, 300), "normal")
    # one granularity and output dtype per format (each opcheck call traces several times)
    axis, bs, dt = [(None, None, torch.float32), (1, None, torch.bfloat16), (None, 256, torch.float16)][FMTS.index(fmt) % 3]
    stoch = fmt in INT_FMTS
    torch.library.opcheck(torch.ops.lepton.quantize.default, (x, fmt, axis, bs, stoch, -3))
    q = lc.quantize(x, fmt, axis=axis, block_size=bs)
    zp = q.zero_point if q.zero_point is not None else torch.empty(0, dtype=torch.int32)
    data = q.data.view(torch.uint8) if fmt.startswith("fp8") else q.data
    torch.library.opcheck(torch.ops.lepton.dequantize.default, (data, q.scale, zp, fmt, [4, 300], axis, bs, dt))


def test_ops_match_eager(rng):
    x = make_x(rng, (4, 300), "normal")
    for fmt in FMTS:
        data, scale, zp = torch.ops.lepton.quantize(x, fmt, 1, None, fmt in INT_FMTS, -(2**63))
        q = lc.quantize(x, fmt, axis=1, rounding="stochastic" if fmt in INT_FMTS else "nearest", seed=2**63)
        assert torch.equal(data.view(torch.uint8), q.data.view(torch.uint8)) and torch.equal(scale, q.scale)
        assert zp.numel() == (300 if fmt == "uint8" else 0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside inductor, not by us
def test_torch_compile_fullgraph(rng):
    torch._dynamo.reset()

    def f(x):
        q = lc.quantize(x, "int8", block_size=256)
        q2 = lc.quantize(x, "uint8", axis=1, rounding="stochastic", seed=7)
        return lc.dequantize(q), q2.dequantize(torch.bfloat16), q2.zero_point

    x = make_x(rng, (8, 512), "normal")
    got = torch.compile(f, fullgraph=True)(x)
    want = f(x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(Exception, match="NaN"):  # the non-finite check still runs inside the graph
        torch.compile(f, fullgraph=True)(torch.full((8, 512), float("nan")))

    # inside a differentiable graph: quantization is not differentiable (no gradient flows through
    # it, as in eager mode), the rest of the graph still is
    def g(x):
        return lc.dequantize(lc.quantize(x, "int4", axis=0)) * 0 + x * 2

    xg = x.clone().requires_grad_()
    torch.compile(g, fullgraph=True)(xg).sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, 2.0))
    assert not lc.quantize(xg, "int8").scale.requires_grad


# =============================================================================================
# Stochastic rounding is the floor of the EXACT sum x / scale + u (issue 9, defect 1)
# =============================================================================================
# (format, v_lo, v_hi): the quotient range of a group whose scale is exactly 1/16, made by putting
# v_hi / 16 (and, for uint8, v_lo / 16) in every group: int8 absmax 127/16; uint8 range 255/16 with
# zero point 128; int4 absmax 7/16.
EXACT_SCALE_RANGE = {"int8": (-127, 127), "uint8": (-128, 127), "int4": (-7, 7)}
STOCH_GRANS = {"tensor": (4100,), "rows": (41, 100), "cols": (41, 100), "b32": (4100,), "b256": (4100,)}
STOCH_KW = {"tensor": {}, "rows": {"axis": 0}, "cols": {"axis": 1}, "b32": {"block_size": 32},
            "b256": {"block_size": 256}}


def _adversarial_quotients(rng, fmt, shape, kw, seed) -> np.ndarray:
    """float32 quotients v (x = v / 16 with scale exactly 1/16) chosen where floor(v + u) is easy to
    get wrong: exact integers (u near 1 rounded v + u up a whole step), v just below and above
    k + 1 - u for this seed's own u (the carry boundary), tiny fractions below 2^-24 (finer than u's
    grid), and random fractions."""
    v_lo, v_hi = EXACT_SCALE_RANGE[fmt]
    n = math.prod(shape)
    u = rng_uniform(seed, np.arange(n)).astype(np.float64)
    k = rng.integers(v_lo, v_hi, n).astype(np.float64)  # v stays in [v_lo, v_hi)
    boundary = (k + 1 - u).astype(np.float32)  # rounded: on the carry, or either side of it
    tiny = (np.exp2(-rng.integers(25, 60, n)) * rng.choice([-1, 1], n)).astype(np.float32)
    candidates = [k, boundary, np.nextafter(boundary, np.float32(-np.inf)),
                  np.nextafter(boundary, np.float32(np.inf)), k + tiny, tiny,
                  np.float32(2.0**-25 + 2.0**-40) * rng.choice([-1, 1], n),  # frac + u just under 1
                  rng.uniform(v_lo, v_hi, n)]
    v = np.choose(rng.integers(0, len(candidates), n), [np.asarray(c, np.float32) for c in candidates])
    v = np.clip(v, v_lo, np.nextafter(np.float32(v_hi), np.float32(0)))
    # every group gets its extremes, so every scale is exactly 1/16 (and the uint8 zero point 128)
    g, n_groups = ref_groups(shape, kw.get("axis"), kw.get("block_size"))
    first = np.unique(g, return_index=True)[1]
    v[first] = v_hi
    if fmt == "uint8":
        second = np.array([np.flatnonzero(g == grp)[1] for grp in range(n_groups)])
        v[second] = v_lo
    return v.reshape(shape)


def test_stochastic_exact_quotient_issue9_reproduction(isa, threads):
    """Issue 9: x / scale an exact integer k must give code k for every u; the float32 sum k + u
    rounded to k + 1 when u was within half an ulp of 1 (seed 213813, index 967, k = 75 / 71)."""
    i = torch.arange(1024, dtype=torch.float32)
    cases = [("int8", ((i % 255) - 127) / 16, 213813), ("uint8", ((i % 256) - 128) / 16, 213813),
             ("int4", ((i % 15) - 7) / 16, 4321)]  # int4: k = -7 at index 285 gave -6
    for fmt, x, seed in cases:
        q = lc.quantize(x, fmt, rounding="stochastic", seed=seed)
        assert float(q.scale) == 1 / 16
        dq = lc.dequantize(q)
        bad = torch.nonzero(dq != x).flatten()
        assert bad.numel() == 0, f"{fmt}: off at {bad[:5].tolist()}: {dq[bad[:5]].tolist()} != {x[bad[:5]].tolist()}"


@pytest.mark.parametrize("gran", list(STOCH_GRANS))
@pytest.mark.parametrize("fmt", INT_FMTS)
def test_stochastic_floor_of_exact_sum(fmt, gran, isa, threads, rng):
    """Brute force over seeds: every code is exactly floor(v + u) (v = x / scale, u this seed's
    generator value at the element's index), computed in float64 without rounding; the bytes equal
    the reference; and the error is strictly below one scale (here exactly computable: scale 1/16)."""
    shape, kw = STOCH_GRANS[gran], STOCH_KW[gran]
    zp = 128 if fmt == "uint8" else 0
    for _ in range(6):
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        v = _adversarial_quotients(rng, fmt, shape, kw, seed)
        x = torch.from_numpy(v / np.float32(16))
        q = lc.quantize(x, fmt, rounding="stochastic", seed=seed, **kw)
        assert np.all(to_np(q.scale) == 1 / 16)
        if fmt == "uint8":
            assert np.all(to_np(q.zero_point) == zp)
        codes = ref_code_values(as_bytes(q.data), fmt, v.size) - zp
        want = exact_floor_plus_u(v.reshape(-1), rng_uniform(seed, np.arange(v.size)))
        bad = np.flatnonzero(codes != want)
        assert bad.size == 0, (f"seed {seed}: {bad.size} codes differ, first at {bad[:5]}: v {v.reshape(-1)[bad[:5]]}, "
                               f"got {codes[bad[:5]]}, want {want[bad[:5]]}")
        check_against_ref(x, q, fmt, stochastic=True, seed=seed, **kw)
        err = np.abs(lc.dequantize(q).double().numpy() - x.double().numpy())  # exact: scale is 2^-4
        assert err.max() < 1 / 16


def test_stochastic_isa_and_threads_bitwise_identical(rng):
    """The exact-sum stochastic rounding gives the scalar single-thread bytes on every ISA path and
    thread count, on inputs full of carry boundaries (large enough for several threads)."""
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    shape = (3, 90001)
    before_isa, before_threads = _runtime.cpu_isa(), lc.get_num_threads()
    results = {}
    try:
        for fmt in INT_FMTS:
            for kw in ({}, {"axis": 0}, {"axis": 1}, {"block_size": 64}):
                v = _adversarial_quotients(rng, fmt, shape, kw, seed)
                x = torch.from_numpy(v / np.float32(16))
                for isa in _runtime.available_isas():
                    for nt in (1, 2, 3):
                        _runtime._set_cpu_isa(isa)
                        lc.set_num_threads(nt)
                        q = lc.quantize(x, fmt, rounding="stochastic", seed=seed, **kw)
                        results.setdefault((fmt, str(kw)), {})[(isa, nt)] = as_bytes(q.data)
                base = results[(fmt, str(kw))][("scalar", 1)]
                check_against_ref(x, lc.quantize(x, fmt, rounding="stochastic", seed=seed, **kw), fmt,
                                  stochastic=True, seed=seed, **kw)
                for key, got in results[(fmt, str(kw))].items():
                    assert np.array_equal(got, base), f"{fmt} {kw}: {key} differs from scalar/1 thread"
    finally:
        _runtime._set_cpu_isa(before_isa)
        lc.set_num_threads(before_threads)


# =============================================================================================
# Values near FLT_MAX: finite scales and dequantized values, within the contract's bounds (issue 9,
# defect 13: a uint8 range wider than FLT_MAX gave scale inf and dequantized to NaN; int8 with
# absmax FLT_MAX dequantized its end codes to +-inf)
# =============================================================================================
F32_MAX = float(np.finfo(np.float32).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
EXTREME_GROUPS = [
    [2e38, -2e38, 1.0],  # the issue's example
    [F32_MAX, -F32_MAX, 0.0, 1.0],
    [F32_MAX, -1e37, 5.0],  # uint8: zero point rounds down, so (255 - zp) * scale > FLT_MAX
    [-F32_MAX, 1e37, -3.0],
    [F32_MAX, -F32_MAX * 0.999],
    [F32_MAX, 1.0],
    [-F32_MAX, -1.0, -1e-30],
    [1.7e38, -1.7e38],  # hi - lo just past FLT_MAX
    [3e38, -0.5e38],
]


def _extreme_x(rng, width, dtype):
    """(len(EXTREME_GROUPS), width): row r holds group r's values, then random values inside its
    range, in random order; for bfloat16 the values are scaled into its (smaller) finite range."""
    cap = F32_MAX if dtype == torch.float32 else BF16_MAX
    rows = []
    for vals in EXTREME_GROUPS:
        vals = np.array(vals) * (cap / F32_MAX)
        lo, hi = min(vals.min(), 0.0), max(vals.max(), 0.0)
        fill = rng.uniform(lo, hi, width - len(vals)) * rng.choice([1.0, 1e-3, 1e-20], width - len(vals))
        rows.append(rng.permutation(np.concatenate([vals, fill])))
    return torch.from_numpy(np.array(rows, dtype=np.float32)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["tensor", "rows", "cols", "b32"])
@pytest.mark.parametrize("fmt", FMTS)
def test_extreme_values_finite_and_within_bounds(fmt, layout, dtype, isa, rng):
    """Every format and granularity on groups spanning up to [-FLT_MAX, FLT_MAX]: the bytes are the
    reference's (uint8 scale = (hi - lo) / 255 as if float32 had no exponent limit); scales, zero
    points and dequantized values are finite; and the contract's error bounds hold."""
    x = _extreme_x(rng, 32, dtype)
    if layout == "cols":
        x = x.T.contiguous()
    kw = {"rows": {"axis": 0}, "cols": {"axis": 1}, "b32": {"block_size": 32}}.get(layout, {})
    xs = list(x) if layout == "tensor" else [x]  # per-tensor: one group (row) at a time
    roundings = ["nearest", "stochastic"] if fmt in INT_FMTS else ["nearest"]
    for xi in xs:
        for rounding in roundings:
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            q = lc.quantize(xi, fmt, rounding=rounding, seed=seed, **kw)
            check_against_ref(xi, q, fmt, stochastic=rounding == "stochastic", seed=seed, **kw)
            check_dequantize(q, tuple(xi.shape), kw, OUT_DTYPES)
            s = _group_scales(q, tuple(xi.shape), **kw)
            assert np.all(np.isfinite(s)) and np.all(s > 0)
            if fmt == "uint8":
                assert np.all((to_np(q.zero_point) >= 0) & (to_np(q.zero_point) <= 255))
            x64 = xi.double().numpy().reshape(-1)
            dq = lc.dequantize(q).double().numpy().reshape(-1)
            assert np.all(np.isfinite(dq))
            err = np.abs(dq - x64)
            if fmt.startswith("fp8"):
                min_normal = 2.0**-6 if fmt == "fp8_e4m3" else 2.0**-14
                normal = np.abs(x64) >= min_normal * s
                rel = err[normal] / np.abs(x64)[normal]
                assert np.all(rel <= FP8_REL[fmt] * (1 + 4 * 2.0**-24) + 2 * 2.0**-24)
                continue
            slack = 255 * s * 2.0**-23 if fmt == "uint8" else 0  # uint8: float32 rounding at the range ends
            if rounding == "nearest":
                assert np.all(err <= quant_nearest_bound(np.abs(x64), s) + slack)
            else:
                assert np.all(err < quant_stochastic_bound(np.abs(x64), s) + slack)


def test_uint8_scale_past_float32_range_is_the_contract_formula():
    """[2e38, -2e38, 1]: hi - lo = 4e38 > FLT_MAX. The scale is (hi - lo) / 255 rounded as float32
    would without an exponent limit, the zero point rint(-lo / scale) = 128 (2e38 / scale =
    127.5 rounds to even), and each end dequantizes within scale / 2."""
    x = torch.tensor([2e38, -2e38, 1.0])
    q = lc.quantize(x, "uint8")
    want = f32_round_unbounded(f32_round_unbounded(np.float64(np.float32(2e38)) * 2) / 255)
    assert float(q.scale) == want
    assert int(q.zero_point) == int(np.rint(np.float32(2e38) / np.float32(want)))
    dq = lc.dequantize(q).double()
    assert torch.all((dq - x.double()).abs() <= float(q.scale) / 2)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_saturates_integer_formats(fmt, isa):
    """A code whose value * scale exceeds FLT_MAX dequantizes to +-FLT_MAX for integer formats (the
    float32 nearest to any x it can stand for), on every ISA path and in the SIMD body and the tail
    alike; fp8 products are unchanged (an e5m2 infinity code stays infinite), NaN scales give NaN."""
    n = 64 * 2 + 45  # block 2: a 32-element SIMD body and a 13-element scalar tail
    raw = (np.arange(n) * 37 % 256).astype(np.uint8)
    data = torch.from_numpy(raw[: (n + 1) // 2] if fmt == "int4" else raw)
    if fmt.startswith("fp8"):
        data = data.view(FP8_TORCH[fmt])
    elif fmt == "int8":
        data = data.view(torch.int8)
    zp = torch.tensor([3, 0, 250], dtype=torch.int32) if fmt == "uint8" else None
    scale = torch.tensor([3e38, float("nan"), F32_MAX / 3], dtype=torch.float32)
    q = lc.QTensor(data, scale, zp, fmt, (n,), None, 64)
    want = ref_dequantize(as_bytes(data), scale.numpy(), None if zp is None else zp.numpy(), fmt, (n,), None, 64)
    got = lc.dequantize(q).numpy()
    assert np.all(np.isnan(got[64:128]))
    ends = np.r_[0:64, 128:n]
    assert np.array_equal(np.isnan(got[ends]), np.isnan(want[ends]))  # fp8 NaN codes
    ok = ends[~np.isnan(want[ends])]
    assert np.array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))
    if fmt in INT_FMTS:
        assert np.all(np.isfinite(got[ends]))
        for part in (got[:64], got[128:160], got[160:]):  # SIMD bodies and the tail
            assert np.any(np.abs(part) == F32_MAX)
