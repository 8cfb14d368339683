"""`lepton::nn_linear`: y = x @ W^T + b through lc.gemm, registered with torch.library.

One op serves the forward and both matmuls of the backward, so autograd, autocast and torch.compile
see a single opaque, shape-checked operation (a fake implementation tells the compiler the output's
shape and dtype; the real one only ever runs on real tensors):

    forward       y  = gemm(x_c, W_c^T) + b            x_c, W_c: x and W rounded to compute_dtype
    grad input    gx = gemm(g_c, W_c)     = nn_linear(g, W^T)      (rounded once to x's dtype)
    grad weight   gW = gemm(g_c^T, x_c)   = nn_linear(g^T, x^T)    (rounded once to W's dtype)
    grad bias     gb = sum over rows of g, in float32

g_c is the incoming gradient rounded to compute_dtype (as autocast does). Every product is
accumulated in float32 by lc.gemm and rounded once, so the float32 master weights receive a float32
gradient (not one rounded to bf16 first, as autocast + nn.Linear would give).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

import lepton_core as lc


@torch.library.custom_op("lepton::nn_linear", mutates_args=())
def nn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None -> (..., N) in out_dtype."""
    # The dtypes are explicit arguments: an enclosing autocast must not re-cast anything in here.
    with torch.autocast(x.device.type, enabled=False):
        x2 = _rows(x).to(compute_dtype)
        w_t = weight.to(compute_dtype).t()  # (K, N) transposed view: lc.gemm reads it without a copy
        y2 = lc.gemm(x2, w_t, bias=bias, out_dtype=out_dtype)
    return y2.reshape(*x.shape[:-1], weight.shape[0])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) as a (rows, C) matrix; explicit sizes, since -1 is ambiguous when C == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@nn_linear.register_fake
def _nn_linear_fake(x, weight, bias, compute_dtype, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, compute_dtype, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.compute_dtype = compute_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    cd = ctx.compute_dtype
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g2 = _rows(grad_out)
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = nn_linear(grad_out, weight.t(), None, cd, x.dtype)
    if need_w:
        grad_w = nn_linear(g2.t(), _rows(x).t(), None, cd, weight.dtype)
    if need_b and ctx.bias_dtype is not None:
        grad_b = g2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None


nn_linear.register_autograd(_backward, setup_context=_setup_context)
