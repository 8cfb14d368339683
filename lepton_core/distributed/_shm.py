"""The shared-memory transport: one segment per (communicator, host), the native collectives of
csrc/comm (collectives.h) on it, asynchronous calls on the native communication thread.

Setup: the lowest rank of each host creates a segment under a fresh random name and publishes the
name in the store; the host's other ranks map it; every rank of the group reports whether it could;
if one could not, all fall back to torch.distributed together (with a RuntimeWarning), otherwise
everyone unlinks the name at once (csrc/comm/shm_segment.h).
"""
from __future__ import annotations

import os
import secrets
import warnings
from typing import List, Optional

import torch

from .. import _C
from ._rendezvous import CommError, Setup, fail_comm

# Shared-memory geometry, chosen by the segment's creator (the others read it back from the segment).
# Measured on 2 cores (bench/notes_allreduce.md): 256 KiB x 4 ring slots beat 64-128 KiB slots once
# other load shares the cores (fewer hand-offs, each of which may wait for the peer to be
# scheduled) and cost little when idle; the latency path wins up to ~64 KiB (up to 128 KiB with 2
# ranks, ~32 KiB with 4 oversubscribed ones).
RING_SLOT_BYTES = 256 << 10
RING_SLOTS = 4
LAT_BYTES = 64 << 10

SEGMENT_PREFIX = "lepton-"


def open_segment(setup: Setup, tag: str, rank: int, local: List[int], global_ranks: List[int],
                 timeout_s: float, forced: Optional[str]):
    """Maps this host's segment (the ranks `local` of the group share it). Every rank of the group
    then says whether it could; if one could not (no usable /dev/shm, or "one host" that is really
    several containers), all fall back to torch.distributed together (or raise, when
    LEPTON_TRANSPORT=shm). Returns the native ShmComm, or None when torch.distributed takes over."""
    local_rank, leader = local.index(rank), local[0]
    names = [global_ranks[r] for r in local]  # how the native layer names the ranks
    shm, problem = None, ""
    if rank == leader:
        _C.shm_sweep_orphans(prefix=SEGMENT_PREFIX)
        name = f"/{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            shm = _C.ShmComm(name=name, create=True, rank=local_rank, n_ranks=len(local), ring_slot_bytes=RING_SLOT_BYTES,
                             ring_slots=RING_SLOTS, lat_bytes=LAT_BYTES, rank_names=names)
            setup.put(f"{tag}/segment", name)
        except CommError as e:
            problem = str(e)
            setup.put(f"{tag}/segment", "!")
    else:
        name = setup.get(f"{tag}/segment", leader)
        if name == "!":
            problem = f"rank {global_ranks[leader]} could not create the segment"
        else:
            try:
                shm = _C.ShmComm(name=name, create=False, rank=local_rank, n_ranks=len(local),
                                 ring_slot_bytes=RING_SLOT_BYTES, ring_slots=RING_SLOTS, lat_bytes=LAT_BYTES,
                                 rank_names=names)
            except CommError as e:
                problem = str(e)
    try:
        setup.put(f"shm/{rank}", problem or "ok")
        statuses = [setup.get(f"shm/{r}", r) for r in range(len(global_ranks))]
    except BaseException:
        if shm is not None:
            shm.unlink()
        raise
    failed = [(r, st) for r, st in enumerate(statuses) if st != "ok"]
    if failed:
        if shm is not None:
            shm.unlink()
            shm.shutdown()
        r, why = failed[0]
        msg = f"shared memory is unusable on rank {global_ranks[r]}: {why}"
        if forced == "shm":
            raise fail_comm(setup.who, msg)
        warnings.warn(f"lepton_core.distributed: {msg}; using torch.distributed instead", RuntimeWarning,
                      stacklevel=5)
        return None
    shm.attach(timeout_s=timeout_s)  # everyone has mapped it: returns at once, after unlinking
    return shm


def call(shm, args: dict, timeout_s: float, async_op: bool, finish, result, keep):
    """Runs one native call (args: ShmComm.run's, but timeout_s) on this thread, after the calls
    queued before it; or queues it on the native thread and returns a Future of `result`, set
    once `finish` has copied the result back. `keep`: the tensors the call's pointers point into,
    held until it ends."""
    if not async_op:
        shm.run(**args, timeout_s=timeout_s)
        finish()
        return None
    fut = torch.futures.Future()

    def done(ok: bool, fatal: bool, err: str, keep=keep) -> None:  # runs on the native thread
        if not ok:
            fut.set_exception(CommError(err))
            return
        try:
            finish()
        except Exception as e:  # noqa: BLE001 - hand any failure to the future
            fut.set_exception(e)
            return
        fut.set_result(result)

    shm.submit(**args, timeout_s=timeout_s, callback=done)
    return fut
