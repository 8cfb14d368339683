"""Which backend serves an array, and the device check every op runs (API.md §0: one device per
call, and a device whose backend is built and usable). Torch-free: NumPy arrays live on the CPU."""
from __future__ import annotations

import numpy as np

from ._arrays import fail
from .backends import cpu


def backend_for(x):
    """The backend module for x's device (after check_device)."""
    if type(x) is np.ndarray or x.is_cpu:
        return cpu
    from .backends import cuda

    return cuda


def check_device(op: str, **arrays) -> None:
    """All arguments on one device, and that device served by a usable backend."""
    devs = {name: ("cpu" if isinstance(t, np.ndarray) else t.device) for name, t in arrays.items() if t is not None}
    if len({str(d) for d in devs.values()}) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise fail(ValueError, op, f"all tensors must be on one device, got {desc}")
    dev = next(iter(devs.values())) if devs else "cpu"
    dev_type = dev if isinstance(dev, str) else dev.type
    if dev_type not in ("cpu", "cuda", "meta"):
        raise fail(ValueError, op, f"tensors on device {dev} are not supported (cpu or cuda only)")
    if dev_type == "cuda":
        from .backends import cuda

        reason = cuda.unavailable_reason()
        if reason is not None:
            raise fail(ValueError, op, f"got CUDA tensors but the CUDA backend is unavailable: {reason}")
