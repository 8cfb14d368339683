"""All-reduce between simulated hosts: ld.all_reduce (hierarchical: shared memory inside a host,
Gloo between hosts) next to torch.distributed.all_reduce on Gloo alone, 2 hosts x 2 ranks.

The hosts are network namespaces joined by veth pairs through a bridge (tools/netns_hosts.py; needs
root); `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` runs on each. Every rank times
the implementations interleaved, round after round, each sample a block of back-to-back float32 sum
calls whose length rank 0 calibrates and broadcasts (lepton_core.benchmarks.allreduce._timed); rank 0
reports the medians. Results are checked once, outside the timing. veth moves bytes at memory speed
(both ends are this machine's kernel), so this shows the cost of each algorithm's structure and
software (messages, copies, TCP stack), not what a real network's bandwidth or latency would do.

    PYTHONPATH=$PWD python bench/bench_multihost.py [--rounds 7] [--rate 1gbit] [--markdown out.md]

--rate caps what each host sends (tc's token bucket on its interface), like a real link would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

SIZES = [4 << 10, 1 << 20, 16 << 20]
COLUMNS = ["case", "ranks", "bytes", "ours_us", "gloo_us", "int8_us", "x_gloo", "x_gloo_int8", "note"]


def run(rounds: int, rate: str = ""):
    from netns_hosts import IFNAME, NetnsHosts, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"bench_multihost: cannot simulate hosts: {why}")
    with tempfile.TemporaryDirectory(prefix="lepton-bench-multihost-") as out, NetnsHosts(2) as hosts:
        if rate:
            hosts.limit_rate(rate)
        env = {k: v for k, v in os.environ.items() if k not in ("LEPTON_HOST_ID", "LEPTON_TRANSPORT")}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=IFNAME)
        procs = []
        for i in range(hosts.n):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts.n), "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.address(0)}:29400", "--rdzv-id", hosts.name,
                   "--rdzv-conf", f"is_host={int(i == 0)}", "--local-addr", hosts.address(i), "--max-restarts", "0",
                   os.path.abspath(__file__), "--worker", out, "--rounds", str(rounds), "--rate", rate]
            procs.append(hosts.popen(i, cmd, env=env, cwd=out))
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"bench_multihost: a host's torchrun exited with {p.returncode}")
        with open(os.path.join(out, "rows.json")) as f:
            return json.load(f)


def worker(out: str, rounds: int, rate: str) -> None:
    import torch
    import torch.distributed as dist

    import lepton_core.distributed as ld
    from lepton_core.benchmarks.allreduce import _human, _timed
    from lepton_core.distributed import _comm

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    ld.all_reduce(torch.ones(1))
    comm = _comm.get_comm(dist.group.WORLD)
    if comm.transport != "hier" or comm.n_hosts != 2:
        raise RuntimeError(f"expected the hierarchical transport over 2 hosts, got {comm.transport} over {comm.n_hosts}")
    rows = []
    for size in SIZES:
        n = size // 4
        base = torch.rand(n, generator=torch.Generator().manual_seed(rank)) + 1
        want = sum(torch.rand(n, generator=torch.Generator().manual_seed(r)) + 1 for r in range(world))
        got = base.clone()
        ld.all_reduce(got)
        assert torch.allclose(got, want, rtol=1e-5), "ld.all_reduce gave a wrong sum"
        ours, gloo, q8 = base * 1e-30, base * 1e-30, base.clone()  # tiny: repeated sums stay finite
        t = _timed({"ours": lambda: ld.all_reduce(ours), "gloo": lambda: dist.all_reduce(gloo),
                    "int8": lambda: ld.all_reduce(q8, "avg", compression="int8")}, rounds, dist)
        link = f"link {rate}" if rate else "veth, no cap"
        row = {"case": f"all-reduce f32 sum, 2 hosts x 2, {link}", "ranks": world, "bytes": _human(size),
               "ours_us": t["ours"] * 1e6, "gloo_us": t["gloo"] * 1e6, "int8_us": t["int8"] * 1e6,
               "x_gloo": t["gloo"] / t["ours"], "x_gloo_int8": t["gloo"] / t["int8"],
               "note": f"load {os.getloadavg()[0]:.1f}"}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), file=sys.stderr, flush=True)
    if rank == 0:
        with open(os.path.join(out, "rows.json"), "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rate", default="", help="cap each host's sending rate (tc tbf), e.g. 1gbit")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.rounds, a.rate)
        return
    from lepton_core.benchmarks.common import print_table

    text = print_table(run(a.rounds, a.rate), COLUMNS, title="all-reduce between simulated hosts")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
