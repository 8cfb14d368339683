"""ld.all_reduce: the public entry point (API.md §3). Checks, staging of non-contiguous / CUDA
tensors, then the group's communicator (_comm.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .._arrays import fail
from ._checks import COMPRESSIONS, DTYPES, FLOAT_DTYPES, KIND_ALLREDUCE, OP_NAME, OPS, check_all, dtype_code
from ._comm import CommError, fast_comms, get_comm, remember_fast

__all__ = ["CommError", "all_reduce"]

# Fast-path caches. _parsed: (op, compression, block_size and their types) -> (op code, compression
# code, block size, whether integer tensors may take it) for argument sets that passed the checks.
# _comm.fast_comms: the group argument as given (None, or the group's id) -> its shm communicator.
_parsed: dict = {}
_codes = {d: dtype_code(d) for d in DTYPES}
_FLOAT_CODES = frozenset(dtype_code(d) for d in FLOAT_DTYPES)


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise fail(ValueError, OP_NAME, "torch.distributed is not initialized: call "
                   "torch.distributed.init_process_group() first (or launch with torchrun)")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise fail(TypeError, OP_NAME, f"group must be a torch.distributed.ProcessGroup or None, "
                   f"got {type(group).__name__}")
    return group


def _writable_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` cut to one index along each dimension where `like` has stride 0 (an expanded tensor),
    so every element left owns distinct memory of `like`."""
    for d in range(like.dim()):
        if like.stride(d) == 0 and like.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _stage(tensor: torch.Tensor):
    """(work, finish): a contiguous CPU tensor to reduce in place, and the function that copies the
    result back into `tensor` (a no-op when work is tensor itself)."""
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        return tensor, lambda: None
    dst = _writable_view(tensor, tensor)
    if dst.numel() and torch._debug_has_internal_overlap(dst) == 1:
        raise fail(ValueError, OP_NAME, f"tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} "
                   "has elements that share memory; it cannot be reduced in place")
    work = tensor.detach().to("cpu", copy=True).contiguous()

    def finish() -> None:
        with torch.no_grad():
            dst.copy_(_writable_view(work, tensor))

    return work, finish


def all_reduce(tensor: torch.Tensor, op: Any = "sum", *, group=None, compression: Optional[str] = None,
               block_size: int = 256, async_op: bool = False):
    """Reduces `tensor` in place across the ranks of `group` and returns it (API.md §3).

    op: "sum", "avg", "max" or "min". compression="int8": every hop carries blockwise int8 codes plus
    float32 scales (sum/avg of float tensors), with the error bound of API.md §3. The result is
    bitwise identical on every rank and across runs. async_op=True returns a torch.futures.Future
    whose value is `tensor`, completed by the communication thread.
    Raises CommError (a RuntimeError) when a rank dies, stops calling or disagrees on the call.
    """
    # Fast path (small messages are all overhead): a contiguous CPU tensor, arguments already
    # checked once in this process, the group's shared-memory communicator already made.
    if async_op is False and type(tensor) is torch.Tensor:
        try:
            parsed = _parsed.get((op, type(op), compression, block_size, type(block_size)))
        except TypeError:  # an unhashable op: the full checks below say what is wrong
            parsed = None
        comm = fast_comms.get(None if group is None else id(group))
        if parsed is not None and comm is not None and tensor.layout is torch.strided:
            code = _codes.get(tensor.dtype)
            if (code is not None and tensor.is_cpu and tensor.is_contiguous() and (code in _FLOAT_CODES or parsed[3])
                    and comm.group_ref() is (group if group is not None else dist.GroupMember.WORLD)):
                comm.shm.run(tensor.data_ptr(), tensor.numel(), code, parsed[0], parsed[1], parsed[2], KIND_ALLREDUCE,
                             0, comm.size, comm.timeout_s)
                return tensor
    t, op_name, comp, block = check_all(tensor, op, compression, block_size)
    if not isinstance(async_op, bool):
        raise fail(TypeError, OP_NAME, f"async_op must be a bool, got {type(async_op).__name__}")
    caller_group = group
    group = _resolve_group(group)
    if dist.get_rank(group) < 0:  # not a member: nothing to do, as torch.distributed does
        return _done(t) if async_op else t
    comm = get_comm(group)
    if comm.size == 1:
        return _done(t) if async_op else t
    key = (op, type(op), compression, block_size, type(block_size))
    if key not in _parsed:
        try:
            _parsed[key] = (OPS[op_name], COMPRESSIONS[comp], block, op_name != "avg" and comp is None)
        except TypeError:
            pass
    if comm.transport == "shm":
        remember_fast(None if caller_group is None else id(caller_group), comm)
    work, finish = _stage(t)
    with torch.no_grad():
        fut = comm.all_reduce(work, op_name, comp, block, async_op, finish, t)
    return fut if async_op else t


def _done(t: torch.Tensor):
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut

