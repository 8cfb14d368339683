"""The DDP communication hook of the Trainer: ld.allreduce_hook plus byte accounting and, under fp16
loss scaling, a guard that keeps inf/nan gradients away from the int8 quantizer."""
from __future__ import annotations

import torch
import torch.distributed as dist

import lepton_core.distributed as ld


class CommState:
    """State of the DDP comm hook: the ld.HookState and what went over the wire.

    Bytes are per worker and per all-reduce: `payload_bytes` is the gradient bucket as DDP hands it
    over (float32); `wire_bytes` is what the ring algorithm sends for it, 2 (W - 1) / W of the payload,
    with int8 chunks costing 1 byte + 4 / block_size bytes (the float32 scale) per element.
    """

    def __init__(self, hook_state: "ld.HookState", world_size: int, compression: str, block_size: int,
                 guard_nonfinite: bool, group=None) -> None:
        self.hook_state = hook_state
        self.world_size = world_size
        self.compression = compression
        self.block_size = block_size
        self.guard_nonfinite = guard_nonfinite
        self.group = group
        self.bypass = False  # warm-up pass: no communication, no residual update
        self.payload_bytes = 0
        self.wire_bytes = 0

    def count(self, buf: torch.Tensor) -> None:
        n_elems = buf.numel()
        self.payload_bytes += n_elems * buf.element_size()
        per_elem = (1 + 4 / self.block_size) if self.compression == "int8" else buf.element_size()
        self.wire_bytes += int(round(2 * (self.world_size - 1) / self.world_size * n_elems * per_elem))


def _done(buf: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


def comm_hook(state, bucket):
    """DDP comm hook (state: CommState, bucket: dist.GradBucket) -> Future[Tensor]. Unannotated: DDP
    checks annotations against the real classes, and this module's are postponed strings."""
    buf = bucket.buffer()
    if state.bypass:
        return _done(buf)
    state.count(buf)
    if state.guard_nonfinite:
        # fp16 loss scaling overflows now and then; int8 cannot carry inf/nan. All ranks agree (one tiny
        # all-reduce) and, on overflow, hand the scaler an all-inf gradient so it skips this step and
        # lowers the scale, leaving the error-feedback residuals untouched.
        bad = torch.tensor([0 if bool(torch.isfinite(buf).all()) else 1], dtype=torch.int32, device=buf.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=state.group)
        if int(bad.item()):
            buf.fill_(float("inf"))
            return _done(buf)
    return ld.allreduce_hook(state.hook_state, bucket)
