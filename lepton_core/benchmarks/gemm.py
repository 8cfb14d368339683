"""`lepton bench gemm`: lc.gemm against torch in the same process, timed interleaved.

Rows: fp32 and bf16 square GEMMs (256 .. 2048, and 4096 unless quick) against torch.matmul in the
same dtype, int8 -> int32 (1024, 2048, and 4096 unless quick) against torch._int_mm, skinny x (M, 4096) @ W^T shapes (M = 1, 8, 32: a
linear layer at a small batch), the training shapes (lc.nn.Linear's forward, input-gradient and
weight-gradient GEMMs in bf16 at 32 .. 4096 tokens and 256 .. 4096 features), and the fixed cost of a
64 x 64 call. Both sides
use the same thread count (lc.get_num_threads()). `ratio` is torch's time over ours (> 1: we are
faster), the median of 7 rounds' ratios, each of two samples taken one right after the other (the
box's speed moves between rounds; `ours_ms` and `torch_ms` are each side's median, whose quotient can
differ from `ratio`; `ratio_spread` is the per-round ratios' range without the lowest and highest).
A roofline against the compute peak: `peak_pct` is our throughput and `torch_peak_pct` the
baseline's over this machine's measured peak for that arithmetic (`peak_gflops`): the peak probe
(_C.gemm_peak_probe) runs the active ISA's microkernel instructions without loads on every thread
(AVX-512: vfmadd231ps for float32 / float16, vdpbf16ps for bf16, vpdpbusd for int8; AVX2: FMA for
every float dtype, madd + add for int8; amx: tdpbf16ps for bf16, tdpbssd for int8), and is
timed interleaved with the row's own samples, so it reflects the clock and core share the row
actually had (the machine is shared). On a busy machine small 2-thread calls (ours and torch's alike) can wait a
scheduler tick for their second OpenMP thread; the probe's calls are long enough not to.

Some torch baselines are very slow on CPUs without native bf16 / int8 dot products (bf16 matmul and
_int_mm fall back to reference loops): a baseline whose single call would take longer than
`_MAX_BASELINE_S` is timed once (or skipped when projected far beyond) instead of interleaved, and
its row says so in `note`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import lepton_core as lc
from lepton_core import _C
from lepton_core.benchmarks.common import (ProgressRows, interleaved_samples, paired_ratio, paired_ratio_spread,
                                           print_table)

COLUMNS = ["shape", "dtype", "baseline", "ours_ms", "torch_ms", "ratio", "ratio_spread", "ours_gflops", "torch_gflops",
           "peak_gflops", "peak_pct", "torch_peak_pct", "note"]

_MAX_BASELINE_S = 4.0     # longer single calls are timed once instead of interleaved
_SKIP_BASELINE_S = 15.0   # projected single calls longer than this are not run at all

_MISSING = "-"            # table cell of a baseline that was not run

# (tokens = batch x sequence, features in, features out) of the training-shape rows
_TRAIN_SHAPES = [(32, 1024, 1024), (512, 1024, 1024), (4096, 1024, 1024), (32, 4096, 4096), (512, 256, 256),
                 (4096, 256, 1024)]

def _probe_kind(dtype: torch.dtype) -> str:
    return "int8" if dtype == torch.int8 else "bf16" if dtype == torch.bfloat16 else "float"


def _peak_fn(ops: float, n_threads: int, kind: str) -> Optional[Tuple[Callable[[], object], float]]:
    """A call of the peak probe doing about `ops` operations on n_threads threads, and the exact
    operation count it does (None when the active kernels, the scalar ones, have no probe)."""
    per_iter = _C.gemm_peak_probe(1, n_threads, kind)  # operations of one iteration on every thread
    if per_iter is None:
        return None
    n_iters = max(1, int(ops / per_iter))
    return (lambda: _C.gemm_peak_probe(n_iters, n_threads, kind)), n_iters * per_iter


def _operands(m: int, k: int, n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        return (torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
                torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g))
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _bench_one(m: int, k: int, n: int, dtype: torch.dtype, baseline: str, est_baseline_s: Optional[float],
               n_threads: int, layout: str = "", label: str = "") -> dict:
    """layout "W^T": b is the transpose of a row-major (n, k) weight (nn.Linear's forward); "A^T": a
    is the transpose of a row-major (k, m) matrix (the weight gradient g^T @ x); "": both row-major."""
    a, b = _operands(m, k, n, dtype)
    if layout == "W^T":
        b = b.t().contiguous().t()
    elif layout == "A^T":
        a = a.t().contiguous().t()
    ours = lambda: lc.gemm(a, b)  # noqa: E731
    theirs = (lambda: torch._int_mm(a, b)) if dtype == torch.int8 else (lambda: torch.matmul(a, b))  # noqa: E731
    # Check once, outside the timed part: int8 exactly, floats against torch in float32.
    if dtype == torch.int8:
        want = torch.matmul(a.to(torch.int32), b.to(torch.int32))
        assert torch.equal(ours(), want), "lc.gemm int8 result differs from the exact product"
    else:
        want = a.float() @ b.float()
        err = (ours().float() - want).norm() / want.norm()
        assert err < 1e-2, f"lc.gemm relative error {err:.3g}"
    ops = 2.0 * m * n * k
    # The peak probe is sampled in the same interleaved rounds, so "% of peak" compares against the
    # clock and core share this row actually had (other tenants, turbo), not a number from earlier.
    # Each probe call does at least ~50 ms of work so that waking a descheduled OpenMP thread (up to
    # a scheduler tick on a busy machine) does not count as lost peak.
    peak_ops = max(ops, 2e10 if dtype == torch.int8 else 1e10)
    peak = _peak_fn(peak_ops, n_threads, _probe_kind(dtype))
    # The probe first, ours next to torch: in rounds of alternating order (interleaved_samples) ours and
    # torch are always timed one right after the other, and each follows the probe equally often.
    fns = {}
    if peak is not None:
        fns["peak"] = peak[0]
    fns["ours"] = ours
    note = ""
    t_theirs = None
    if est_baseline_s is not None and est_baseline_s > _SKIP_BASELINE_S:
        note = f"{baseline} skipped: ~{est_baseline_s:.0f} s per call projected"
    else:
        single = _time_once(theirs)
        if single > _MAX_BASELINE_S:
            t_theirs = single
            note = f"{baseline} timed once ({single:.1f} s per call)"
        else:
            fns["torch"] = theirs
    samples = interleaved_samples(fns, rounds=7, min_sample_s=0.05)
    t = {name: statistics.median(v) for name, v in samples.items()}
    t_ours = t["ours"]
    t_theirs = t.get("torch", t_theirs)
    # The ratio of times taken moments apart, round by round (paired_ratio): this box's speed moves
    # between rounds, and a ratio of medians then compares different moments. A baseline timed once
    # has no rounds: the ratio of the two times.
    paired = "torch" in samples
    ratio = None if t_theirs is None else paired_ratio(samples, "torch", "ours") if paired else t_theirs / t_ours
    ours_g = ops / t_ours / 1e9
    if peak is not None:
        peak_g = peak[1] / t["peak"] / 1e9
    else:
        peak_g = float("nan")
    row = {
        "shape": (label + " " if label else "") + f"{m}x{k}x{n}" + (f" {layout}" if layout else ""),
        "dtype": str(dtype).replace("torch.", "") + ("->int32" if dtype == torch.int8 else ""),
        "baseline": baseline,
        "ours_ms": t_ours * 1e3,
        "torch_ms": _MISSING if t_theirs is None else t_theirs * 1e3,
        "ratio": _MISSING if ratio is None else ratio,
        "ratio_spread": paired_ratio_spread(samples, "torch", "ours") if paired else _MISSING,
        "ours_gflops": ours_g,
        "torch_gflops": _MISSING if t_theirs is None else ops / t_theirs / 1e9,
        "peak_gflops": peak_g,
        "peak_pct": 100.0 * ours_g / peak_g,
        "torch_peak_pct": _MISSING if t_theirs is None else 100.0 * ops / t_theirs / 1e9 / peak_g,
        "note": note,
    }
    return row


def run(quick: bool = False) -> List[dict]:
    """Benchmarks lc.gemm against torch; returns one dict per row (keys: COLUMNS)."""
    n_threads = lc.get_num_threads()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    rows: List[dict] = ProgressRows("gemm", COLUMNS)
    try:
        sizes = [256, 512, 1024, 2048] + ([] if quick else [4096])
        for dtype in (torch.float32, torch.bfloat16):
            prev = None  # (size, torch seconds per call) to project the next size's baseline time
            for s in sizes:
                est = None if prev is None or prev[1] is None else prev[1] * (s / prev[0]) ** 3
                row = _bench_one(s, s, s, dtype, "torch.matmul", est, n_threads)
                rows.append(row)
                # a skipped baseline keeps projecting from its own projection
                prev = (s, est if row["torch_ms"] == _MISSING else row["torch_ms"] / 1e3)
        prev = None
        for s in [1024, 2048] + ([] if quick else [4096]):
            est = None if prev is None or prev[1] is None else prev[1] * (s / prev[0]) ** 3
            row = _bench_one(s, s, s, torch.int8, "torch._int_mm", est, n_threads)
            rows.append(row)
            prev = (s, est if row["torch_ms"] == _MISSING else row["torch_ms"] / 1e3)
        # Skinny shapes of a linear layer's forward at a small batch: x (M, 4096) @ W^T (int8: W8A8's
        # product before its scales).
        for dtype in (torch.float32, torch.bfloat16, torch.int8):
            for m in [1, 8, 32, 128]:
                baseline = "torch._int_mm" if dtype == torch.int8 else "torch.matmul"
                rows.append(_bench_one(m, 4096, 4096, dtype, baseline, None, n_threads, layout="W^T"))
        # ... and times a row-major W (in, out): the input gradient g @ W at a small batch, Conv1D weights.
        for m in [8, 16]:
            rows.append(_bench_one(m, 4096, 4096, torch.bfloat16, "torch.matmul", None, n_threads, label="x@W"))
        # Training shapes (issue 14): the three bf16 GEMMs of lc.nn.Linear's step for x (T, f_in), W
        # (f_out, f_in), g (T, f_out): forward x @ W^T, input gradient g @ W, weight gradient g^T @ x,
        # in the layouts lc.nn.Linear hands to lc.gemm (see _ops._linear_backward).
        for tokens, f_in, f_out in _TRAIN_SHAPES[:2] if quick else _TRAIN_SHAPES:
            for label, (m, k, n), layout in (("fwd x@W^T", (tokens, f_in, f_out), "W^T"),
                                             ("dx g@W", (tokens, f_out, f_in), ""),
                                             ("dW g^T@x", (f_out, tokens, f_in), "A^T")):
                rows.append(_bench_one(m, k, n, torch.bfloat16, "torch.matmul", None, n_threads, layout=layout,
                                       label=label))
        # Fixed cost: a 64 x 64 x 64 call is mostly Python checks, allocation and dispatch.
        row = _bench_one(64, 64, 64, torch.float32, "torch.matmul", None, n_threads)
        row["note"] = (row["note"] + "; " if row["note"] else "") + "fixed cost of a small call"
        rows.append(row)
    finally:
        torch.set_num_threads(torch_threads)
    return rows


CPU_TIME_COLUMNS = ["shape", "dtype", "threads", "ours_gflops", "torch_gflops", "peak_gflops", "ratio", "peak_pct"]


def run_cpu_time(quick: bool = False) -> List[dict]:
    """The same comparison measured by CPU time instead of wall time, for shared machines.

    CPU time does not advance while a thread is descheduled, so other tenants barely move it. With
    n threads, GFLOP/s is computed from process CPU time / n: what an idle machine's wall time would
    be if the threads overlap perfectly (time spent spinning at the end of a parallel region counts
    against the kernel, so this is a pessimistic estimate for both sides). Median of 5 alternating
    samples of at least ~4 GFLOP each.
    """
    import statistics

    rows: List[dict] = []
    torch_threads = torch.get_num_threads()
    sizes = [1024, 2048] + ([] if quick else [4096])
    try:
        for n_threads in sorted({1, lc.get_num_threads()}):
            torch.set_num_threads(n_threads)
            lc_threads = lc.get_num_threads()
            lc.set_num_threads(n_threads)
            try:
                for dtype in (torch.float32, torch.bfloat16, torch.int8):
                    for s in sizes if dtype == torch.float32 else sizes[:2]:
                        a, b = _operands(s, s, s, dtype)
                        ops = 2.0 * s ** 3
                        fns = {"ours": lambda: lc.gemm(a, b)}
                        if dtype == torch.float32:
                            fns["torch"] = lambda: torch.matmul(a, b)
                        peak = _peak_fn(ops, n_threads, _probe_kind(dtype))
                        if peak is not None:
                            fns["peak"] = peak[0]
                        reps = max(1, int(4e9 / ops))
                        samples: Dict[str, List[float]] = {k: [] for k in fns}
                        for fn in fns.values():
                            fn()
                        for _ in range(5):
                            for name, fn in fns.items():
                                t0 = time.process_time()
                                for _ in range(reps):
                                    fn()
                                samples[name].append((time.process_time() - t0) / reps / n_threads)
                        t = {k: statistics.median(v) for k, v in samples.items()}
                        peak_g = peak[1] / t["peak"] / 1e9 if "peak" in t else float("nan")
                        ours_g = ops / t["ours"] / 1e9
                        rows.append({
                            "shape": f"{s}x{s}x{s}",
                            "dtype": str(dtype).replace("torch.", "") + ("->int32" if dtype == torch.int8 else ""),
                            "threads": n_threads,
                            "ours_gflops": ours_g,
                            "torch_gflops": ops / t["torch"] / 1e9 if "torch" in t else _MISSING,
                            "peak_gflops": peak_g,
                            "ratio": t["torch"] / t["ours"] if "torch" in t else _MISSING,
                            "peak_pct": 100.0 * ours_g / peak_g,
                        })
            finally:
                lc.set_num_threads(lc_threads)
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def main(quick: bool = False, cpu_time: bool = False) -> List[dict]:
    n_threads = lc.get_num_threads()
    if cpu_time:
        rows = run_cpu_time(quick=quick)
        print_table(rows, CPU_TIME_COLUMNS, title=f"lc.gemm vs torch by CPU time (ISA {lc.info()['cpu_isa']}; "
                                                  "torch bf16 / int8 baselines omitted: reference loops here)")
        return rows
    rows = run(quick=quick)
    print_table(rows, COLUMNS, title=f"lc.gemm vs torch ({n_threads} threads, ISA {lc.info()['cpu_isa']})")
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv, cpu_time="--cpu-time" in sys.argv)
