"""Process-wide runtime: the native module, CPU instruction-set choice, threads, backend status."""
from __future__ import annotations

import os
import warnings
from typing import Optional

from . import _C

ISA_NAMES = ("scalar", "avx2", "avx512", "amx")


def _default_num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset / container CPU sets
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _apply_isa_cap() -> None:
    """LEPTON_CPU_ISA caps the automatic choice; an unknown name warns and is ignored."""
    cap = os.environ.get("LEPTON_CPU_ISA", "").strip().lower()
    if not cap:
        return
    if cap not in ISA_NAMES:
        warnings.warn(
            f"lepton_core: LEPTON_CPU_ISA={cap!r} is not one of {', '.join(ISA_NAMES)}; "
            "using the automatic choice",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _C.cpu_isa_set_active(ISA_NAMES.index(cap))


_apply_isa_cap()
_C.set_num_threads(_default_num_threads())


def cpu_isa() -> str:
    return ISA_NAMES[_C.cpu_isa_active()]


def available_isas() -> list:
    """Every ISA level this process can run (for tests that cover each path)."""
    best = min(_C.cpu_isa_detected(), _C.cpu_isa_compiled())
    return list(ISA_NAMES[: best + 1])


def _set_cpu_isa(name: str) -> None:
    """Testing hook: switch the kernels' ISA at run time (capped at what the CPU supports)."""
    if name not in ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}")
    _C.cpu_isa_set_active(ISA_NAMES.index(name))


def set_num_threads(n: int) -> None:
    """Threads used by lepton_core's CPU kernels. Results never depend on it (see API.md §0)."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import numpy as np

            if isinstance(n, np.integer) and not isinstance(n, np.bool_):
                n = int(n)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"lc.set_num_threads: n must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"lc.set_num_threads: n must be >= 1, got {n}")
    _C.set_num_threads(min(n, 1 << 16))  # stored as given (above the core count too)
    global _num_threads
    _num_threads = n


_num_threads: Optional[int] = None


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else _C.get_num_threads()


# ---- CUDA backend status (the module is optional and loaded lazily) ----
_cuda_state = None


def _cuda():
    """(module or None, device name or None, reason or None), computed once."""
    global _cuda_state
    if _cuda_state is None:
        try:
            from . import _cuda_backend

            _cuda_state = _cuda_backend.probe()
        except ImportError as e:
            _cuda_state = (None, None, f"lepton_core was built without its CUDA backend ({e})")
    return _cuda_state


def cuda_unavailable_reason() -> Optional[str]:
    return _cuda()[2]


def info() -> dict:
    """What this build and machine offer (API.md §0)."""
    from . import __version__

    mod, device, reason = _cuda()
    backends = ["cpu"] + (["cuda"] if reason is None else [])
    feats = _C.cpu_features()
    return {
        "version": __version__,
        "backends": backends,
        "cpu_isa": cpu_isa(),
        "cpu_isa_detected": ISA_NAMES[_C.cpu_isa_detected()],
        "cpu_isa_compiled": ISA_NAMES[_C.cpu_isa_compiled()],
        "num_threads": get_num_threads(),
        "openmp": bool(_C.has_openmp),
        "cpu": feats["brand"] or feats["vendor"],
        "cpu_features": {k: v for k, v in feats.items() if isinstance(v, bool) and v},
        "cache_bytes": {"l1d": feats["l1d_bytes"], "l2": feats["l2_bytes"], "l3": feats["l3_bytes"]},
        "cuda_device": device if reason is None else None,
        "cuda_unavailable_reason": reason,
    }
