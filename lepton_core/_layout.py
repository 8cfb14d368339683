"""Shapes every backend and check agrees on: quantization groups and GEMM results (torch-free).

Quantization granularity is described over the C-order flattening of x as
(n_outer, n_channels, n_inner, block_size), the layout the native kernels take:

    per-tensor          (1, 1, n, 0)                                          groups: 1
    per-channel axis k  (prod(shape[:k]), shape[k], prod(shape[k+1:]), 0)    groups: shape[k]
    blockwise B         (1, 1, n, B)                                          groups: ceil(n / B)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple


def quant_geometry(shape, axis: Optional[int], block_size: Optional[int]) -> Tuple[int, int, int, int]:
    """(n_outer, n_channels, n_inner, block_size) of x's C-order flattening (block_size 0: none)."""
    if block_size is not None:
        return 1, 1, math.prod(shape), block_size
    if axis is None:
        return 1, 1, math.prod(shape), 0
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]), 0


def scale_shape(shape, axis: Optional[int], block_size: Optional[int]) -> Tuple[int, ...]:
    """Shape of QTensor.scale (and zero_point): () per tensor, (C,) per channel, (blocks,) blockwise."""
    if block_size is not None:
        return (-(-math.prod(shape) // block_size),)
    if axis is None:
        return ()
    return (shape[axis],)


def data_shape(shape, bits: int) -> Tuple[int, ...]:
    """Shape of QTensor.data: x's shape, or flat packed bytes for sub-byte formats."""
    if bits < 8:
        return ((math.prod(shape) * bits + 7) // 8,)
    return tuple(shape)


def gemm_out_shape(a_shape, b_shape) -> Tuple[int, ...]:
    """(M, N) or (B, M, N) for a (M, K) | (B, M, K) and b (K, N) | (B, K, N)."""
    if len(a_shape) == 2:
        return (a_shape[0], b_shape[-1])
    return (a_shape[0], a_shape[1], b_shape[-1])
