"""Configurations of one build timed against each other in one process, switched through environment
variables between calls: for a change under study, guarded by a temporary `getenv` in the kernel
source that is read on every call (never committed: tests/test_docs.py rejects unknown variables).
Configurations alternate every round (order reversed on odd rounds), best of a few calls each, then
medians and per-round ratios first / this (> 1: this one is faster than the first), with torch too:

    CONFIGS="off:XSHARE=0;on:" CASES="bf16:2048x2048x2048,int8:4096x1024x1024:wt" ROUNDS=11 NT=2 \\
        PYTHONPATH=. python bench/ab_env_switch.py

A case is dtype:MxKxN[:wt|:at] (wt: B = W^T, a transposed (N, K) weight; at: A transposed in memory).
In one process the configurations share the placement of the threads and the box's phase, which two
builds in two processes (bench/ab_builds_vs_torch.py) do not: on a noisy box this is the usable A/B.
TORCH=0 leaves torch out."""
import os
import statistics
import time

import torch

import lepton_core as lc

NT = int(os.environ.get("NT", 2))
torch.set_num_threads(NT)
lc.set_num_threads(NT)
ROUNDS = int(os.environ.get("ROUNDS", 9))
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "int8": torch.int8}


def parse_configs(text):
    configs = []
    for item in text.split(";"):
        name, _, assignments = item.partition(":")
        configs.append((name, dict(a.split("=", 1) for a in assignments.split(",") if a)))
    return configs


CONFIGS = parse_configs(os.environ["CONFIGS"])
VARIABLES = {v for _, env in CONFIGS for v in env}


def use(env):
    for v in VARIABLES:
        os.environ.pop(v, None)
    os.environ.update(env)


def operands(dtype, m, k, n, layout):
    torch.manual_seed(0)
    b_shape = (n, k) if layout == "wt" else (k, n)
    if dtype == torch.int8:
        a, b = torch.randint(-127, 128, (m, k), dtype=dtype), torch.randint(-127, 128, b_shape, dtype=dtype)
    else:
        a, b = torch.randn(m, k).to(dtype), torch.randn(b_shape).to(dtype)
    if layout == "wt":
        b = b.t()
    if layout == "at":
        a = a.t().contiguous().t()
    return a, b


def best_of(f, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    with_torch = os.environ.get("TORCH", "1") == "1"
    for case in os.environ["CASES"].split(","):
        parts = case.split(":")
        dtype = DTYPES[parts[0]]
        m, k, n = map(int, parts[1].split("x"))
        a, b = operands(dtype, m, k, n, parts[2] if len(parts) > 2 else "nn")
        runs = [(name, (lambda env=env: (use(env), lc.gemm(a, b)))) for name, env in CONFIGS]
        if with_torch:
            runs.append(("torch", (lambda: torch._int_mm(a, b)) if dtype == torch.int8 else (lambda: torch.matmul(a, b))))
        reps = max(3, min(50, int(2e9 / (2 * m * n * k) * 3)))
        for _, f in runs:
            f()
        times = {name: [] for name, _ in runs}
        for r in range(ROUNDS):
            for name, f in runs if r % 2 == 0 else runs[::-1]:
                times[name].append(best_of(f, reps))
        first = times[runs[0][0]]
        cells = []
        for name, ts in times.items():
            ratios = sorted(x / y for x, y in zip(first, ts))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            cells.append(f"{name} {statistics.median(ts) * 1e3:.3f} ms r{statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]")
        print(f"{case:26s} " + "  ".join(cells), flush=True)
        use({})


if __name__ == "__main__":
    main()
