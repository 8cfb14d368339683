"""ld.all_gather (API.md §3): `output` receives the ranks' inputs concatenated in rank order.
Checks, staging, then the group's communicator (_comm.py)."""
from __future__ import annotations

import torch

from ._checks import check_async, check_same_dtype, check_tensor
from ._comm import Call
from ._staging import run_output_input

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
    return run_output_input(Call("all_gather", None), out, inp, group, async_op)
