"""ld.reduce_scatter (API.md §3): rank r receives chunk r of the C-order flattening of `input`,
reduced over the group's ranks. Checks, staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .._arrays import fail
from ._checks import check_async, check_reduction, check_same_dtype, check_tensor
from ._comm import Call, get_comm
from ._staging import done, resolve_group, stage_input, stage_output

WHO = "ld.reduce_scatter"


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, op: Any = "sum", *, group=None,
                   compression: Optional[str] = None, block_size: int = 256, async_op: bool = False):
    """Reduces `input` (W x output.numel() elements, W the group's size) across the ranks of `group`
    and writes chunk r of its C-order flattening, reduced, into `output` on rank r (API.md §3).
    Returns `output`, or with async_op=True a torch.futures.Future of it.

    op, compression and block_size as in ld.all_reduce (int8 blocks restart at each chunk). The
    result is the same on every run for the same inputs and world size.
    Raises CommError (a RuntimeError) when a rank dies, stops calling or disagrees on the call.
    """
    out = check_tensor(output, WHO, "output")
    inp = check_tensor(input, WHO, "input")
    check_same_dtype(out, inp, WHO)
    op_name, comp, block = check_reduction(inp, op, compression, block_size, WHO, "input")
    check_async(async_op, WHO)
    group = resolve_group(group, WHO)
    w = dist.get_world_size(group)
    if inp.numel() != w * out.numel():
        raise fail(ValueError, WHO, f"input must have world size x output's elements, {w} x {out.numel()} = "
                   f"{w * out.numel()}, got {inp.numel()} (input shape {tuple(inp.shape)}, output shape "
                   f"{tuple(out.shape)})")
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
        fut = comm.run(Call("reduce_scatter", work_in, work_out.view(-1), op_name, comp, block), async_op, finish,
                       out)
    return fut if async_op else out
