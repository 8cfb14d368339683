"""lc.quantize / lc.dequantize (API.md §2).

The public functions check the contract once, describe the granularity as
(n_outer, n_channels, n_inner, block_size) over the C-order flattening of x, and call a backend:

    per-tensor          (1, 1, n, 0)                                   groups: 1
    per-channel axis k  (prod(shape[:k]), shape[k], prod(shape[k+1:]), 0)   groups: shape[k]
    blockwise B         (1, 1, n, B)                                   groups: ceil(n / B)

Backends (same signatures on every device; CUDA's live in _cuda_backend):
    _cpu_quantize_into(x, fmt, n_outer, n_channels, n_inner, block_size, stochastic, seed,
                       data, scale, zero_point) -> first non-finite flat index of x, or -1
    _cpu_dequantize_into(data, scale, zero_point, fmt, n_outer, n_channels, n_inner, block_size, out)

Both are also registered as torch.library ops (lepton::quantize, lepton::dequantize, with fake
implementations) so torch.compile can trace them; eager calls skip the dispatcher for low overhead.
"""
import math
import operator
from typing import Optional, Tuple

import numpy as np
import torch

from . import _C
from ._tensors import (LP_DTYPE, as_torch, check_device, check_strided, dtype_name, fail, is_fake, kind_of,
                       new_output, parse_dtype, to_kind, type_desc)
from .qtensor import QTensor

# Format codes: keep in step with lp_qfmt in csrc/cpu/quant/quant.h.
FORMATS = {"int8": 0, "uint8": 1, "int4": 2, "fp8_e4m3": 3, "fp8_e5m2": 4}
_DATA_DTYPE = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.uint8,
               "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# What lepton::quantize returns as data: fp8 codes travel as their uint8 bit patterns (torch has few
# kernels for float8 tensors, and opcheck compares outputs with arithmetic); quantize() views them.
_OP_DATA_DTYPE = {**_DATA_DTYPE, "fp8_e4m3": torch.uint8, "fp8_e5m2": torch.uint8}
# torch dtypes accepted in place of the format name.
_FORMAT_ALIASES = {torch.int8: "int8", torch.uint8: "uint8", torch.float8_e4m3fn: "fp8_e4m3",
                   torch.float8_e5m2: "fp8_e5m2"}
# dtypes a QTensor's data may have, by format (NumPy fp8 data is uint8 bit patterns).
_QT_DATA_DTYPES = {"int8": (torch.int8,), "uint8": (torch.uint8,), "int4": (torch.uint8,),
                   "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8), "fp8_e5m2": (torch.float8_e5m2, torch.uint8)}
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ROUNDINGS = ("nearest", "stochastic")
_U64 = 1 << 64


# ---------------------------------------------------------------------------------------------
# Granularity
# ---------------------------------------------------------------------------------------------
def _geometry(shape, axis, block_size) -> Tuple[int, int, int, int]:
    """(n_outer, n_channels, n_inner, block_size) of x's C-order flattening."""
    if block_size is not None:
        return 1, 1, math.prod(shape), block_size
    if axis is None:
        return 1, 1, math.prod(shape), 0
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]), 0


def _scale_shape(shape, axis, block_size) -> Tuple[int, ...]:
    if block_size is not None:
        return (-(-math.prod(shape) // block_size),)
    if axis is None:
        return ()
    return (shape[axis],)


def _data_shape(shape, fmt) -> Tuple[int, ...]:
    return ((math.prod(shape) + 1) // 2,) if fmt == "int4" else tuple(shape)


# ---------------------------------------------------------------------------------------------
# CPU backend
# ---------------------------------------------------------------------------------------------
def _cpu_quantize_into(x, fmt, n_outer, n_channels, n_inner, block_size, stochastic, seed, data, scale,
                       zero_point) -> int:
    """x contiguous f32/f16/bf16; data contiguous uint8 (n bytes, int4 ceil(n/2)); scale float32 and
    zero_point int32 (or None) contiguous, one per group; block_size 0 or None when not blockwise.
    Returns the first non-finite flat index of x or -1."""
    return _C.quantize_into(x.data_ptr(), LP_DTYPE[x.dtype], n_outer, n_channels, n_inner, block_size or 0,
                            FORMATS[fmt], bool(stochastic), int(seed), data.data_ptr(), scale.data_ptr(),
                            0 if zero_point is None else zero_point.data_ptr())


def _cpu_dequantize_into(data, scale, zero_point, fmt, n_outer, n_channels, n_inner, block_size, out) -> None:
    """data contiguous uint8; out contiguous f32/f16/bf16 (computed in f32, rounded once)."""
    _C.dequantize_into(data.data_ptr(), scale.data_ptr(), 0 if zero_point is None else zero_point.data_ptr(),
                       FORMATS[fmt], n_outer, n_channels, n_inner, block_size or 0, out.data_ptr(),
                       LP_DTYPE[out.dtype])


def _backend(device: torch.device, name: str):
    if device.type == "cpu":
        return _cpu_quantize_into if name == "quantize_into" else _cpu_dequantize_into
    from . import _cuda_backend

    fn = getattr(_cuda_backend, "_cuda_" + name, None)
    if fn is None:
        raise fail(ValueError, "lc.quantize" if name == "quantize_into" else "lc.dequantize",
                   f"the CUDA backend of this build has no {name} kernel")
    return fn


# ---------------------------------------------------------------------------------------------
# Implementations (eager; also the bodies of the torch.library ops)
# ---------------------------------------------------------------------------------------------
def _draw_seed() -> int:
    """A fresh 64-bit seed from torch's default generator (so torch.manual_seed reproduces it)."""
    lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
    return lo | (hi << 32)


def _non_finite_error(x: torch.Tensor, flat: int) -> ValueError:
    v = float(x.reshape(-1)[flat])
    what = "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(x.shape))) if x.dim() else ()
    return fail(ValueError, "lc.quantize",
                f"x contains {what} at index {idx} (flat index {flat} in C order); "
                "NaN and +-Inf cannot be quantized")


def _quantize_impl(x: torch.Tensor, fmt: str, axis: Optional[int], block_size: Optional[int],
                   stochastic: bool, seed: Optional[int]):
    """(data, scale, zero_point or None) as torch tensors on x's device; raises on NaN / Inf."""
    shape = tuple(x.shape)
    dev = x.device
    data = new_output(shape if fmt != "int4" else ((x.numel() + 1) // 2,), _DATA_DTYPE[fmt], dev)
    scale_shape = _scale_shape(shape, axis, block_size)
    scale = new_output(scale_shape, torch.float32, dev)
    zero_point = new_output(scale_shape, torch.int32, dev) if fmt == "uint8" else None
    if x.numel() == 0:  # empty x: every group is an all-zero group (same on every backend)
        scale.zero_()
        if zero_point is not None:
            zero_point.zero_()
        return data, scale, zero_point
    if stochastic and seed is None:
        seed = _draw_seed()
    n_outer, n_channels, n_inner, bs = _geometry(shape, axis, block_size)
    xc = (x.detach() if x.requires_grad else x).contiguous()
    if x.is_cpu:  # the kernel only takes data's address: no uint8 view needed
        first_bad = _cpu_quantize_into(xc, fmt, n_outer, n_channels, n_inner, bs, stochastic,
                                       seed if stochastic else 0, data, scale, zero_point)
    else:
        data_u8 = data.view(torch.uint8) if data.dtype != torch.uint8 else data
        first_bad = _backend(dev, "quantize_into")(xc, fmt, n_outer, n_channels, n_inner, bs, stochastic,
                                                   seed if stochastic else 0, data_u8, scale, zero_point)
    if first_bad >= 0:
        raise _non_finite_error(xc, first_bad)
    return data, scale, zero_point


def _dequantize_impl(data: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt: str,
                     shape, axis: Optional[int], block_size: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(shape)
    kernel_dtype = torch.float32 if dtype == torch.float64 else dtype
    out = new_output(shape, kernel_dtype, data.device)
    if out.numel():
        data = data.contiguous()
        zp = None if zero_point is None else zero_point.contiguous()
        n_outer, n_channels, n_inner, bs = _geometry(shape, axis, block_size)
        if data.is_cpu:  # the kernel only takes data's address: no uint8 view needed
            _cpu_dequantize_into(data, scale.contiguous(), zp, fmt, n_outer, n_channels, n_inner, bs, out)
        else:
            data_u8 = data.view(torch.uint8) if data.dtype != torch.uint8 else data
            _backend(data.device, "dequantize_into")(data_u8, scale.contiguous(), zp, fmt, n_outer, n_channels,
                                                     n_inner, bs, out)
    return out.to(torch.float64) if dtype == torch.float64 else out


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
def _seed_to_i64(seed: Optional[int]) -> Optional[int]:
    return None if seed is None else (seed - _U64 if seed >= 1 << 63 else seed)


@torch.library.custom_op("lepton::quantize", mutates_args=(),
                         schema="(Tensor x, str fmt, int? axis, int? block_size, bool stochastic, int? seed)"
                                " -> (Tensor, Tensor, Tensor)")
def _quantize_op(x, fmt, axis, block_size, stochastic, seed):
    """seed is the 64-bit seed as a signed int64 (the schema's int), or None for a fresh one.
    data is int8 for "int8", else uint8 (fp8: bit patterns); an empty int32 zero_point means "none"
    (symmetric formats)."""
    data, scale, zero_point = _quantize_impl(x, fmt, axis, block_size, stochastic,
                                             None if seed is None else seed % _U64)
    data = data.view(_OP_DATA_DTYPE[fmt])
    if zero_point is None:
        zero_point = torch.empty(0, dtype=torch.int32, device=x.device)
    return data, scale, zero_point


@_quantize_op.register_fake
def _quantize_fake(x, fmt, axis, block_size, stochastic, seed):
    shape = tuple(x.shape)
    n = x.numel()
    data_shape = ((n + 1) // 2,) if fmt == "int4" else shape
    if block_size is not None:
        scale_shape = ((n + block_size - 1) // block_size,)
    else:
        scale_shape = () if axis is None else (shape[axis],)
    data = x.new_empty(data_shape, dtype=_OP_DATA_DTYPE[fmt])
    scale = x.new_empty(scale_shape, dtype=torch.float32)
    zero_point = x.new_empty(scale_shape if fmt == "uint8" else (0,), dtype=torch.int32)
    return data, scale, zero_point


@torch.library.custom_op("lepton::dequantize", mutates_args=(),
                         schema="(Tensor data, Tensor scale, Tensor zero_point, str fmt, SymInt[] shape, "
                                "int? axis, int? block_size, ScalarType dtype) -> Tensor")
def _dequantize_op(data, scale, zero_point, fmt, shape, axis, block_size, dtype):
    """data: the codes (int8, uint8 or uint8 fp8 bit patterns); zero_point: int32 per group for
    uint8, empty otherwise."""
    return _dequantize_impl(data, scale, zero_point if fmt == "uint8" else None, fmt, shape, axis, block_size,
                            dtype)


@_dequantize_op.register_fake
def _dequantize_fake(data, scale, zero_point, fmt, shape, axis, block_size, dtype):
    return data.new_empty(tuple(shape), dtype=dtype)


def _eager_cpu(*ts) -> bool:
    """The common case, checked cheaply: plain CPU tensors and no torch.compile tracing. Then the
    device check cannot fail and the kernel runs directly (no dispatcher)."""
    for t in ts:
        if t is not None and (type(t) is not torch.Tensor or not t.is_cpu):
            return False
    return not torch.compiler.is_compiling()


def _tracing(*ts) -> bool:
    """True while torch.compile traces, or for fake / meta tensors: then the torch.library ops run."""
    return torch.compiler.is_compiling() or is_fake(*ts)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _as_int(v, op: str, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise fail(TypeError, op, f"{arg} must be an int, got {type(v).__name__} {v!r}")
    return operator.index(v)


def _check_format(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in FORMATS:
            raise fail(ValueError, "lc.quantize",
                       f"dtype must be one of {', '.join(repr(f) for f in FORMATS)}, got {dtype!r}")
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in _FORMAT_ALIASES:
        return _FORMAT_ALIASES[dtype]
    raise fail(TypeError, "lc.quantize",
               f"dtype must be a format name ({', '.join(repr(f) for f in FORMATS)}), got {dtype!r}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def quantize(x, dtype="int8", *, axis=None, block_size=None, rounding="nearest", seed=None) -> QTensor:
    """Quantizes x (float32 / float16 / bfloat16, torch or NumPy, any shape and strides) per tensor,
    per channel (axis=k) or per block of the C-order flattening (block_size=B). See API.md §2."""
    op = "lc.quantize"
    kind = kind_of(x)
    if not kind:
        raise fail(TypeError, op, f"x must be a torch.Tensor or numpy.ndarray, got {type_desc(x)}")
    xt = x if kind == "torch" else as_torch(x, op, "x")
    if xt.dtype not in _X_DTYPES:
        raise fail(TypeError, op, f"x must be float32, float16 or bfloat16, got {type_desc(x)}")
    if xt.layout is not torch.strided:
        check_strided(op, x=xt)
    fmt = dtype if type(dtype) is str and dtype in FORMATS else _check_format(dtype)
    shape = tuple(xt.shape)
    if axis is not None:
        axis = _as_int(axis, op, "axis")
    if block_size is not None:
        block_size = _as_int(block_size, op, "block_size")
    if axis is not None and block_size is not None:
        raise fail(ValueError, op, f"axis and block_size cannot be combined, got axis={axis} and "
                                   f"block_size={block_size}")
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise fail(ValueError, op, f"axis {axis} is out of range for x of shape {shape}")
        axis %= len(shape)
    if block_size is not None and (block_size < 32 or block_size > 4096 or block_size & (block_size - 1)):
        raise fail(ValueError, op, f"block_size must be a power of two in 32..4096, got {block_size}")
    if rounding not in _ROUNDINGS:
        raise fail(ValueError, op, f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    stochastic = rounding == "stochastic"
    if stochastic and fmt.startswith("fp8"):
        raise fail(ValueError, op, f"rounding='stochastic' is for the integer formats only, got dtype={fmt!r}")
    if seed is not None:
        seed = _as_int(seed, op, "seed")
        if not 0 <= seed < _U64:
            raise fail(ValueError, op, f"seed must be in [0, 2**64), got {seed}")
    eager_cpu = _eager_cpu(xt)
    if not eager_cpu:
        check_device(op, x=xt)
    if not eager_cpu and _tracing(xt):
        # not differentiable (as in eager mode): tracing must not look for a backward formula
        data, scale, zero_point = torch.ops.lepton.quantize(xt.detach(), fmt, axis, block_size, stochastic,
                                                            _seed_to_i64(seed))
        zero_point = zero_point if fmt == "uint8" else None
        data = data.view(_DATA_DTYPE[fmt])
    else:
        data, scale, zero_point = _quantize_impl(xt, fmt, axis, block_size, stochastic, seed)
    if kind == "numpy":
        data, scale = to_kind(data, kind), to_kind(scale, kind)
        zero_point = None if zero_point is None else to_kind(zero_point, kind)
    return QTensor(data, scale, zero_point, fmt, shape, axis, block_size)


def _check_qtensor(q: QTensor, op: str):
    """Validates a QTensor's fields (it may have been built by hand) and returns torch views of its
    arrays: (data, scale, zero_point or None, kind)."""
    fmt = q.dtype
    if fmt not in FORMATS:
        raise fail(ValueError, op, f"q.dtype must be one of {', '.join(repr(f) for f in FORMATS)}, got {fmt!r}")
    kind = kind_of(q.data)
    if not kind:
        raise fail(TypeError, op, f"q.data must be a torch.Tensor or numpy.ndarray, got {type_desc(q.data)}")
    for name, a in (("scale", q.scale), ("zero_point", q.zero_point)):
        if (a is not None or name == "scale") and kind_of(a) != kind:
            raise fail(TypeError, op, f"q.{name} must be a {'torch.Tensor' if kind == 'torch' else 'numpy.ndarray'}"
                                      f" like q.data, got {type_desc(a)}")
    if kind == "torch":
        data, scale, zero_point = q.data, q.scale, q.zero_point
    else:
        data = as_torch(q.data, op, "q.data")
        scale = as_torch(q.scale, op, "q.scale")
        zero_point = None if q.zero_point is None else as_torch(q.zero_point, op, "q.zero_point")
    check_strided(op, **{"q.data": data, "q.scale": scale, "q.zero_point": zero_point})
    try:
        shape = tuple(map(operator.index, q.shape))
    except TypeError:
        raise fail(TypeError, op, f"q.shape must be a tuple of ints, got {q.shape!r}") from None
    if any(s < 0 for s in shape):
        raise fail(ValueError, op, f"q.shape must not be negative, got {shape}")
    axis, block_size = q.axis, q.block_size
    if axis is not None and block_size is not None:
        raise fail(ValueError, op, f"q has both axis={axis} and block_size={block_size}")
    if axis is not None and not (isinstance(axis, int) and 0 <= axis < len(shape)):
        raise fail(ValueError, op, f"q.axis {axis!r} is out of range for shape {shape}")
    if block_size is not None and not (isinstance(block_size, int) and 32 <= block_size <= 4096 and
                                       block_size & (block_size - 1) == 0):
        raise fail(ValueError, op, f"q.block_size must be a power of two in 32..4096, got {block_size!r}")
    want_data = _QT_DATA_DTYPES[fmt]
    if data.dtype not in want_data:
        raise fail(TypeError, op, f"q.data for format {fmt!r} must be "
                                  f"{' or '.join(sorted(dtype_name(d) for d in want_data))}, got {type_desc(q.data)}")
    if data.numel() != math.prod(_data_shape(shape, fmt)):
        raise fail(ValueError, op, f"q.data has {data.numel()} elements, expected "
                                   f"{math.prod(_data_shape(shape, fmt))} for format {fmt!r} and shape {shape}")
    n_groups = math.prod(_scale_shape(shape, axis, block_size))
    if scale.dtype != torch.float32 or scale.numel() != n_groups:
        raise fail(ValueError if scale.dtype == torch.float32 else TypeError, op,
                   f"q.scale must be float32 with {n_groups} elements, got {type_desc(q.scale)}")
    if fmt == "uint8":
        if zero_point is None or zero_point.dtype != torch.int32 or zero_point.numel() != n_groups:
            raise fail(ValueError, op, f"q.zero_point must be int32 with {n_groups} elements for 'uint8', "
                                       f"got {type_desc(q.zero_point) if q.zero_point is not None else None}")
    elif zero_point is not None:
        raise fail(ValueError, op, f"q.zero_point must be None for the symmetric format {fmt!r}")
    if not _eager_cpu(data, scale, zero_point):
        check_device(op, data=data, scale=scale, zero_point=zero_point)
    return data, scale, zero_point, kind, shape


def dequantize(q, dtype=None):
    """The float tensor q stands for: (code - zero_point) * scale in float32, rounded once to `dtype`
    (float32 by default; float16 / bfloat16 / float64 too). Same kind (torch / NumPy) as q's arrays."""
    op = "lc.dequantize"
    if not isinstance(q, QTensor):
        raise fail(TypeError, op, f"q must be a lepton_core.QTensor, got {type_desc(q)}")
    out_dtype = torch.float32 if dtype is None else parse_dtype(dtype, op, "dtype")
    if out_dtype not in _OUT_DTYPES:
        raise fail(TypeError, op, f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
    data, scale, zero_point, kind, shape = _check_qtensor(q, op)
    if kind == "numpy" and out_dtype == torch.bfloat16:
        raise fail(TypeError, op, "dtype bfloat16 needs a torch QTensor (NumPy has no bfloat16)")
    if not _eager_cpu(data, scale) and _tracing(data, scale):
        zp = zero_point if zero_point is not None else torch.empty(0, dtype=torch.int32, device=data.device)
        data = data.view(torch.uint8) if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else data
        out = torch.ops.lepton.dequantize(data.detach(), scale.detach(), zp.detach(), q.dtype, list(shape), q.axis,
                                          q.block_size, out_dtype)
    else:
        out = _dequantize_impl(data, scale, zero_point, q.dtype, shape, q.axis, q.block_size, out_dtype)
    return to_kind(out, kind)
