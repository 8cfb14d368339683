"""CUDA backend: loads lepton_core._C_cuda lazily, alone decides whether CUDA is usable here (and
says why not), and runs the ops' kernels on CUDA tensors.

The public functions check every contract (shapes, dtypes, devices) before calling in here; this
module only brings operands into layouts the kernels read, and passes pointers, sizes, strides
(elements), lp_dtype codes and torch's current stream to the native code. Every call is asynchronous
on `torch.cuda.current_stream()`, like a torch op, except the read-back of quantize's NaN/Inf index.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

from .. import _arrays
from .._arrays import DTYPE_NAME, non_finite_error
from .._codes import DTYPE_CODES, FORMATS, QLINEAR_SCHEMES
from .._layout import quant_geometry
from . import _common

INT64_MAX = (1 << 63) - 1

_module = None
_status = None


def status():
    """(module or None, device name or None, reason CUDA is unavailable or None), computed once."""
    global _status
    if _status is None:
        _status = probe()
    return _status


def built_archs() -> Optional[list]:
    """The CUDA architectures the CUDA module was built for (e.g. ["80-real", "90"]), or None
    when it was not built or does not load."""
    try:
        from .. import _C_cuda  # type: ignore[attr-defined]
    except ImportError:
        return None
    return [a for a in _C_cuda.built_archs().split(",") if a]


def unavailable_reason() -> Optional[str]:
    """None when CUDA tensors can run here, else a sentence saying why not (lc.info())."""
    return status()[2]


def _no_device_reason(mod, err: str) -> str:
    """Why the CUDA runtime found no usable GPU, in words."""
    driver = mod.driver_version()
    runtime = mod.runtime_version()

    def ver(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    if driver == 0:
        import ctypes

        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return ("no NVIDIA driver is installed (libcuda.so.1 was not found), so no GPU can be used; "
                    f"the CUDA backend was built, but it needs a GPU and its driver ({err})")
        return f"the NVIDIA driver did not initialize, so no GPU can be used ({err})"
    if "InsufficientDriver" in err or driver < runtime:
        return (f"the NVIDIA driver supports CUDA {ver(driver)} but this build of the CUDA backend uses "
                f"CUDA {ver(runtime)}: update the driver or rebuild with an older toolkit (see "
                f"setup_cuda.md; {err})")
    if "NoDevice" in err or not err:
        return f"no CUDA GPU is present (NVIDIA driver for CUDA {ver(driver)} found, but no device)"
    return f"the CUDA runtime reports no usable GPU ({err})"


def probe():
    """(module or None, device name or None, reason the CUDA backend is unavailable or None)."""
    try:
        from .. import _C_cuda  # type: ignore[attr-defined]
    except ImportError as e:
        msg = str(e)
        if "No module named" in msg or "cannot import name" in msg:
            return None, None, ("lepton_core was built without its CUDA backend (nvcc was not found at "
                                "build time, or LEPTON_CUDA=OFF); see setup_cuda.md")
        return None, None, f"the CUDA backend failed to load: {msg}"
    try:
        n_devices, err = _C_cuda.device_count()
        if n_devices <= 0:
            return None, None, _no_device_reason(_C_cuda, err)
        try:
            import torch
        except ImportError:
            return None, None, "the CUDA backend needs PyTorch, which is not installed"
        if torch.version.cuda is None:
            return None, None, ("this PyTorch build has no CUDA support (a CPU-only wheel), so there are "
                                "no CUDA tensors to run on; install a CUDA build of PyTorch")
        if not torch.cuda.is_available():
            return None, None, (f"PyTorch cannot use the GPU (torch.cuda.is_available() is False) although "
                                f"the CUDA runtime sees {n_devices} device(s)")
        device = torch.cuda.current_device()
        why = _C_cuda.device_check(device)
        if why:
            return None, None, why
        global _module
        _module = _C_cuda
        return _C_cuda, torch.cuda.get_device_name(device), None
    except Exception as e:  # a probe must never break `import lepton_core` or lc.info()
        return None, None, f"probing the CUDA backend failed: {type(e).__name__}: {e}"


# ---- helpers ----

_checked_devices: dict = {}


def _mod():
    global _module
    if _module is None:
        mod, _, reason = status()
        if mod is None:
            raise RuntimeError(f"lepton_core: the CUDA backend is unavailable: {reason}")
        _module = mod
    return _module


def _device_index(t) -> int:
    import torch

    idx = t.device.index
    if idx is None:
        idx = torch.cuda.current_device()
    if idx not in _checked_devices:
        why = _mod().device_check(idx)
        _checked_devices[idx] = why
    if _checked_devices[idx]:
        raise RuntimeError(f"lepton_core: CUDA device {idx} cannot run the CUDA backend: {_checked_devices[idx]}")
    return idx


def _stream(device: int) -> int:
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _dtype_code(dt) -> int:
    return DTYPE_CODES[str(dt)[6:]]  # "torch.float32"


def _pack(t3, rows_dim: int, cols_dim: int, align: int, device: int):
    """A contiguous copy of the 3-D tensor t3 with `rows_dim` as rows and `cols_dim` as the contiguous
    axis, rows padded to a multiple of `align` elements: returns (buffer, ld, batch_stride)."""
    import torch

    batch = t3.shape[0]
    rows, cols = t3.shape[rows_dim], t3.shape[cols_dim]
    sb = t3.stride(0)
    if batch > 1 and sb == 0:  # broadcast batch: pack it once, keep stride 0
        batch = 1
    ld = max(_round_up(cols, align), align)
    buf = torch.empty(batch * rows * ld, dtype=t3.dtype, device=t3.device)
    _mod().pack_rows(device=device, stream=_stream(device), elem_bytes=t3.element_size(), batch=batch,
                     rows=rows, cols=cols, src=t3.data_ptr(), src_batch_stride=sb,
                     src_row_stride=t3.stride(rows_dim), src_col_stride=t3.stride(cols_dim),
                     dst=buf.data_ptr(), dst_ld=ld)
    return buf, ld, (0 if t3.shape[0] > 1 and t3.stride(0) == 0 else rows * ld)


def _as_rows(t3, rows_dim: int, cols_dim: int, align: int, ptr_align: int):
    """(ld, batch_stride) if t3 can be read in place with `cols_dim` contiguous, rows every ld
    elements (a multiple of `align`) and a pointer aligned to `ptr_align` bytes; else None. Strides
    of size-1 axes never matter and are replaced by harmless aligned values."""
    batch, rows, cols = t3.shape[0], t3.shape[rows_dim], t3.shape[cols_dim]
    if t3.data_ptr() % ptr_align:
        return None
    if cols > 1 and t3.stride(cols_dim) != 1:
        return None
    ld = t3.stride(rows_dim) if rows > 1 else max(_round_up(cols, align), align)
    bs = t3.stride(0) if batch > 1 else 0
    if ld % align or bs % align or ld < 0 or bs < 0:
        return None
    return ld, bs


def _run_gemm(a3, b3, out3, bias=None, scale_a=None, scale_b=None) -> None:
    batch, m, k = a3.shape
    n = b3.shape[2]
    if batch == 0 or m == 0 or n == 0:
        return
    device = _device_index(out3)
    is_int8 = not a3.dtype.is_floating_point
    tensor_cores = a3.element_size() < 4
    align = 16 // a3.element_size() if tensor_cores else 1
    ptr_align = 16 if tensor_cores else a3.element_size()
    keep = []  # packed copies live until their kernel is enqueued (the caching allocator is stream-ordered)

    if k == 0:  # nothing is read (the result is 0 or the bias): pass aligned dummy buffers
        a_ptr = b_ptr = out3.data_ptr() - out3.data_ptr() % 16
        lda = ldb = align
        a_bs = b_bs = 0
        b_k_major = True
    else:
        got = _as_rows(a3, 1, 2, align, ptr_align)
        if got is None:
            buf, lda, a_bs = _pack(a3, 1, 2, align, device)
            keep.append(buf)
            a_ptr = buf.data_ptr()
        else:
            (lda, a_bs), a_ptr = got, a3.data_ptr()
        b_k_major = True
        got = _as_rows(b3, 2, 1, align, ptr_align)  # K-major: n rows, k contiguous (w.t() views)
        if got is None and not is_int8:
            got = _as_rows(b3, 1, 2, align, ptr_align)  # N-major: k rows, n contiguous
            b_k_major = got is None
        if got is None:
            # Pack towards the layout the source is closest to (int8 must be K-major).
            b_k_major = is_int8 or b3.stride(1) < b3.stride(2)
            rows_dim, cols_dim = (2, 1) if b_k_major else (1, 2)
            buf, ldb, b_bs = _pack(b3, rows_dim, cols_dim, align, device)
            keep.append(buf)
            b_ptr = buf.data_ptr()
        else:
            (ldb, b_bs), b_ptr = got, b3.data_ptr()
        # A broadcast B over evenly spaced A rows is one GEMM with batch * M rows.
        if batch > 1 and b_bs == 0 and a_bs == m * lda:
            m, batch, a_bs = batch * m, 1, 0

    _mod().gemm(
        device=device, stream=_stream(device), in_dtype=_dtype_code(a3.dtype), out_dtype=_dtype_code(out3.dtype),
        batch=batch, m=m, n=n, k=k, a=a_ptr, a_batch_stride=a_bs, lda=lda, b=b_ptr, b_batch_stride=b_bs,
        ldb=ldb, b_k_major=b_k_major, out=out3.data_ptr(),
        bias=0 if bias is None else bias.data_ptr(),
        scale_a=0 if scale_a is None else scale_a.data_ptr(), scale_a_n=0 if scale_a is None else scale_a.numel(),
        scale_b=0 if scale_b is None else scale_b.data_ptr(), scale_b_n=0 if scale_b is None else scale_b.numel())
    del keep


def _f32_vector(t):
    import torch

    if t is None:
        return None
    return t.reshape(-1).to(torch.float32).contiguous()


# ---- the functions the op modules call for CUDA tensors ----

def gemm_into(a3, b3, bias, out3) -> None:
    """out3 (B, M, N), contiguous, of the output dtype = a3 (B, M, K) @ b3 (B, K, N) (+ bias).
    Any strides (batch stride 0 broadcasts). Float inputs accumulate in float32 and are rounded once;
    int8 inputs give exact int32."""
    _run_gemm(a3, b3, out3, bias=_f32_vector(bias))


def scaled_gemm_into(a, b, scale_a, scale_b, bias, out) -> None:
    """out (M, N) = round_once((float(a @ b) * scale_a[m]) * scale_b[n] + bias[n]) for int8 a (M, K)
    and b (K, N) of any strides; scale_a (M,) or (1,), scale_b (N,) or (1,), bias (N,) or None."""
    _run_gemm(a.unsqueeze(0), b.unsqueeze(0), out.view(1, *out.shape), bias=_f32_vector(bias),
              scale_a=_f32_vector(scale_a), scale_b=_f32_vector(scale_b))


def quantize_into(x, fmt, n_outer: int, n_channels: int, n_inner: int, block_size: Optional[int],
                  stochastic: bool, seed: int, data, scale, zero_point) -> int:
    """Quantizes contiguous x viewed as (n_outer, n_channels, n_inner) (blockwise: (1, 1, n) with
    block_size B) into data (uint8 view, n bytes; int4 ceil(n/2)), scale (float32, one per group) and
    zero_point (int32, uint8 only). Returns the first flat index of a NaN/Inf in x, or -1."""
    import torch

    n = n_outer * n_channels * n_inner
    if n == 0:
        return -1
    device = _device_index(x)
    x = x.contiguous()
    block = int(block_size or 0)
    n_groups = (n + block - 1) // block if block else n_channels
    stats = None if block else torch.zeros(2 * n_groups, dtype=torch.int32, device=x.device)
    bad = torch.full((1,), INT64_MAX, dtype=torch.int64, device=x.device)
    _mod().quantize(
        device=device, stream=_stream(device), in_dtype=_dtype_code(x.dtype), format=fmt.code,
        n_outer=n_outer, n_channels=n_channels, n_inner=n_inner, block_size=block, stochastic=bool(stochastic),
        seed=int(seed), x=x.data_ptr(), data=data.data_ptr(), scale=scale.data_ptr(),
        zero_point=0 if zero_point is None else zero_point.data_ptr(),
        stats=0 if stats is None else stats.data_ptr(), bad_index=bad.data_ptr())
    idx = int(bad.item())  # the one device -> host sync of the op
    return -1 if idx == INT64_MAX else idx


def dequantize_into(data, scale, zero_point, fmt, n_outer: int, n_channels: int, n_inner: int,
                    block_size: Optional[int], out) -> None:
    """out (contiguous float32/float16/bfloat16) = the codes in data dequantized with their group's
    scale (and zero point), computed in float32 and rounded once."""
    n = n_outer * n_channels * n_inner
    if n == 0:
        return
    device = _device_index(out)
    _mod().dequantize(
        device=device, stream=_stream(device), format=fmt.code, n_outer=n_outer, n_channels=n_channels,
        n_inner=n_inner, block_size=int(block_size or 0), data=data.data_ptr(), scale=scale.data_ptr(),
        zero_point=0 if zero_point is None else zero_point.data_ptr(), out=out.data_ptr(),
        out_dtype=_dtype_code(out.dtype))


def gemm_config(a3, b3, out_dtype) -> str:
    """The kernel configuration gemm_into would pick for these operands (tests and benchmarks)."""
    batch, m, k = a3.shape
    b_k_major = b3.shape[2] <= 1 or b3.stride(2) != 1 or not a3.dtype.is_floating_point
    return _mod().gemm_config(device=_device_index(a3), in_dtype=_dtype_code(a3.dtype),
                              out_dtype=_dtype_code(out_dtype), batch=batch, m=m, n=b3.shape[2], k=k,
                              b_k_major=b_k_major)


# ---- the backend functions (lepton_core/backends/__init__.py) ----

def gemm(a, b, bias, out_dtype: str):
    out, (n_batch, m, k, n), bias32, done = _common.gemm_setup(a, b, bias, out_dtype)
    if not done:
        a3 = a if a.ndim == 3 else a.unsqueeze(0)
        b3 = b if b.ndim == 3 else b.unsqueeze(0).expand(n_batch, k, n)
        gemm_into(a3, b3, bias32, out if out.ndim == 3 else out.unsqueeze(0))
    return out


def scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype: str):
    m, k = a.shape
    n = b.shape[1]
    out = _common.new_output("torch", (m, n), out_dtype, a.device)
    if m * n == 0:
        return out
    sa, sb, bias32 = _f32_vector(scale_a), _f32_vector(scale_b), _f32_vector(bias)
    if k == 0:
        _common.scaled_gemm_empty_k(out, sa, sb, bias32)
    else:
        scaled_gemm_into(a, b, sa, sb, bias32, out)
    return out


def quantize(x, fmt, axis, block_size, stochastic: bool, seed: int):
    data, scale, zero_point = _common.quantize_outputs(x, fmt, axis, block_size)
    if x.numel() == 0:
        return data, scale, zero_point, -1
    import torch

    data_u8 = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    first_bad = quantize_into(x.contiguous(), fmt, *quant_geometry(tuple(x.shape), axis, block_size), stochastic,
                              seed, data_u8, scale, zero_point)
    return data, scale, zero_point, first_bad


def dequantize(data, scale, zero_point, fmt, shape, axis, block_size, dtype: str):
    import torch

    shape = tuple(shape)
    kernel_dtype = "float32" if dtype == "float64" else dtype
    out = _common.new_output("torch", shape, kernel_dtype, data.device)
    if out.numel():
        data_u8 = data.view(torch.uint8) if data.dtype != torch.uint8 else data
        zp = None if zero_point is None else zero_point.contiguous()
        dequantize_into(data_u8.contiguous(), scale.contiguous(), zp, fmt,
                        *quant_geometry(shape, axis, block_size), out)
    return out.double() if dtype == "float64" else out


def linear(x, weight, bias, compute_dtype: str, out_dtype: str):
    return _common.linear(gemm, x, weight, bias, compute_dtype, out_dtype)


def quant_linear(x, codes, scale, zero, bias, scheme: str, group_size: int, n: int):
    """x (..., K) times the packed weight (csrc/cpu/qlinear/qlinear.h; w8a8: int8 codes (N, K) and
    per-row scales) plus bias, in x's dtype. w8 / w4: csrc/cuda/qlinear.cu reading the packed buffers
    in place; w8a8: x quantized to int8 per row, then scaled_gemm's int8 GEMM and epilogue."""
    import torch

    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    m = x2.shape[0]
    out_name = DTYPE_NAME[x.dtype]
    bias32 = _f32_vector(bias)
    if scheme == "w8a8":
        if m == 0 or n == 0:
            return _common.new_output("torch", (*lead, n), out_name, x.device)
        data, scale_x, _, first_bad = quantize(x2, FORMATS["int8"], 0, None, False, 0)
        if first_bad >= 0:
            raise non_finite_error(x2.contiguous(), first_bad, "lc.nn.QuantLinear", "input")
        return scaled_gemm(data, codes.t(), scale_x, scale, bias32, out_name).reshape(*lead, n)
    out = _common.new_output("torch", (*lead, n), out_name, x.device)
    if m == 0 or n == 0:
        return out
    device = _device_index(x)
    mod = _mod()
    code = QLINEAR_SCHEMES[scheme]
    splits, _ = mod.qlinear_plan(scheme=code, m=m, n=n, k=k, group_size=group_size)
    # K split across CTAs (decode shapes): float32 partials summed in a fixed order by a second kernel.
    ws = torch.empty(splits * m * n, dtype=torch.float32, device=x.device) if splits > 1 else None
    if ws is not None and _arrays.POISON_OUTPUTS:
        ws.fill_(float("nan"))  # tests: a partial the kernel failed to write shows up in the output
    codes, scale = _aligned(codes), _aligned(scale)
    zero = _aligned(zero) if scheme == "w4" else None
    x_row, x_col = x2.stride()
    mod.qlinear(device=device, stream=_stream(device), scheme=code, m=m, n=n, k=k, group_size=group_size,
                x=x2.data_ptr(), x_dtype=_dtype_code(x2.dtype), x_row=x_row, x_col=x_col, codes=codes.data_ptr(),
                scale=scale.data_ptr(), zero=0 if zero is None else zero.data_ptr(),
                bias=0 if bias32 is None else bias32.data_ptr(), out=out.data_ptr(),
                out_dtype=_dtype_code(out.dtype), ws=0 if ws is None else ws.data_ptr(), splits=splits)
    return out


def _aligned(t):
    """t contiguous at a 16-byte aligned address (the packed buffers are; a view into a bigger
    storage may not be): the kernels read them with 16-byte loads."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.contiguous().clone()


def register() -> None:
    """Registers this module's functions as the CUDA kernels of the torch.library ops."""
    from .. import _ops

    _ops.register_kernels("cuda", sys.modules[__name__])
