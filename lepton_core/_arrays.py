"""The two kinds of arrays every op takes (torch tensors and NumPy arrays), without needing torch.

Public ops check their contract on what both kinds share (`.shape`, `.ndim`, a dtype named as in
_codes), then hand the backend raw pointers, sizes and strides in elements (`data_ptr`,
`strides_elems`). Outputs are allocated here (`new_output`), of the caller's kind. torch is optional:
`torch` below is the module, or None when it is not installed (then only NumPy arrays exist).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from . import _C
from ._codes import DTYPE_CODES, FP8_NAMES

try:
    import torch
except ImportError:  # the NumPy API works without torch (API.md §0)
    torch = None

TORCH, NUMPY = "torch", "numpy"

# Installing this extra brings PyTorch (pyproject.toml).
TORCH_EXTRA = "torch"


def require_torch(what: str, extra: str = TORCH_EXTRA) -> None:
    """ImportError naming the extra to install, for the parts of the package that need torch."""
    if torch is None:
        raise ImportError(f"{what} needs PyTorch, which is not installed: pip install 'lepton_core[{extra}]' "
                          "(or install torch yourself)")


def fail(exc: type, op: str, msg: str) -> Exception:
    """The exception every op raises: `<op>: <argument> <what was wrong and what was got>`."""
    return exc(f"{op}: {msg}")


# ---- dtypes by name (torch's names), for both kinds ----
_NP_NAMES = {np.dtype(n): n for n in ("float32", "float16", "float64", "int8", "uint8", "int16", "int32",
                                      "int64", "bool")}
DTYPE_NAME: dict = dict(_NP_NAMES)
TORCH_DTYPE: dict = {}  # name -> torch.dtype
if torch is not None:
    for _name in list(DTYPE_CODES) + ["int16", "bool"]:
        TORCH_DTYPE[_name] = getattr(torch, _name)
        DTYPE_NAME[getattr(torch, _name)] = _name
NUMPY_DTYPE = {n: d for d, n in _NP_NAMES.items()}


def name_of(dt: Any) -> str:
    """The name of a torch or NumPy dtype, as error messages print it."""
    name = DTYPE_NAME.get(dt)
    if name is not None:
        return name
    return str(dt).replace("torch.", "")


def parse_dtype(dt: Any, op: str, arg: str) -> str:
    """The name of a torch dtype, NumPy dtype or NumPy scalar type; anything else is a TypeError."""
    if torch is not None and isinstance(dt, torch.dtype):
        return name_of(dt)
    if isinstance(dt, np.dtype) or (isinstance(dt, type) and issubclass(dt, np.generic)):
        npd = np.dtype(dt)
        if npd in _NP_NAMES:
            return _NP_NAMES[npd]
        raise fail(TypeError, op, f"{arg} has NumPy dtype {npd}, which has no equivalent here")
    raise fail(TypeError, op, f"{arg} must be a torch or NumPy dtype, got {dt!r}")


# ---- kinds ----
def kind_of(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return NUMPY
    if torch is not None and isinstance(x, torch.Tensor):
        return TORCH
    return ""


def type_desc(x: Any) -> str:
    kind = kind_of(x)
    if kind == TORCH:
        return f"torch.Tensor of dtype {name_of(x.dtype)} and shape {tuple(x.shape)}"
    if kind == NUMPY:
        return f"numpy.ndarray of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


def as_array(x: Any, op: str, arg: str):
    """x as an array the kernels can read: torch tensors as they are; NumPy arrays in native byte
    order with non-negative, element-aligned strides (copied only when they are not)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NP_NAMES:
            if x.dtype.kind in "fiub" and x.dtype.newbyteorder("=") in _NP_NAMES:
                x = x.astype(x.dtype.newbyteorder("="))  # non-native byte order
            else:
                raise fail(TypeError, op, f"{arg} has NumPy dtype {x.dtype}, which this op does not take")
        if any(st < 0 or st % x.itemsize for st, n in zip(x.strides, x.shape) if n > 1):
            x = np.ascontiguousarray(x)
        return x
    if torch is not None and isinstance(x, torch.Tensor):
        return x
    raise fail(TypeError, op, f"{arg} must be a torch.Tensor or numpy.ndarray, got {type_desc(x)}")


def to_kind(x, kind: str, op: str, arg: str):
    """x (an array from as_array) as the caller's kind: the result of an op is of its first input's
    kind, and the other arguments follow it (CPU only: NumPy arrays live on the CPU)."""
    if isinstance(x, np.ndarray):
        return x if kind == NUMPY else torch.from_numpy(x)
    if kind == TORCH:
        return x
    if x.device.type != "cpu":
        raise fail(ValueError, op, f"{arg} is on {x.device} but the first input is a NumPy array (CPU); "
                                   "all tensors must be on one device")
    if x.dtype == torch.bfloat16:
        raise fail(TypeError, op, f"{arg} is bfloat16, which NumPy (the first input's kind) cannot hold")
    return to_numpy(x.detach())


def strides_elems(x) -> tuple:
    """Strides in elements. NumPy's strides of size-1 dimensions never address anything and may be
    negative or unaligned (`np.ones((1, 5))[::-1]`): they are reported as 0."""
    if isinstance(x, np.ndarray):
        size = x.itemsize
        return tuple(st // size if n > 1 else 0 for st, n in zip(x.strides, x.shape))
    return tuple(x.stride())


def data_ptr(x) -> int:
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data_ptr()


def is_contiguous(x) -> bool:
    return x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous()


def contiguous(x):
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()


def numel(x) -> int:
    return x.size if isinstance(x, np.ndarray) else x.numel()


def check_strided(op: str, **arrays) -> None:
    """ValueError for sparse / mkldnn / other non-strided torch tensors (kernels read strided memory)."""
    for name, t in arrays.items():
        if t is not None and not isinstance(t, np.ndarray) and t.layout is not torch.strided:
            raise fail(ValueError, op, f"{name} must be a dense (strided) tensor, got layout {t.layout}")


# ---- outputs ----
# Outputs of at least this many bytes are served by the host pool (0: the pool is off).
_POOL_MIN_BYTES = _C.host_pool_min_bytes if _C.host_pool_limit_bytes() > 0 else float("inf")

# Tests set this so every output buffer starts as NaN / a sentinel: an element a kernel forgets to
# write then fails the comparison instead of passing by luck (fresh memory is often zeros).
POISON_OUTPUTS = False


def new_output(kind: str, shape: tuple, dtype: str, device=None):
    """An op's output (contiguous) of the caller's kind; `dtype` is a name, `device` a torch.device
    or None (the CPU). Poisoned when POISON_OUTPUTS is set."""
    if kind == TORCH:
        out = _new_torch(shape, TORCH_DTYPE[dtype], device)
    else:
        npd = NUMPY_DTYPE["uint8" if dtype in FP8_NAMES else dtype]
        n_bytes = math.prod(shape) * npd.itemsize
        if n_bytes >= _POOL_MIN_BYTES:
            out = np.frombuffer(_C.PooledBuffer(n_bytes), dtype=npd).reshape(shape)
        else:
            out = np.empty(shape, dtype=npd)
    if POISON_OUTPUTS:
        _poison(out, dtype)
    return out


def _new_torch(shape, tdtype, device):
    # The device keyword costs ~1 us per call; CPU is the default device. Sizes as separate
    # arguments: torch parses a tuple ~0.8 us slower.
    if device is None or device.type == "cpu":
        n_bytes = math.prod(shape) * tdtype.itemsize
        if n_bytes >= _POOL_MIN_BYTES:
            # Large outputs come from the host pool: reused, already-faulted pages instead of fresh
            # ones the OS must zero on first touch (csrc/common/host_pool.h).
            return torch.frombuffer(_C.PooledBuffer(n_bytes), dtype=torch.uint8).view(tdtype).view(*shape)
        return torch.empty(*shape, dtype=tdtype) if shape else torch.empty((), dtype=tdtype)
    return torch.empty(shape, dtype=tdtype, device=device)


def _poison(out, dtype: str) -> None:
    if not numel(out):
        return
    if dtype in ("float32", "float16", "bfloat16", "float64"):
        out.fill(np.nan) if isinstance(out, np.ndarray) else out.fill_(float("nan"))
    elif dtype == "int32":
        out.fill(-0x5A5A5A5A) if isinstance(out, np.ndarray) else out.fill_(-0x5A5A5A5A)
    else:  # one-byte codes (and fp8 bit patterns)
        raw = out.view(np.uint8) if isinstance(out, np.ndarray) else out.view(torch.uint8)
        raw.fill(0xA5) if isinstance(raw, np.ndarray) else raw.fill_(0xA5)


def to_numpy(t):
    """A torch CPU tensor as NumPy (fp8 as its uint8 bit patterns: NumPy has no fp8)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.view(torch.uint8)
    return t.numpy()


def draw_seed(kind: str) -> int:
    """A fresh 64-bit seed from the default generator of the caller's kind, so that
    torch.manual_seed (torch inputs) or np.random.seed (NumPy inputs) reproduces it."""
    if kind == TORCH:
        lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
    else:
        lo, hi = (int(v) for v in np.random.randint(0, 1 << 32, size=2, dtype=np.uint64))
    return lo | (hi << 32)


def non_finite_error(x, flat: int, op: str, arg: str = "x") -> ValueError:
    """ValueError naming the NaN / Inf at C-order flat index `flat` of contiguous x."""
    v = float(x.reshape(-1)[flat])
    what = "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(x.shape))) if x.ndim else ()
    return fail(ValueError, op, f"{arg} contains {what} at index {idx} (flat index {flat} in C order); "
                                "NaN and +-Inf cannot be quantized")
