"""lc.gemm of two builds and torch, timed against each other: one persistent worker process per build
tree (each imports the lepton_core of its tree; the new tree's also times torch), the three
alternating every round (best of a few calls each), then medians and per-round ratios. BUSY_CORE=1
keeps a busy loop on CPU 0 meanwhile (another process, or a neighbouring guest, on one of the cores):

    OLD=/path/to/old/tree NEW=/path/to/new/tree ROUNDS=9 NT=2 BUSY_CORE=1 \
        CASES="int8:2048x2048x2048,f32:1024x1024x1024,bf16:4096x256x1024:wt" python bench/ab_builds_vs_torch.py

A case is dtype:MxKxN[:wt] (wt: B = W^T, a transposed (N, K) weight). Both trees must be built
(tools/dev_build.sh). Ratios > 1: the second named is faster."""
import os, subprocess, sys, statistics
W = r'''
import sys, time, torch
sys.path.insert(0, sys.argv[1]); import lepton_core as lc
nt = int(sys.argv[2]); torch.set_num_threads(nt); lc.set_num_threads(nt)
DT = {"bf16": torch.bfloat16, "f32": torch.float32, "int8": torch.int8}
cache = {}
for line in sys.stdin:
    who, case = line.split()
    if case not in cache:
        p = case.split(":"); dt = DT[p[0]]; m, k, n = map(int, p[1].split("x")); lay = p[2] if len(p) > 2 else "nn"
        torch.manual_seed(0)
        if dt == torch.int8:
            a = torch.randint(-127, 128, (m, k), dtype=dt); b = torch.randint(-127, 128, (n, k) if lay == "wt" else (k, n), dtype=dt)
        else:
            a = torch.randn(m, k).to(dt); b = torch.randn((n, k) if lay == "wt" else (k, n)).to(dt)
        if lay == "wt": b = b.t()
        cache[case] = (a, b, max(3, min(50, int(2e9 / (2 * m * n * k) * 3))))
    a, b, reps = cache[case]
    f = (lambda: lc.gemm(a, b)) if who == "lc" else ((lambda: torch._int_mm(a, b)) if a.dtype == torch.int8 else (lambda: torch.matmul(a, b)))
    f(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    print(min(ts), flush=True)
'''
nt = os.environ.get("NT", "2")
busy = None
if os.environ.get("BUSY_CORE") == "1":
    busy = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])
procs = {"old": subprocess.Popen([sys.executable, "-c", W, os.environ["OLD"], nt], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
         "new": subprocess.Popen([sys.executable, "-c", W, os.environ["NEW"], nt], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)}
who = [("old", "lc"), ("new", "lc"), ("new", "torch")]
for case in os.environ["CASES"].split(","):
    res = {w: [] for w in who}
    for r in range(int(os.environ.get("ROUNDS", 9))):
        for w in (who if r % 2 == 0 else who[::-1]):
            p = procs[w[0]]; p.stdin.write(f"{w[1]} {case}\n"); p.stdin.flush(); res[w].append(float(p.stdout.readline()))
    o, nw, tt = res[who[0]], res[who[1]], res[who[2]]
    r1 = sorted(x / y for x, y in zip(o, nw)); r2 = sorted(x / y for x, y in zip(tt, nw)); r3 = sorted(x / y for x, y in zip(tt, o))
    md = lambda v: statistics.median(v)
    print(f"{case:24s} old {md(o)*1e3:8.3f} new {md(nw)*1e3:8.3f} torch {md(tt)*1e3:8.3f} ms | old/new {md(r1):.2f} [{r1[0]:.2f}-{r1[-1]:.2f}] torch/new {md(r2):.2f} torch/old {md(r3):.2f}", flush=True)
for p in procs.values(): p.stdin.close(); p.wait()
if busy:
    busy.kill()
