"""One rank of tests/test_multihost.py, started by `torchrun --nnodes N` on a simulated host:

    torchrun ... multihost_worker.py <job> <out dir> <json args>

Initializes torch.distributed (Gloo, env://, the group timeout from the args) and runs the job;
writes <out dir>/rank<r>.json: {"ok": bool, "error": traceback, **whatever the job recorded}.
Jobs:
  correctness: sum / avg / max of float32 and bfloat16, uncompressed and int8, on the hierarchical
      path: exact sums of small integers must come out exact; random inputs within the float64
      reference's bound; every result's bits are hashed for the parent to compare across ranks.
  kill: a stream of all-reduces until the parent kills a whole host; survivors record the
      CommError and the wall-clock time it came (the parent knows when it killed).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lepton_core.distributed as ld  # noqa: E402
from jobs import _bits, _comm_of, _segments_of_this_process, abs_err, check_close, make_input, q8_bound, reference  # noqa: E402
from lepton_core.distributed import _rendezvous  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
SIZES = (1, 7, 1000, 70001, 300007)  # latency path, ring path, non-multiples of every split


def exact_inputs(seed: int, case: int, world: int, n: int, dtype):
    """Small integers whose sum is a multiple of the world size (so sum and avg are exact in
    bfloat16 too: |sum| <= 8 W < 256), different on every rank and element."""
    g = torch.Generator().manual_seed(seed * 7919 + case)
    xs = torch.randint(-8, 9, (world, n), generator=g, dtype=torch.int64)
    xs[-1] -= xs.sum(0) % world
    return [x.to(dtype) for x in xs]


def correctness(out: dict, args: dict) -> None:
    seed, r, w = args["seed"], dist.get_rank(), dist.get_world_size()
    hashes = out["hashes"] = {}
    exact_fail = []
    case = 0
    for dtype in DTYPES:
        for n in SIZES:
            for op in ("sum", "avg", "max"):
                case += 1
                xs = exact_inputs(seed, case, w, n, dtype)
                t = xs[r].clone()
                ld.all_reduce(t, op)
                want = reference(xs, op)
                want = torch.from_numpy(want.astype("float64")).to(dtype) if op != "max" else want
                if not torch.equal(t, want):
                    exact_fail.append(f"{dtype} {op} n={n}")
                hashes[f"exact {dtype} {op} {n}"] = _bits(t)
                case += 1
                xs = [make_input(seed, case, k, dtype, n) for k in range(w)]
                t = xs[r].clone()
                ld.all_reduce(t, op)
                check_close(t, xs, op, f"random {dtype} {op} n={n}")
                hashes[f"random {dtype} {op} {n}"] = _bits(t)
            for op in ("sum", "avg"):
                case += 1
                xs = [make_input(seed, case, k, dtype, n) for k in range(w)]
                t = xs[r].clone()
                ld.all_reduce(t, op, compression="int8")
                err, bound = abs_err(t, reference(xs, op)), q8_bound(xs, 256, op)
                assert bool((err <= bound).all()), \
                    f"int8 {dtype} {op} n={n}: over the bound by {float((err - bound).max())}"
                hashes[f"int8 {dtype} {op} {n}"] = _bits(t)
    assert not exact_fail, f"exact sums came out wrong: {exact_fail}"


def kill(out: dict, args: dict) -> None:
    """On a group with a short timeout (the default group's is long enough for a loaded machine
    to start every rank): the bound on the survivors' error is this timeout + a few seconds."""
    group = dist.new_group(list(range(dist.get_world_size())),
                           timeout=datetime.timedelta(seconds=args["stream_timeout_s"]))
    t = torch.ones(1 << 18)
    for _ in range(3):
        ld.all_reduce(t, group=group)
    out["stream_transport"] = _comm_of(group).transport
    out["segments_after_setup"] = _segments_of_this_process()
    _save(out)
    open(os.path.join(args["out"], f"ready{dist.get_rank()}"), "w").close()
    try:
        while True:
            ld.all_reduce(t, "avg", group=group)
    except ld.CommError as e:
        out.update(error=str(e), error_at=time.time())
    # Survivors stay until the parent has every survivor's error: one that left early would be a
    # dead peer to the others, and they might name it instead of the killed host's ranks.
    _save(out)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(args["out"], "release")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _save(out: dict) -> None:
    path = os.path.join(out["out"], f"rank{out['rank']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)  # the parent never reads a half-written file


def main() -> None:
    job, out_dir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    args["out"] = out_dir
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a stuck rank's stacks, in its host's log
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args["pg_timeout_s"]))
    rank = dist.get_rank()
    out = {"rank": rank, "out": out_dir, "pid": os.getpid(), "hostname": socket.gethostname(),
           "host_id": _rendezvous.host_id(), "ok": None}
    _save(out)
    try:
        ld.all_reduce(torch.ones(4))
        comm = _comm_of(None)
        out.update(transport=comm.transport, n_hosts=comm.n_hosts, local_size=comm.local_size)
        {"correctness": correctness, "kill": kill}[job](out, args)
        out["ok"] = True
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out["ok"] = False
        out["error_trace"] = traceback.format_exc()
    _save(out)
    sys.stdout.flush()
    if job == "kill":  # Gloo's teardown with a dead host is not what is tested
        os._exit(0 if out["ok"] else 1)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
