"""ld.broadcast (API.md §3): the tensor of rank `src` into every rank's tensor, in place. Checks,
staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .._arrays import fail
from ._checks import COMPRESSIONS, KINDS, OPS, check_async, check_tensor
from ._comm import Call, fast_shm, get_comm, remember_fast
from ._staging import done, resolve_group, stage_inout

WHO = "ld.broadcast"
# What the full path's Call sends for the arguments a broadcast does not have (the ranks compare
# every field of the call's header, so both paths must send the same).
_KIND, _OP, _COMPRESSION, _BLOCK = KINDS["broadcast"], OPS[Call.op], COMPRESSIONS[Call.comp], Call.block


def broadcast(tensor: torch.Tensor, src: int, *, group=None, async_op: bool = False):
    """Overwrites `tensor` on every rank of `group` with rank `src`'s (a global rank, as in
    torch.distributed.broadcast), in place, and returns it; with async_op=True a
    torch.futures.Future of it. The bytes arrive unchanged.
    Raises CommError (a RuntimeError) when a rank dies, stops calling or disagrees on the call.
    """
    # Fast path (as ld.all_reduce's): a contiguous CPU tensor, a source given as an int of the
    # group, the group's shared-memory communicator made by an earlier checked call.
    fast = fast_shm(tensor, group) if async_op is False and type(src) is int else None
    if fast is not None and src in fast[0].global_ranks:
        comm, code = fast
        comm.shm.run(tensor.data_ptr(), tensor.numel(), code, _OP, _COMPRESSION, _BLOCK, _KIND, 0,
                     comm.global_ranks.index(src), comm.size, comm.timeout_s)  # (ShmComm.run's order)
        return tensor
    t = check_tensor(tensor, WHO)
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)):
        raise fail(TypeError, WHO, f"src must be an int (a global rank), got {type(src).__name__}")
    check_async(async_op, WHO)
    caller_group = group
    group = resolve_group(group, WHO)
    members = dist.get_process_group_ranks(group)
    if int(src) not in members:
        raise fail(ValueError, WHO, f"src must be a global rank of the group ({members}), got {int(src)}")
    if dist.get_rank(group) < 0:  # not a member: nothing to do, as torch.distributed does
        return done(t) if async_op else t
    if len(members) == 1:
        return done(t) if async_op else t
    work, finish = stage_inout(t, WHO)
    comm = get_comm(group, WHO)
    if comm.transport == "shm":
        remember_fast(None if caller_group is None else id(caller_group), comm)
    with torch.no_grad():
        fut = comm.run(Call("broadcast", work, root=dist.get_group_rank(group, int(src))), async_op, finish, t)
    return fut if async_op else t
