"""QTensor: the result of lc.quantize (API.md §2)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np
import torch


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
        return self.data.device if isinstance(self.data, torch.Tensor) else torch.device("cpu")

    def dequantize(self, dtype=None):
        from .quant import dequantize

        return dequantize(self, dtype)

    def to(self, device) -> "QTensor":
        """The same QTensor with its arrays on `device` (torch only; NumPy arrays live on the CPU)."""
        if not isinstance(self.data, torch.Tensor):
            if torch.device(device).type != "cpu":
                raise ValueError(f"QTensor.to: a NumPy QTensor can only live on the CPU, got {device}")
            return self
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return dataclasses.replace(self, data=self.data.to(device), scale=self.scale.to(device), zero_point=zp)

    def __repr__(self) -> str:
        kind = "numpy" if isinstance(self.data, np.ndarray) else f"torch, {self.device}"
        extra = f", axis={self.axis}" if self.axis is not None else ""
        extra += f", block_size={self.block_size}" if self.block_size is not None else ""
        return f"QTensor({self.dtype}, shape={tuple(self.shape)}{extra}, {kind}, nbytes={self.nbytes})"

    # Pickled with torch tensors only, so torch.load(weights_only=True) accepts it.
    def __reduce__(self):
        is_numpy = isinstance(self.data, np.ndarray)

        def t(a):
            if a is None or not is_numpy:
                return a
            return torch.from_numpy(np.ascontiguousarray(a))

        return (_rebuild_qtensor, (t(self.data), t(self.scale), t(self.zero_point), self.dtype,
                                   tuple(int(s) for s in self.shape), self.axis, self.block_size, is_numpy))


def _n_bytes(a) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def _rebuild_qtensor(data, scale, zero_point, dtype, shape, axis, block_size, is_numpy):
    if is_numpy:
        data, scale = data.numpy(), scale.numpy()
        zero_point = None if zero_point is None else zero_point.numpy()
    return QTensor(data, scale, zero_point, dtype, tuple(shape), axis, block_size)


torch.serialization.add_safe_globals([QTensor, _rebuild_qtensor])
