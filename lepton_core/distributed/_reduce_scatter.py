"""ld.reduce_scatter (API.md §3): rank r receives chunk r of the C-order flattening of `input`,
reduced over the group's ranks. Checks, staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ._checks import check_async, check_reduction, check_same_dtype, check_tensor
from ._comm import Call
from ._staging import run_output_input

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
    return run_output_input(Call("reduce_scatter", None, op=op_name, comp=comp, block=block), out, inp, group,
                            async_op)
