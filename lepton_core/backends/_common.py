"""What the device backends share: output allocation, the empty-dimension cases and the linear
composite, all on arrays of either kind (torch tensors or NumPy arrays)."""
from __future__ import annotations

import math

import numpy as np

from .._arrays import NUMPY, TORCH, new_output, torch
from .._layout import gemm_out_shape, scale_shape


def kind(x) -> str:
    return NUMPY if isinstance(x, np.ndarray) else TORCH


def float32_vector(t):
    """t as a contiguous float32 vector (no copy when it already is one)."""
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t.reshape(-1), dtype=np.float32)
    if t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 1:
        return t.reshape(-1).to(torch.float32).contiguous()
    return t


def device_of(x):
    return None if isinstance(x, np.ndarray) else x.device


def gemm_setup(a, b, bias, out_dtype: str):
    """(out, sizes (n_batch, m, k, n), bias as float32 or None, done). When `done`, out already holds
    the result: an empty result, or K == 0 (an empty sum: zeros plus bias, rounded once)."""
    shape = gemm_out_shape(a.shape, b.shape)
    out = new_output(kind(a), shape, out_dtype, device_of(a))
    n_batch = a.shape[0] if a.ndim == 3 else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    if not (m and n and n_batch):
        return out, (n_batch, m, k, n), None, True
    bias32 = float32_vector(bias)
    if k == 0:
        fill_rows(out, bias32)
        return out, (n_batch, m, k, n), bias32, True
    return out, (n_batch, m, k, n), bias32, False


def fill_rows(out, row) -> None:
    """out[...] = row (broadcast over the leading dims), or 0 when row is None; rounded once."""
    if isinstance(out, np.ndarray):
        out[...] = 0 if row is None else row
    elif row is None:
        out.zero_()
    else:
        out.copy_(row.expand(out.shape))


def scaled_gemm_empty_k(out, scale_a, scale_b, bias32) -> None:
    """K == 0: acc = 0, so out = round_once((0 * scale_a) * scale_b + bias) (NaN/Inf scales propagate)."""
    m, n = out.shape
    if isinstance(out, np.ndarray):
        val = (np.zeros((m, n), np.float32) * scale_a.reshape(-1, 1)) * scale_b.reshape(1, -1)
        out[...] = val if bias32 is None else val + bias32
        return
    zero = torch.zeros((m, n), dtype=torch.float32, device=out.device)
    val = (zero * scale_a.reshape(-1, 1)) * scale_b.reshape(1, -1)
    out.copy_(val if bias32 is None else val + bias32)


def quantize_outputs(x, fmt, axis, block_size):
    """(data, scale, zero_point or None) allocated for quantizing x (of its kind and device)."""
    k, dev = kind(x), device_of(x)
    shape = tuple(x.shape)
    n = math.prod(shape)
    data_dtype = fmt.storage if k == TORCH else fmt.numpy_storage
    data = new_output(k, (fmt.data_numel(n),) if fmt.bits < 8 else shape, data_dtype, dev)
    s_shape = scale_shape(shape, axis, block_size)
    scale = new_output(k, s_shape, "float32", dev)
    zero_point = new_output(k, s_shape, "int32", dev) if fmt.zero_point else None
    if n == 0:  # empty x: every group is an all-zero group (the same on every backend)
        for a in (scale, zero_point):
            if a is not None:
                a.fill(0) if isinstance(a, np.ndarray) else a.zero_()
    return data, scale, zero_point


def linear(gemm, x, weight, bias, compute_dtype: str, out_dtype: str):
    """y = x @ weight^T + bias through the backend's `gemm`: x (..., K) and weight (N, K) rounded to
    compute_dtype, weight read as a transposed view (never copied), float32 accumulation, rounded
    once to out_dtype. x and weight are torch tensors."""
    td = getattr(torch, compute_dtype)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(td)
    y2 = gemm(x2, weight.to(td).t(), bias, out_dtype)
    return y2.reshape(*x.shape[:-1], weight.shape[0])
