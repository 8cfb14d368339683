"""ld.broadcast (API.md §3): the tensor of rank `src` into every rank's tensor, in place. Checks,
staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .._arrays import fail
from ._checks import check_async, check_tensor
from ._comm import Call, get_comm
from ._staging import done, resolve_group, stage_inout

WHO = "ld.broadcast"


def broadcast(tensor: torch.Tensor, src: int, *, group=None, async_op: bool = False):
    """Overwrites `tensor` on every rank of `group` with rank `src`'s (a global rank, as in
    torch.distributed.broadcast), in place, and returns it; with async_op=True a
    torch.futures.Future of it. The bytes arrive unchanged.
    Raises CommError (a RuntimeError) when a rank dies, stops calling or disagrees on the call.
    """
    t = check_tensor(tensor, WHO)
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)):
        raise fail(TypeError, WHO, f"src must be an int (a global rank), got {type(src).__name__}")
    check_async(async_op, WHO)
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
    with torch.no_grad():
        fut = comm.run(Call("broadcast", work, root=dist.get_group_rank(group, int(src))), async_op, finish, t)
    return fut if async_op else t
