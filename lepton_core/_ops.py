"""Every op's torch.library contract, declared once: schema, fake (shape/dtype) implementation and
autograd formula. Device kernels come from the backends (`register_kernels`, called by
backends/cpu.py and backends/cuda.py), so a new device is one module, not an edit here.

    lepton::gemm(a, b, bias?, out_dtype)                     lc.gemm, arguments checked
    lepton::scaled_gemm(a, b, scale_a, scale_b, bias?, out_dtype)
    lepton::quantize(x, fmt, axis?, block_size?, stochastic, seed?) -> (data, scale, zero_point)
    lepton::dequantize(data, scale, zero_point, fmt, shape, axis?, block_size?, dtype)
    lepton::nn_linear(x, weight, bias?, compute_dtype, out_dtype)   lc.nn.Linear's forward
    lepton::quant_linear(x, codes, scale, zero?, bias?, scheme, group_size, out_features)
                                                             lc.nn.QuantLinear's forward

The eager-bypass rule (`needs_dispatcher`): a plain eager call on plain tensors runs the backend
function directly (the dispatcher costs microseconds, which is most of a small GEMM); tracing,
autograd recording, tensor subclasses, meta tensors and dispatch modes go through these ops. One
exception to the autograd part: lc.nn.Linear on CPU records its gradient with _EagerLinear (`linear`),
the op's own forward and backward without the dispatcher. Needs torch (lepton_core imports this module
only when torch is installed).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._arrays import TORCH_DTYPE, draw_seed, name_of, non_finite_error
from ._codes import FORMATS
from ._layout import data_shape, gemm_out_shape, scale_shape
from ._qpack import unpack

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_U64 = 1 << 64


def needs_dispatcher(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a call must go through torch.ops.lepton.* (see the module docstring)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():  # FakeTensorMode, make_fx...
        return True
    grad_on = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or (grad_on and t.requires_grad) or t.is_meta):
            return True
    return False


def eager_cpu_grad(*tensors: Optional[torch.Tensor]) -> Optional[bool]:
    """For the eager CPU paths that skip an op (lc.gemm's plain call, lc.nn.Linear): None when the
    call must take the op (tracing, a dispatch mode, a tensor subclass, a tensor off the CPU), else
    whether it records a gradient. is_compiling first: dynamo does not trace the other tests."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return None
    grad = False
    for t in tensors:
        if t is not None:
            if type(t) not in _PLAIN_TENSOR_TYPES or not t.is_cpu:
                return None
            grad = grad or t.requires_grad
    return grad and torch.is_grad_enabled()


def seed_to_i64(seed: Optional[int]) -> Optional[int]:
    """A 64-bit seed as the schema's signed int."""
    return None if seed is None else (seed - _U64 if seed >= 1 << 63 else seed)


# What lepton::quantize returns as data: fp8 codes travel as their uint8 bit patterns (torch has few
# kernels for float8 tensors, and opcheck compares outputs with arithmetic); callers view them back.
def op_data_dtype(fmt) -> torch.dtype:
    return torch.uint8 if fmt.storage.startswith("float8") else TORCH_DTYPE[fmt.storage]


_DEFS = {
    "gemm": "(Tensor a, Tensor b, Tensor? bias, ScalarType out_dtype) -> Tensor",
    "scaled_gemm": "(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias, ScalarType out_dtype) -> Tensor",
    "quantize": "(Tensor x, str fmt, int? axis, int? block_size, bool stochastic, int? seed) -> (Tensor, Tensor, Tensor)",
    "dequantize": "(Tensor data, Tensor scale, Tensor zero_point, str fmt, SymInt[] shape, int? axis, int? block_size, "
                  "ScalarType dtype) -> Tensor",
    "nn_linear": "(Tensor x, Tensor weight, Tensor? bias, ScalarType compute_dtype, ScalarType out_dtype) -> Tensor",
    "quant_linear": "(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? bias, str scheme, int group_size, "
                    "int out_features) -> Tensor",
}
for _name, _schema in _DEFS.items():
    torch.library.define(f"lepton::{_name}", _schema)


# ---- fakes: output shapes and dtypes only ----
@torch.library.register_fake("lepton::gemm")
def _gemm_fake(a, b, bias, out_dtype):
    return a.new_empty(gemm_out_shape(a.shape, b.shape), dtype=out_dtype)


@torch.library.register_fake("lepton::scaled_gemm")
def _scaled_gemm_fake(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.register_fake("lepton::quantize")
def _quantize_fake(x, fmt, axis, block_size, stochastic, seed):
    f = FORMATS[fmt]
    s_shape = scale_shape(tuple(x.shape), axis, block_size)
    return (x.new_empty(data_shape(tuple(x.shape), f.bits), dtype=op_data_dtype(f)),
            x.new_empty(s_shape, dtype=torch.float32),
            x.new_empty(s_shape if f.zero_point else (0,), dtype=torch.int32))


@torch.library.register_fake("lepton::dequantize")
def _dequantize_fake(data, scale, zero_point, fmt, shape, axis, block_size, dtype):
    return data.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("lepton::nn_linear")
def _nn_linear_fake(x, weight, bias, compute_dtype, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("lepton::quant_linear")
def _quant_linear_fake(x, codes, scale, zero, bias, scheme, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


# ---- device kernels: adapters from each schema to the backend functions ----
# device type -> the backend module registered for it (the eager paths below call it directly).
_BACKENDS = {}


def register_kernels(device_type: str, backend) -> None:
    """Registers `backend`'s functions (backends/__init__.py) as `device_type`'s kernels of every op."""
    _BACKENDS[device_type] = backend

    def gemm(a, b, bias, out_dtype):
        return backend.gemm(a, b, bias, name_of(out_dtype))

    def scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype):
        return backend.scaled_gemm(a, b, scale_a, scale_b, bias, name_of(out_dtype))

    def quantize(x, fmt, axis, block_size, stochastic, seed):
        """seed: the 64-bit seed as a signed int64, or None for a fresh one (drawn from torch's
        generator). data is int8 for "int8", else uint8 (fp8: bit patterns); an empty int32
        zero_point stands for "none" (symmetric formats)."""
        f = FORMATS[fmt]
        seed = (draw_seed("torch") if seed is None else seed % _U64) if stochastic else 0
        data, scale, zero_point, first_bad = backend.quantize(x, f, axis, block_size, stochastic, seed)
        if first_bad >= 0:
            raise non_finite_error(x.contiguous(), first_bad, "lc.quantize")
        if zero_point is None:
            zero_point = torch.empty(0, dtype=torch.int32, device=x.device)
        return data.view(op_data_dtype(f)), scale, zero_point

    def dequantize(data, scale, zero_point, fmt, shape, axis, block_size, dtype):
        f = FORMATS[fmt]
        return backend.dequantize(data, scale, zero_point if f.zero_point else None, f, shape, axis, block_size,
                                  name_of(dtype))

    def nn_linear(x, weight, bias, compute_dtype, out_dtype):
        return backend.linear(x, weight, bias, name_of(compute_dtype), name_of(out_dtype))

    for name, fn in (("gemm", gemm), ("scaled_gemm", scaled_gemm), ("quantize", quantize),
                     ("dequantize", dequantize), ("nn_linear", nn_linear), ("quant_linear", backend.quant_linear)):
        torch.library.register_kernel(f"lepton::{name}", device_type, fn)


# ---- autograd ----
def _gemm_setup_context(ctx, inputs, output):
    a, b, bias, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemm_backward(ctx, grad):
    """Gradients through lepton::gemm itself, in the input dtype with float32 accumulation."""
    a, b = ctx.saved_tensors
    g = grad if grad.dtype == a.dtype else grad.to(a.dtype)
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.lepton.gemm(g, b.transpose(-1, -2), None, a.dtype)
    if ctx.needs_input_grad[1]:
        if a.dim() == 3 and b.dim() == 2:  # b was broadcast over the batch: sum its gradient
            k, n = b.shape
            grad_b = torch.ops.lepton.gemm(a.reshape(-1, k).transpose(0, 1), g.reshape(-1, n), None, b.dtype)
        else:
            grad_b = torch.ops.lepton.gemm(a.transpose(-1, -2), g, None, b.dtype)
    if ctx.needs_input_grad[2]:
        dims = tuple(range(grad.dim() - 1))
        grad_bias = grad.to(torch.float32).sum(dim=dims).to(ctx.bias_dtype)
    return grad_a, grad_b, grad_bias, None


torch.library.register_autograd("lepton::gemm", _gemm_backward, setup_context=_gemm_setup_context)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) as a (rows, C) matrix; explicit sizes, since -1 is ambiguous when C == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, compute_dtype, _ = inputs
    ctx.save_for_backward(x, weight)
    _linear_save_dtypes(ctx, x, weight, bias, compute_dtype)


def _linear_save_dtypes(ctx, x, weight, bias, compute_dtype):
    ctx.compute_dtype = compute_dtype
    ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad_out):
    """lc.nn.Linear's backward, through the same op (lc.gemm underneath):

        grad input    gx = gemm(g_c, W_c)   = nn_linear(g, W^T)     (rounded once to x's dtype)
        grad weight   gW = gemm(g_c^T, x_c) = nn_linear(g^T, x^T)   (rounded once to W's dtype)
        grad bias     gb = sum over rows of g, in float32

    g_c is the incoming gradient rounded to compute_dtype (as autocast does); every product is
    accumulated in float32 and rounded once, so float32 master weights get a float32 gradient. The
    saved x and weight are the inputs (the op) or already x_c and W_c (_EagerLinear: rounded once in
    the forward); rounding either again gives the same bits."""
    x, weight = ctx.saved_tensors
    cd = ctx.compute_dtype
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g2 = _rows(grad_out)
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = linear(grad_out, weight.t(), None, cd, ctx.x_dtype)
    if need_w:
        grad_w = linear(g2.t(), _rows(x).t(), None, cd, ctx.weight_dtype)
    if need_b and ctx.bias_dtype is not None:
        grad_b = g2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None


torch.library.register_autograd("lepton::nn_linear", _linear_backward, setup_context=_linear_setup_context)


class _EagerLinear(torch.autograd.Function):
    """lepton::nn_linear's autograd for eager CPU calls: the op's own forward (the CPU backend) and
    backward (_linear_backward), without the dispatcher's passes through Python (~200 of a 32 x 64 x
    64 layer's ~300 us forward and backward)."""

    # forward with ctx (not setup_context): apply then binds no signature on each call (inspect,
    # ~25 us of a small layer's call). It saves x and the weight as rounded to compute_dtype, so the
    # backward's g @ W does not round the weight again: with float32 master weights under bf16 autocast,
    # that second pass over every weight (read 4 bytes, write 2 a parameter) was a fifth of a training
    # step of 32-row products (bench/notes_train.md, session 25). A bf16 copy of each weight then lives
    # from forward to backward, as under torch.autocast.
    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, out_dtype):
        x_c, w_c = x.to(compute_dtype), weight.to(compute_dtype)
        out = _BACKENDS["cpu"].linear(x_c, w_c, bias, name_of(compute_dtype), name_of(out_dtype))
        ctx.save_for_backward(x_c, w_c)
        _linear_save_dtypes(ctx, x, weight, bias, compute_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _linear_backward(ctx, grad_out)


def linear(x, weight, bias, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """lepton::nn_linear's result (lc.nn.Linear's forward and its backward's products). By the
    eager-bypass rule, plain CPU tensors outside tracing and dispatch modes skip the op: the CPU
    backend directly when nothing needs a gradient (inference; the backward's own products), else
    _EagerLinear, the same forward and backward recorded without the dispatcher."""
    grad = eager_cpu_grad(x, weight, bias) if "cpu" in _BACKENDS else None
    if grad is None:
        return torch.ops.lepton.nn_linear(x, weight, bias, compute_dtype, out_dtype)
    if grad:
        return _EagerLinear.apply(x, weight, bias, compute_dtype, out_dtype)
    return _BACKENDS["cpu"].linear(x, weight, bias, name_of(compute_dtype), name_of(out_dtype))


def _quant_linear_setup_context(ctx, inputs, output):
    x, codes, scale, zero, bias, scheme, group_size, out_features = inputs
    ctx.save_for_backward(codes, scale, zero)
    ctx.geometry = (scheme, out_features, x.shape[-1], group_size)
    ctx.x_dtype = x.dtype


def _quant_linear_backward(ctx, grad_out):
    """The input's gradient g W (weights are frozen): W dequantized for the backward only, float32
    accumulation, rounded once to the input's dtype."""
    codes, scale, zero = ctx.saved_tensors
    scheme, n, k, group_size = ctx.geometry
    w = unpack(scheme, codes, scale, zero, n, k, group_size)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_out.to(torch.float32) @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None, None, None, None


torch.library.register_autograd("lepton::quant_linear", _quant_linear_backward,
                                setup_context=_quant_linear_setup_context)
