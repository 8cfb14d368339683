"""QTensor: the result of lc.quantize, and its dequantization (API.md §2)."""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Tuple

import numpy as np

from . import _arrays
from ._arrays import DTYPE_NAME, TORCH, fail, torch, type_desc
from ._codes import FORMATS, MAX_BLOCK, MIN_BLOCK
from ._devices import backend_for, check_device
from ._layout import data_shape, scale_shape

if torch is not None:
    from . import _ops  # the torch.library ops and the eager-bypass rule

_OUT_NAMES = ("float32", "float16", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """Quantized data plus its scales.

    data:       codes, shape == `shape` (int4: flat uint8 of ceil(n/2) bytes, low nibble first)
    scale:      float32; () per-tensor, (shape[axis],) per-channel, (ceil(n/block_size),) blockwise
    zero_point: int32 like `scale` for "uint8", None for the symmetric formats
    dtype:      "int8", "uint8", "int4", "fp8_e4m3" or "fp8_e5m2"
    shape:      the original tensor's shape
    axis:       the channel axis (non-negative) or None
    block_size: the block length or None
    """

    data: Any
    scale: Any
    zero_point: Optional[Any]
    dtype: str
    shape: Tuple[int, ...]
    axis: Optional[int] = None
    block_size: Optional[int] = None

    @property
    def granularity(self) -> str:
        if self.block_size is not None:
            return "block"
        return "channel" if self.axis is not None else "tensor"

    @property
    def nbytes(self) -> int:
        """Bytes of data + scale + zero_point."""
        total = _n_bytes(self.data) + _n_bytes(self.scale)
        if self.zero_point is not None:
            total += _n_bytes(self.zero_point)
        return total

    @property
    def device(self):
        """The torch device of the arrays (NumPy arrays: torch.device("cpu"); "cpu" without torch)."""
        if isinstance(self.data, np.ndarray):
            return torch.device("cpu") if torch is not None else "cpu"
        return self.data.device

    def dequantize(self, dtype=None):
        """The float tensor this stands for, as lc.dequantize(self, dtype)."""
        return self._dequantize(dtype, "lc.dequantize")

    def _dequantize(self, dtype, op: str):
        out_dtype = "float32" if dtype is None else _arrays.parse_dtype(dtype, op, "dtype")
        if out_dtype not in _OUT_NAMES:
            raise fail(TypeError, op, f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
        fmt, data, scale, zero_point, kind, shape = _check_fields(self, op)
        if kind != TORCH:
            if out_dtype == "bfloat16":
                raise fail(TypeError, op, "dtype bfloat16 needs a torch QTensor (NumPy has no bfloat16)")
        elif _ops.needs_dispatcher(data, scale, zero_point):
            zp = zero_point if zero_point is not None else torch.empty(0, dtype=torch.int32, device=data.device)
            if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                data = data.view(torch.uint8)
            return torch.ops.lepton.dequantize(data.detach(), scale.detach(), zp.detach(), fmt.name, list(shape),
                                               self.axis, self.block_size, _arrays.TORCH_DTYPE[out_dtype])
        return backend_for(data).dequantize(data, scale, zero_point, fmt, shape, self.axis, self.block_size,
                                            out_dtype)

    def to(self, device) -> "QTensor":
        """The same QTensor with its arrays on `device` (torch only; NumPy arrays live on the CPU)."""
        if isinstance(self.data, np.ndarray):
            if str(device).split(":")[0] != "cpu":
                raise ValueError(f"QTensor.to: a NumPy QTensor can only live on the CPU, got {device}")
            return self
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return dataclasses.replace(self, data=self.data.to(device), scale=self.scale.to(device), zero_point=zp)

    def __repr__(self) -> str:
        kind = "numpy" if isinstance(self.data, np.ndarray) else f"torch, {self.device}"
        extra = f", axis={self.axis}" if self.axis is not None else ""
        extra += f", block_size={self.block_size}" if self.block_size is not None else ""
        return f"QTensor({self.dtype}, shape={tuple(self.shape)}{extra}, {kind}, nbytes={self.nbytes})"

    # Pickled with torch tensors when torch is installed, so torch.load(weights_only=True) accepts
    # it; NumPy arrays come back as NumPy arrays of the same shape and dtype (0-d scales included).
    # fp8 data travels as its uint8 bytes: plain pickle cannot load float8 tensors (torch 2.13).
    def __reduce__(self):
        is_numpy = isinstance(self.data, np.ndarray)

        def t(a):
            if a is None or not is_numpy or torch is None:
                return a
            # np.ascontiguousarray would turn a 0-d scale into shape (1,)
            return torch.from_numpy(np.array(a, order="C", copy=True))

        data, view_as = t(self.data), None
        if not is_numpy and data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            data, view_as = data.view(torch.uint8), str(data.dtype)[6:]
        return (_rebuild_qtensor, (data, t(self.scale), t(self.zero_point), self.dtype,
                                   tuple(int(s) for s in self.shape), self.axis, self.block_size, is_numpy, view_as))


def _check_fields(q: QTensor, op: str):
    """Validates a QTensor's fields (it may have been built by hand): returns (format, data, scale,
    zero_point or None, kind, shape)."""
    fmt = FORMATS.get(q.dtype) if isinstance(q.dtype, str) else None
    if fmt is None:
        raise fail(ValueError, op, f"q.dtype must be one of {', '.join(repr(f) for f in FORMATS)}, got {q.dtype!r}")
    kind = _arrays.kind_of(q.data)
    if not kind:
        raise fail(TypeError, op, f"q.data must be a torch.Tensor or numpy.ndarray, got {type_desc(q.data)}")
    for name, a in (("scale", q.scale), ("zero_point", q.zero_point)):
        if (a is not None or name == "scale") and _arrays.kind_of(a) != kind:
            raise fail(TypeError, op, f"q.{name} must be a {'torch.Tensor' if kind == TORCH else 'numpy.ndarray'}"
                                      f" like q.data, got {type_desc(a)}")
    data = _arrays.as_array(q.data, op, "q.data")
    scale = _arrays.as_array(q.scale, op, "q.scale")
    zero_point = None if q.zero_point is None else _arrays.as_array(q.zero_point, op, "q.zero_point")
    _arrays.check_strided(op, **{"q.data": data, "q.scale": scale, "q.zero_point": zero_point})
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
    if block_size is not None and not (isinstance(block_size, int) and MIN_BLOCK <= block_size <= MAX_BLOCK and
                                       block_size & (block_size - 1) == 0):
        raise fail(ValueError, op, f"q.block_size must be a power of two in {MIN_BLOCK}..{MAX_BLOCK}, "
                                   f"got {block_size!r}")
    want_data = {fmt.storage, fmt.numpy_storage}
    if DTYPE_NAME.get(data.dtype) not in want_data:
        raise fail(TypeError, op, f"q.data for format {fmt.name!r} must be {' or '.join(sorted(want_data))}, "
                                  f"got {type_desc(q.data)}")
    n_data = math.prod(data_shape(shape, fmt.bits))
    if _arrays.numel(data) != n_data:
        raise fail(ValueError, op, f"q.data has {_arrays.numel(data)} elements, expected {n_data} for format "
                                   f"{fmt.name!r} and shape {shape}")
    n_groups = math.prod(scale_shape(shape, axis, block_size))
    if DTYPE_NAME.get(scale.dtype) != "float32" or _arrays.numel(scale) != n_groups:
        raise fail(ValueError if DTYPE_NAME.get(scale.dtype) == "float32" else TypeError, op,
                   f"q.scale must be float32 with {n_groups} elements, got {type_desc(q.scale)}")
    if fmt.zero_point:
        if zero_point is None or DTYPE_NAME.get(zero_point.dtype) != "int32" or _arrays.numel(zero_point) != n_groups:
            raise fail(ValueError, op, f"q.zero_point must be int32 with {n_groups} elements for {fmt.name!r}, "
                                       f"got {type_desc(q.zero_point) if q.zero_point is not None else None}")
    elif zero_point is not None:
        raise fail(ValueError, op, f"q.zero_point must be None for the symmetric format {fmt.name!r}")
    if kind == TORCH and not (data.is_cpu and scale.is_cpu and (zero_point is None or zero_point.is_cpu)):
        check_device(op, data=data, scale=scale, zero_point=zero_point)
    return fmt, data, scale, zero_point, kind, shape


def _n_bytes(a) -> int:
    if isinstance(a, np.ndarray):
        return int(a.nbytes)
    return a.numel() * a.element_size()


def _rebuild_qtensor(data, scale, zero_point, dtype, shape, axis, block_size, is_numpy, view_as=None):
    if view_as is not None:
        data = data.view(getattr(torch, view_as))
    if is_numpy:
        def n(a):
            return a if a is None or isinstance(a, np.ndarray) else a.numpy()

        data, scale, zero_point = n(data), n(scale), n(zero_point)
    return QTensor(data, scale, zero_point, dtype, tuple(shape), axis, block_size)


if torch is not None:
    torch.serialization.add_safe_globals([QTensor, _rebuild_qtensor])
