"""lc.quantize / lc.dequantize (API.md §2): the public functions and their checks.

quantize checks its arguments once, then (by the eager-bypass rule of lepton_core/_ops.py) runs the
device's backend function directly or the registered op torch.ops.lepton.quantize. Dequantizing is
the QTensor's own operation (lepton_core/qtensor.py); lc.dequantize(q) is q.dequantize().
"""
from __future__ import annotations

import operator

import numpy as np

from . import _arrays
from ._arrays import DTYPE_NAME, NUMPY, TORCH, fail, torch, type_desc
from ._codes import FLOAT_NAMES, FORMATS, MAX_BLOCK, MIN_BLOCK
from ._devices import backend_for, check_device
from .qtensor import QTensor

if torch is not None:
    from . import _ops  # the torch.library ops and the eager-bypass rule

_OP = "lc.quantize"
_ROUNDINGS = ("nearest", "stochastic")
_U64 = 1 << 64
_Tensor = torch.Tensor if torch is not None else None
_STRIDED = torch.strided if torch is not None else None
# torch dtypes accepted in place of the format name.
_FORMAT_ALIASES = {} if torch is None else {torch.int8: "int8", torch.uint8: "uint8",
                                            torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def as_int(v, op: str, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise fail(TypeError, op, f"{arg} must be an int, got {type(v).__name__} {v!r}")
    return operator.index(v)


def valid_block_size(b: int) -> bool:
    return MIN_BLOCK <= b <= MAX_BLOCK and b & (b - 1) == 0


def _check_format(dtype):
    if isinstance(dtype, str):
        if dtype not in FORMATS:
            raise fail(ValueError, _OP, f"dtype must be one of {', '.join(repr(f) for f in FORMATS)}, got {dtype!r}")
        return FORMATS[dtype]
    if dtype in _FORMAT_ALIASES:
        return FORMATS[_FORMAT_ALIASES[dtype]]
    raise fail(TypeError, _OP, f"dtype must be a format name ({', '.join(repr(f) for f in FORMATS)}), got {dtype!r}")


def quantize(x, dtype="int8", *, axis=None, block_size=None, rounding="nearest", seed=None) -> QTensor:
    """Quantizes x (float32 / float16 / bfloat16, torch or NumPy, any shape and strides) per tensor,
    per channel (axis=k) or per block of the C-order flattening (block_size=B). See API.md §2."""
    op = _OP
    kind = TORCH if type(x) is _Tensor else _arrays.kind_of(x)
    if not kind:
        raise fail(TypeError, op, f"x must be a torch.Tensor or numpy.ndarray, got {type_desc(x)}")
    if kind == NUMPY:
        x = _arrays.as_array(x, op, "x")
    if DTYPE_NAME.get(x.dtype) not in FLOAT_NAMES:
        raise fail(TypeError, op, f"x must be float32, float16 or bfloat16, got {type_desc(x)}")
    if kind == TORCH and x.layout is not _STRIDED:
        _arrays.check_strided(op, x=x)
    fmt = FORMATS.get(dtype) if type(dtype) is str else None
    if fmt is None:
        fmt = _check_format(dtype)
    shape = tuple(x.shape)
    if axis is not None:
        axis = as_int(axis, op, "axis")
    if block_size is not None:
        block_size = as_int(block_size, op, "block_size")
    if axis is not None and block_size is not None:
        raise fail(ValueError, op, f"axis and block_size cannot be combined, got axis={axis} and "
                                   f"block_size={block_size}")
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise fail(ValueError, op, f"axis {axis} is out of range for x of shape {shape}")
        axis %= len(shape)
    if block_size is not None and not valid_block_size(block_size):
        raise fail(ValueError, op, f"block_size must be a power of two in {MIN_BLOCK}..{MAX_BLOCK}, got {block_size}")
    if rounding not in _ROUNDINGS:
        raise fail(ValueError, op, f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    stochastic = rounding == "stochastic"
    if stochastic and not fmt.stochastic:
        raise fail(ValueError, op, f"rounding='stochastic' is for the integer formats only, got dtype={fmt.name!r}")
    if seed is not None:
        seed = as_int(seed, op, "seed")
        if not 0 <= seed < _U64:
            raise fail(ValueError, op, f"seed must be in [0, 2**64), got {seed}")
    if kind == TORCH:
        if not x.is_cpu:
            check_device(op, x=x)
        if x.requires_grad:
            x = x.detach()  # not differentiable (the codes are integers)
        if _ops.needs_dispatcher(x):
            data, scale, zero_point = torch.ops.lepton.quantize(x, fmt.name, axis, block_size, stochastic,
                                                                _ops.seed_to_i64(seed))
            zero_point = zero_point if fmt.zero_point else None
            data = data.view(_arrays.TORCH_DTYPE[fmt.storage])
            return QTensor(data, scale, zero_point, fmt.name, shape, axis, block_size)
    if stochastic and seed is None:
        seed = _arrays.draw_seed(kind)
    data, scale, zero_point, first_bad = backend_for(x).quantize(x, fmt, axis, block_size, stochastic,
                                                                 seed if stochastic else 0)
    if first_bad >= 0:
        raise _arrays.non_finite_error(_arrays.contiguous(x), first_bad, op)
    return QTensor(data, scale, zero_point, fmt.name, shape, axis, block_size)


def dequantize(q, dtype=None):
    """The float tensor q stands for: (code - zero_point) * scale in float32, rounded once to `dtype`
    (float32 by default; float16 / bfloat16 / float64 too). Same kind (torch / NumPy) as q's arrays."""
    if not isinstance(q, QTensor):
        raise fail(TypeError, "lc.dequantize", f"q must be a lepton_core.QTensor, got {type_desc(q)}")
    return q._dequantize(dtype, "lc.dequantize")
