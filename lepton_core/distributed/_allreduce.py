"""ld.all_reduce: the public entry point (API.md §3). Checks, staging of non-contiguous / CUDA
tensors, then the group's communicator (_comm.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ._checks import COMPRESSIONS, FLOAT_DTYPES, KIND_ALLREDUCE, OP_NAME, OPS, check_all, check_async, dtype_code
from ._comm import Call, CommError, fast_shm, get_comm, remember_fast
from ._staging import done, resolve_group, stage_inout

__all__ = ["CommError", "all_reduce"]

# Fast-path cache (with _comm.fast_shm). _parsed: (op, compression, block_size and their types) ->
# (op code, compression code, block size, whether integer tensors may take it) for argument sets
# that passed the checks.
_parsed: dict = {}
_FLOAT_CODES = frozenset(dtype_code(d) for d in FLOAT_DTYPES)


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
    fast = fast_shm(tensor, group) if async_op is False else None
    if fast is not None:
        try:
            parsed = _parsed.get((op, type(op), compression, block_size, type(block_size)))
        except TypeError:  # an unhashable op: the full checks below say what is wrong
            parsed = None
        comm, code = fast
        if parsed is not None and (code in _FLOAT_CODES or parsed[3]):
            # positional: keywords cost ~1.3 us per call here (bench/RESULTS.md, session 4);
            # the order is ShmComm.run's: data, n, dtype, op, compression, block, kind, out, root,
            # divisor, timeout_s
            comm.shm.run(tensor.data_ptr(), tensor.numel(), code, parsed[0], parsed[1], parsed[2], KIND_ALLREDUCE,
                         0, 0, comm.size, comm.timeout_s)
            return tensor
    t, op_name, comp, block = check_all(tensor, op, compression, block_size)
    check_async(async_op, OP_NAME)
    caller_group = group
    group = resolve_group(group, OP_NAME)
    if dist.get_rank(group) < 0:  # not a member: nothing to do, as torch.distributed does
        return done(t) if async_op else t
    comm = get_comm(group, OP_NAME)
    if comm.size == 1:
        return done(t) if async_op else t
    key = (op, type(op), compression, block_size, type(block_size))
    if key not in _parsed:
        try:
            _parsed[key] = (OPS[op_name], COMPRESSIONS[comp], block, op_name != "avg" and comp is None)
        except TypeError:
            pass
    if comm.transport == "shm":
        remember_fast(None if caller_group is None else id(caller_group), comm)
    work, finish = stage_inout(t, OP_NAME)
    with torch.no_grad():
        fut = comm.run(Call("all_reduce", work, op=op_name, comp=comp, block=block), async_op, finish, t)
    return fut if async_op else t
