"""Shared plumbing for every op: input kinds (torch / NumPy), dtype codes, and error messages.

Every public op converts its inputs here once, checks its contract in Python, and only then calls
the native kernel with raw pointers, sizes and strides (in elements).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Tuple

import numpy as np
import torch

from . import _C

# lp_dtype codes: keep in step with csrc/common/dtypes.h
LP_DTYPE = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int8: 4,
    torch.uint8: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.float8_e4m3fn: 8,
    torch.float8_e5m2: 9,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.bool_): torch.bool,
}


def fail(exc: type, op: str, msg: str) -> Exception:
    """Builds the exception every op raises: `<op>: <argument> <what was wrong and what was got>`."""
    return exc(f"{op}: {msg}")


def dtype_name(dt: Any) -> str:
    if isinstance(dt, torch.dtype):
        return str(dt).replace("torch.", "")
    return str(dt)


def kind_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    return ""


def type_desc(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor of dtype {dtype_name(x.dtype)} and shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


def as_torch(x: Any, op: str, arg: str) -> torch.Tensor:
    """A torch view of a torch tensor or NumPy array (no copy unless NumPy's layout forces one)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype not in _NP_TO_TORCH:
            if x.dtype.kind in "fiub" and x.dtype.newbyteorder("=") in _NP_TO_TORCH:
                x = x.astype(x.dtype.newbyteorder("="))  # non-native byte order
            else:
                raise fail(TypeError, op, f"{arg} has NumPy dtype {x.dtype}, which this op does not take")
        if any(s < 0 or s % x.itemsize for s in x.strides):
            x = np.ascontiguousarray(x)  # torch cannot view negative or unaligned strides
        if not x.flags.writeable:
            with warnings.catch_warnings():  # we only read inputs; torch warns on read-only views
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x)
        return torch.from_numpy(x)
    raise fail(TypeError, op, f"{arg} must be a torch.Tensor or numpy.ndarray, got {type_desc(x)}")


def check_strided(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """ValueError for sparse / mkldnn / other non-strided tensors (the kernels read raw strided memory)."""
    for name, t in tensors.items():
        if t is not None and t.layout is not torch.strided:
            raise fail(ValueError, op, f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def to_kind(t: torch.Tensor, kind: str):
    """Returns `t` as the caller's kind of array."""
    if kind == "numpy":
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.view(torch.uint8)  # NumPy has no fp8: bit patterns as uint8
        return t.numpy()
    return t


def parse_dtype(dt: Any, op: str, arg: str) -> torch.dtype:
    """A torch dtype from a torch dtype or a NumPy dtype / scalar type; anything else is a TypeError."""
    if isinstance(dt, torch.dtype):
        return dt
    if isinstance(dt, np.dtype) or (isinstance(dt, type) and issubclass(dt, np.generic)):
        npd = np.dtype(dt)
        if npd in _NP_TO_TORCH:
            return _NP_TO_TORCH[npd]
        raise fail(TypeError, op, f"{arg} has NumPy dtype {npd}, which has no equivalent here")
    raise fail(TypeError, op, f"{arg} must be a torch or NumPy dtype, got {dt!r}")


def check_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """All tensor arguments on one device, and that device served by a built backend."""
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    uniq = set(devs.values())
    if len(uniq) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise fail(ValueError, op, f"all tensors must be on one device, got {desc}")
    dev = next(iter(uniq)) if uniq else torch.device("cpu")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise fail(ValueError, op, f"tensors on device {dev} are not supported (cpu or cuda only)")
    if dev.type == "cuda":
        from . import _runtime

        reason = _runtime.cuda_unavailable_reason()
        if reason is not None:
            raise fail(ValueError, op, f"got CUDA tensors but the CUDA backend is unavailable: {reason}")
    return dev


def strides(t: torch.Tensor) -> Tuple[int, ...]:
    """Strides in elements (torch's own unit)."""
    return tuple(t.stride())


def is_fake(*ts: Optional[torch.Tensor]) -> bool:
    """True while tracing (FakeTensor / meta), when no native kernel may run."""
    for t in ts:
        if t is not None and (t.device.type == "meta" or type(t) is not torch.Tensor and
                              type(t).__name__ in ("FakeTensor", "FunctionalTensor")):
            return True
    return False


# Outputs of at least this many bytes are served by the host pool (0: the pool is off).
_POOL_MIN_BYTES = _C.host_pool_min_bytes if _C.host_pool_limit_bytes() > 0 else float("inf")

# Tests set this so every output buffer starts as NaN / a sentinel: an element a kernel forgets to
# write then fails the comparison instead of passing by luck (torch.empty often returns zeros).
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocates an op's output (contiguous); poisoned when POISON_OUTPUTS is set."""
    # The device keyword costs ~1 us per call; CPU is the default device. `device` is a torch.device
    # or None (an isinstance test here would cost another 0.3 us per call).
    # Sizes as separate arguments: torch parses a tuple ~0.8 us slower.
    if device is None or device.type == "cpu":
        n_bytes = math.prod(shape) * dtype.itemsize
        if n_bytes >= _POOL_MIN_BYTES:
            # Large outputs come from the host pool: reused, already-faulted pages instead of fresh
            # ones the OS must zero on first touch (csrc/common/host_pool.h).
            out = torch.frombuffer(_C.PooledBuffer(n_bytes), dtype=torch.uint8).view(dtype).view(*shape)
        else:
            out = torch.empty(*shape, dtype=dtype) if shape else torch.empty((), dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.numel():
        if out.dtype.is_floating_point and out.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0xA5) if out.element_size() == 1 else out.fill_(-0x5A5A5A5A if out.dtype == torch.int32 else 0x5A)
    return out
