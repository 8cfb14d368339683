"""Process-wide runtime: the native module, CPU instruction-set choice, threads, backend status."""
from __future__ import annotations

import os
import warnings
from typing import Optional

from . import _C

ISA_NAMES = tuple(_C.codes["isa"])  # lp_isa levels, best last (csrc/common/codes.h)


def _cpu_quota() -> Optional[int]:
    """CPUs allowed by this process's cgroup CPU quota (v2 cpu.max, v1 cfs quota), or None."""
    candidates = [("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")]
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as f:
                fields = f.read().split()
            if period_path is not None:
                with open(period_path) as f:
                    fields = fields[:1] + f.read().split()[:1]
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return max(1, -(-quota // period))  # a partial CPU still gets a thread
        return None
    return None


def _omp_num_threads() -> Optional[int]:
    """OMP_NUM_THREADS as OpenMP (and so torch) reads it: the first entry of the list, when it is a
    positive integer; anything else is ignored."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, container CPU sets), capped by the
    cgroup CPU quota (docker --cpus)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(n, quota) if quota else n)


def default_num_threads() -> int:
    """The thread count API.md §0 fixes: OMP_NUM_THREADS when set (torchrun sets it to 1 per
    worker), else the CPUs this process may run on."""
    return _omp_num_threads() or available_cpus()


def _apply_isa_cap() -> None:
    """LEPTON_CPU_ISA caps the choice (the automatic one is the best level the CPU, the OS and the build
    support, amx included); an unknown name warns and is ignored."""
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
    _C.cpu_isa_set_active(isa=ISA_NAMES.index(cap))


_apply_isa_cap()
_C.set_num_threads(n=default_num_threads())


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
    _C.cpu_isa_set_active(isa=ISA_NAMES.index(name))


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
    _C.set_num_threads(n=min(n, 1 << 16))  # stored as given (above the core count too)
    global _num_threads
    _num_threads = n


_num_threads: Optional[int] = None


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else _C.get_num_threads()


def empty_cache() -> int:
    """Frees the host pool's cached output buffers (large CPU outputs reuse them; see
    LEPTON_HOST_POOL_MB). Buffers still in use are untouched. Returns the bytes freed."""
    return _C.host_pool_trim()


def info() -> dict:
    """What this build and machine offer (API.md §0), plus what a bug report needs."""
    import platform

    from ._arrays import torch
    from ._version import __version__
    from .backends import cuda

    mod, device, reason = cuda.status()
    backends = ["cpu"] + (["cuda"] if reason is None else [])
    feats = _C.cpu_features()
    return {
        "version": __version__,
        "backends": backends,
        "cpu_isa": cpu_isa(),
        "cpu_isa_detected": ISA_NAMES[_C.cpu_isa_detected()],
        "cpu_isa_compiled": ISA_NAMES[_C.cpu_isa_compiled()],
        "cpu_kernels": cpu_kernels(),
        "num_threads": get_num_threads(),
        "openmp": bool(_C.has_openmp),
        "cpu": feats["brand"] or feats["vendor"],
        "cpu_features": {k: v for k, v in feats.items() if isinstance(v, bool) and v},
        "cache_bytes": {"l1d": feats["l1d_bytes"], "l2": feats["l2_bytes"], "l3": feats["l3_bytes"]},
        "cuda_device": device if reason is None else None,
        "cuda_unavailable_reason": reason,
        "cuda_archs": cuda.built_archs(),
        "host_pool_cached_bytes": _C.host_pool_cached_bytes(),
        "host_pool_limit_bytes": _C.host_pool_limit_bytes(),
        "python": platform.python_version(),
        "numpy": _numpy_version(),
        "torch": None if torch is None else torch.__version__,
        "compiler": _C.compiler,
        "git_revision": _C.git_revision,
    }


def cpu_kernels() -> str:
    """Which kernels the active ISA level runs, in words (the amx level: AMX tiles for some GEMMs; the
    avx512 level: how it multiplies bfloat16, which this CPU's timing of vdpbf16ps against FMA picked)."""
    isa = cpu_isa()
    if isa == "avx512":
        if _C.gemm_kernels_name(ISA_NAMES.index("avx512")) == "avx512-bf16fma":
            return "avx512 (bfloat16 GEMM widened to float32 and FMA: this CPU's vdpbf16ps gives fewer flops)"
        return "avx512 (bfloat16 GEMM by vdpbf16ps)"
    if isa == "amx":
        fp16 = ", float16 with AMX-FP16" if _C.cpu_features().get("amx_fp16") else ""
        return (f"amx (AMX tiles for bfloat16{fp16} and int8 GEMM; "
                "float32 GEMM and the other kernels: AVX-512 / AVX2)")
    return isa


def _numpy_version() -> str:
    import numpy

    return numpy.__version__
