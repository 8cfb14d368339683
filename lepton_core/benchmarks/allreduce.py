"""`lepton bench allreduce`: ld.all_reduce next to Gloo (torch.distributed) and Open MPI (mpi4py), and
ld.reduce_scatter / ld.all_gather / ld.broadcast next to Gloo's at 1 MiB.

Each case runs W processes on this machine (under `mpirun` when mpi4py and mpirun are installed, so
MPI_Allreduce joins the same run; otherwise without the MPI column). In every process the three
implementations are timed interleaved, round after round (ours, Gloo, MPI, ours int8, ours, ...);
each sample is a block of back-to-back calls on the same float32 tensor (sum), whose length rank 0
picks from a calibration run and broadcasts, so every rank makes the same calls; rank 0 reports the
median over rounds. Results are checked once, outside the timing.

busbw = 2 (W - 1) / W * bytes / time (the bytes each rank must send and receive in a ring; (W - 1) / W
for reduce-scatter and all-gather, 1 for broadcast, with bytes the larger buffer); the
int8 column counts the float32 bytes, so it is comparable with the others. `of_copy` is our busbw
over this machine's memcpy rate (bytes copied per second, measured once in the parent).
The DDP rows time one training step (forward, backward with the hook's communication, SGD) of a
model whose gradients are ~59 MB, with DDP's default Gloo all-reduce (gloo_us), ld.allreduce_hook
uncompressed (ours_us) and int8 with error feedback (int8_us); the note gives the same step without
any communication (`no_sync`), the floor. `note` also gives the 1-minute load average while the
row was measured: the machine is shared, and other load slows every implementation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

COLUMNS = ["case", "ranks", "bytes", "ours_us", "gloo_us", "mpi_us", "int8_us", "ours_GBs", "gloo_GBs",
           "mpi_GBs", "int8_GBs", "x_gloo", "x_mpi", "of_copy", "note"]

FULL_SIZES = [4 << i for i in range(0, 25, 2)]  # 4 B, 16 B, 64 B ... 16 MiB, 64 MiB
QUICK_SIZES = [4 << 10, 1 << 20, 16 << 20]
COLLECTIVE_BYTES = 1 << 20  # the reduce-scatter / all-gather / broadcast rows (issue 10's done-when)


def _human(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def _mpi_available() -> bool:
    if shutil.which("mpirun") is None:
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("mpi4py") is not None
    except (ImportError, ValueError):
        return False


def _launch(world: int, mode: str, out: str, sizes: List[int], rounds: int, use_mpi: bool) -> None:
    store = os.path.join(out, f"store-{mode}-{world}")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    args = ["-m", "lepton_core.benchmarks.allreduce", "--worker", mode, "--world", str(world), "--store", store,
            "--out", out, "--rounds", str(rounds), "--sizes", ",".join(map(str, sizes))]
    if use_mpi:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd = ["mpirun", "-np", str(world), "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH", "-x",
               "OMP_NUM_THREADS", sys.executable] + args + ["--mpi"]
        subprocess.run(cmd, env=env, check=True, timeout=3600, cwd=out)  # cwd: no source tree shadows the package
        return
    procs = [subprocess.Popen([sys.executable] + args + ["--rank", str(r)], env=env, cwd=out) for r in range(world)]
    for p in procs:
        if p.wait(timeout=3600) != 0:
            raise RuntimeError(f"benchmark rank exited with {p.returncode}")


def run(quick: bool = False) -> List[Dict]:
    from .common import ProgressRows, copy_bandwidth_gbps

    copy_rate = copy_bandwidth_gbps() / 2  # bytes copied per second (the helper counts read + write)
    use_mpi = _mpi_available()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    rows: List[Dict] = ProgressRows("allreduce", COLUMNS)
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as out:
        for world in (2, 4):
            try:
                _launch(world, "allreduce", out, sizes, 3 if quick else 5, use_mpi)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                if not use_mpi:
                    raise
                print(f"lepton bench allreduce: mpirun failed ({e}); running without the MPI column", file=sys.stderr,
                      flush=True)
                use_mpi = False
                _launch(world, "allreduce", out, sizes, 3 if quick else 5, use_mpi)
            with open(os.path.join(out, f"allreduce-{world}.json")) as f:
                for row in json.load(f):
                    row["of_copy"] = row["ours_GBs"] / copy_rate
                    rows.append(row)
        if not quick:
            _launch(2, "ddp", out, [], 9, False)
            with open(os.path.join(out, "ddp-2.json")) as f:
                rows.extend(json.load(f))
    return rows


# ---------------------------------------------------------------- the worker (one rank)
def _timed(fns: Dict[str, object], rounds: int, dist, group=None) -> Dict[str, float]:
    """Median seconds per call of each function, interleaved round by round; the block length of
    each is calibrated on rank 0 and broadcast so that every rank makes the same calls."""
    import torch

    iters = {}
    for name, fn in fns.items():
        for _ in range(2):
            fn()
        dist.barrier()
        t0 = time.perf_counter()
        k = 3
        for _ in range(k):
            fn()
        dt = (time.perf_counter() - t0) / k
        n = torch.tensor([max(3, min(2000, int(0.05 / max(dt, 1e-7))))])
        dist.broadcast(n, 0)
        iters[name] = int(n)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _worker_allreduce(a, rank: int, world: int, dist) -> None:
    import torch

    import lepton_core.distributed as ld

    comm = None
    if a.mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        n = max(1, size // 4)
        base = torch.rand(n, generator=torch.Generator().manual_seed(rank)) + 1
        # correctness once, outside the timing
        want = sum(torch.rand(n, generator=torch.Generator().manual_seed(r)) + 1 for r in range(world))
        got = base.clone()
        ld.all_reduce(got)
        assert torch.allclose(got, want, rtol=1e-5), "ld.all_reduce gave a wrong sum"
        # Timed tensors start tiny so that repeated in-place sums stay finite for long (no
        # denormals either: they would slow every implementation alike, but they are not needed).
        ours, gloo, q8 = base * 1e-30, base * 1e-30, base.clone()
        fns = {"ours": lambda: ld.all_reduce(ours), "gloo": lambda: dist.all_reduce(gloo)}
        if comm is not None:
            from mpi4py import MPI

            mpi = (base * 1e-30).numpy()
            fns["mpi"] = lambda: comm.Allreduce(MPI.IN_PLACE, mpi, op=MPI.SUM)
        fns["int8"] = lambda: ld.all_reduce(q8, "avg", compression="int8")  # avg: stays in range
        t = _timed(fns, a.rounds, dist)
        bus = 2 * (world - 1) / world * size
        row = {"case": "all-reduce f32 sum", "ranks": world, "bytes": _human(size),
               "note": f"load {os.getloadavg()[0]:.1f}"}
        for name in ("ours", "gloo", "mpi", "int8"):
            if name in t:
                row[f"{name}_us"] = t[name] * 1e6
                row[f"{name}_GBs"] = bus / t[name] / 1e9
        row["x_gloo"] = t["gloo"] / t["ours"]
        if "mpi" in t:
            row["x_mpi"] = t["mpi"] / t["ours"]
        rows.append(row)
        if rank == 0:  # progress, on stderr: stdout holds only the tables
            print(json.dumps(row), file=sys.stderr, flush=True)
    rows.extend(_other_collectives(a, rank, world, dist))
    if rank == 0:
        with open(os.path.join(a.out, f"allreduce-{world}.json"), "w") as f:
            json.dump(rows, f)


def _other_collectives(a, rank: int, world: int, dist) -> List[Dict]:
    """ld.reduce_scatter / ld.all_gather / ld.broadcast next to Gloo's reduce_scatter_tensor /
    all_gather_into_tensor / broadcast, all six interleaved in one timing run, at COLLECTIVE_BYTES
    (the larger buffer: reduce_scatter's input, all_gather's output, the broadcast tensor)."""
    import torch

    import lepton_core.distributed as ld

    n = COLLECTIVE_BYTES // 4
    m = n // world
    base = torch.rand(n, generator=torch.Generator().manual_seed(rank)) + 1
    # correctness once, outside the timing
    want = sum(torch.rand(n, generator=torch.Generator().manual_seed(r)) + 1 for r in range(world))
    out = torch.empty(m)
    ld.reduce_scatter(out, base, group=None)
    assert torch.allclose(out, want[rank * m:(rank + 1) * m], rtol=1e-5), "ld.reduce_scatter gave a wrong sum"
    gathered, theirs = torch.empty(n), torch.empty(n)
    ld.all_gather(gathered, base[:m])
    dist.all_gather_into_tensor(theirs, base[:m])
    assert torch.equal(gathered, theirs), "ld.all_gather differs from Gloo"
    bufs = {k: torch.empty(m) for k in ("rs_ours", "rs_gloo")}
    bufs.update({k: torch.empty(n) for k in ("ag_ours", "ag_gloo")})
    bufs.update({k: base.clone() for k in ("bc_ours", "bc_gloo")})
    piece = base[:m].clone()
    fns = {
        "rs_ours": lambda: ld.reduce_scatter(bufs["rs_ours"], base),
        "rs_gloo": lambda: dist.reduce_scatter_tensor(bufs["rs_gloo"], base),
        "ag_ours": lambda: ld.all_gather(bufs["ag_ours"], piece),
        "ag_gloo": lambda: dist.all_gather_into_tensor(bufs["ag_gloo"], piece),
        "bc_ours": lambda: ld.broadcast(bufs["bc_ours"], 0),
        "bc_gloo": lambda: dist.broadcast(bufs["bc_gloo"], 0),
    }
    t = _timed(fns, a.rounds, dist)
    rows = []
    for key, case, moved in (("rs", "reduce-scatter f32 sum", (world - 1) / world),
                             ("ag", "all-gather f32", (world - 1) / world), ("bc", "broadcast f32", 1.0)):
        ours, gloo = t[f"{key}_ours"], t[f"{key}_gloo"]
        bus = moved * COLLECTIVE_BYTES
        rows.append({"case": case, "ranks": world, "bytes": _human(COLLECTIVE_BYTES), "ours_us": ours * 1e6,
                     "gloo_us": gloo * 1e6, "ours_GBs": bus / ours / 1e9, "gloo_GBs": bus / gloo / 1e9,
                     "x_gloo": gloo / ours, "note": f"load {os.getloadavg()[0]:.1f}"})
        if rank == 0:
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _worker_ddp(a, rank: int, world: int, dist) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lepton_core.distributed as ld

    torch.set_num_threads(1)  # one core per rank

    def make(kind):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 2048),
                                    torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
        m = DDP(model)
        if kind in ("hook", "int8"):
            m.register_comm_hook(ld.HookState(compression=None if kind == "hook" else "int8"), ld.allreduce_hook)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(rank))

        def step():
            with (m.no_sync() if kind == "none" else contextlib.nullcontext()):
                loss = m(x).square().mean()
                opt.zero_grad()
                loss.backward()
            opt.step()

        return step, sum(p.numel() for p in model.parameters())

    steps = {}
    n_params = 0
    for kind in ("default", "hook", "int8", "none"):
        steps[kind], n_params = make(kind)
    t = _timed(steps, a.rounds, dist)
    grad_bytes = 4 * n_params
    row = {"case": "DDP step", "ranks": world, "bytes": f"{grad_bytes / 1e6:.0f} MB grads",
           "ours_us": t["hook"] * 1e6, "gloo_us": t["default"] * 1e6, "int8_us": t["int8"] * 1e6,
           "x_gloo": t["default"] / t["hook"],
           "note": f"no comm {t['none'] * 1e3:.1f} ms; int8 x_gloo {t['default'] / t['int8']:.2f}; "
                   f"load {os.getloadavg()[0]:.1f}"}
    if rank == 0:
        print(json.dumps(row), file=sys.stderr, flush=True)
        with open(os.path.join(a.out, f"ddp-{world}.json"), "w") as f:
            json.dump([row], f)


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--rank", type=int, default=-1)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="")
    p.add_argument("--mpi", action="store_true")
    a = p.parse_args()
    rank = a.rank if a.rank >= 0 else int(os.environ["OMPI_COMM_WORLD_RANK"])
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{a.store}", rank=rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=600))
    if a.worker == "allreduce":
        _worker_allreduce(a, rank, a.world, dist)
    else:
        _worker_ddp(a, rank, a.world, dist)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main()
