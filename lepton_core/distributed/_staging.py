"""What every public collective does around its call: the group argument, and the staging of the
user's tensors into contiguous CPU tensors (a non-contiguous view, an expanded or a CUDA tensor is
copied in, and the result copied back into it in place; the rest of its base is untouched); for the
collectives with an output and an input, all of it (run_output_input)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.distributed as dist

from .._arrays import fail
from ._comm import Call, get_comm


def resolve_group(group, who: str):
    if not dist.is_available() or not dist.is_initialized():
        raise fail(ValueError, who, "torch.distributed is not initialized: call "
                   "torch.distributed.init_process_group() first (or launch with torchrun)")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise fail(TypeError, who, f"group must be a torch.distributed.ProcessGroup or None, "
                   f"got {type(group).__name__}")
    return group


def _writable_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` cut to one index along each dimension where `like` has stride 0 (an expanded tensor),
    so every element left owns distinct memory of `like`."""
    for d in range(like.dim()):
        if like.stride(d) == 0 and like.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _direct(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def stage_inout(tensor: torch.Tensor, who: str, arg: str = "tensor") -> Tuple[torch.Tensor, Callable[[], None]]:
    """(work, finish): a contiguous CPU copy of `tensor` to compute on in place, and the function
    that copies the result back into `tensor` (a no-op when work is tensor itself). An expanded
    tensor is written through one element per shared location (all of them hold the same value)."""
    if _direct(tensor):
        return tensor, lambda: None
    dst = _writable_view(tensor, tensor)
    if dst.numel() and torch._debug_has_internal_overlap(dst) == 1:
        raise fail(ValueError, who, f"{arg} of shape {tuple(tensor.shape)} and strides {tensor.stride()} "
                   "has elements that share memory; it cannot be written in place")
    work = tensor.detach().to("cpu", copy=True).contiguous()

    def finish() -> None:
        with torch.no_grad():
            dst.copy_(_writable_view(work, tensor))

    return work, finish


def stage_output(out: torch.Tensor, who: str) -> Tuple[torch.Tensor, Callable[[], None]]:
    """(work, finish) of an output that receives distinct values everywhere: refused when elements
    share memory."""
    if _direct(out):
        return out, lambda: None
    if out.numel() and torch._debug_has_internal_overlap(out) == 1:
        raise fail(ValueError, who, f"output of shape {tuple(out.shape)} and strides {out.stride()} has elements "
                   "that share memory; it cannot hold the result")
    work = torch.empty(out.numel(), dtype=out.dtype)

    def finish() -> None:
        with torch.no_grad():
            out.copy_(work.view(out.shape))

    return work, finish


def stage_input(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A flat contiguous CPU tensor holding `inp`'s values that writing `out` cannot change before
    it is read (a copy when the two share memory, e.g. torch's in-place all-gather idiom)."""
    flat = inp.detach()
    if not _direct(flat):
        return flat.to("cpu").contiguous().view(-1)
    if out.device.type == "cpu" and inp.numel() and out.numel():
        a0, a1 = inp.data_ptr(), inp.data_ptr() + inp.numel() * inp.element_size()
        b0 = out.untyped_storage().data_ptr()
        b1 = b0 + out.untyped_storage().nbytes()
        if a0 < b1 and b0 < a1:
            return flat.clone().view(-1)
    return flat.view(-1)


def done(value) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def run_output_input(c: Call, output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    """reduce_scatter / all_gather on checked arguments (c: the call without its tensors): the
    sizes (the larger tensor holds W x the other's elements: a ValueError before any
    communication), staging, a one-rank group, then the group's communicator. Returns what the
    public function returns."""
    who = c.who
    group = resolve_group(group, who)
    w = dist.get_world_size(group)
    (big, bname), (small, sname) = ((input, "input"), (output, "output")) if c.kind == "reduce_scatter" \
        else ((output, "output"), (input, "input"))
    if big.numel() != w * small.numel():
        raise fail(ValueError, who, f"{bname} must have world size x {sname}'s elements, {w} x {small.numel()} = "
                   f"{w * small.numel()}, got {big.numel()} ({bname} shape {tuple(big.shape)}, {sname} shape "
                   f"{tuple(small.shape)})")
    if dist.get_rank(group) < 0:  # not a member: nothing to do, as torch.distributed does
        return done(output) if async_op else output
    c.data = stage_input(input, output)
    work_out, finish = stage_output(output, who)
    c.out = work_out.view(-1)
    if w == 1:
        with torch.no_grad():
            c.out.copy_(c.data)
            finish()
        return done(output) if async_op else output
    comm = get_comm(group, who)
    with torch.no_grad():
        fut = comm.run(c, async_op, finish, output)
    return fut if async_op else output
