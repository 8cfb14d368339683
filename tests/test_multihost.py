"""ld.all_reduce across hosts, for real (API.md §3, the hierarchical path): simulated hosts are Linux
network namespaces joined by veth pairs through a bridge (tools/netns_hosts.py), each with its own
host name; `torchrun --nnodes N --nproc-per-node 2 --rdzv-backend c10d` runs on every host and the
hosts talk TCP to each other, the two ranks of a host shared memory (tests/dist_workers/
multihost_worker.py is one rank). Nothing here sets LEPTON_HOST_ID or LEPTON_TRANSPORT: the library
must find the hosts itself.

Skipped, with the reason, where namespaces cannot be made (not root, no `ip` / `unshare`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).with_name("dist_workers")))
from launch import PKG_PARENT  # noqa: E402
from netns_hosts import IFNAME, NetnsHosts, unavailable  # noqa: E402

WORKER = Path(__file__).with_name("dist_workers") / "multihost_worker.py"
RDZV_PORT = 29400  # every host namespace has its own ports: no clash with other jobs
PER_HOST = 2

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def netns_ok():
    why = unavailable()
    if why:
        pytest.skip(f"simulated hosts need network namespaces: {why}")


@pytest.fixture
def out_dir():
    with tempfile.TemporaryDirectory(prefix="lepton-multihost-") as d:
        yield Path(d)


@pytest.fixture
def make_hosts(netns_ok, out_dir):
    """make_hosts(n) -> NetnsHosts; every namespace, veth and process is gone after the test,
    whether it passed or not (before out_dir goes: nothing writes there any more)."""
    made = []

    def make(n: int) -> NetnsHosts:
        hosts = NetnsHosts(n)
        made.append(hosts)
        return hosts.__enter__()

    yield make
    for hosts in made:
        hosts.close()


def _torchrun(hosts: NetnsHosts, job: str, out: Path, args: dict):
    """One torchrun agent per host (the first hosts the rendezvous store); returns the Popens."""
    procs = []
    for i in range(hosts.n):
        env = {k: v for k, v in os.environ.items() if k not in ("LEPTON_HOST_ID", "LEPTON_TRANSPORT")}
        env.update(PYTHONPATH=str(PKG_PARENT), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME=IFNAME)  # the host name resolves nowhere: name the interface
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts.n),
               "--nproc-per-node", str(PER_HOST), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{hosts.address(0)}:{RDZV_PORT}", "--rdzv-id", hosts.name,
               "--rdzv-conf", f"is_host={int(i == 0)}", "--local-addr", hosts.address(i),
               "--max-restarts", "0", "--monitor-interval", "0.2",
               str(WORKER), job, str(out), json.dumps(args)]
        log = open(out / f"host{i}.log", "w")
        procs.append(hosts.popen(i, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out))
        log.close()
    return procs


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("host*.log")))


def _results(out: Path, world: int):
    res = {}
    for r in range(world):
        p = out / f"rank{r}.json"
        if p.exists():
            res[r] = json.loads(p.read_text())
    return res


def _segments(pids):
    return [n for n in os.listdir("/dev/shm") if any(n.startswith(f"lepton-{pid}-") for pid in pids)]


def _check_layout(res, hosts: NetnsHosts):
    """Every rank took the hierarchical path, and each namespace is one host of two ranks."""
    by_host = {}
    for r, x in res.items():
        assert x["transport"] == "hier" and x["n_hosts"] == hosts.n and x["local_size"] == PER_HOST, x
        by_host.setdefault(x["hostname"], []).append(r)
    assert sorted(by_host) == sorted(hosts.hostname(i) for i in range(hosts.n)), by_host
    assert all(len(v) == PER_HOST for v in by_host.values()), by_host
    assert len({x["host_id"] for x in res.values()}) == hosts.n
    return by_host


@pytest.mark.parametrize("n_hosts", [2, 3])
def test_hierarchical_all_reduce_across_namespace_hosts_is_exact_and_bitwise_equal(make_hosts, out_dir, n_hosts):
    hosts = make_hosts(n_hosts)
    world = n_hosts * PER_HOST
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    procs = _torchrun(hosts, "correctness", out_dir, {"seed": seed, "pg_timeout_s": 60})
    try:
        codes = [p.wait(timeout=150) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in 150 s\n{_logs(out_dir)}")
    res = _results(out_dir, world)
    assert codes == [0] * n_hosts and len(res) == world, f"{codes}\n{_logs(out_dir)}"
    for x in res.values():
        assert x["ok"], x.get("error_trace")
    _check_layout(res, hosts)
    first = res[0]["hashes"]
    assert len(first) == 2 * 5 * (2 * 3 + 2)  # dtypes x sizes x (exact and random x 3 ops, int8 x 2 ops)
    for r in range(1, world):
        diff = [k for k in first if res[r]["hashes"].get(k) != first[k]]
        assert not diff, f"rank {r} holds other bits than rank 0 for {diff[:5]}"
    assert _segments([x["pid"] for x in res.values()]) == [], "shared-memory segments left in /dev/shm"


def test_a_killed_host_makes_the_survivors_raise_commerror_naming_one_of_its_ranks(make_hosts, out_dir):
    hosts = make_hosts(3)
    world, timeout = 3 * PER_HOST, 5.0
    procs = _torchrun(hosts, "kill", out_dir, {"pg_timeout_s": 60, "stream_timeout_s": timeout})
    try:
        deadline = time.monotonic() + 120
        while not all((out_dir / f"ready{r}").exists() for r in range(world)):
            assert time.monotonic() < deadline, f"the job did not start\n{_logs(out_dir)}"
            assert all(p.poll() is None for p in procs), f"a host ended early\n{_logs(out_dir)}"
            time.sleep(0.05)
        victim = 2  # not the first host: it holds the rendezvous store every rank's group uses
        killed_at = time.time()
        hosts.kill_host(victim)
        res = _results(out_dir, world)
        dead = sorted(r for r, x in res.items() if x["hostname"] == hosts.hostname(victim))
        survivors = [r for r in range(world) if r not in dead]
        deadline = time.monotonic() + timeout + 15
        while True:
            res = _results(out_dir, world)
            if all("error" in res[r] or res[r]["ok"] is False for r in survivors):
                break
            assert time.monotonic() < deadline, f"survivors did not raise in time\n{_logs(out_dir)}"
            time.sleep(0.05)
    finally:
        (out_dir / "release").touch()
    _check_layout(res, hosts)
    assert len(dead) == PER_HOST, dead
    for r in survivors:
        x = res[r]
        print(f"rank {r}: CommError {x.get('error_at', killed_at) - killed_at:.2f} s after the kill: {x.get('error')}")
        assert "error" in x, x.get("error_trace")
        assert x["stream_transport"] == "hier"
        assert x["error_at"] - killed_at <= timeout + 5, (r, x["error_at"] - killed_at)
        named = [int(k) for k in re.findall(r"ranks? ([\d, ]+)", x["error"])[0].replace(",", " ").split()]
        assert named and set(named) <= set(dead), (r, dead, x["error"])
        assert x["segments_after_setup"] == []
    assert _segments([x["pid"] for x in res.values()]) == [], "shared-memory segments left in /dev/shm"
