"""lepton_core.distributed (API.md §3): reduce kernels in this process, then multi-process jobs.

Kernels: every ISA table against a torch reference, and the SIMD tables against the scalar one bit
for bit on arbitrary bit patterns (NaN, Inf, subnormals, signed zeros included).
Jobs (tests/dist_workers/jobs.py, started by launch.py as separate processes, every one bounded in
time): world sizes 1..4, all dtypes / ops / counts, latency and ring paths, non-contiguous views,
async calls, int8 compression and its error bound, the three transports (shm, hierarchical across
LEPTON_HOST_IDs, torch), DDP with the hook, killed / stopped / mismatched ranks; /dev/shm is checked
after each job.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lepton_core  # noqa: F401  (loads the native module)
from lepton_core import _C
from lepton_core._tensors import LP_DTYPE

sys.path.insert(0, str(Path(__file__).with_name("dist_workers")))
from launch import launch  # noqa: E402

OPS = {"sum": 0, "avg": 1, "max": 2, "min": 3}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTS = (torch.int32, torch.int64)
ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32,
       torch.float64: torch.float64, torch.int32: torch.int32, torch.int64: torch.int64}
SIZES = [0, 1, 7, 8, 33, 257, 1000]


def _isa_code(name: str) -> int:
    return ("scalar", "avx2", "avx512", "amx").index(name)


def _ops_for(dtype):
    return ["sum", "max", "min"] + (["avg"] if dtype in FLOATS else [])


def _random(dtype, n, rng, scale=100.0):
    if dtype in INTS:
        hi = 1 << (20 if dtype == torch.int32 else 40)
        return torch.from_numpy(rng.integers(-hi, hi, size=n)).to(dtype)
    return torch.from_numpy(rng.standard_normal(n) * scale).to(dtype)


def _random_bits(dtype, n, rng):
    """Arbitrary bit patterns of dtype: NaNs, infinities, subnormals and signed zeros included."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = rng.integers(0, 256, size=n * itemsize, dtype=np.uint8)
    t = torch.from_numpy(raw).view(dtype).clone()
    if n >= 4 and dtype in FLOATS:
        t[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")], dtype=dtype)
    return t


def _bits(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- torch references of the kernel semantics (csrc/cpu/reduce/reduce.h) ----
def _apply(op, a, b):
    if op in ("sum", "avg"):
        return a + b
    pick = (a > b) if op == "max" else (a < b)
    r = torch.where(pick, a, b)
    if a.dtype.is_floating_point:
        r = torch.where(torch.isnan(a), a, r)
    return r


def _finalize(op, v, n_ranks):
    return v / n_ranks if op == "avg" else v


def ref_gather(srcs, op, n_ranks):
    dtype = srcs[0].dtype
    v = srcs[0].to(ACC[dtype])
    for s in srcs[1:]:
        v = _apply(op, v, s.to(ACC[dtype]))
    return _finalize(op, v, n_ranks).to(dtype)


def ref_q8(v: torch.Tensor, block: int):
    """(codes, scales) of float32 v: scale = absmax / 127, q = clamp(round_half_even(v / scale))."""
    n = v.numel()
    q = torch.zeros(n, dtype=torch.int8)
    scales = torch.zeros((n + block - 1) // block, dtype=torch.float32)
    for b, off in enumerate(range(0, n, block)):
        blk = v[off:off + block]
        if not torch.isfinite(blk).all():
            scales[b] = float("inf")
            continue
        scale = blk.abs().max() / torch.tensor(127.0)
        scales[b] = scale
        if scale != 0:
            q[off:off + block] = torch.clamp(torch.round(blk / scale), -127, 127).to(torch.int8)
    return q, scales


def ref_deq(q, scales, block):
    s = scales.repeat_interleave(block)[: q.numel()]
    return q.to(torch.float32) * s


def _q8_in(x):
    return x.to(torch.float32)


# ======================= kernels, in this process =======================
@pytest.mark.parametrize("dtype", FLOATS + INTS)
@pytest.mark.parametrize("n", SIZES)
def test_reduce_kernels_match_reference(isa, dtype, n, rng):
    W = 3
    srcs = [_random(dtype, n, rng) for _ in range(W)]
    acc_in = _random(ACC[dtype], n, rng)
    x = srcs[0]
    for op in _ops_for(dtype):
        code, dt = OPS[op], LP_DTYPE[dtype]
        # gather: reduce in source order, finalize, round once
        y = torch.full((n,), 7, dtype=dtype)
        _C.reduce_gather(-1, y.data_ptr(), [s.data_ptr() for s in srcs], n, dt, code, W)
        assert _bits(y) == _bits(ref_gather(srcs, op, W)), op
        # accumulate: acc_out = op(acc_in, widen(x))
        out = torch.full((n,), 7, dtype=ACC[dtype])
        _C.reduce_accumulate(-1, out.data_ptr(), acc_in.data_ptr(), x.data_ptr(), n, dt, code)
        assert _bits(out) == _bits(_apply(op, acc_in, x.to(ACC[dtype]))), op
        # finish: y = y2 = narrow(finalize(op(acc_in, widen(x))))
        y, y2 = torch.full((n,), 7, dtype=dtype), torch.full((n,), 7, dtype=dtype)
        _C.reduce_finish(-1, y.data_ptr(), y2.data_ptr(), acc_in.data_ptr(), x.data_ptr(), n, dt, code, W)
        ref = _finalize(op, _apply(op, acc_in, x.to(ACC[dtype])), W).to(dtype)
        assert _bits(y) == _bits(ref) and _bits(y2) == _bits(ref), op
        # narrow
        y = torch.full((n,), 7, dtype=dtype)
        _C.reduce_narrow(-1, y.data_ptr(), 0, acc_in.data_ptr(), n, dt, code, W)
        assert _bits(y) == _bits(_finalize(op, acc_in, W).to(dtype)), op
    # widen
    acc = torch.full((n,), 7, dtype=ACC[dtype])
    _C.reduce_widen(-1, acc.data_ptr(), x.data_ptr(), n, LP_DTYPE[dtype])
    assert _bits(acc) == _bits(x.to(ACC[dtype]))


@pytest.mark.parametrize("dtype", FLOATS + INTS)
def test_reduce_kernels_simd_equals_scalar_on_any_bits(dtype, rng):
    from lepton_core import _runtime

    isas = [_isa_code(i) for i in _runtime.available_isas()]
    n = 1031
    srcs = [_random_bits(dtype, n, rng) for _ in range(3)]
    acc_in = _random_bits(ACC[dtype], n, rng)
    for op in _ops_for(dtype):
        outs = {}
        for isa in isas:
            y = torch.empty(n, dtype=dtype)
            _C.reduce_gather(isa, y.data_ptr(), [s.data_ptr() for s in srcs], n, LP_DTYPE[dtype], OPS[op], 3)
            f, f2 = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            _C.reduce_finish(isa, f.data_ptr(), f2.data_ptr(), acc_in.data_ptr(), srcs[0].data_ptr(), n,
                             LP_DTYPE[dtype], OPS[op], 3)
            a = torch.empty(n, dtype=ACC[dtype])
            _C.reduce_accumulate(isa, a.data_ptr(), acc_in.data_ptr(), srcs[1].data_ptr(), n, LP_DTYPE[dtype],
                                 OPS[op])
            outs[isa] = (_bits(y), _bits(f), _bits(f2), _bits(a))
        for isa in isas[1:]:
            assert outs[isa] == outs[isas[0]], (op, isa)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 31, 256, 257, 1000])
@pytest.mark.parametrize("block", [32, 256])
def test_q8_kernels_match_reference(isa, dtype, n, block, rng):
    dt = LP_DTYPE[dtype]
    x = _random(dtype, n, rng)
    if n > 64:
        x[: min(block, n)] = 0  # an all-zero block: scale 0
    nb = (n + block - 1) // block
    # quantize
    q, s = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32)
    _C.q8_quantize(-1, q.data_ptr(), s.data_ptr(), x.data_ptr(), n, dt, block)
    rq, rs = ref_q8(_q8_in(x), block)
    assert torch.equal(q, rq) and _bits(s) == _bits(rs)
    # accumulate: Q(D(q, s) + x2)
    x2 = _random(dtype, n, rng)
    q2, s2 = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32)
    _C.q8_accumulate(-1, q2.data_ptr(), s2.data_ptr(), q.data_ptr(), s.data_ptr(), x2.data_ptr(), n, dt, block)
    v = ref_deq(q, s, block) + _q8_in(x2)
    rq2, rs2 = ref_q8(v, block)
    assert torch.equal(q2, rq2) and _bits(s2) == _bits(rs2)
    # partial: D(q, s) + x2, exact float32
    acc = torch.empty(n, dtype=torch.float32)
    _C.q8_partial(-1, acc.data_ptr(), q.data_ptr(), s.data_ptr(), x2.data_ptr(), n, dt, block)
    assert _bits(acc) == _bits(v)
    # finish: quantize the sum, keep its dequantized value / divisor
    for divisor in (1, 3):
        q3, s3, y = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32), torch.empty(n, dtype=dtype)
        _C.q8_finish(-1, q3.data_ptr(), s3.data_ptr(), y.data_ptr(), q.data_ptr(), s.data_ptr(), x2.data_ptr(), n,
                     dt, block, divisor)
        ref_y = ref_deq(rq2, rs2, block)
        ref_y = (ref_y / divisor if divisor > 1 else ref_y).to(dtype)
        assert torch.equal(q3, rq2) and _bits(s3) == _bits(rs2) and _bits(y) == _bits(ref_y)
        y = torch.empty(n, dtype=dtype)
        _C.q8_dequantize(-1, y.data_ptr(), q3.data_ptr(), s3.data_ptr(), n, dt, block, divisor)
        assert _bits(y) == _bits(ref_y)
    # gather: sum of dequantized sources in order
    y = torch.empty(n, dtype=dtype)
    _C.q8_gather(-1, y.data_ptr(), [q.data_ptr(), q2.data_ptr()], [s.data_ptr(), s2.data_ptr()], n, dt, block, 2)
    ref_y = ((ref_deq(q, s, block) + ref_deq(q2, s2, block)) / 2).to(dtype)
    assert _bits(y) == _bits(ref_y)
    # error feedback: x += r; r = x - D(Q(x))
    xf, r = _random(torch.float32, n, rng), _random(torch.float32, n, rng, 0.1)
    xr = xf + r
    rq4, rs4 = ref_q8(xr, block)
    _C.q8_error_feedback(-1, xf.data_ptr(), r.data_ptr(), n, block)
    assert _bits(xf) == _bits(xr) and _bits(r) == _bits(xr - ref_deq(rq4, rs4, block))


def test_q8_non_finite_block_dequantizes_to_nan(isa):
    x = torch.ones(64, dtype=torch.float32)
    x[40] = float("inf")
    q, s = torch.empty(64, dtype=torch.int8), torch.empty(2, dtype=torch.float32)
    _C.q8_quantize(-1, q.data_ptr(), s.data_ptr(), x.data_ptr(), 64, 0, 32)
    y = torch.empty(64, dtype=torch.float32)
    _C.q8_dequantize(-1, y.data_ptr(), q.data_ptr(), s.data_ptr(), 64, 0, 32, 1)
    assert torch.equal(y[:32], torch.ones(32)) and torch.isnan(y[32:]).all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_q8_kernels_simd_equals_scalar_on_any_bits(dtype, rng):
    from lepton_core import _runtime

    isas = [_isa_code(i) for i in _runtime.available_isas()]
    n, block, dt = 4099, 64, LP_DTYPE[dtype]
    nb = (n + block - 1) // block
    x = _random(dtype, n, rng)
    x[100:200] = _random_bits(dtype, 100, rng)  # NaN / Inf / subnormal blocks among normal ones
    q0 = torch.from_numpy(rng.integers(-127, 128, size=n).astype(np.int8))
    s0 = torch.from_numpy(rng.random(nb).astype(np.float32))
    outs = {}
    for isa in isas:
        q, s = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32)
        _C.q8_quantize(isa, q.data_ptr(), s.data_ptr(), x.data_ptr(), n, dt, block)
        q2, s2, y = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32), torch.empty(n, dtype=dtype)
        _C.q8_finish(isa, q2.data_ptr(), s2.data_ptr(), y.data_ptr(), q0.data_ptr(), s0.data_ptr(), x.data_ptr(), n,
                     dt, block, 3)
        g = torch.empty(n, dtype=dtype)
        _C.q8_gather(isa, g.data_ptr(), [q0.data_ptr(), q.data_ptr()], [s0.data_ptr(), s.data_ptr()], n, dt, block, 2)
        outs[isa] = [_bits(t) for t in (q, s, q2, s2, y, g)]
    for isa in isas[1:]:
        assert outs[isa] == outs[isas[0]], isa
