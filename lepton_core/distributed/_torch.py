"""The torch.distributed transport: every collective through the group's own backend (Gloo or
NCCL), with lepton_core's arithmetic so that results keep the contract (API.md §3):
  all_reduce      16-bit types reduced in float32 and rounded once; int8: an all-gather of every
                  rank's quantized input, summed in rank order (the same bits everywhere);
  reduce_scatter  an all_to_all sends chunk c to rank c; rank r reduces the W pieces of its chunk
                  in rank order (int8: the pieces travel quantized), rounded once;
  all_gather      all_gather_into_tensor;   broadcast   broadcast.
A small header all-gather precedes every call so that ranks that disagree on the call raise
CommError instead of corrupting or hanging a collective. When a torch.distributed collective fails,
the rank to blame is found (a dead process on this host, else the heartbeats in the group's store,
_liveness.py) and the communicator is broken for good; on the hierarchical path this host's ranks
are told through the segment at once.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from .. import _C
from ._checks import COMPRESSIONS, KINDS, LP_DTYPE, OPS, dtype_code
from ._rendezvous import CommError, fail_comm
from ._wire import gather_q8, pack_q8, q8_message_bytes

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
HEADER_FIELDS = ("the collective", "numel", "dtype", "op", "compression", "block_size", "src")


def run(comm, fn, who: str, what: str, out: torch.Tensor, *args, **kwargs):
    """Runs a torch.distributed collective whose first argument `out` is written in place.
    Groups without a CPU backend (NCCL alone) get CUDA copies of the tensors."""
    try:
        if comm.comm_device.type == "cpu":
            return fn(out, *args, **kwargs)
        dev_out = out.to(comm.comm_device)
        dev_args = [a.to(comm.comm_device) if isinstance(a, torch.Tensor) else a for a in args]
        fn(dev_out, *dev_args, **kwargs)
        out.copy_(dev_out)
        return None
    except CommError:
        raise
    except Exception as e:  # noqa: BLE001 - Gloo/NCCL report peers' failures as RuntimeError
        raise fault(comm, who, what, e) from None


def fault(comm, who: str, what: str, e: BaseException) -> Exception:
    """The CommError of a torch.distributed collective that failed, naming the rank(s) to blame:
    a dead process on this host, else what the heartbeats say (_liveness.py). The communicator
    cannot be used again; this host's shared-memory peers (hierarchical path) are told at once."""
    ranks, how = dead_local_ranks(comm), "died or exited"
    if not ranks:
        ranks, how = comm.heartbeat.missing() if comm.heartbeat is not None else ([], "")
    names = ", ".join(str(comm.global_ranks[r]) for r in ranks)
    blame = f"rank{'s' if len(ranks) > 1 else ''} {names} {how}; " if ranks else (f"{how}; " if how else "")
    msg = f"{who}: {blame}torch.distributed {what} failed: {type(e).__name__}: {e}"
    comm.broken = msg
    if comm.shm is not None:
        comm.shm.abort(why=msg)
    return CommError(msg)


def begin(comm, who: str) -> None:
    """Start of a torch / hier call (on the thread that runs it, in call order)."""
    if comm.broken is not None:
        raise fail_comm(who, f"this process group's communicator failed earlier and cannot be used: {comm.broken}")
    comm.heartbeat.calls += 1


def dead_local_ranks(comm) -> List[int]:
    """Ranks of this host whose process is gone (a zombie counts as gone): torch.distributed's
    errors do not say which peer failed."""
    dead = []
    for r in range(comm.size):
        if r == comm.rank or not comm.same_host[r]:
            continue
        try:
            with open(f"/proc/{comm.pids[r]}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                dead.append(r)
        except (OSError, IndexError):
            dead.append(r)
    return dead


def check_headers(comm, c, extra=()) -> List[List[int]]:
    """All-gathers the call's header (HEADER_FIELDS, then `extra`) across the group and raises
    CommError, the same on every rank, on the first field that differs from rank 0's. Returns
    every rank's header."""
    header = [KINDS[c.kind], c.data.numel(), dtype_code(c.data.dtype), OPS[c.op], COMPRESSIONS[c.comp], c.block,
              c.root, *extra]
    mine = torch.tensor(header, dtype=torch.int64)
    allh = torch.empty(comm.size * len(header), dtype=torch.int64)
    run(comm, all_gather_flat, c.who, "header exchange", allh, mine, comm.group)
    rows = allh.view(comm.size, len(header)).tolist()
    for i, row in enumerate(rows[1:], start=1):
        for f, name in enumerate(HEADER_FIELDS):
            if name == "block_size" and not (row[4] and rows[0][4]):
                continue
            if row[f] != rows[0][f]:
                v0, v = _field_text(comm, name, rows[0][f]), _field_text(comm, name, row[f])
                raise fail_comm(c.who, f"ranks disagree on {name}: rank {comm.global_ranks[0]} has {v0}, "
                                       f"rank {comm.global_ranks[i]} has {v}")
    return rows


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp, group=group)
    else:
        dist.all_gather_into_tensor(out, inp, group=group)


def _field_text(comm, name: str, v: int) -> str:
    if name == "the collective":
        return {k: f"ld.{n}" for n, k in KINDS.items()}.get(v, str(v))
    if name == "dtype":
        for k, code in LP_DTYPE.items():
            if code == v:
                return str(k).replace("torch.", "")
    if name == "op":
        return repr({c: o for o, c in OPS.items()}.get(v, v))
    if name == "compression":
        return repr({c: o for o, c in COMPRESSIONS.items()}.get(v, v))
    if name == "src":
        return f"rank {comm.global_ranks[v]}" if 0 <= v < comm.size else str(v)
    return str(v)


def narrow_into(work: torch.Tensor, acc: torch.Tensor) -> None:
    """work = acc rounded once to work's dtype (the kernels' rounding)."""
    _C.reduce_narrow(isa=-1, y=work.data_ptr(), y2=0, acc=acc.data_ptr(), n=work.numel(), dtype=dtype_code(work.dtype),
                     op=OPS["sum"], n_ranks=1)


# ---- the collectives (c: a _comm.Call whose tensors are contiguous CPU tensors) ----
def all_reduce(comm, c) -> None:
    begin(comm, c.who)
    check_headers(comm, c)
    work = c.data
    if work.numel() == 0:
        return
    if c.comp is None:
        acc = work if work.dtype not in (torch.float16, torch.bfloat16) else work.to(torch.float32)
        run(comm, dist.all_reduce, c.who, "all_reduce", acc, _REDUCE_OPS[c.op], group=comm.group)
        if c.op == "avg":
            acc.div_(comm.size)
        if acc is not work:
            narrow_into(work, acc)
        return
    msg = pack_q8(work, c.block)
    msgs = torch.empty(comm.size * msg.numel(), dtype=torch.uint8)
    run(comm, all_gather_flat, c.who, "all_gather", msgs, msg, comm.group)
    gather_q8(work, list(msgs.view(comm.size, -1)), c.block, comm.size if c.op == "avg" else 1)


def reduce_scatter(comm, c) -> None:
    begin(comm, c.who)
    check_headers(comm, c)
    w, m = comm.size, c.out.numel()
    if m == 0:
        return
    if c.comp is None:
        recv = torch.empty_like(c.data)
        run(comm, dist.all_to_all_single, c.who, "all_to_all", recv, c.data, group=comm.group)
        _C.reduce_gather(isa=-1, y=c.out.data_ptr(), srcs=[p.data_ptr() for p in recv.view(w, m)], n=m,
                         dtype=dtype_code(c.out.dtype), op=OPS[c.op], n_ranks=w)
        return
    send = torch.cat([pack_q8(chunk, c.block) for chunk in c.data.view(w, m)])
    recv = torch.empty(w * q8_message_bytes(m, c.block), dtype=torch.uint8)
    run(comm, dist.all_to_all_single, c.who, "all_to_all", recv, send, group=comm.group)
    gather_q8(c.out, list(recv.view(w, -1)), c.block, w if c.op == "avg" else 1)


def all_gather(comm, c) -> None:
    begin(comm, c.who)
    check_headers(comm, c)
    if c.data.numel():
        run(comm, all_gather_flat, c.who, "all_gather", c.out, c.data, comm.group)


def broadcast(comm, c) -> None:
    begin(comm, c.who)
    check_headers(comm, c)
    if c.data.numel():
        run(comm, dist.broadcast, c.who, "broadcast", c.data, comm.global_ranks[c.root], group=comm.group)


CALLS = {"all_reduce": all_reduce, "reduce_scatter": reduce_scatter, "all_gather": all_gather,
         "broadcast": broadcast}
