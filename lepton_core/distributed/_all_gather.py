"""ld.all_gather (API.md §3): `output` receives the ranks' inputs concatenated in rank order.
Checks, staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._arrays import fail
from ._checks import check_async, check_same_dtype, check_tensor
from ._comm import Call, get_comm
from ._staging import done, resolve_group, stage_input, stage_output

WHO = "ld.all_gather"


def all_gather(output: torch.Tensor, input: torch.Tensor, *, group=None, async_op: bool = False):
    """Writes the C-order flattenings of the ranks' `input`s, in rank order, into `output`
    (W x input.numel() elements, W the group's size) on every rank (API.md §3). Returns `output`,
    or with async_op=True a torch.futures.Future of it. The bytes arrive unchanged.
    Raises CommError (a RuntimeError) when a rank dies, stops calling or disagrees on the call.
    """
    out = check_tensor(output, WHO, "output")
    inp = check_tensor(input, WHO, "input")
    check_same_dtype(out, inp, WHO)
    check_async(async_op, WHO)
    group = resolve_group(group, WHO)
    w = dist.get_world_size(group)
    if out.numel() != w * inp.numel():
        raise fail(ValueError, WHO, f"output must have world size x input's elements, {w} x {inp.numel()} = "
                   f"{w * inp.numel()}, got {out.numel()} (output shape {tuple(out.shape)}, input shape "
                   f"{tuple(inp.shape)})")
    if dist.get_rank(group) < 0:  # not a member: nothing to do, as torch.distributed does
        return done(out) if async_op else out
    work_in = stage_input(inp, out)
    work_out, finish = stage_output(out, WHO)
    if w == 1:
        with torch.no_grad():
            work_out.view(-1).copy_(work_in)
            finish()
        return done(out) if async_op else out
    comm = get_comm(group, WHO)
    with torch.no_grad():
        fut = comm.run(Call("all_gather", work_in, work_out.view(-1)), async_op, finish, out)
    return fut if async_op else out
