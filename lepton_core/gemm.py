"""lc.gemm and lc.scaled_gemm (API.md §1): contract checks, backend dispatch, torch.library ops.

Layers, outermost first:
  * `gemm` / `scaled_gemm`: accept torch tensors, NumPy arrays (and QTensors), check the whole
    contract once, and return the kind of the first input. Eager calls go straight to the
    implementation (low overhead); while tracing (torch.compile, FakeTensor / meta) or when autograd
    must record, they go through the registered ops `torch.ops.lepton.gemm` / `.scaled_gemm`.
  * `_gemm_impl` / `_scaled_gemm_impl`: allocate the output, handle empty dims, pick the device.
  * `_cpu_gemm_into` / `_cpu_scaled_gemm_into`: pass pointers, sizes and strides (in elements) to the
    native kernels (csrc/cpu/gemm). The CUDA backend implements the same `*_into` signatures.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _C, _tensors
from ._tensors import LP_DTYPE, dtype_name, fail
from .qtensor import QTensor

_GEMM = "lc.gemm"
_SCALED = "lc.scaled_gemm"

# int8 products are at most 128 * 128 = 2^14 in magnitude, so K * 2^14 < 2^31 keeps int32 exact.
INT8_MAX_K = 131071

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_LP_INT8 = LP_DTYPE[torch.int8]
_STRIDED = torch.strided


# ---------------------------------------------------------------------------------------------
# Backend functions (inputs already checked)
# ---------------------------------------------------------------------------------------------

def _cpu_gemm_into(a3: torch.Tensor, b3: torch.Tensor, bias: Optional[torch.Tensor], out3: torch.Tensor) -> None:
    """out3[i] = a3[i] @ b3[i] (+ bias), rounded once to out3's dtype.

    a3 (B, M, K) and b3 (B, K, N) with any strides (b3's batch stride 0 when broadcast); both float
    of one dtype, or both int8 (then out3 is int32 and bias None). bias: None or float32 contiguous
    (N,). out3: contiguous (B, M, N).
    """
    n_batch, m, k = a3.shape
    _cpu_gemm(a3, b3, bias, out3, n_batch, m, k, b3.shape[2])


def _cpu_gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
              n_batch: int, m: int, k: int, n: int) -> None:
    """_cpu_gemm_into for 2-D or 3-D a / b (2-D b with 3-D a broadcasts), sizes already known: no
    views are built, the strides go straight to the kernel (this path sets the fixed cost of small
    calls)."""
    if a.ndim == 2:
        sa_batch = 0
        sa_row, sa_col = a.stride()
    else:
        sa_batch, sa_row, sa_col = a.stride()
    if b.ndim == 2:
        sb_batch = 0
        sb_row, sb_col = b.stride()
    else:
        sb_batch, sb_row, sb_col = b.stride()
    if n_batch > 1 and sb_batch == 0 and (m == 1 or sa_batch == m * sa_row):
        # b is shared by every batch and a's batches stack as rows: one (B*M, K) @ (K, N) GEMM
        # packs b once and cuts the work into bigger tiles.
        if m == 1:
            sa_row = sa_batch
        m, n_batch, sa_batch = n_batch * m, 1, 0
    in_code = LP_DTYPE[a.dtype]
    if in_code == _LP_INT8:
        _C.gemm_int8(n_batch, m, n, k, a.data_ptr(), sa_batch, sa_row, sa_col,
                     b.data_ptr(), sb_batch, sb_row, sb_col, out.data_ptr())
    else:
        _C.gemm_float(n_batch, m, n, k, a.data_ptr(), in_code, sa_batch, sa_row, sa_col,
                      b.data_ptr(), sb_batch, sb_row, sb_col, 0 if bias is None else bias.data_ptr(),
                      out.data_ptr(), LP_DTYPE[out.dtype])


def _cpu_scaled_gemm_into(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                          bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out = round_once((float(a @ b) * scale_a[:, None]) * scale_b[None, :] + bias).

    a int8 (M, K), b int8 (K, N), any strides; scale_a float32 contiguous (M,) or (1,); scale_b
    float32 contiguous (N,) or (1,); bias None or float32 contiguous (N,); out contiguous (M, N).
    """
    m, k = a.shape
    n = b.shape[1]
    _C.scaled_gemm_int8(m, n, k, a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                        scale_a.data_ptr(), scale_a.numel(), scale_b.data_ptr(), scale_b.numel(),
                        0 if bias is None else bias.data_ptr(), out.data_ptr(), LP_DTYPE[out.dtype])


def _gemm_impl(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    if a.ndim == 2:
        m, k = a.shape
        n = b.shape[1]
        n_batch = 1
        shape = (m, n)
    else:
        n_batch, m, k = a.shape
        n = b.shape[-1]
        shape = (n_batch, m, n)
    out = _tensors.new_output(shape, out_dtype, a.device)
    if not (m and n and n_batch):
        return out
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if k == 0:  # an empty sum: zeros plus bias, rounded once
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand(shape))
        return out
    if a.is_cpu:
        _cpu_gemm(a, b, bias, out, n_batch, m, k, n)
    else:
        from . import _cuda_backend

        a3 = a if a.ndim == 3 else a.unsqueeze(0)
        b3 = b if b.ndim == 3 else b.unsqueeze(0).expand(n_batch, k, n)
        _cuda_backend.gemm_into(a3, b3, bias, out if out.ndim == 3 else out.unsqueeze(0))
    return out


def _scaled_gemm_impl(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    out = _tensors.new_output((m, n), out_dtype, a.device)
    if out.numel() == 0:
        return out
    sa = scale_a.to(torch.float32).reshape(-1).contiguous()
    sb = scale_b.to(torch.float32).reshape(-1).contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    if k == 0:  # acc = 0: (0 * sa) * sb + bias, in float32, rounded once
        zero = torch.zeros((m, n), dtype=torch.float32, device=a.device)
        val = (zero * sa.reshape(-1, 1)) * sb.reshape(1, -1)
        if bias32 is not None:
            val = val + bias32
        out.copy_(val)
        return out
    if a.device.type == "cuda":
        from . import _cuda_backend

        _cuda_backend.scaled_gemm_into(a, b, sa, sb, bias32, out)
    else:
        _cpu_scaled_gemm_into(a, b, sa, sb, bias32, out)
    return out


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lepton::gemm", mutates_args=())
def _gemm_op(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """lc.gemm with its arguments already checked; out_dtype resolved."""
    return _gemm_impl(a, b, bias, out_dtype)


@_gemm_op.register_fake
def _gemm_fake(a, b, bias, out_dtype):
    n = b.shape[-1]
    shape = (a.shape[0], a.shape[1], n) if a.dim() == 3 else (a.shape[0], n)
    return a.new_empty(shape, dtype=out_dtype)


def _gemm_setup_context(ctx, inputs, output):
    a, b, bias, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemm_backward(ctx, grad):
    """Gradients through lc.gemm itself, in the input dtype with float32 accumulation."""
    a, b = ctx.saved_tensors
    g = grad if grad.dtype == a.dtype else grad.to(a.dtype)
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_a = gemm(g, b.transpose(-1, -2), out_dtype=a.dtype)
    if ctx.needs_input_grad[1]:
        if a.dim() == 3 and b.dim() == 2:  # b was broadcast over the batch: sum its gradient
            k, n = b.shape
            grad_b = gemm(a.reshape(-1, k).transpose(0, 1), g.reshape(-1, n), out_dtype=b.dtype)
        else:
            grad_b = gemm(a.transpose(-1, -2), g, out_dtype=b.dtype)
    if ctx.needs_input_grad[2]:
        dims = tuple(range(grad.dim() - 1))
        grad_bias = grad.to(torch.float32).sum(dim=dims).to(ctx.bias_dtype)
    return grad_a, grad_b, grad_bias, None


_gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


@torch.library.custom_op("lepton::scaled_gemm", mutates_args=())
def _scaled_gemm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """lc.scaled_gemm on raw int8 data and flat float32 scales, arguments already checked."""
    return _scaled_gemm_impl(a, b, scale_a, scale_b, bias, out_dtype)


@_scaled_gemm_op.register_fake
def _scaled_gemm_fake(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _needs_dispatcher(a: torch.Tensor, b: torch.Tensor, *more: Optional[torch.Tensor]) -> bool:
    """True when the call must go through torch.ops.lepton.* (tracing, autograd recording, tensor
    subclasses, meta tensors or an active dispatch mode); plain eager calls skip the dispatcher."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():  # FakeTensorMode, make_fx...
        return True
    grad_on = torch.is_grad_enabled()
    for t in (a, b) + more:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or (grad_on and t.requires_grad) or t.is_meta):
            return True
    return False


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_bias(op: str, bias: torch.Tensor, n: int) -> None:
    if bias.dtype not in _BIAS_DTYPES:
        raise fail(TypeError, op, f"bias must be float32, float16, bfloat16 or float64, got {dtype_name(bias.dtype)}")
    if bias.dim() != 1 or bias.shape[0] != n:
        raise fail(ValueError, op, f"bias must have shape ({n},) (N of the result), got {_shape(bias)}")


def _resolve_out_dtype(op: str, out_dtype, default: torch.dtype, allowed: tuple, kind: str) -> torch.dtype:
    od = default if out_dtype is None else _tensors.parse_dtype(out_dtype, op, "out_dtype")
    if od not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise fail(TypeError, op, f"out_dtype must be one of {names} here, got {dtype_name(od)}")
    if kind == "numpy" and od == torch.bfloat16:
        raise fail(TypeError, op, "out_dtype bfloat16 is not available for NumPy inputs (NumPy has no bfloat16)")
    return od


_GEMM_IN_DTYPES = frozenset(_FLOAT_DTYPES + (torch.int8,))


def _check_gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out_dtype, kind: str) -> torch.dtype:
    """Checks lc.gemm's contract; returns the resolved output dtype. Straight-line on purpose: this
    runs on every call and is most of a small GEMM's fixed cost."""
    op = _GEMM
    if not (a.is_cpu and b.is_cpu and (bias is None or bias.is_cpu)):
        _tensors.check_device(op, a=a, b=b, bias=bias)
    if a.layout is not _STRIDED or b.layout is not _STRIDED or (bias is not None and bias.layout is not _STRIDED):
        _tensors.check_strided(op, a=a, b=b, bias=bias)
    a_dtype, b_dtype = a.dtype, b.dtype
    if a_dtype not in _GEMM_IN_DTYPES or b_dtype not in _GEMM_IN_DTYPES:
        name, t = ("a", a) if a_dtype not in _GEMM_IN_DTYPES else ("b", b)
        raise fail(TypeError, op, f"{name} must be float32, float16, bfloat16 or int8, got {dtype_name(t.dtype)}")
    if a_dtype != b_dtype:
        raise fail(TypeError, op, f"a and b must share one dtype, got a {dtype_name(a_dtype)} and b {dtype_name(b_dtype)}")
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
    if a_dtype == torch.int8:
        if bias is not None:
            raise fail(ValueError, op, f"bias is not supported for int8 inputs (exact int32 result), got bias "
                                       f"of shape {_shape(bias)}")
        if k > INT8_MAX_K:
            raise fail(ValueError, op, f"K={k} exceeds {INT8_MAX_K} for int8 inputs (the int32 sum "
                                       f"could overflow); a {_shape(a)}, b {_shape(b)}")
        if out_dtype is None:
            return torch.int32
        return _resolve_out_dtype(op, out_dtype, torch.int32, (torch.int32,), kind)
    if bias is not None:
        _check_bias(op, bias, b_shape[-1])
    if out_dtype is None:
        return a_dtype
    return _resolve_out_dtype(op, out_dtype, a_dtype, _FLOAT_DTYPES, kind)


def gemm(a, b, *, bias=None, out_dtype=None):
    """`a @ b (+ bias)` with float32 accumulation, rounded once to `out_dtype` (API.md §1).

    a: (M, K) or (B, M, K); b: (K, N) or (B, K, N) (2-D b broadcasts over a's batch). Float inputs
    (float32 / float16 / bfloat16, one dtype) give out_dtype (default: the input dtype); int8 inputs
    give an exact int32 result. Returns the kind (torch / NumPy) of `a`.
    """
    if type(a) is torch.Tensor and type(b) is torch.Tensor:  # the common case, without calls
        kind, ta, tb = "torch", a, b
    else:
        kind = _tensors.kind_of(a)
        ta = _tensors.as_torch(a, _GEMM, "a")
        tb = _tensors.as_torch(b, _GEMM, "b")
    tbias = None if bias is None else _tensors.as_torch(bias, _GEMM, "bias")
    od = _check_gemm(ta, tb, tbias, out_dtype, kind)
    if _needs_dispatcher(ta, tb, tbias):
        out = torch.ops.lepton.gemm(ta, tb, tbias, od)
    else:
        out = _gemm_impl(ta, tb, tbias, od)
    return out if kind == "torch" else _tensors.to_kind(out, kind)


def _qtensor_parts(q, name: str, want_axis: int, op: str):
    """(data, scale) torch tensors of an int8 QTensor for one side of scaled_gemm."""
    if not isinstance(q, QTensor):
        raise fail(TypeError, op, f"{name} must be a lepton_core.QTensor (from lc.quantize), got {_tensors.type_desc(q)}")
    if q.dtype != "int8":
        raise fail(TypeError, op, f"{name} must be an int8 QTensor, got format {q.dtype!r}")
    desc = "per-row (axis=0)" if want_axis == 0 else "per-column (axis=1)"
    if q.block_size is not None or (q.axis is not None and q.axis != want_axis):
        got = f"block_size={q.block_size}" if q.block_size is not None else f"axis={q.axis}"
        raise fail(ValueError, op, f"{name} must be quantized per-tensor or {desc}, got {got}")
    data = _tensors.as_torch(q.data, op, f"{name}.data")
    scale = q.scale
    if isinstance(scale, np.generic):
        scale = np.asarray(scale)
    scale = _tensors.as_torch(scale, op, f"{name}.scale")
    if data.dtype != torch.int8:
        raise fail(TypeError, op, f"{name}.data must be int8, got {dtype_name(data.dtype)}")
    if data.dim() != 2:
        raise fail(ValueError, op, f"{name} must hold a 2-D matrix, got shape {_shape(data)}")
    if scale.dtype != torch.float32:
        raise fail(TypeError, op, f"{name}.scale must be float32, got {dtype_name(scale.dtype)}")
    want_n = 1 if q.axis is None else data.shape[want_axis]
    if scale.numel() != want_n or (q.axis is not None and scale.dim() != 1):
        raise fail(ValueError, op, f"{name}.scale must have {want_n} element(s) for {name} of shape "
                                   f"{_shape(data)}, got shape {_shape(scale)}")
    return data, scale


def scaled_gemm(qa, qb, *, bias=None, out_dtype=torch.float32):
    """W8A8 linear: `(qa.data @ qb.data) * scale_a[:, None] * scale_b[None, :] + bias` (API.md §1).

    int32 accumulation, then in float32 `(float(acc) * scale_a) * scale_b + bias`, rounded once to
    out_dtype (float32 / float16 / bfloat16). qa: int8 QTensor of (M, K), per-tensor or per-row;
    qb: int8 QTensor of (K, N), per-tensor or per-column. Returns the kind of qa's data.
    """
    op = _SCALED
    a, sa = _qtensor_parts(qa, "qa", 0, op)
    b, sb = _qtensor_parts(qb, "qb", 1, op)
    kind = _tensors.kind_of(qa.data)
    tbias = None if bias is None else _tensors.as_torch(bias, op, "bias")
    _tensors.check_device(op, qa=a, qa_scale=sa, qb=b, qb_scale=sb, bias=tbias)
    _tensors.check_strided(op, qa=a, qa_scale=sa, qb=b, qb_scale=sb, bias=tbias)
    if a.shape[1] != b.shape[0]:
        raise fail(ValueError, op, f"inner dimensions differ: qa {_shape(a)} has K={a.shape[1]} but qb "
                                   f"{_shape(b)} has K={b.shape[0]}")
    if a.shape[1] > INT8_MAX_K:
        raise fail(ValueError, op, f"K={a.shape[1]} exceeds {INT8_MAX_K} (the int32 sum could overflow); "
                                   f"qa {_shape(a)}, qb {_shape(b)}")
    if tbias is not None:
        _check_bias(op, tbias, b.shape[1])
    od = _resolve_out_dtype(op, out_dtype, torch.float32, _FLOAT_DTYPES, kind)
    if _needs_dispatcher(a, b, sa, sb, tbias):
        out = torch.ops.lepton.scaled_gemm(a, b, sa, sb, tbias, od)
    else:
        out = _scaled_gemm_impl(a, b, sa, sb, tbias, od)
    return _tensors.to_kind(out, kind)
