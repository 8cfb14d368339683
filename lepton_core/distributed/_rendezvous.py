"""Rendezvous of a group's communicator (at the group's first collective; every rank of the group
takes part, bounded by one timeout), through the group's own store:
  1. Each rank writes "<host id> <pid> <LEPTON_TRANSPORT> <pid namespace>" under
     lepton_core/<group>/<generation>/; the host id is LEPTON_HOST_ID, or the host name plus the
     kernel's boot id (two containers on one machine share the boot id but may not share /dev/shm:
     set LEPTON_HOST_ID to tell them apart or together).
  2. Ranks that disagree on LEPTON_TRANSPORT raise CommError (rather than deadlock).
  3. The transport: "shm" when every rank is on one host, "hier" when the group spans hosts that each
     hold the same number (>= 2) of ranks, "torch" otherwise; LEPTON_TRANSPORT=shm|torch forces one
     (shm: all ranks must really share a host). The segment itself is set up by _shm.py.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import _C

CommError = _C.CommError
DEFAULT_TIMEOUT_S = 1800.0


def fail_comm(who: str, msg: str) -> Exception:
    return CommError(f"{who}: {msg}")


def host_id() -> str:
    override = os.environ.get("LEPTON_HOST_ID", "").strip()
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return f"unknown-{os.getpid()}"  # never equal to another process's: no pid checks


def forced_transport(who: str) -> Optional[str]:
    value = os.environ.get("LEPTON_TRANSPORT", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("shm", "torch"):
        raise ValueError(f"{who}: LEPTON_TRANSPORT must be 'shm' or 'torch', got {value!r}")
    return value


def group_timeout_s(group) -> float:
    """The process group's timeout (what torch.distributed would wait), in seconds."""
    for dev in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(dev))
            return float(backend.options._timeout.total_seconds())
        except Exception:  # noqa: BLE001 - backends differ in what they expose
            continue
    try:
        return float(_group_store(group).timeout.total_seconds())
    except Exception:  # noqa: BLE001
        return DEFAULT_TIMEOUT_S


def comm_device(group) -> torch.device:
    """Where torch.distributed collectives of this group take their tensors: the CPU, unless the
    group has no CPU backend (NCCL alone), then the current CUDA device."""
    try:
        types = {d.type for d in group._device_types}
    except Exception:  # noqa: BLE001 - older torch: assume a CPU-capable group
        return torch.device("cpu")
    if "cpu" in types or not types or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _group_store(group):
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_process_group_store(group)


class Setup:
    """Store-based rendezvous of one communicator (keys under lepton_core/<group>/<generation>/)."""

    def __init__(self, group, generation: int, timeout_s: float, who: str):
        name = getattr(group, "group_name", "") or "group"
        self.store = dist.PrefixStore(f"lepton_core/{name}/{generation}/", _group_store(group))
        self.timeout_s = timeout_s
        self.who = who
        self.deadline = time.monotonic() + timeout_s  # the whole setup is bounded by one timeout

    def put(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str, who: int) -> str:
        try:
            left = max(0.05, self.deadline - time.monotonic())
            self.store.wait([key], datetime.timedelta(seconds=left))
            return self.store.get(key).decode()
        except Exception as e:  # noqa: BLE001 - store errors come as RuntimeError/DistStoreError
            raise fail_comm(self.who, f"rank {who} did not join the communicator setup within the timeout of "
                                      f"{self.timeout_s:g} s ({type(e).__name__}: {e})") from None


class Members:
    """What step 1 tells every rank about the group: each rank's host and pid, the hosts in order
    of their lowest rank, and which ranks each holds."""

    def __init__(self, setup: Setup, rank: int, size: int, global_ranks: List[int], forced: Optional[str]):
        setup.put(f"rank{rank}", f"{host_id()}\n{os.getpid()}\n{forced or 'auto'}\n{_pid_namespace()}")
        self.hosts: List[str] = []
        self.pids: List[int] = []
        transports: List[str] = []
        pidns: List[str] = []
        for r in range(size):
            fields = setup.get(f"rank{r}", r).split("\n")
            self.hosts.append(fields[0])
            self.pids.append(int(fields[1]))
            transports.append(fields[2])
            pidns.append(fields[3])
        # pids can be checked for the ranks in this pid namespace (same host, same container)
        self.same_host = [self.hosts[r] == self.hosts[rank] and pidns[r] == pidns[rank] for r in range(size)]
        for r in range(1, size):
            if transports[r] != transports[0]:  # would deadlock: fail on every rank instead
                raise fail_comm(setup.who, f"ranks disagree on LEPTON_TRANSPORT: rank {global_ranks[0]} has "
                                           f"{transports[0]!r}, rank {global_ranks[r]} has {transports[r]!r}")
        self.order: List[str] = []
        for h in self.hosts:
            if h not in self.order:
                self.order.append(h)
        self.members: Dict[str, List[int]] = {h: [r for r in range(size) if self.hosts[r] == h] for h in self.order}

    def transport(self, forced: Optional[str]) -> str:
        """Step 3, before any segment exists: "shm", "hier" or "torch"."""
        if forced is not None:
            return forced
        if len(self.order) == 1:
            return "shm"
        sizes = {len(m) for m in self.members.values()}
        if len(sizes) != 1 or next(iter(sizes)) < 2:
            return "torch"  # uneven hosts, or one rank per host: torch.distributed alone
        return "hier"
