"""DDP communication hook: gradient averaging through ld.all_reduce, int8 with error feedback.

    model.register_comm_hook(ld.HookState(compression="int8"), ld.allreduce_hook)

Error feedback: before its bucket is reduced, each rank adds to it the residual it kept from the
previous step, x = g + r, and keeps r' = x - D(Q(x)): what its own blockwise-int8 quantization of x
loses (csrc/cpu/reduce/reduce.h, q8_error_feedback). Over steps, what one step's quantization drops
is sent in a later one instead of being lost. A block of x holding NaN/Inf (an fp16 overflow) is
reduced as it is, non-finite on every rank, so a GradScaler skips the step; its residual stays
unchanged rather than turning NaN for every later step.

Residuals are kept per parameter, keyed by the parameter's position in DDP's bucket order (also the
key of state_dict()["residuals"]). DDP rebuilds its buckets after the first step (in the order
gradients became ready), so a bucket's index and layout change while a parameter's gradient keeps its
meaning: positions are given once, in the order of the first buckets the state meets (bucket 0's
parameters first), and followed through rebuilds by parameter identity, held weakly. A DDP wrapper
the state has not met (a model re-created from a checkpoint, in this process or a new one) shows
itself by parameters the state does not know in bucket 0 of its first step: positions start again
from 0, in its bucket order, which is the same for the same model definition (DDP's initial buckets
follow the parameters' order and sizes; the trainer's bucket warm-up makes it the rebuilt order
in both runs). So the same HookState, or one restored with load_state_dict, continues bitwise
identically on a re-created model and optimizer, and no old model is kept alive.
One HookState serves one DDP model at a time.

Failures: a call that fails (a dead or silent peer) makes loss.backward() raise its ld.CommError
itself, naming the missing rank (see _to_ddp for how, and the one case DDP turns it into a
RuntimeError carrying the same message).
"""
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.autograd import Variable

from .. import _C
from ._allreduce import all_reduce
from ._checks import FLOAT_DTYPES, parse_block_size, parse_compression

__all__ = ["HookState", "allreduce_hook"]

_OP = "ld.HookState"


class HookState:
    """State of ld.allreduce_hook: the group, the compression and the error-feedback residuals."""

    def __init__(self, group=None, compression: Optional[str] = "int8", error_feedback: bool = True,
                 block_size: int = 256):
        self.compression = parse_compression(compression, _OP)
        self.block_size = parse_block_size(block_size, _OP)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"{_OP}: error_feedback must be a bool, got {type(error_feedback).__name__}")
        self.group = group
        self.error_feedback = error_feedback
        # id(parameter) -> (weak reference to it, its position); see the module docstring
        self._positions: Dict[int, Tuple[weakref.ref, int]] = {}
        self._next_position = 0
        self._views: Dict[int, torch.Tensor] = {}  # position -> its residual (a view into a flat)
        self._flats: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], torch.Tensor] = {}  # (positions, sizes) -> flat
        self._loaded: Dict[int, torch.Tensor] = {}  # residuals from load_state_dict, not yet placed

    @property
    def uses_error_feedback(self) -> bool:
        return self.error_feedback and self.compression is not None

    # ---- checkpoints ----
    def state_dict(self) -> Dict[str, Any]:
        residuals = {i: v.detach().clone() for i, v in self._views.items()}
        for i, v in self._loaded.items():
            residuals.setdefault(i, v.detach().clone())
        return {"compression": self.compression, "block_size": self.block_size,
                "error_feedback": self.error_feedback, "residuals": residuals}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "residuals" not in state:
            raise ValueError(f"{_OP}.load_state_dict: expected a dict from HookState.state_dict(), got "
                             f"{type(state).__name__}")
        self.compression = parse_compression(state.get("compression", self.compression))
        self.block_size = parse_block_size(state.get("block_size", self.block_size))
        self.error_feedback = bool(state.get("error_feedback", self.error_feedback))
        loaded = {}
        for k, v in state["residuals"].items():
            if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.dim() != 1:
                raise ValueError(f"{_OP}.load_state_dict: residual {k!r} must be a 1-D float32 tensor")
            loaded[int(k)] = v.detach().to("cpu", copy=True)
        # Parameters already known take their residual now; the others when the hook meets them.
        self._loaded = {}
        for i, v in loaded.items():
            if i in self._views:
                if self._views[i].numel() != v.numel():
                    raise ValueError(f"{_OP}.load_state_dict: residual {i} has {v.numel()} elements, the "
                                     f"parameter has {self._views[i].numel()}")
                self._views[i].copy_(v)
            else:
                self._loaded[i] = v
        for i in self._views:
            if i not in loaded:
                self._views[i].zero_()

    # ---- residuals of a bucket ----
    def _known_position(self, p: torch.Tensor) -> Optional[int]:
        entry = self._positions.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else None  # (an id may be reused)

    def _bucket_positions(self, bucket_index: int, params: List[torch.Tensor]) -> Tuple[int, ...]:
        known = [self._known_position(p) for p in params]
        if bucket_index == 0 and None in known:
            # DDP runs a step's buckets in index order: a new model's first bucket. Number again.
            self._positions.clear()
            self._next_position = 0
            known = [None] * len(params)
        out = []
        for p, pos in zip(params, known):
            if pos is None:
                pos = self._next_position
                self._next_position += 1
                self._positions[id(p)] = (weakref.ref(p), pos)
            out.append(pos)
        return tuple(out)

    def residual_for(self, bucket_index: int, params: List[torch.Tensor], n_elems: int) -> torch.Tensor:
        """The flat float32 residual of bucket `bucket_index`, whose buffer holds `params`'
        gradients in order."""
        positions = self._bucket_positions(bucket_index, params)
        sizes = tuple(p.numel() for p in params)
        flat = self._flats.get((positions, sizes))
        if flat is not None:
            return flat
        if sum(sizes) != n_elems:
            raise ValueError(f"ld.allreduce_hook: bucket of {n_elems} elements does not hold its "
                             f"parameters' {sum(sizes)} gradient elements back to back")
        # A new layout (first step, or DDP's bucket rebuild): carry every parameter's residual over.
        flat = torch.zeros(n_elems, dtype=torch.float32)
        off = 0
        for i, size in zip(positions, sizes):
            view = flat[off:off + size]
            old = self._views.get(i)
            if old is None:
                old = self._loaded.pop(i, None)
            if old is not None:
                if old.numel() != size:
                    raise ValueError(f"ld.allreduce_hook: the residual at position {i} has {old.numel()} "
                                     f"elements, the parameter there has {size} (a different model?)")
                view.copy_(old)
            self._views[i] = view
            off += size
        # Layouts that lost a parameter to this one are stale.
        moved = set(positions)
        for key in [k for k in self._flats if moved.intersection(k[0])]:
            del self._flats[key]
        self._flats[(positions, sizes)] = flat
        return flat


def _to_ddp(fut: torch.futures.Future, then=None) -> torch.futures.Future:
    """The future DDP gets for a bucket: the call's result (passed through `then`), or an error.

    A failed ld.all_reduce future holds its CommError as its value (torch.futures.Future has no
    other way to fail from Python), which DDP would try to cast to a tensor ("Unable to cast ... to
    Tensor"). Chained through .then, a failure is a real error of the future: DDP re-raises it as
    RuntimeError("... CommError: <message>"). To hand the CommError itself to loss.backward(), a
    final autograd callback per bucket waits for the call and re-raises it: queued during the
    backward pass, it runs before DDP's own finalization (queued after the last bucket), and the
    autograd engine passes an exception raised in Python through unchanged. Where DDP finalizes
    inside its own final callback (the first step with static_graph=True), the RuntimeError
    carrying the message is what arrives."""
    def result(f: torch.futures.Future) -> torch.Tensor:
        value = f.value()  # raises the call's CommError
        return then(value) if then is not None else value

    try:
        Variable._execution_engine.queue_callback(fut.wait)
    except RuntimeError:  # not inside a backward pass (the hook called directly)
        pass
    return fut.then(result)


# No `from __future__ import annotations` in this file: DDP checks the hook's return annotation object.
def allreduce_hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averages the bucket with ld.all_reduce (state.compression), with
    error feedback when state.error_feedback and compression is on."""
    buf = bucket.buffer()
    if not state.uses_error_feedback or buf.dtype not in FLOAT_DTYPES:
        return _to_ddp(all_reduce(buf, "avg", group=state.group, compression=state.compression,
                                  block_size=state.block_size, async_op=True))
    r = state.residual_for(bucket.index(), list(bucket.parameters()), buf.numel())
    staged = buf.dtype != torch.float32 or buf.device.type != "cpu" or not buf.is_contiguous()
    x = buf.detach().to("cpu", torch.float32, copy=True).contiguous() if staged else buf
    # x += r; r = x - D(Q(x))   (in place, one pass)
    _C.q8_error_feedback(-1, x.data_ptr(), r.data_ptr(), x.numel(), state.block_size)
    fut = all_reduce(x, "avg", group=state.group, compression=state.compression,
                     block_size=state.block_size, async_op=True)
    if not staged:
        return _to_ddp(fut)

    def copy_back(reduced: torch.Tensor) -> torch.Tensor:
        buf.copy_(reduced)
        return buf

    return _to_ddp(fut, copy_back)
