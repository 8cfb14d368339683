"""Attaches to shared-memory segments whose header, size, owner or mode were tampered with
(tests/test_distributed.py runs this in a subprocess, so a crash fails the test cleanly).

For each case, local rank 0 of a 2-rank communicator creates a real segment; the case then edits the
file in /dev/shm and local rank 1 maps it. Prints one JSON line per case, as soon as it is done:
{"case", "result": "CommError: ..." | "attached" | "skipped: ...", "sum_ok"}. A segment that maps
fine is then used for a ring all-reduce from two threads (where a trusted bad offset would crash).
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading

import torch

import lepton_core.distributed as ld
from lepton_core import _C
from lepton_core.distributed import _checks

SLOT_BYTES, SLOTS, LAT_BYTES = 256 << 10, 4, 64 << 10
# Byte offsets of SegHeader's fields (csrc/comm/transport.h).
MAGIC, N_RANKS, RING_SLOTS, RING_SLOT_BYTES, LAT, CTL_OFFSET, DATA_OFFSET, RANK_DATA_BYTES, TOTAL_BYTES = (
    0, 8, 12, 16, 24, 32, 40, 48, 56)


def put(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def get(path: str, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def size_of(path: str) -> int:
    return os.stat(path).st_size


CASES = {
    "untouched": lambda p: None,
    "ctl_offset past the end": lambda p: put(p, CTL_OFFSET, "<Q", 1 << 40),
    "data_offset near the end": lambda p: put(p, DATA_OFFSET, "<Q", size_of(p) - 4096),
    "ring slots larger than planned": lambda p: put(p, RING_SLOT_BYTES, "<Q", 4 * SLOT_BYTES),
    "latency slots larger than planned": lambda p: put(p, LAT, "<Q", 16 * LAT_BYTES),
    "rank data past the end": lambda p: put(p, RANK_DATA_BYTES, "<Q", 1 << 33),
    "no ring slots": lambda p: put(p, RING_SLOTS, "<i", 0),
    "one ring slot": lambda p: put(p, RING_SLOTS, "<i", 1),
    "negative ring slots": lambda p: put(p, RING_SLOTS, "<i", -4),
    "sizes that overflow": lambda p: (put(p, RING_SLOTS, "<i", (1 << 31) - 1), put(p, RING_SLOT_BYTES, "<Q", 1 << 62)),
    "tiny ring slots": lambda p: (put(p, RING_SLOT_BYTES, "<Q", 64)),
    "total past the end": lambda p: put(p, TOTAL_BYTES, "<Q", 2 * size_of(p)),
    "shorter than its header": lambda p: os.truncate(p, 40),
    "shorter than its layout": lambda p: os.truncate(p, size_of(p) // 2),
    "wrong rank count": lambda p: put(p, N_RANKS, "<i", 3),
    "wrong magic": lambda p: put(p, MAGIC, "<Q", 0),
    "writable by others": lambda p: os.chmod(p, 0o666),
    "writable by group": lambda p: os.chmod(p, 0o620),
    "owned by another user": lambda p: os.chown(p, 4242, -1),
}


def ring_all_reduce(comms) -> bool:
    """Both ranks reduce 1 Mi float32 (the ring path) from two threads; True when the sum is right."""
    n = 1 << 20
    xs = [torch.full((n,), float(r + 1)) for r in range(2)]
    errors = []

    def run(r):
        try:
            comms[r].run(data=xs[r].data_ptr(), n=n, dtype=_checks.dtype_code(torch.float32), op=_checks.OPS["sum"],
                         compression=0, block=256, kind=_checks.KIND_ALLREDUCE, out=0, root=0, divisor=2,
                         timeout_s=10.0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return not errors and all(bool((x == 3.0).all()) for x in xs)


def run_case(case: str, tamper) -> dict:
    if case == "owned by another user" and os.geteuid() != 0:
        return {"case": case, "result": "skipped: only root can give a file away"}
    name = f"/lepton-{os.getpid()}-crafted-{abs(hash(case)) % 10**8}"
    path = "/dev/shm" + name
    creator = _C.ShmComm(name, True, 0, 2, SLOT_BYTES, SLOTS, LAT_BYTES)
    out = {"case": case}
    try:
        if case == "untouched":  # the offsets above still describe the header
            out["header_ok"] = (get(path, MAGIC, "<Q") == 0x31474E4952504C4C and get(path, N_RANKS, "<i") == 2
                                and get(path, TOTAL_BYTES, "<Q") == size_of(path)
                                and get(path, RING_SLOTS, "<i") == SLOTS)
        tamper(path)
        try:
            peer = _C.ShmComm(name, False, 1, 2, SLOT_BYTES, SLOTS, LAT_BYTES)
        except ld.CommError as e:
            out["result"] = f"CommError: {e}"
            return out
        out["result"] = "attached"
        creator.attach(10.0)
        peer.attach(10.0)
        out["sum_ok"] = ring_all_reduce([creator, peer])
        peer.shutdown()
        return out
    finally:
        creator.unlink()
        creator.shutdown()


def main() -> None:
    for case, tamper in CASES.items():
        print(json.dumps(run_case(case, tamper)), flush=True)
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"lepton-{os.getpid()}-")]
    print(json.dumps({"case": "left in /dev/shm", "result": left}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
