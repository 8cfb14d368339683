"""CPU backend: every op's kernel on torch CPU tensors or NumPy arrays (no torch needed here).

Arguments were checked by the public functions; these pass pointers, sizes and strides (elements)
and lp_dtype / lp_qfmt codes to the native kernels (csrc/cpu), which run without the GIL.
"""
from __future__ import annotations

import math
import sys
import weakref

import numpy as np

from .. import _C
from .._arrays import (DTYPE_NAME, TORCH, TORCH_DTYPE, contiguous, data_ptr, new_output, non_finite_error,
                       strides_elems)
from .._codes import DTYPE_CODES, FORMATS, QLINEAR_SCHEMES
from .._layout import quant_geometry
from . import _common

_I8 = DTYPE_CODES["int8"]
_INT8_FMT = FORMATS["int8"].code
_TORCH_CODES = {TORCH_DTYPE[name]: code for name, code in DTYPE_CODES.items() if name in TORCH_DTYPE}


def gemm(a, b, bias, out_dtype: str):
    """a (M, K) | (B, M, K) @ b (K, N) | (B, K, N) (+ bias), rounded once to out_dtype. Float inputs of
    one dtype accumulate in float32; int8 inputs give exact int32. Any strides (a 2-D b broadcasts)."""
    if type(a) is np.ndarray:
        out, (n_batch, m, k, n), bias32, done = _common.gemm_setup(a, b, bias, out_dtype)
        if not done:
            gemm_into(a, b, bias32, out, n_batch, m, k, n)
        return out
    # torch tensors: the same steps inline (this path sets the fixed cost of small calls)
    n = b.shape[-1]
    if a.ndim == 2:
        m, k = a.shape
        n_batch, out = 1, new_output(TORCH, (m, n), out_dtype, None)
    else:
        n_batch, m, k = a.shape
        out = new_output(TORCH, (n_batch, m, n), out_dtype, None)
    if not (m and n and n_batch):
        return out
    bias32 = _common.float32_vector(bias)
    if k == 0:
        _common.fill_rows(out, bias32)
        return out
    gemm_into(a, b, bias32, out, n_batch, m, k, n)
    return out


def gemm_2d(a, b, m: int, k: int, n: int):
    """a (M, K) @ b (K, N): torch tensors of one float dtype, M, K, N > 0, any strides, no bias; the
    result in that dtype. lc.gemm's plain call (lepton_core/gemm.py), checked there."""
    code = _TORCH_CODES[a.dtype]
    out = new_output(TORCH, (m, n), DTYPE_NAME[a.dtype], None)
    (a_row, a_col), (b_row, b_col) = a.stride(), b.stride()
    _C.gemm_float(1, m, n, k, a.data_ptr(), code, 0, a_row, a_col, b.data_ptr(), 0, b_row, b_col, 0, out.data_ptr(),
                  code)
    return out


def gemm_into(a, b, bias32, out, n_batch: int, m: int, k: int, n: int) -> None:
    """The kernel call itself, sizes known (this path sets the fixed cost of small calls)."""
    if type(a) is np.ndarray:
        sa, sb = strides_elems(a), strides_elems(b)
        pa, pb, pout = a.ctypes.data, b.ctypes.data, out.ctypes.data
        pbias = 0 if bias32 is None else bias32.ctypes.data
        in_code, out_code = DTYPE_CODES[a.dtype.name], DTYPE_CODES[out.dtype.name]
    else:
        sa, sb = a.stride(), b.stride()
        pa, pb, pout = a.data_ptr(), b.data_ptr(), out.data_ptr()
        pbias = 0 if bias32 is None else bias32.data_ptr()
        in_code, out_code = _TORCH_CODES[a.dtype], _TORCH_CODES[out.dtype]
    if len(sa) == 2:
        sa_batch, (sa_row, sa_col) = 0, sa
    else:
        sa_batch, sa_row, sa_col = sa
    if len(sb) == 2:
        sb_batch, (sb_row, sb_col) = 0, sb
    else:
        sb_batch, sb_row, sb_col = sb
    if n_batch > 1 and sb_batch == 0 and (m == 1 or sa_batch == m * sa_row):
        # b is shared by every batch and a's batches stack as rows: one (B*M, K) @ (K, N) GEMM
        # packs b once and cuts the work into bigger tiles.
        if m == 1:
            sa_row = sa_batch
        m, n_batch, sa_batch = n_batch * m, 1, 0
    # Positional on purpose: pybind11 parses these 16 keywords in ~1.3 us, a fifth of a small call
    # (the names are in csrc/bindings/gemm_bind.cc and _C.pyi).
    if in_code == _I8:
        _C.gemm_int8(n_batch, m, n, k, pa, sa_batch, sa_row, sa_col, pb, sb_batch, sb_row, sb_col, pout)
    else:
        _C.gemm_float(n_batch, m, n, k, pa, in_code, sa_batch, sa_row, sa_col, pb, sb_batch, sb_row, sb_col, pbias,
                      pout, out_code)


def scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype: str, b_packed: int = 0):
    """round_once((float(a @ b) * scale_a[:, None]) * scale_b[None, :] + bias): a int8 (M, K), b int8
    (K, N), any strides; scale_a (M,) or one element, scale_b (N,) or one element. b_packed: the address
    of b pre-packed by _packed_b (then b is not read), or 0."""
    m, k = a.shape
    n = b.shape[1]
    kind = _common.kind(a)
    out = _common.new_output(kind, (m, n), out_dtype, _common.device_of(a))
    if m * n == 0:
        return out
    sa, sb = _common.float32_vector(scale_a), _common.float32_vector(scale_b)
    bias32 = _common.float32_vector(bias)
    if k == 0:
        _common.scaled_gemm_empty_k(out, sa, sb, bias32)
        return out
    (a_row, a_col), (b_row, b_col) = strides_elems(a), strides_elems(b)
    _C.scaled_gemm_int8(m=m, n=n, k=k, a=data_ptr(a), a_stride_row=a_row, a_stride_col=a_col, b=data_ptr(b),
                        b_stride_row=b_row, b_stride_col=b_col, scale_a=data_ptr(sa), scale_a_n_elems=sa.shape[0],
                        scale_b=data_ptr(sb), scale_b_n_elems=sb.shape[0],
                        bias=0 if bias32 is None else data_ptr(bias32), out=data_ptr(out),
                        out_dtype=DTYPE_CODES[DTYPE_NAME[out.dtype]], b_packed=b_packed)
    return out


# id(codes tensor) -> (key, packed bytes, their aligned address); an entry leaves with its tensor
# (weakref.finalize). Not a WeakKeyDictionary: its lookups compare tensors with ==, elementwise.
_PACKED_B = {}


def _packed_b(codes) -> int:
    """The address of B = codes.t() (codes: a w8a8 weight, int8 (N, K)) packed once for the active int8
    GEMM table (csrc/cpu/gemm/gemm.h, gemm_int8_pack_b), or 0 when that table packs B on every call
    (scalar) or codes' writes are not tracked (an inference tensor has no version counter). The
    packing is kept per codes tensor (weakly: it goes with the tensor, and never into its pickle or
    state_dict) and redone when the table, the tensor's storage or its version change."""
    n, k = codes.shape
    table, n_bytes = _C.gemm_int8_packed_b_bytes(k, n)  # positional: a per-call cost (as in gemm_into)
    if n_bytes == 0:
        return 0
    try:
        version = codes._version
    except RuntimeError:
        return 0
    key = (table, codes.data_ptr(), version, tuple(codes.shape), codes.stride())
    cached = _PACKED_B.get(id(codes))
    if cached is not None and cached[0] == key:
        return cached[2]
    buf = np.empty(n_bytes + 64, np.uint8)
    addr = buf.ctypes.data + (-buf.ctypes.data) % 64  # the kernels' aligned panel loads
    b_row, b_col = strides_elems(codes.t())
    _C.gemm_int8_pack_b(k=k, n=n, b=codes.data_ptr(), b_stride_row=b_row, b_stride_col=b_col, dst=addr)
    if cached is None:
        weakref.finalize(codes, _PACKED_B.pop, id(codes), None)
    _PACKED_B[id(codes)] = (key, buf, addr)
    return addr


def quantize(x, fmt, axis, block_size, stochastic: bool, seed: int):
    """(data, scale, zero_point or None, first non-finite flat index of x or -1) for x of any strides."""
    data, scale, zero_point = _common.quantize_outputs(x, fmt, axis, block_size)
    shape = tuple(x.shape)
    n_outer, n_channels, n_inner, block = quant_geometry(shape, axis, block_size)
    if n_outer * n_channels * n_inner == 0:
        return data, scale, zero_point, -1
    xc = contiguous(x)
    # Positional on purpose, as in gemm_into (names: csrc/bindings/quant_bind.cc).
    first_bad = _C.quantize_into(data_ptr(xc), DTYPE_CODES[DTYPE_NAME[xc.dtype]], n_outer, n_channels, n_inner, block,
                                 fmt.code, stochastic, seed, data_ptr(data), data_ptr(scale),
                                 0 if zero_point is None else data_ptr(zero_point))
    return data, scale, zero_point, first_bad


def dequantize(data, scale, zero_point, fmt, shape, axis, block_size, dtype: str):
    """(code - zero_point) * scale in float32 per group, rounded once to dtype (float64: widened)."""
    shape = tuple(shape)
    kind = _common.kind(data)
    out = _common.new_output(kind, shape, "float32" if dtype == "float64" else dtype, None)
    dequantize_into(data, scale, zero_point, fmt, shape, axis, block_size, out)
    if dtype == "float64":
        return out.astype(np.float64) if kind == "numpy" else out.double()
    return out


def dequantize_into(data, scale, zero_point, fmt, shape, axis, block_size, out) -> None:
    """dequantize into a preallocated contiguous float32 / float16 / bfloat16 `out` of x's numel."""
    n_outer, n_channels, n_inner, block = quant_geometry(tuple(shape), axis, block_size)
    if n_outer * n_channels * n_inner == 0:
        return
    scale, data = contiguous(scale), contiguous(data)
    zero_point = None if zero_point is None else contiguous(zero_point)
    # Positional on purpose, as in gemm_into (names: csrc/bindings/quant_bind.cc).
    _C.dequantize_into(data_ptr(data), data_ptr(scale), 0 if zero_point is None else data_ptr(zero_point), fmt.code,
                       n_outer, n_channels, n_inner, block, data_ptr(out), DTYPE_CODES[DTYPE_NAME[out.dtype]])


def quant_linear(x, codes, scale, zero, bias, scheme: str, group_size: int, n: int):
    """x (..., K) times the packed weight (csrc/cpu/qlinear/qlinear.h; w8a8: int8 codes (N, K) and
    per-row scales) plus bias, in x's dtype. w8 / w4: the weight-only kernels; w8a8: x quantized to
    int8 per row, then scaled_gemm's int8 GEMM (the weight packed once: _packed_b) and epilogue with
    the bias fused."""
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    m = x2.shape[0]
    out_name = DTYPE_NAME[x.dtype]
    bias32 = _common.float32_vector(bias)
    if scheme == "w8a8":
        if m == 0 or n == 0:
            return new_output(TORCH, (*lead, n), out_name, x.device)
        if k > 0:
            return _w8a8(x2.contiguous(), codes, _common.float32_vector(scale), bias32, out_name).reshape(*lead, n)
        data, scale_x, _, _ = quantize(x2, FORMATS["int8"], 0, None, False, 0)
        return scaled_gemm(data, codes.t(), scale_x, scale, bias32, out_name).reshape(*lead, n)
    out = new_output(TORCH, (*lead, n), out_name, x.device)
    if m == 0 or n == 0:
        return out
    (x_row, x_col) = x2.stride()
    # Positional on purpose, as in gemm_into (names: csrc/bindings/qlinear_bind.cc).
    _C.qlinear(m, n, k, x2.data_ptr(), _TORCH_CODES[x2.dtype], x_row, x_col, QLINEAR_SCHEMES[scheme], group_size,
               codes.data_ptr(), scale.data_ptr(), zero.data_ptr() if scheme == "w4" else 0,
               0 if bias32 is None else bias32.data_ptr(), out.data_ptr(), _TORCH_CODES[out.dtype])
    return out


def _w8a8(x, codes, scale, bias32, out_name: str):
    """quant_linear's "w8a8" for a contiguous x (M, K >= 1): quantize's per-row int8 and scaled_gemm
    with the packed weight, straight to the native kernels (a batch-1 call is mostly this overhead)."""
    m, k = x.shape
    n = codes.shape[0]
    out = new_output(TORCH, (m, n), out_name)
    b_row, b_col = codes.stride()[::-1]  # B = codes.t()
    # One native call: quantize's per-row int8 into a scratch, then scaled_gemm_int8 (csrc/bindings/
    # gemm_bind.cc). Positional on purpose, as in gemm_into.
    first_bad = _C.w8a8_linear(m, n, k, x.data_ptr(), _TORCH_CODES[x.dtype], _INT8_FMT, codes.data_ptr(), b_row, b_col,
                               scale.data_ptr(), scale.shape[0], 0 if bias32 is None else bias32.data_ptr(),
                               out.data_ptr(), _TORCH_CODES[out.dtype], _packed_b(codes))
    if first_bad >= 0:
        raise non_finite_error(x, first_bad, "lc.nn.QuantLinear", "input")
    return out


def linear(x, weight, bias, compute_dtype: str, out_dtype: str):
    return _common.linear(gemm, x, weight, bias, compute_dtype, out_dtype)


def register() -> None:
    """Registers this module's functions as the CPU kernels of the torch.library ops (needs torch)."""
    from .. import _ops

    _ops.register_kernels("cpu", sys.modules[__name__])
