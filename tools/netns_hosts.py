"""Simulated hosts on one Linux machine: network namespaces joined by veth pairs through a bridge.

Used by tests/test_multihost.py and bench/bench_multihost.py to run `torchrun --nnodes N` over TCP
between "hosts". Each host is a network namespace with one interface, `eth0` at 10.77.0.<i+1>/24,
whose veth peer sits on a bridge in a switch namespace of its own (the machine's own network is not
touched). Processes start in their host's namespace and in a UTS namespace of their own with the
hostname `<name>-h<i>`, so lepton_core.distributed sees separate hosts (its host id is the host name
plus the boot id); /dev/shm stays shared, as the pid namespace does (pids stay meaningful to the
caller). Needs root (CAP_SYS_ADMIN), iproute2's `ip` and util-linux's `unshare`; `unavailable()`
says why not when they are missing.

    with NetnsHosts(2) as hosts:
        p = hosts.popen(0, ["torchrun", ...], stdout=log)
        hosts.kill_host(1)      # every process in host 1's namespace, SIGKILL
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from typing import List, Optional, Sequence

SUBNET = "10.77.0"
IFNAME = "eth0"  # the interface inside every host namespace (GLOO_SOCKET_IFNAME)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> Optional[str]:
    """Why namespaces cannot be made here (None when they can): tries to make and delete one."""
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"no `{tool}` command ({package})"
    name = f"lepton-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` failed (needs root / CAP_SYS_ADMIN): {e.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    try:
        subprocess.run(["ip", "netns", "exec", name, "unshare", "--uts", "true"], check=True, capture_output=True,
                       text=True, timeout=30)
    except subprocess.CalledProcessError as e:
        return f"cannot run in a namespace with its own host name: {e.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


class NetnsHosts:
    """n simulated hosts; a context manager that always deletes what it made (close())."""

    def __init__(self, n: int):
        if not 1 <= n <= 200:
            raise ValueError(f"NetnsHosts: n must be in 1..200, got {n}")
        self.n = n
        self.name = f"lepton-{os.getpid()}-{secrets.token_hex(3)}"  # unique per run: parallel runs coexist
        self.switch = f"{self.name}-sw"
        self.namespaces = [f"{self.name}-h{i}" for i in range(n)]
        self.made: List[str] = []
        self.procs: List[subprocess.Popen] = []

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def hostname(self, i: int) -> str:
        return self.namespaces[i]

    def __enter__(self) -> "NetnsHosts":
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        for ns in [self.switch] + self.namespaces:
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            # Both ends are made inside their namespaces: nothing appears in the machine's own.
            _ip("link", "add", IFNAME, "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def limit_rate(self, rate: str) -> None:
        """Caps what each host sends (tc's token bucket on its eth0, e.g. "1gbit"): veth alone moves
        bytes at memory speed, unlike a real link between hosts. Traffic inside a host is not capped."""
        for ns in self.namespaces:
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", IFNAME, "root", "tbf", "rate", rate,
                            "burst", "256kb", "latency", "50ms"], check=True, capture_output=True, text=True,
                           timeout=30)

    def command(self, i: int, argv: Sequence[str]) -> List[str]:
        """argv run on host i: in its network namespace, under its own host name."""
        return ["ip", "netns", "exec", self.namespaces[i], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts argv on host i; close() ends and reaps it if it is still running."""
        p = subprocess.Popen(self.command(i, argv), **kwargs)
        self.procs.append(p)
        return p

    def pids(self, i: int) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[i]], capture_output=True, text=True,
                             timeout=30).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, i: int, timeout_s: float = 10.0) -> None:
        """SIGKILL every process in host i's namespace, until none is left (a process may be forking)."""
        if self.namespaces[i] not in self.made:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids(i)
            if not pids:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"NetnsHosts: processes {pids} survive SIGKILL in {self.namespaces[i]}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def close(self) -> None:
        """Kills every process left on every host, then deletes the namespaces (and with them the
        veth pairs and the bridge). Safe to call twice, and after a failed setup."""
        errors = []
        for i in range(self.n):
            try:
                self.kill_host(i)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} did not end after SIGKILL")
        self.procs = []
        for ns in reversed(self.made):
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self.made = []
        if errors:
            raise RuntimeError("NetnsHosts: cleanup failed: " + "; ".join(errors))
