"""The CUDA backend (lepton_core._C_cuda, lepton_core/backends/cuda.py).

Two parts:
1. Tests that run on every machine: the package imports and lc.info() explains a missing GPU; the
   CUDA module (when built) imports without a driver; the probe's reasons; and the *host twins* of
   the quantization kernels (the same __host__ __device__ arithmetic the kernels run, executed on the
   CPU) are byte-identical to a NumPy reference of API.md §2 and to the CPU backend, and the CUDA
   ports of dtypes.h match them bit for bit (rng.h is compiled for the device as it is).
2. GPU tests (marked `cuda`): skipped, with the reason lc.info() gives, unless the CUDA backend is
   usable. They run the contract on CUDA tensors: gemm against a float64 reference (API.md §1
   bounds) for every dtype, layout, batch and tile configuration, int8 exactly, scaled_gemm exactly
   as its float32 formula, and quantize / dequantize byte-identical to the CPU path and to the host
   twins for every format, granularity and rounding (stochastic with the same seed).
"""
import importlib.util
import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch

import lepton_core as lc
from lepton_core._codes import FORMATS
from lepton_core.backends import cuda as _cuda_backend

from tolerances import FP8_REL, gemm_rel_norm_bound, quant_nearest_bound, quant_stochastic_bound

INFO = lc.info()
HAS_CUDA = "cuda" in INFO["backends"]
# Every GPU test carries both marks; without a usable backend it is skipped with lc.info()'s reason.
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason=f"CUDA backend unavailable: {INFO['cuda_unavailable_reason']}")

_BUILT = importlib.util.find_spec("lepton_core._C_cuda") is not None

FMTS = ["int8", "uint8", "int4", "fp8_e4m3", "fp8_e5m2"]
INT_FMTS = ["int8", "uint8", "int4"]
QMAX = {"int8": 127.0, "uint8": 255.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LP_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
F32_MAX = float(np.finfo(np.float32).max)


# =============================================================================================
# Part 1: every machine
# =============================================================================================
def test_import_and_info_explain_cuda_status():
    info = lc.info()
    gpu_here = torch.cuda.is_available()
    if HAS_CUDA:
        assert info["cuda_unavailable_reason"] is None
        assert isinstance(info["cuda_device"], str) and info["cuda_device"]
    else:
        assert "cuda" not in info["backends"] and info["cuda_device"] is None
        reason = info["cuda_unavailable_reason"]
        assert isinstance(reason, str) and len(reason) > 20, reason
        if not gpu_here and _BUILT:
            # The module is built but there is no usable GPU: the reason must say what is missing.
            assert any(w in reason for w in ("driver", "GPU", "PyTorch", "device")), reason


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built (no nvcc at build time, or LEPTON_CUDA=OFF)")
def test_cuda_module_imports_without_a_gpu():
    from lepton_core import _C_cuda

    n, err = _C_cuda.device_count()
    assert isinstance(n, int) and isinstance(err, str)
    assert (n > 0) == (err == "")
    assert _C_cuda.runtime_version() >= 11000
    archs = _C_cuda.built_archs()
    assert archs and all(int(a.split("-")[0].rstrip("a")) >= 80 for a in archs.split(","))


def _fake_module(n_devices, err, driver, runtime=13000, check=""):
    m = types.SimpleNamespace()
    m.device_count = lambda: (n_devices, err)
    m.driver_version = lambda: driver
    m.runtime_version = lambda: runtime
    m.device_check = lambda dev: check
    return m


@pytest.mark.parametrize("case", ["no_driver", "old_driver", "no_device", "cpu_torch", "old_gpu"])
def test_probe_reasons(monkeypatch, case):
    """probe() turns every way the GPU path can be missing into a sentence (and never raises)."""
    fake = {
        "no_driver": _fake_module(0, "cudaErrorInsufficientDriver: CUDA driver version is insufficient", 0),
        "old_driver": _fake_module(0, "cudaErrorInsufficientDriver: CUDA driver version is insufficient", 12040),
        "no_device": _fake_module(0, "cudaErrorNoDevice: no CUDA-capable device is detected", 13000),
        "cpu_torch": _fake_module(1, "", 13000),
        "old_gpu": _fake_module(1, "", 13000, check="the GPU has compute capability 7.5; ..."),
    }[case]
    monkeypatch.setitem(sys.modules, "lepton_core._C_cuda", fake)
    monkeypatch.setattr(lc, "_C_cuda", fake, raising=False)
    if case == "cpu_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
    if case == "old_gpu":
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    mod, dev, reason = _cuda_backend.probe()
    assert mod is None and dev is None
    assert isinstance(reason, str) and reason
    want = {"no_driver": "driver", "old_driver": "CUDA 12.4", "no_device": "no CUDA GPU",
            "cpu_torch": "PyTorch build has no CUDA", "old_gpu": "compute capability 7.5"}[case]
    assert want in reason, reason


class _NoCudaModule:
    """A meta-path finder that makes `import lepton_core._C_cuda` fail as on a build without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "lepton_core._C_cuda":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_probe_without_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "lepton_core._C_cuda", raising=False)
    monkeypatch.delattr(lc, "_C_cuda", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoCudaModule()] + sys.meta_path)
    mod, dev, reason = _cuda_backend.probe()
    assert mod is None and dev is None and "built without its CUDA backend" in reason


def test_cuda_tensors_rejected_clearly_without_backend():
    if HAS_CUDA:
        pytest.skip("the CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="CUDA backend is unavailable"):
        _cuda_backend._mod()


# ---- NumPy reference of API.md §2 (written from the contract, independent of the kernels) ----
def _mix32(x):
    x = np.asarray(x, dtype=np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def ref_uniform(seed, idx):
    idx = np.asarray(idx, dtype=np.uint64)
    key = _mix32((seed & 0xFFFFFFFF) ^ int(_mix32(((seed >> 32) + 0x9E3779B9) & 0xFFFFFFFF)))
    key_hi = _mix32(key ^ _mix32(((idx >> np.uint64(32)) + np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)))
    h = _mix32(_mix32((idx & np.uint64(0xFFFFFFFF)) ^ key_hi) + key)
    return (h >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)


def f32_round_unbounded(a):
    """float64 -> nearest float32 significand (24 bits, ties to even) with no exponent limit."""
    m, e = np.frexp(a)
    return np.ldexp(np.rint(np.ldexp(m, 24)), e - 24)


def ref_dequant_values(val, scale, fmt):
    """float32(val * scale), rounded once; integer formats saturate to +-FLT_MAX (API.md §2)."""
    p = val.astype(np.float64) * scale.astype(np.float64)  # exact
    if fmt in INT_FMTS:
        p = np.clip(p, -F32_MAX, F32_MAX)
    with np.errstate(over="ignore", invalid="ignore"):
        return p.astype(np.float32)


def ref_layout(shape, axis, block_size):
    """(n_outer, n_channels, n_inner, block_size) and the group of each flat index."""
    n = math.prod(shape)
    i = np.arange(n)
    if block_size:
        return (1, 1, n, block_size), i // block_size, -(-n // block_size)
    if axis is None:
        return (1, 1, n, 0), np.zeros(n, np.int64), 1
    n_inner = math.prod(shape[axis + 1:])
    return (math.prod(shape[:axis]), shape[axis], n_inner, 0), (i // n_inner) % shape[axis], shape[axis]


def ref_quantize(x32, fmt, groups, n_groups, stochastic=False, seed=0):
    flat = x32.reshape(-1).astype(np.float32)
    hi = np.zeros(n_groups, np.float32)
    nlo = np.zeros(n_groups, np.float32)
    np.maximum.at(hi, groups, flat)
    np.maximum.at(nlo, groups, -flat)
    hi, nlo = hi + np.float32(0), nlo + np.float32(0)  # -0.0 -> +0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fmt == "uint8":
            scale = ((hi + nlo) / np.float32(255)).astype(np.float32)
            # hi + nlo past FLT_MAX: the same formula as if float32 had no exponent limit (both are
            # >= 2^103 there, so the float64 sum is exact; see test_quant.uint8_scale)
            wide = f32_round_unbounded(f32_round_unbounded(hi.astype(np.float64) + nlo) / 255.0)
            scale = np.where(np.isfinite(scale), scale, wide.astype(np.float32))
            scale = np.where((scale == 0) & ((hi > 0) | (nlo > 0)), np.float32(2.0**-149), scale).astype(np.float32)
            zp = np.where(scale == 0, 0, np.rint(nlo / scale)).astype(np.int32)
        else:
            scale = (np.maximum(hi, nlo) / np.float32(QMAX[fmt])).astype(np.float32)
            scale = np.where((scale == 0) & ((hi > 0) | (nlo > 0)), np.float32(2.0**-149), scale).astype(np.float32)
            zp = np.zeros(n_groups, np.int32)
        s = scale[groups]
        q = (flat / s).astype(np.float32)
    zero = s == 0
    q[zero] = 0
    if fmt.startswith("fp8"):
        # dtypes.h saturates finite values to the largest code (torch's cast would give inf / NaN);
        # quotients beyond qmax happen when a tiny absmax makes the scale subnormal and inexact.
        sat = np.clip(q, -QMAX[fmt], QMAX[fmt]).astype(np.float32)
        codes = torch.from_numpy(sat).to(FP8_TORCH[fmt]).view(torch.uint8).numpy().copy()
        codes[zero] = 0
        return codes, scale, (zp if fmt == "uint8" else None)
    if stochastic:
        # floor of the exact sum q + u (u on the 2^-24 grid): every float64 step here is exact
        u24 = ref_uniform(seed, np.arange(flat.size)).astype(np.float64) * 2.0**24
        r = np.floor((np.floor(q.astype(np.float64) * 2.0**24) + u24) / 2.0**24)
    else:
        r = np.rint(q)
    if fmt == "uint8":
        c = np.clip(r + zp[groups], 0, 255)
    else:
        c = np.clip(r, -QMAX[fmt], QMAX[fmt])
    c = np.where(zero, 0, c).astype(np.int64)
    if fmt == "int4":
        nib = (c & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        codes = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    else:
        codes = (c & 0xFF).astype(np.uint8)
    return codes, scale, (zp if fmt == "uint8" else None)


def make_x(rng, shape, dtype, kind="normal"):
    n = math.prod(shape)
    if kind == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    elif kind == "positive":
        v = rng.uniform(0.5, 3.0, n)
    elif kind == "ties":  # many exact .5 quotients: round-half-even matters
        v = rng.integers(-254, 255, n) / 2.0
    else:  # zero groups, sign zeros and tiny values mixed in
        v = rng.standard_normal(n)
        v[rng.random(n) < 0.4] = 0.0
        v[rng.random(n) < 0.05] = -0.0
        v[: max(1, n // 3)] = 0.0
        v[rng.random(n) < 0.02] = 1e-40
    return torch.from_numpy(v.reshape(shape).astype(np.float32)).to(dtype)


def host_quantize(x, fmt, layout, stochastic=False, seed=0):
    """Runs the kernels' host twin on a CPU tensor: (codes uint8, scale, zero_point, bad_index)."""
    from lepton_core import _C_cuda

    (n_outer, n_channels, n_inner, block) = layout
    n = x.numel()
    n_groups = -(-n // block) if block else n_channels
    data = torch.full(((n + 1) // 2 if fmt == "int4" else n,), 0xA5, dtype=torch.uint8)
    scale = torch.full((n_groups,), float("nan"), dtype=torch.float32)
    zp = torch.full((n_groups,), -7, dtype=torch.int32) if fmt == "uint8" else None
    bad = torch.zeros(1, dtype=torch.int64)
    xc = x.contiguous()
    _C_cuda.host_quantize(in_dtype=LP_CODE[x.dtype], format=FORMATS[fmt].code, n_outer=n_outer,
                          n_channels=n_channels, n_inner=n_inner, block_size=block, stochastic=stochastic,
                          seed=seed, x=xc.data_ptr(), data=data.data_ptr(), scale=scale.data_ptr(),
                          zero_point=0 if zp is None else zp.data_ptr(), bad_index=bad.data_ptr())
    return data, scale, zp, int(bad.item())


def host_dequantize(data, scale, zp, fmt, layout, out_dtype, n):
    from lepton_core import _C_cuda

    (n_outer, n_channels, n_inner, block) = layout
    out = torch.full((n,), float("nan"), dtype=out_dtype)
    _C_cuda.host_dequantize(format=FORMATS[fmt].code, n_outer=n_outer, n_channels=n_channels,
                            n_inner=n_inner, block_size=block, data=data.data_ptr(), scale=scale.data_ptr(),
                            zero_point=0 if zp is None else zp.data_ptr(), out=out.data_ptr(),
                            out_dtype=LP_CODE[out_dtype])
    return out


GRANULARITIES = [
    ((257,), None, None),
    ((1,), None, None),
    ((7, 33), 0, None),
    ((7, 33), -1, None),
    ((3, 300, 5), 1, None),
    ((2, 3, 300), 2, None),
    ((4, 5, 6, 7), 2, None),
    ((4097,), None, 32),
    ((1000,), None, 256),
    ((3, 1001), None, 512),
    ((9000,), None, 4096),
    ((33,), None, 64),
]


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
def test_host_twin_ports_match_dtypes_and_rng():
    from lepton_core import _C_cuda

    assert _C_cuda.host_selftest(1 << 22) == ""


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("shape,axis,block", GRANULARITIES)
@pytest.mark.parametrize("fmt", FMTS)
def test_host_twin_quantize_matches_reference(rng, shape, axis, block, fmt):
    """The kernels' arithmetic (run on the host) is the contract, byte for byte."""
    for dtype in X_DTYPES:
        for kind in ("normal", "ties", "zeros", "positive"):
            x = make_x(rng, shape, dtype, kind)
            ax = None if axis is None else axis % len(shape)
            layout, groups, n_groups = ref_layout(shape, ax, block)
            roundings = [False, True] if fmt in INT_FMTS else [False]
            for stochastic in roundings:
                seed = int(rng.integers(0, 2**63)) * 2 + 1 if stochastic else 0
                data, scale, zp, bad = host_quantize(x, fmt, layout, stochastic, seed)
                want_codes, want_scale, want_zp = ref_quantize(x.float().numpy(), fmt, groups, n_groups, stochastic,
                                                               seed)
                assert bad == (1 << 63) - 1
                np.testing.assert_array_equal(scale.numpy().view(np.uint32), want_scale.view(np.uint32))
                np.testing.assert_array_equal(data.numpy(), want_codes)
                if fmt == "uint8":
                    np.testing.assert_array_equal(zp.numpy(), want_zp)


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("fmt", FMTS)
def test_host_twin_dequantize_matches_reference(rng, fmt):
    for shape, axis, block in GRANULARITIES:
        x = make_x(rng, shape, torch.float32)
        ax = None if axis is None else axis % len(shape)
        layout, groups, n_groups = ref_layout(shape, ax, block)
        data, scale, zp, _ = host_quantize(x, fmt, layout)
        n = x.numel()
        if fmt == "int4":
            nib = np.stack([data.numpy() & 0xF, data.numpy() >> 4], 1).reshape(-1)[:n].astype(np.int64)
            val = ((nib ^ 8) - 8).astype(np.float32)
        elif fmt == "int8":
            val = data.numpy().view(np.int8).astype(np.float32)
        elif fmt == "uint8":
            val = (data.numpy().astype(np.int64) - zp.numpy()[groups]).astype(np.float32)
        else:
            val = data.view(FP8_TORCH[fmt]).float().numpy()
        want = ref_dequant_values(val, scale.numpy()[groups], fmt)
        for out_dtype in X_DTYPES:
            got = host_dequantize(data, scale, zp, fmt, layout, out_dtype, n)
            ref = torch.from_numpy(want).to(out_dtype)
            assert torch.equal(got.view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                               ref.view(torch.int16 if out_dtype != torch.float32 else torch.int32))


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
def test_host_twin_reports_first_non_finite(rng):
    for shape, axis, block in GRANULARITIES:
        x = make_x(rng, shape, torch.float32)
        n = x.numel()
        pos = sorted(set(rng.integers(0, n, 3).tolist()))
        flat = x.view(-1)
        for p, v in zip(pos, [float("nan"), float("inf"), float("-inf")]):
            flat[p] = v
        layout, _, _ = ref_layout(shape, None if axis is None else axis % len(shape), block)
        assert host_quantize(x, "int8", layout)[3] == pos[0]


def _cpu_quantize_available():
    try:
        lc.quantize(torch.ones(4))
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("fmt", FMTS)
def test_host_twin_matches_cpu_backend(rng, fmt):
    """The CUDA arithmetic equals the CPU backend's bytes (lc.quantize on CPU tensors)."""
    if not _cpu_quantize_available():
        pytest.skip("the CPU quantize backend is not in this build yet (lc.quantize raises)")
    for shape, axis, block in GRANULARITIES:
        for dtype in X_DTYPES:
            x = make_x(rng, shape, dtype, "normal" if rng.random() < 0.7 else "zeros")
            ax = None if axis is None else axis % len(shape)
            layout, _, _ = ref_layout(shape, ax, block)
            for rounding in (["nearest", "stochastic"] if fmt in INT_FMTS else ["nearest"]):
                seed = int(rng.integers(0, 2**63)) * 2 + 1
                q = lc.quantize(x, fmt, axis=ax, block_size=block, rounding=rounding, seed=seed)
                data, scale, zp, _ = host_quantize(x, fmt, layout, rounding == "stochastic", seed)
                assert torch.equal(q.data.reshape(-1).view(torch.uint8), data)
                assert torch.equal(q.scale.reshape(-1).view(torch.int32), scale.view(torch.int32))
                if fmt == "uint8":
                    assert torch.equal(q.zero_point.reshape(-1), zp)


# ---- stochastic rounding is the floor of the exact sum x / scale + u (issue 9) ----
# (format, v_lo, v_hi): every group holds v_hi / 16 (uint8: and v_lo / 16), so its scale is exactly
# 1/16 (uint8 zero point 128) and x / scale = v exactly.
EXACT_SCALE_RANGE = {"int8": (-127, 127), "uint8": (-128, 127), "int4": (-7, 7)}
CARRY_GRANULARITIES = [((4100,), None, None), ((41, 100), 0, None), ((41, 100), 1, None), ((4100,), None, 32),
                       ((4100,), None, 256), ((5, 8193), None, 4096)]


def carry_boundary_x(rng, fmt, shape, groups, seed):
    """x = v / 16 with quotients v where floor(v + u) is easy to get wrong: exact integers (the float32
    sum k + u rounded up to k + 1 for u near 1), and just below / on / above k + 1 - u for this seed's
    own u, and tiny fractions finer than u's 2^-24 grid."""
    v_lo, v_hi = EXACT_SCALE_RANGE[fmt]
    n = math.prod(shape)
    u = ref_uniform(seed, np.arange(n)).astype(np.float64)
    k = rng.integers(v_lo, v_hi, n).astype(np.float64)
    boundary = (k + 1 - u).astype(np.float32)
    tiny = (np.exp2(-rng.integers(25, 60, n)) * rng.choice([-1, 1], n)).astype(np.float32)
    candidates = [k, boundary, np.nextafter(boundary, np.float32(-np.inf)), np.nextafter(boundary, np.float32(np.inf)),
                  tiny, rng.uniform(v_lo, v_hi, n)]
    v = np.choose(rng.integers(0, len(candidates), n), [np.asarray(c, np.float32) for c in candidates])
    v = np.clip(v, v_lo, np.nextafter(np.float32(v_hi), np.float32(0)))
    first = np.unique(groups, return_index=True)[1]
    v[first] = v_hi
    if fmt == "uint8":
        v[[np.flatnonzero(groups == g)[1] for g in range(len(first))]] = v_lo
    return torch.from_numpy((v / np.float32(16)).reshape(shape))


def carry_repro_cases():
    """Issue 9's reproductions: x / scale an exact integer k, scale 1/16, and a seed whose u at one
    index (967; int4: 285) is so close to 1 that the float32 sum k + u rounded to k + 1."""
    i = torch.arange(1024, dtype=torch.float32)
    return [("int8", ((i % 255) - 127) / 16, 213813), ("uint8", ((i % 256) - 128) / 16, 213813),
            ("int4", ((i % 15) - 7) / 16, 4321)]


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("fmt", INT_FMTS)
def test_host_twin_stochastic_floor_of_exact_sum(rng, fmt):
    """The kernels' stochastic rounding (run on the host) is floor(x / scale + u) of the exact sum,
    byte for byte, on inputs full of carry boundaries; the issue's reproductions dequantize exactly."""
    for shape, axis, block in CARRY_GRANULARITIES:
        layout, groups, n_groups = ref_layout(shape, axis, block)
        for _ in range(4):
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            x = carry_boundary_x(rng, fmt, shape, groups, seed)
            data, scale, zp, _ = host_quantize(x, fmt, layout, True, seed)
            want_codes, want_scale, want_zp = ref_quantize(x.numpy(), fmt, groups, n_groups, True, seed)
            assert torch.all(scale == 1 / 16)
            np.testing.assert_array_equal(data.numpy(), want_codes)
            if fmt == "uint8":
                np.testing.assert_array_equal(zp.numpy(), want_zp)
    for f, x, seed in carry_repro_cases():
        if f == fmt:
            layout = ref_layout(tuple(x.shape), None, None)[0]
            data, scale, zp, _ = host_quantize(x, fmt, layout, True, seed)
            out = host_dequantize(data, scale, zp, fmt, layout, torch.float32, x.numel())
            assert torch.equal(out, x)


# ---- values near FLT_MAX (issue 9): finite scales and dequantized values ----
EXTREME_GROUPS = [[2e38, -2e38, 1.0], [F32_MAX, -F32_MAX, 0.0, 1.0], [F32_MAX, -1e37, 5.0], [-F32_MAX, 1e37, -3.0],
                  [F32_MAX, -F32_MAX * 0.999], [F32_MAX, 1.0], [1.7e38, -1.7e38], [3e38, -0.5e38]]


def extreme_x(rng, width):
    """(len(EXTREME_GROUPS), width) float32: row r holds group r's values and random ones inside its range."""
    rows = []
    for vals in EXTREME_GROUPS:
        lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
        fill = rng.uniform(lo, hi, width - len(vals)) * rng.choice([1.0, 1e-3, 1e-20], width - len(vals))
        rows.append(rng.permutation(np.concatenate([vals, fill])))
    return torch.from_numpy(np.array(rows, dtype=np.float32))


EXTREME_LAYOUTS = [(0, None), (1, None), (None, 32)]  # (axis, block_size) over extreme_x(rng, 32)


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("fmt", FMTS)
def test_host_twin_extreme_values(rng, fmt):
    """Groups spanning up to [-FLT_MAX, FLT_MAX]: the kernels' arithmetic gives the reference's bytes
    (uint8 scale = (hi - lo) / 255 as if float32 had no exponent limit), finite scales, and finite
    dequantized values (integer formats saturate) within the contract's bounds."""
    x = extreme_x(rng, 32)
    for axis, block in EXTREME_LAYOUTS:
        layout, groups, n_groups = ref_layout(tuple(x.shape), axis, block)
        for stochastic in ([False, True] if fmt in INT_FMTS else [False]):
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            data, scale, zp, _ = host_quantize(x, fmt, layout, stochastic, seed)
            want_codes, want_scale, want_zp = ref_quantize(x.numpy(), fmt, groups, n_groups, stochastic, seed)
            np.testing.assert_array_equal(scale.numpy().view(np.uint32), want_scale.view(np.uint32))
            np.testing.assert_array_equal(data.numpy(), want_codes)
            if fmt == "uint8":
                np.testing.assert_array_equal(zp.numpy(), want_zp)
            assert torch.all(torch.isfinite(scale))
            out = host_dequantize(data, scale, zp, fmt, layout, torch.float32, x.numel()).double().numpy()
            assert np.all(np.isfinite(out))
            s = scale.double().numpy()[groups]
            x64 = x.double().numpy().reshape(-1)
            err = np.abs(out - x64)
            if fmt in INT_FMTS:  # as test_quant.test_error_bounds_integer (uint8: rounding at the range ends)
                slack = 255 * s * 2.0**-23 if fmt == "uint8" else 0
                bound = quant_stochastic_bound if stochastic else quant_nearest_bound
                assert np.all(err <= bound(np.abs(x64), s) + slack)
            else:
                normal = np.abs(x64) >= s * (2.0**-6 if fmt == "fp8_e4m3" else 2.0**-14)
                assert np.all(err[normal] / np.abs(x64[normal]) <= FP8_REL[fmt] * (1 + 4 * 2.0**-24) + 2 * 2.0**-24)


# ---- the Python glue of _cuda_backend against an emulation of the native contract (csrc/cuda/api.h) ----
class _EmulatedNative:
    """_C_cuda's documented contract run on host memory: the same pointers, element strides, layouts
    (A K-major; B K-major or N-major), tensor-core alignment preconditions and output rounding as the
    CUDA entry points. With it, the layout decisions of _cuda_backend (reading in place, packing,
    folding a broadcast batch) run on CPU tensors; quantize goes to the kernels' host twin."""

    NP = {0: np.float32, 1: np.float16, 2: np.uint16, 4: np.int8, 6: np.int32}

    def __init__(self):
        self.calls = []

    @classmethod
    def view(cls, ptr, code, shape, strides):
        import ctypes

        dt = np.dtype(cls.NP[code])
        if any(d == 0 for d in shape):
            return np.zeros(shape, dt)
        extent = 1 + sum((d - 1) * st for d, st in zip(shape, strides))
        base = np.frombuffer((ctypes.c_char * (extent * dt.itemsize)).from_address(ptr), dtype=dt)
        return np.lib.stride_tricks.as_strided(base, shape, [st * dt.itemsize for st in strides])

    @staticmethod
    def as_f64(a, code):
        if code == 2:  # bfloat16 bit patterns
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)

    def pack_rows(self, device, stream, elem_bytes, batch, rows, cols, src, src_batch_stride, src_row_stride,
                  src_col_stride, dst, dst_ld):
        self.calls.append("pack")
        code = {1: 4, 2: 1, 4: 0}[elem_bytes]
        s = self.view(src, code, (batch, rows, cols), (src_batch_stride, src_row_stride, src_col_stride))
        d = self.view(dst, code, (batch, rows, dst_ld), (rows * dst_ld, dst_ld, 1))
        d[...] = 0
        d[:, :, :cols] = s

    def gemm(self, device, stream, in_dtype, out_dtype, batch, m, n, k, a, a_batch_stride, lda, b, b_batch_stride,
             ldb, b_k_major, out, bias=0, scale_a=0, scale_a_n=0, scale_b=0, scale_b_n=0):
        self.calls.append(("gemm", batch, m, bool(b_k_major)))
        esize = np.dtype(self.NP[in_dtype]).itemsize
        if in_dtype != 0 and k > 0:
            for ptr, stride in ((a, lda), (a, a_batch_stride), (b, ldb), (b, b_batch_stride)):
                if ptr % 16 or (stride * esize) % 16:
                    raise ValueError("tensor-core operands need 16-byte aligned pointers and strides")
        assert in_dtype != 4 or b_k_major, "int8 B must be K-major"
        av = self.as_f64(self.view(a, in_dtype, (batch, m, k), (a_batch_stride, lda, 1)), in_dtype)
        if b_k_major:
            bv = self.view(b, in_dtype, (batch, n, k), (b_batch_stride, ldb, 1)).transpose(0, 2, 1)
        else:
            bv = self.view(b, in_dtype, (batch, k, n), (b_batch_stride, ldb, 1))
        acc = av @ self.as_f64(bv, in_dtype)
        if scale_a:
            acc = acc * self.view(scale_a, 0, (scale_a_n,), (1,)).reshape(1, -1, 1)
            acc = acc * self.view(scale_b, 0, (scale_b_n,), (1,)).reshape(1, 1, -1)
        if bias:
            acc = acc + self.view(bias, 0, (n,), (1,))
        res = torch.from_numpy(acc.reshape(batch * m * n))
        dst_dtype = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 6: torch.int32}[out_dtype]
        res = res.round().to(torch.int64).to(dst_dtype) if out_dtype == 6 else res.to(dst_dtype)
        dst = self.view(out, {0: 0, 1: 2, 2: 2, 6: 6}[out_dtype], (batch * m * n,), (1,))  # 16-bit: as bits
        dst[...] = res.view(torch.uint16 if out_dtype in (1, 2) else dst_dtype).numpy()

    def device_check(self, device):
        return ""

    def quantize(self, device, stream, in_dtype, format, n_outer, n_channels, n_inner, block_size, stochastic, seed,
                 x, data, scale, zero_point, stats, bad_index):
        from lepton_core import _C_cuda

        assert block_size or stats, "per-tensor / per-channel need the stats scratch"
        _C_cuda.host_quantize(in_dtype=in_dtype, format=format, n_outer=n_outer, n_channels=n_channels,
                              n_inner=n_inner, block_size=block_size, stochastic=stochastic, seed=seed, x=x,
                              data=data, scale=scale, zero_point=zero_point, bad_index=bad_index)

    def dequantize(self, device, stream, format, n_outer, n_channels, n_inner, block_size, data, scale, zero_point,
                   out, out_dtype):
        from lepton_core import _C_cuda

        _C_cuda.host_dequantize(format=format, n_outer=n_outer, n_channels=n_channels, n_inner=n_inner,
                                block_size=block_size, data=data, scale=scale, zero_point=zero_point, out=out,
                                out_dtype=out_dtype)


@pytest.fixture
def emulated(monkeypatch):
    emu = _EmulatedNative()
    monkeypatch.setattr(_cuda_backend, "_module", emu)
    monkeypatch.setattr(_cuda_backend, "_device_index", lambda t: 0)
    monkeypatch.setattr(_cuda_backend, "_stream", lambda device: 0)
    return emu


def _layouts(rows, cols, dtype):
    """(name, tensor) views of a (rows, cols) operand in every layout the backend must accept."""
    def r(*shape):
        return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-128, 128, shape).to(dtype)
    return [("contiguous", r(rows, cols)), ("transposed", r(cols, rows).t()),
            ("strided", r(rows, 2 * cols + 3)[:, 1::2][:, :cols]), ("offset", r(rows * cols + 1)[1:].view(rows, cols)),
            ("padded_rows", r(rows, cols + 5)[:, :cols])]


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_backend_glue_layouts_on_emulated_kernels(emulated, dtype):
    """gemm_into brings every layout (transposed, strided, misaligned, broadcast batch) into a form the
    kernels accept, reads w.t() and row-major B in place, and passes consistent strides."""
    for (m, k, n) in [(7, 33, 5), (16, 64, 24), (1, 9, 1), (5, 1, 3)]:
        for (na, a), (nb, b) in itertools.product(_layouts(m, k, dtype), _layouts(k, n, dtype)):
            out_dtype = torch.int32 if dtype == torch.int8 else dtype
            out = torch.full((1, m, n), 7, dtype=out_dtype)
            emulated.calls.clear()
            _cuda_backend.gemm_into(a.unsqueeze(0), b.unsqueeze(0), None, out)
            want = (a.double() @ b.double()).to(out_dtype)
            assert torch.equal(out[0], want), (na, nb, m, k, n)
            packs = emulated.calls.count("pack")
            if na in ("contiguous",) and nb in ("contiguous", "transposed") and \
                    (dtype == torch.float32 or (k * a.element_size()) % 16 == 0 and (n * a.element_size()) % 16 == 0):
                if not (dtype == torch.int8 and nb == "contiguous"):
                    assert packs == 0, (na, nb, emulated.calls)
    # batched, broadcast B, bias; the broadcast batch is folded into one GEMM of batch * M rows
    a = torch.randn(3, 8, 16).to(dtype) if dtype.is_floating_point else torch.randint(-128, 128, (3, 8, 16)).to(dtype)
    b = torch.randn(16, 8).to(dtype) if dtype.is_floating_point else torch.randint(-128, 128, (16, 8)).to(dtype)
    out_dtype = torch.int32 if dtype == torch.int8 else dtype
    out = torch.full((3, 8, 8), 7, dtype=out_dtype)
    emulated.calls.clear()
    bias = None if dtype == torch.int8 else torch.randn(8)
    _cuda_backend.gemm_into(a, b.unsqueeze(0).expand(3, 16, 8), bias, out)
    want = a.double() @ b.double() + (0 if bias is None else bias.double())
    assert torch.equal(out, want.to(out_dtype))
    gemm_calls = [c for c in emulated.calls if c != "pack"]
    assert gemm_calls[0][1:3] == (1, 24), gemm_calls


@pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built")
def test_backend_glue_scaled_gemm_and_quantize_on_emulated_kernels(emulated, rng):
    a = torch.randint(-127, 128, (9, 40), dtype=torch.int8)
    b = torch.randint(-127, 128, (13, 40), dtype=torch.int8).t()
    sa, sb, bias = torch.rand(9) + 0.1, torch.rand(1) + 0.1, torch.randn(13)
    out = torch.full((9, 13), float("nan"))
    _cuda_backend.scaled_gemm_into(a, b, sa, sb, bias, out)
    want = (a.double() @ b.double()) * sa.double().view(-1, 1) * sb.double() + bias.double()
    assert torch.allclose(out.double(), want, rtol=1e-6)
    for shape, axis, block in GRANULARITIES:
        x = make_x(rng, shape, torch.float32)
        ax = None if axis is None else axis % len(shape)
        layout, groups, n_groups = ref_layout(shape, ax, block)
        for fmt in FMTS:
            data, scale, zp, _ = host_quantize(x, fmt, layout)
            d = torch.full_like(data, 0xA5)
            s = torch.full_like(scale, float("nan"))
            z = None if zp is None else torch.full_like(zp, -3)
            assert _cuda_backend.quantize_into(x, FORMATS[fmt], *layout, False, 0, d, s, z) == -1
            assert torch.equal(d, data) and torch.equal(s.view(torch.int32), scale.view(torch.int32))
            out = torch.full((x.numel(),), float("nan"))
            _cuda_backend.dequantize_into(d, s, z, FORMATS[fmt], *layout, out)
            assert torch.equal(out, host_dequantize(data, scale, zp, fmt, layout, torch.float32, x.numel()))
        xb = x.clone()
        xb.view(-1)[x.numel() // 2] = float("nan")
        d = torch.empty_like(data)
        assert _cuda_backend.quantize_into(xb, FORMATS["int8"], *layout, False, 0, d, torch.empty_like(scale), None) == \
            x.numel() // 2


# =============================================================================================
# Part 2: on the GPU
# =============================================================================================
def _ref_gemm(a, b, bias=None):
    r = a.double().cpu() @ b.double().cpu()
    if bias is not None:
        r = r + bias.double().cpu()
    return r


def _rel_err(out, ref):
    out = out.double().cpu()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def _rand(shape, dtype, device="cuda"):
    return torch.randn(shape, dtype=torch.float32).to(dtype).to(device)


GEMM_SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 257), (64, 64, 64), (129, 257, 65), (257, 31, 1000),
               (1, 1000, 64), (300, 1, 77)]


def _operand(rows, cols, dtype, t, device="cuda"):
    """A (rows, cols) operand: plain, transposed view, strided slice, or misaligned by one element."""
    if t == "t":
        return _rand((cols, rows), dtype, device).t()
    if t == "strided":
        return _rand((rows, 2 * cols + 3), dtype, device)[:, 1::2][:, :cols]
    if t == "offset":
        return _rand((rows * cols + 1,), dtype, device)[1:].view(rows, cols)
    return _rand((rows, cols), dtype, device)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt", "strided", "offset"])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_float(dtype, out_dtype, layout, m, k, n, rng):
    """lc.gemm on CUDA tensors of every float dtype and layout against a float64 reference."""
    for bias in (False, True):
        _gemm_float_case(dtype, out_dtype, layout, m, k, n, bias)


def _gemm_float_case(dtype, out_dtype, layout, m, k, n, bias):
    ta = {"nn": "n", "nt": "n", "tn": "t", "tt": "t", "strided": "strided", "offset": "offset"}[layout]
    tb = {"nn": "n", "nt": "t", "tn": "n", "tt": "t", "strided": "strided", "offset": "offset"}[layout]
    a = _operand(m, k, dtype, ta)
    b = _operand(k, n, dtype, tb)
    bv = _rand((n,), torch.float32) if bias else None
    out = lc.gemm(a, b, bias=bv, out_dtype=out_dtype)
    od = out_dtype or dtype
    assert out.device.type == "cuda" and out.dtype == od and out.shape == (m, n)
    ref = _ref_gemm(a, b, bv)
    name = str(od).replace("torch.", "")
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) <= gemm_rel_norm_bound(name, k)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_gemm_bias_batched_broadcast(dtype, rng):
    for (bsz, m, k, n) in [(3, 7, 33, 5), (2, 130, 70, 129), (5, 1, 8, 1)]:
        a = _rand((bsz, m, k), dtype)
        for b in (_rand((k, n), dtype), _rand((bsz, k, n), dtype), _rand((bsz, n, k), dtype).transpose(1, 2)):
            bias = _rand((n,), torch.float32)
            out = lc.gemm(a, b, bias=bias)
            ref = a.double().cpu() @ b.double().cpu() + bias.double().cpu()
            assert out.shape == (bsz, m, n)
            assert _rel_err(out, ref) <= gemm_rel_norm_bound(str(dtype).replace("torch.", ""), k)
        # a transposed batch (non-contiguous A) goes through the packing pre-pass
        at = _rand((bsz, k, m), dtype).transpose(1, 2)
        bt = _rand((k, n), dtype).t().contiguous().t()
        out = lc.gemm(at, bt)
        assert out.shape == (bsz, m, n)
        assert _rel_err(out, at.double().cpu() @ bt.double().cpu()) <= \
            gemm_rel_norm_bound(str(dtype).replace("torch.", ""), k)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_gemm_into_direct_both_tile_configs(dtype, rng):
    """_cuda_backend.gemm_into itself (what the op module calls), on sizes that pick each config."""
    n_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for (m, k, n) in [(40, 100, 24), (2048, 136, 2048), (1030, 1500, 1029)]:
        for bt in ("n", "t"):
            a = _rand((m, k), dtype)
            b = _operand(k, n, dtype, bt)
            out = torch.full((1, m, n), float("nan"), dtype=dtype, device="cuda")
            _cuda_backend.gemm_into(a.unsqueeze(0), b.unsqueeze(0), None, out)
            ref = _ref_gemm(a, b)
            assert _rel_err(out[0], ref) <= gemm_rel_norm_bound(str(dtype).replace("torch.", ""), k)
            cfg = _cuda_backend.gemm_config(a.unsqueeze(0), b.unsqueeze(0), dtype)
            if m * n <= 64 * 64:
                assert "64x64" in cfg, cfg
            elif (m // 128) * (n // 128) >= n_sms:
                assert "128x128" in cfg, cfg


@pytest.mark.cuda
@requires_gpu
def test_gemm_empty_dims_and_k0():
    a = _rand((0, 5), torch.bfloat16)
    assert lc.gemm(a, _rand((5, 3), torch.bfloat16)).shape == (0, 3)
    a = _rand((4, 0), torch.float16)
    bias = _rand((3,), torch.float32)
    out = lc.gemm(a, _rand((0, 3), torch.float16), bias=bias, out_dtype=torch.float32)
    assert torch.equal(out.cpu(), bias.cpu().expand(4, 3))
    out = torch.full((1, 4, 3), float("nan"), device="cuda")
    _cuda_backend.gemm_into(a.unsqueeze(0), _rand((0, 3), torch.float16).unsqueeze(0), bias, out)
    assert torch.equal(out[0].cpu(), bias.cpu().expand(4, 3))


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES + [(2048, 1024, 2048), (77, 4096, 129)])
def test_gemm_int8_exact(m, k, n, rng):
    def operand(rows, cols, t):
        """A CUDA view (the layout is made on the GPU: .cuda() of a strided CPU view would densify it)."""
        if t == "t":
            return torch.randint(-128, 128, (cols, rows), dtype=torch.int8).cuda().t()
        if t == "strided":
            return torch.randint(-128, 128, (rows, 2 * cols + 1), dtype=torch.int8).cuda()[:, 1::2][:, :cols]
        if t == "offset":
            return torch.randint(-128, 128, (rows * cols + 3,), dtype=torch.int8).cuda()[3:].view(rows, cols)
        return torch.randint(-128, 128, (rows, cols), dtype=torch.int8).cuda()

    for ta, tb in (("n", "n"), ("n", "t"), ("t", "n"), ("strided", "offset"), ("offset", "strided")):
        a, b = operand(m, k, ta), operand(k, n, tb)
        out = lc.gemm(a, b)
        assert out.dtype == torch.int32 and out.device.type == "cuda"
        assert torch.equal(out.cpu().long(), a.cpu().long() @ b.cpu().long())


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_gemm_exact_formula(out_dtype, rng):
    """(float(acc) * sa[m]) * sb[n] + bias[n] in float32, rounded once: equal to a float32 emulation."""
    for (m, k, n) in [(7, 33, 5), (130, 257, 129), (2048, 512, 1024)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
        for per_row in (True, False):
            sa = torch.rand(m if per_row else 1) + 0.01
            sb = torch.rand(n if per_row else 1) + 0.01
            bias = torch.randn(n) if per_row else None
            out = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
            _cuda_backend.scaled_gemm_into(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(),
                                           None if bias is None else bias.cuda(), out)
            acc = (a.long() @ b.long()).float()
            want = (acc * sa.view(-1, 1)) * sb.view(1, -1)
            if bias is not None:
                want = want + bias
            assert torch.equal(out.cpu(), want.to(out_dtype))
            qa = lc.QTensor(a.cuda(), sa.cuda() if per_row else sa[0].cuda(), None, "int8", (m, k),
                            0 if per_row else None, None)
            qb = lc.QTensor(b.contiguous().cuda(), sb.cuda() if per_row else sb[0].cuda(), None, "int8", (k, n),
                            1 if per_row else None, None)
            got = lc.scaled_gemm(qa, qb, bias=None if bias is None else bias.cuda(), out_dtype=out_dtype)
            assert torch.equal(got.cpu(), want.to(out_dtype))


@pytest.mark.cuda
@requires_gpu
def test_gemm_runs_on_current_stream():
    a, b = _rand((512, 256), torch.bfloat16), _rand((256, 384), torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # a and b were made on the default stream
    with torch.cuda.stream(s):
        out = lc.gemm(a, b)
    s.synchronize()
    assert _rel_err(out, _ref_gemm(a, b)) <= 1e-2


@pytest.mark.cuda
@requires_gpu
def test_native_precondition_errors_are_python_exceptions():
    from lepton_core import _C_cuda

    a = torch.zeros(64, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="16-byte aligned"):
        _C_cuda.gemm(device=a.device.index or 0, stream=torch.cuda.current_stream().cuda_stream, in_dtype=1,
                     out_dtype=0, batch=1, m=8, n=8, k=8, a=a.data_ptr() + 2, a_batch_stride=0, lda=64,
                     b=a.data_ptr(), b_batch_stride=0, ldb=64, b_k_major=True, out=a.data_ptr())
    with pytest.raises(ValueError, match="block_size"):
        _C_cuda.quantize(device=0, stream=0, in_dtype=0, format=0, n_outer=1, n_channels=1, n_inner=10,
                         block_size=48, stochastic=False, seed=0, x=a.data_ptr(), data=a.data_ptr(),
                         scale=a.data_ptr(), zero_point=0, stats=0, bad_index=a.data_ptr())


def _gpu_quantize_direct(x, fmt, layout, stochastic, seed):
    n_outer, n_channels, n_inner, block = layout
    n = x.numel()
    n_groups = -(-n // block) if block else n_channels
    data = torch.full(((n + 1) // 2 if fmt == "int4" else n,), 0xA5, dtype=torch.uint8, device="cuda")
    scale = torch.full((n_groups,), float("nan"), device="cuda")
    zp = torch.full((n_groups,), -7, dtype=torch.int32, device="cuda") if fmt == "uint8" else None
    bad = _cuda_backend.quantize_into(x, FORMATS[fmt], n_outer, n_channels, n_inner, block, stochastic, seed, data, scale, zp)
    return data, scale, zp, bad


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("shape,axis,block", GRANULARITIES + [
    (((1 << 20) + 3,), None, None), ((512, 1024), 0, None), ((1024, 513), 1, None),
    (((1 << 20) + 37,), None, 128), ((777, 4099), None, 2048)])
@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_gpu_equals_host_twin_and_cpu(shape, axis, block, fmt, rng):
    """Same bytes (data, scale, zero_point) on the GPU as the host twin and as the CPU backend, for
    every input dtype and rounding, stochastic with the same seed."""
    cpu_ok = _cpu_quantize_available()
    for dtype in X_DTYPES:
        x = make_x(rng, shape, dtype, "normal" if rng.random() < 0.6 else "zeros")
        ax = None if axis is None else axis % len(shape)
        layout, _, _ = ref_layout(shape, ax, block)
        for rounding in (["nearest", "stochastic"] if fmt in INT_FMTS else ["nearest"]):
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            st = rounding == "stochastic"
            d, s, z, bad = _gpu_quantize_direct(x.cuda(), fmt, layout, st, seed)
            hd, hs, hz, _ = host_quantize(x, fmt, layout, st, seed)
            assert bad == -1
            assert torch.equal(d.cpu(), hd)
            assert torch.equal(s.cpu().view(torch.int32), hs.view(torch.int32))
            if fmt == "uint8":
                assert torch.equal(z.cpu(), hz)
            if cpu_ok:
                qg = lc.quantize(x.cuda(), fmt, axis=ax, block_size=block, rounding=rounding, seed=seed)
                qc = lc.quantize(x, fmt, axis=ax, block_size=block, rounding=rounding, seed=seed)
                assert qg.data.device.type == "cuda"
                assert torch.equal(qg.data.cpu().view(torch.uint8), qc.data.view(torch.uint8))
                assert torch.equal(qg.scale.cpu().view(torch.int32), qc.scale.view(torch.int32))
                if fmt == "uint8":
                    assert torch.equal(qg.zero_point.cpu(), qc.zero_point)
                for out_dtype in X_DTYPES:
                    dg = lc.dequantize(qg, out_dtype)
                    dc = lc.dequantize(qc, out_dtype)
                    assert dg.device.type == "cuda"
                    assert torch.equal(dg.cpu().view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                                       dc.view(torch.int16 if out_dtype != torch.float32 else torch.int32))


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_gpu_equals_host_twin(fmt, rng):
    for shape, axis, block in GRANULARITIES + [(((1 << 18) + 5,), None, 64), ((300, 301), 1, None)]:
        x = make_x(rng, shape, torch.float32)
        ax = None if axis is None else axis % len(shape)
        layout, _, _ = ref_layout(shape, ax, block)
        hd, hs, hz, _ = host_quantize(x, fmt, layout)
        for out_dtype in X_DTYPES:
            want = host_dequantize(hd, hs, hz, fmt, layout, out_dtype, x.numel())
            out = torch.full((x.numel(),), float("nan"), dtype=out_dtype, device="cuda")
            _cuda_backend.dequantize_into(hd.cuda(), hs.cuda(), None if hz is None else hz.cuda(), FORMATS[fmt], *layout, out)
            iv = torch.int16 if out_dtype != torch.float32 else torch.int32
            assert torch.equal(out.cpu().view(iv), want.view(iv))


@pytest.mark.cuda
@requires_gpu
def test_quantize_gpu_reports_first_non_finite(rng):
    for shape, axis, block in GRANULARITIES + [(((1 << 20) + 3,), None, 256), ((64, 4096), 0, None)]:
        for dtype in X_DTYPES:
            x = make_x(rng, shape, dtype)
            n = x.numel()
            pos = sorted(set(rng.integers(0, n, 4).tolist()))
            flat = x.view(-1)
            for p, v in zip(pos, [float("inf"), float("nan"), float("-inf"), float("nan")]):
                flat[p] = v
            ax = None if axis is None else axis % len(shape)
            layout, _, _ = ref_layout(shape, ax, block)
            for fmt in ("int8", "uint8"):
                assert _gpu_quantize_direct(x.cuda(), fmt, layout, False, 0)[3] == pos[0]


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("fmt", INT_FMTS)
def test_quantize_gpu_stochastic_floor_of_exact_sum(fmt, rng):
    """Stochastic rounding on the GPU is the floor of the exact sum: the same bytes as the host twin
    and the CPU backend on inputs full of carry boundaries, and issue 9's reproductions dequantize
    exactly."""
    for shape, axis, block in CARRY_GRANULARITIES + [(((1 << 20) + 3,), None, None), ((1024, 513), 1, None)]:
        layout, groups, n_groups = ref_layout(shape, axis, block)
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        x = carry_boundary_x(rng, fmt, shape, groups, seed)
        d, s, z, bad = _gpu_quantize_direct(x.cuda(), fmt, layout, True, seed)
        hd, hs, hz, _ = host_quantize(x, fmt, layout, True, seed)
        assert bad == -1
        assert torch.equal(d.cpu(), hd) and torch.equal(s.cpu(), hs)
        if fmt == "uint8":
            assert torch.equal(z.cpu(), hz)
        if _cpu_quantize_available():
            qc = lc.quantize(x, fmt, axis=axis, block_size=block, rounding="stochastic", seed=seed)
            assert torch.equal(hd, qc.data.reshape(-1).view(torch.uint8))
    for f, x, seed in carry_repro_cases():
        if f == fmt:
            q = lc.quantize(x.cuda(), fmt, rounding="stochastic", seed=seed)
            assert torch.equal(lc.dequantize(q).cpu(), x)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_gpu_extreme_values(fmt, rng):
    """Groups spanning up to [-FLT_MAX, FLT_MAX]: the GPU gives the host twin's and the CPU backend's
    bytes, and dequantizes to the same finite values."""
    x = extreme_x(rng, 32)
    for axis, block in EXTREME_LAYOUTS:
        layout, _, _ = ref_layout(tuple(x.shape), axis, block)
        for rounding in (["nearest", "stochastic"] if fmt in INT_FMTS else ["nearest"]):
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            st = rounding == "stochastic"
            d, s, z, bad = _gpu_quantize_direct(x.cuda(), fmt, layout, st, seed)
            hd, hs, hz, _ = host_quantize(x, fmt, layout, st, seed)
            assert bad == -1 and torch.equal(d.cpu(), hd)
            assert torch.equal(s.cpu().view(torch.int32), hs.view(torch.int32))
            if fmt == "uint8":
                assert torch.equal(z.cpu(), hz)
            out = torch.full((x.numel(),), float("nan"), device="cuda")
            _cuda_backend.dequantize_into(d, s, z, FORMATS[fmt], *layout, out)
            want = host_dequantize(hd, hs, hz, fmt, layout, torch.float32, x.numel())
            assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32)) and torch.all(torch.isfinite(want))
            if _cpu_quantize_available():
                qc = lc.quantize(x, fmt, axis=axis, block_size=block, rounding=rounding, seed=seed)
                assert torch.equal(hd, qc.data.reshape(-1).view(torch.uint8))
                assert torch.equal(lc.dequantize(qc).reshape(-1).view(torch.int32), want.view(torch.int32))
