"""lc.gemm of two builds timed against each other: one persistent worker process per build tree
(each imports the lepton_core of its tree), alternating old / new every round, best and median of 5
calls per round, 2 threads. For before / after checks of a change that must not slow the kernels:

    OLD=/path/to/old/tree NEW=/path/to/new/tree ROUNDS=15 CASES="int8 2048,bf16 1024" \
        python bench/ab_builds_gemm.py

Both trees must be built (tools/dev_build.sh). Prints old time / new time (> 1: new is faster)."""
import os, subprocess, sys, json, statistics
WORKER = r'''
import sys, time, torch
sys.path.insert(0, sys.argv[1]); import lepton_core as lc
torch.manual_seed(0)
cases = {}
for name, dt, n in [("int8 2048", torch.int8, 2048), ("bf16 1024", torch.bfloat16, 1024), ("bf16 2048", torch.bfloat16, 2048), ("f32 1024", torch.float32, 1024)]:
    if dt == torch.int8:
        a = torch.randint(-127, 128, (n, n), dtype=dt); b = torch.randint(-127, 128, (n, n), dtype=dt)
    else:
        a = torch.randn(n, n).to(dt); b = torch.randn(n, n).to(dt)
    cases[name] = (a, b)
lc.set_num_threads(2)
for line in sys.stdin:
    name = line.strip()
    a, b = cases[name]
    lc.gemm(a, b)
    ts = []
    for _ in range(5):
        t = time.perf_counter(); lc.gemm(a, b); ts.append(time.perf_counter() - t)
    print(min(ts), flush=True)
'''
procs = {t: subprocess.Popen([sys.executable, "-c", WORKER, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
         for t, d in [("old", os.environ["OLD"]), ("new", os.environ["NEW"])]}
res = {}
for rnd in range(int(os.environ.get("ROUNDS", 9))):
    for name in os.environ.get("CASES", "int8 2048,bf16 1024,bf16 2048,f32 1024").split(","):
        for t in (["old", "new"] if rnd % 2 == 0 else ["new", "old"]):
            p = procs[t]; p.stdin.write(name + "\n"); p.stdin.flush()
            res.setdefault((name, t), []).append(float(p.stdout.readline()))
for name in os.environ.get("CASES", "int8 2048,bf16 1024,bf16 2048,f32 1024").split(","):
    o, n = min(res[(name, "old")]), min(res[(name, "new")])
    mo, mn = statistics.median(res[(name, "old")]), statistics.median(res[(name, "new")])
    print(f"{name}: best old {o*1e3:.2f} ms new {n*1e3:.2f} ms old/new {o/n:.3f}; median old/new {mo/mn:.3f}")
for p in procs.values(): p.stdin.close(); p.wait()
