"""lc.gemm and lc.scaled_gemm (API.md §1): the public functions and their checks.

Each call takes torch tensors or NumPy arrays (and QTensors), checks the whole contract once, and
returns the kind of its first input. Then, by the eager-bypass rule of lepton_core/_ops.py, it
either runs the device's backend function directly (lepton_core/backends) or goes through the
registered op (torch.ops.lepton.gemm / .scaled_gemm: tracing, autograd, subclasses).
"""
from __future__ import annotations

import numpy as np

from . import _arrays
from ._arrays import DTYPE_NAME, NUMPY, TORCH, TORCH_DTYPE, fail, name_of, torch
from ._codes import INT8_MAX_K
from ._devices import backend_for, check_device
from .backends import cpu
from .qtensor import QTensor

if torch is not None:
    from . import _ops  # the torch.library ops and the eager-bypass rule

_GEMM = "lc.gemm"
_SCALED = "lc.scaled_gemm"

_FLOAT_NAMES = ("float32", "float16", "bfloat16")
_BIAS_NAMES = ("float32", "float16", "bfloat16", "float64")
_GEMM_IN_NAMES = frozenset(_FLOAT_NAMES + ("int8",))
_Tensor = torch.Tensor if torch is not None else None
_STRIDED = torch.strided if torch is not None else None


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_bias(op: str, bias, n: int) -> None:
    name = DTYPE_NAME.get(bias.dtype)
    if name not in _BIAS_NAMES:
        raise fail(TypeError, op, f"bias must be float32, float16, bfloat16 or float64, got {name_of(bias.dtype)}")
    if bias.ndim != 1 or bias.shape[0] != n:
        raise fail(ValueError, op, f"bias must have shape ({n},) (N of the result), got {_shape(bias)}")


def resolve_out_dtype(op: str, out_dtype, default: str, allowed: tuple, kind: str) -> str:
    od = default if out_dtype is None else _arrays.parse_dtype(out_dtype, op, "out_dtype")
    if od not in allowed:
        raise fail(TypeError, op, f"out_dtype must be one of {', '.join(allowed)} here, got {od}")
    if kind == NUMPY and od == "bfloat16":
        raise fail(TypeError, op, "out_dtype bfloat16 is not available for NumPy inputs (NumPy has no bfloat16)")
    return od


def _check_gemm(a, b, bias, out_dtype, kind: str) -> str:
    """Checks lc.gemm's contract; returns the output dtype's name. Straight-line on purpose: this
    runs on every call and is most of a small GEMM's fixed cost."""
    op = _GEMM
    if kind == TORCH:
        if not (a.is_cpu and b.is_cpu and (bias is None or bias.is_cpu)):
            check_device(op, a=a, b=b, bias=bias)
        if a.layout is not _STRIDED or b.layout is not _STRIDED or (bias is not None and bias.layout is not _STRIDED):
            _arrays.check_strided(op, a=a, b=b, bias=bias)
    a_dtype, b_dtype = DTYPE_NAME.get(a.dtype), DTYPE_NAME.get(b.dtype)
    if a_dtype not in _GEMM_IN_NAMES or b_dtype not in _GEMM_IN_NAMES:
        name, t = ("a", a) if a_dtype not in _GEMM_IN_NAMES else ("b", b)
        raise fail(TypeError, op, f"{name} must be float32, float16, bfloat16 or int8, got {name_of(t.dtype)}")
    if a_dtype != b_dtype:
        raise fail(TypeError, op, f"a and b must share one dtype, got a {a_dtype} and b {b_dtype}")
    a_nd, b_nd = a.ndim, b.ndim
    if a_nd != 2 and a_nd != 3:
        raise fail(ValueError, op, f"a must be 2-D or 3-D (M, K) or (B, M, K), got shape {_shape(a)}")
    if b_nd != 2 and b_nd != 3:
        raise fail(ValueError, op, f"b must be 2-D or 3-D (K, N) or (B, K, N), got shape {_shape(b)}")
    a_shape, b_shape = a.shape, b.shape
    if a_nd == 2 and b_nd == 3:
        raise fail(ValueError, op, f"a 2-D a with a 3-D b is not supported, got a {_shape(a)} and b {_shape(b)}")
    k = a_shape[-1]
    if k != b_shape[-2]:
        raise fail(ValueError, op, f"inner dimensions differ: a {_shape(a)} has K={k} but b "
                                   f"{_shape(b)} has K={b_shape[-2]}")
    if a_nd == 3 and b_nd == 3 and a_shape[0] != b_shape[0]:
        raise fail(ValueError, op, f"batch sizes differ: a {_shape(a)} and b {_shape(b)}")
    if a_dtype == "int8":
        if bias is not None:
            raise fail(ValueError, op, f"bias is not supported for int8 inputs (exact int32 result), got bias "
                                       f"of shape {_shape(bias)}")
        if k > INT8_MAX_K:
            raise fail(ValueError, op, f"K={k} exceeds {INT8_MAX_K} for int8 inputs (the int32 sum "
                                       f"could overflow); a {_shape(a)}, b {_shape(b)}")
        if out_dtype is None:
            return "int32"
        return resolve_out_dtype(op, out_dtype, "int32", ("int32",), kind)
    if bias is not None:
        _check_bias(op, bias, b_shape[-1])
    if out_dtype is None:
        return a_dtype
    return resolve_out_dtype(op, out_dtype, a_dtype, _FLOAT_NAMES, kind)


# The plain CPU call: two dense 2-D CPU tensors of one float dtype, no bias, the default out_dtype,
# nothing to trace or differentiate. There the contract's checks are these few tests, and the CPU
# backend's gemm_2d runs it without the general path's steps (checks, dispatcher test, backend,
# output, strides: 10.4 -> 6.5 us of a 16^3 call on the 2-core Xeon, torch.matmul 2.2). Anything
# else, every error included, returns None and takes the general path.
_PLAIN_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16)) if torch is not None else frozenset()


def _plain_cpu_gemm(a, b):
    if a.layout is not _STRIDED or b.layout is not _STRIDED:
        return None
    dt = a.dtype
    if dt not in _PLAIN_DTYPES or b.dtype is not dt:
        return None
    a_shape, b_shape = a.shape, b.shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        return None
    m, k = a_shape
    k_b, n = b_shape
    if k != k_b or not (m and n and k) or _ops.eager_cpu_grad(a, b) is not False:
        return None
    return cpu.gemm_2d(a, b, m, k, n)


def gemm(a, b, *, bias=None, out_dtype=None):
    """`a @ b (+ bias)` with float32 accumulation, rounded once to `out_dtype` (API.md §1).

    a: (M, K) or (B, M, K); b: (K, N) or (B, K, N) (2-D b broadcasts over a's batch). Float inputs
    (float32 / float16 / bfloat16, one dtype) give out_dtype (default: the input dtype); int8 inputs
    give an exact int32 result. Returns the kind (torch / NumPy) of `a`.
    """
    if type(a) is _Tensor and type(b) is _Tensor:  # the common case, without calls
        if bias is None and out_dtype is None:
            out = _plain_cpu_gemm(a, b)
            if out is not None:
                return out
        kind = TORCH
    else:
        kind = _arrays.kind_of(a)
        a = _arrays.as_array(a, _GEMM, "a")
        b = _arrays.as_array(b, _GEMM, "b")
        b = _arrays.to_kind(b, kind, _GEMM, "b")
    if bias is not None:
        bias = _arrays.to_kind(_arrays.as_array(bias, _GEMM, "bias"), kind, _GEMM, "bias")
    od = _check_gemm(a, b, bias, out_dtype, kind)
    if kind == TORCH:
        if _ops.needs_dispatcher(a, b, bias):
            return torch.ops.lepton.gemm(a, b, bias, TORCH_DTYPE[od])
    return backend_for(a).gemm(a, b, bias, od)


def _qtensor_parts(q, name: str, want_axis: int, op: str):
    """(data, scale) arrays of an int8 QTensor for one side of scaled_gemm."""
    if not isinstance(q, QTensor):
        raise fail(TypeError, op, f"{name} must be a lepton_core.QTensor (from lc.quantize), got {_arrays.type_desc(q)}")
    if q.dtype != "int8":
        raise fail(TypeError, op, f"{name} must be an int8 QTensor, got format {q.dtype!r}")
    desc = "per-row (axis=0)" if want_axis == 0 else "per-column (axis=1)"
    if q.block_size is not None or (q.axis is not None and q.axis != want_axis):
        got = f"block_size={q.block_size}" if q.block_size is not None else f"axis={q.axis}"
        raise fail(ValueError, op, f"{name} must be quantized per-tensor or {desc}, got {got}")
    data = _arrays.as_array(q.data, op, f"{name}.data")
    scale = q.scale
    if isinstance(scale, np.generic):
        scale = np.asarray(scale)
    scale = _arrays.as_array(scale, op, f"{name}.scale")
    if DTYPE_NAME.get(data.dtype) != "int8":
        raise fail(TypeError, op, f"{name}.data must be int8, got {name_of(data.dtype)}")
    if data.ndim != 2:
        raise fail(ValueError, op, f"{name} must hold a 2-D matrix, got shape {_shape(data)}")
    if DTYPE_NAME.get(scale.dtype) != "float32":
        raise fail(TypeError, op, f"{name}.scale must be float32, got {name_of(scale.dtype)}")
    want_n = 1 if q.axis is None else data.shape[want_axis]
    if _arrays.numel(scale) != want_n or (q.axis is not None and scale.ndim != 1):
        raise fail(ValueError, op, f"{name}.scale must have {want_n} element(s) for {name} of shape "
                                   f"{_shape(data)}, got shape {_shape(scale)}")
    return data, scale


def scaled_gemm(qa, qb, *, bias=None, out_dtype=None):
    """W8A8 linear: `(qa.data @ qb.data) * scale_a[:, None] * scale_b[None, :] + bias` (API.md §1).

    int32 accumulation, then in float32 `(float(acc) * scale_a) * scale_b + bias`, rounded once to
    out_dtype (float32 / float16 / bfloat16; None: float32). qa: int8 QTensor of (M, K), per-tensor
    or per-row; qb: int8 QTensor of (K, N), per-tensor or per-column. Returns the kind of qa's data.
    """
    op = _SCALED
    a, sa = _qtensor_parts(qa, "qa", 0, op)
    b, sb = _qtensor_parts(qb, "qb", 1, op)
    kind = _arrays.kind_of(a)
    tbias = None if bias is None else _arrays.as_array(bias, op, "bias")
    b, sa, sb = (_arrays.to_kind(t, kind, op, n) for t, n in ((b, "qb.data"), (sa, "qa.scale"), (sb, "qb.scale")))
    if tbias is not None:
        tbias = _arrays.to_kind(tbias, kind, op, "bias")
    check_device(op, qa=a, qa_scale=sa, qb=b, qb_scale=sb, bias=tbias)
    _arrays.check_strided(op, qa=a, qa_scale=sa, qb=b, qb_scale=sb, bias=tbias)
    if a.shape[1] != b.shape[0]:
        raise fail(ValueError, op, f"inner dimensions differ: qa {_shape(a)} has K={a.shape[1]} but qb "
                                   f"{_shape(b)} has K={b.shape[0]}")
    if a.shape[1] > INT8_MAX_K:
        raise fail(ValueError, op, f"K={a.shape[1]} exceeds {INT8_MAX_K} (the int32 sum could overflow); "
                                   f"qa {_shape(a)}, qb {_shape(b)}")
    if tbias is not None:
        _check_bias(op, tbias, b.shape[1])
    od = resolve_out_dtype(op, out_dtype, "float32", _FLOAT_NAMES, kind)
    if kind == TORCH:
        if _ops.needs_dispatcher(a, b, sa, sb, tbias):
            return torch.ops.lepton.scaled_gemm(a, b, sa, sb, tbias, TORCH_DTYPE[od])
    return backend_for(a).scaled_gemm(a, b, sa, sb, tbias, od)
