"""Argument checks of the collectives (API.md §3), done in Python before any communication. `who` is
the public function whose errors these are ("ld.all_reduce", "ld.reduce_scatter", ...)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch

from .._arrays import TORCH_DTYPE, fail, type_desc
from .._arrays import name_of as dtype_name
from .. import _C
from .._codes import COMPRESSIONS, DTYPE_CODES, MAX_BLOCK, MIN_BLOCK
from .._codes import REDUCE_OPS as OPS

# lp_dtype code of each torch dtype (lepton_core/_codes.py)
LP_DTYPE = {TORCH_DTYPE[name]: code for name, code in DTYPE_CODES.items()}

OP_NAME = "ld.all_reduce"

# lp_call_kind codes (csrc/common/codes.h): the public collectives, and the two halves of a
# hierarchical all-reduce inside one host.
KINDS = dict(_C.codes["call_kind"])
KIND_ALLREDUCE, KIND_HOST_REDUCE_SCATTER, KIND_HOST_ALL_GATHER = (KINDS[k] for k in
                                                                  ("all_reduce", "host_reduce_scatter", "host_all_gather"))

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)
DTYPES = FLOAT_DTYPES + INT_DTYPES


def _op_from_reduce_op(op: Any) -> Optional[str]:
    """torch.distributed.ReduceOp.SUM/AVG/MAX/MIN are accepted as well as the strings."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    table = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}
    if hasattr(dist.ReduceOp, "AVG"):
        table[dist.ReduceOp.AVG] = "avg"
    for k, v in table.items():
        try:
            if op == k:
                return v
        except Exception:  # noqa: BLE001 - a foreign type that cannot compare
            return None
    return None


def parse_op(op: Any, who: str = OP_NAME) -> str:
    if isinstance(op, str):
        name = op.lower()
        if name in OPS:
            return name
    elif not isinstance(op, (int, float)) and op is not None:
        name = _op_from_reduce_op(op)
        if name is not None:
            return name
    raise fail(ValueError, who, f"op must be one of 'sum', 'avg', 'max', 'min', got {op!r}")


def parse_compression(compression: Any, who: str = OP_NAME) -> Optional[str]:
    if compression is None or (isinstance(compression, str) and compression.lower() == "none"):
        return None
    if isinstance(compression, str) and compression.lower() == "int8":
        return "int8"
    raise fail(ValueError, who, f"compression must be None or 'int8', got {compression!r}")


def parse_block_size(block_size: Any, who: str = OP_NAME) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise fail(TypeError, who, f"block_size must be an int, got {type(block_size).__name__}")
    b = int(block_size)
    if b < MIN_BLOCK or b > MAX_BLOCK or b & (b - 1):
        raise fail(ValueError, who,
                   f"block_size must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {b}")
    return b


def check_tensor(tensor: Any, who: str = OP_NAME, arg: str = "tensor", dtypes=DTYPES) -> torch.Tensor:
    if isinstance(tensor, np.ndarray):
        raise fail(TypeError, who,
                   f"{arg} must be a torch.Tensor, got a {type_desc(tensor)}; wrap it with torch.from_numpy()")
    if not isinstance(tensor, torch.Tensor):
        raise fail(TypeError, who, f"{arg} must be a torch.Tensor, got {type_desc(tensor)}")
    if tensor.dtype not in dtypes:
        raise fail(TypeError, who,
                   f"{arg} has dtype {dtype_name(tensor.dtype)}; supported: " + ", ".join(dtype_name(d) for d in dtypes))
    if tensor.device.type not in ("cpu", "cuda"):
        raise fail(ValueError, who, f"{arg} is on device {tensor.device}; cpu or cuda tensors only")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise fail(ValueError, who, f"{arg} must be a dense (strided) tensor, got layout {tensor.layout}")
    return tensor


def check_same_dtype(output: torch.Tensor, input: torch.Tensor, who: str) -> None:
    if output.dtype != input.dtype:
        raise fail(TypeError, who, f"output and input must have one dtype, got {dtype_name(output.dtype)} and "
                   f"{dtype_name(input.dtype)}")


def check_reduction(t: torch.Tensor, op: Any, compression: Any, block_size: Any, who: str = OP_NAME,
                    arg: str = "tensor") -> Tuple[str, Optional[str], int]:
    """The checks of a reduction's arguments on a checked tensor; returns (op, compression, block_size)."""
    op_name = parse_op(op, who)
    comp = parse_compression(compression, who)
    block = parse_block_size(block_size, who)
    if op_name == "avg" and t.dtype in INT_DTYPES:
        raise fail(TypeError, who,
                   f"op 'avg' needs a floating-point {arg}, got dtype {dtype_name(t.dtype)} (use 'sum' and divide)")
    if comp is not None:
        if op_name not in ("sum", "avg"):
            raise fail(TypeError, who, f"compression {comp!r} works with op 'sum' or 'avg' only, got {op_name!r}")
        if t.dtype not in FLOAT_DTYPES:
            raise fail(TypeError, who,
                       f"compression {comp!r} needs a floating-point {arg}, got dtype {dtype_name(t.dtype)}")
    return op_name, comp, block


def check_all(tensor: Any, op: Any, compression: Any, block_size: Any) -> Tuple[torch.Tensor, str, Optional[str], int]:
    """Every contract check of ld.all_reduce; returns (tensor, op, compression, block_size)."""
    t = check_tensor(tensor)
    return (t,) + check_reduction(t, op, compression, block_size)


def check_async(async_op: Any, who: str) -> None:
    if not isinstance(async_op, bool):
        raise fail(TypeError, who, f"async_op must be a bool, got {type(async_op).__name__}")


def dtype_code(dtype: torch.dtype) -> int:
    return LP_DTYPE[dtype]
