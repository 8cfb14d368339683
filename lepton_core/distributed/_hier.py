"""The hierarchical transport (a group spanning hosts that each hold the same number >= 2 of ranks).

all_reduce: the native reduce-scatter inside the host (HOST_REDUCE_SCATTER, exact partial sums of
this rank's shard); then, between hosts, all_to_all_single on the group itself sends piece h of this
rank's shard to the rank with the same local index on host h, which reduces the pieces in rank
order, and a second all_to_all returns the reduced pieces (int8: pieces travel quantized both ways);
then the native all-gather inside the host (HOST_ALL_GATHER). No extra process group is made.
reduce_scatter, all_gather and broadcast run as on the torch transport (_torch.py), across the
whole group. Calls run inline, or in order on the group's Python communication thread.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import _C
from . import _torch
from ._checks import COMPRESSIONS, KIND_HOST_ALL_GATHER, KIND_HOST_REDUCE_SCATTER, OPS, dtype_code
from ._rendezvous import CommError, fail_comm
from ._wire import gather_q8, pack_q8, q8_message_bytes


def all_reduce(comm, c) -> None:
    _torch.begin(comm, c.who)
    work, op, comp, block = c.data, c.op, c.comp, c.block
    n, dt, op_code, comp_code = work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp]
    acc_dtype = torch.float32 if (comp or work.dtype in (torch.float16, torch.bfloat16)) else work.dtype
    b, e = comm.shm.owned_range(n_elems=n, dtype=dt, compression=comp_code, block_elems=block)
    shard = torch.empty(e - b, dtype=acc_dtype)
    args = dict(data=work.data_ptr(), n=n, dtype=dt, op=op_code, compression=comp_code, block=block,
                out=shard.data_ptr(), root=0, divisor=comm.size, timeout_s=comm.timeout_s)
    # 1. Reduce-scatter inside the host (also checks that this host's ranks agree).
    local_error: Optional[BaseException] = None
    try:
        comm.shm.run(kind=KIND_HOST_REDUCE_SCATTER, **args)
    except CommError as ex:
        if comm.shm.broken:  # a local rank is missing: no agreement between hosts is possible
            comm.broken = str(ex)
            comm.heartbeat.report_failure()
            raise
        local_error = ex  # a disagreement inside the host: all hosts raise together (step 2)
    # 2.-3. Between hosts. Marked in the segment, so that a local peer that times out waiting for
    #    this rank meanwhile gives it the time to name the missing rank (see ShmComm.set_remote).
    comm.shm.set_remote(inside=True)
    try:
        if not _between_hosts(comm, c, shard, acc_dtype, local_error):
            return
    finally:
        comm.shm.set_remote(inside=False)
    # 4. All-gather inside the host (finishes avg and the rounding of 16-bit types).
    comm.shm.run(kind=KIND_HOST_ALL_GATHER, **args)


def _between_hosts(comm, c, shard, acc_dtype, local_error) -> bool:
    """Steps 2 and 3 of all_reduce; False when there is nothing more to do."""
    # 2. Everyone agrees? Each rank's verdict travels with its header, so all raise together.
    rows = _torch.check_headers(comm, c, extra=[int(local_error is not None)])
    if local_error is not None:
        raise local_error
    bad = [i for i, row in enumerate(rows) if row[-1]]
    if bad:
        raise fail_comm(c.who, f"rank {comm.global_ranks[bad[0]]} failed this call inside its host "
                               "(see the error raised there)")
    if c.data.numel() == 0:
        return False
    # 3. Between hosts: my shard's piece h goes to the peer on host h, which reduces it in rank
    #    order; then every peer gets every reduced piece (all_to_all on the group, zero bytes to
    #    the ranks of other local indices).
    block, op = c.block, c.op
    pieces = _split(shard.numel(), block if c.comp else 1, comm.n_hosts)
    mine = pieces[comm.host_index]
    piece_of = {k: pieces[comm.host_of[k]] for k in comm.peers}
    if c.comp is None:
        send = torch.cat([shard[piece_of[k][0]:piece_of[k][1]] for k in comm.peers])
        recv = torch.empty(len(comm.peers) * (mine[1] - mine[0]), dtype=acc_dtype)
        _exchange(comm, c.who, recv, send, lambda k: piece_of[k], lambda k: mine)
        parts = list(recv.view(len(comm.peers), -1))
        reduced = parts[0].clone()
        for part in parts[1:]:
            _C.reduce_accumulate(isa=-1, out=reduced.data_ptr(), in_=reduced.data_ptr(), x=part.data_ptr(),
                                 n=reduced.numel(), dtype=dtype_code(acc_dtype),
                                 op=OPS["sum"] if op == "avg" else OPS[op])
        send = torch.cat([reduced] * len(comm.peers))
        recv = torch.empty(shard.numel(), dtype=acc_dtype)
        _exchange(comm, c.who, recv, send, lambda k: mine, lambda k: piece_of[k])
        for k, (o0, o1) in zip(comm.peers, _offsets([piece_of[k] for k in comm.peers])):
            shard[piece_of[k][0]:piece_of[k][1]] = recv[o0:o1]
    else:
        msgs = [pack_q8(shard[piece_of[k][0]:piece_of[k][1]], block) for k in comm.peers]
        mine_bytes = q8_message_bytes(mine[1] - mine[0], block)
        recv = torch.empty(len(comm.peers) * mine_bytes, dtype=torch.uint8)
        _exchange(comm, c.who, recv, torch.cat(msgs), lambda k: (0, msgs[comm.peers.index(k)].numel()),
                  lambda k: (0, mine_bytes))
        reduced = torch.empty(mine[1] - mine[0], dtype=torch.float32)
        gather_q8(reduced, list(recv.view(len(comm.peers), -1)), block, 1)
        msg = pack_q8(reduced, block)
        recv = torch.empty(sum(m.numel() for m in msgs), dtype=torch.uint8)
        _exchange(comm, c.who, recv, torch.cat([msg] * len(comm.peers)), lambda k: (0, msg.numel()),
                  lambda k: (0, msgs[comm.peers.index(k)].numel()))
        for k, (o0, o1) in zip(comm.peers, _offsets([(0, m.numel()) for m in msgs])):
            gather_q8(shard[piece_of[k][0]:piece_of[k][1]], [recv[o0:o1]], block, 1)
    return True


def _exchange(comm, who: str, recv, send, send_range, recv_range) -> None:
    """all_to_all_single on the group: to / from each peer k the sizes of send_range(k) /
    recv_range(k) ((begin, end) pairs), nothing to / from the other ranks."""
    in_splits = [0] * comm.size
    out_splits = [0] * comm.size
    for k in comm.peers:
        a, b = send_range(k)
        in_splits[k] = b - a
        a, b = recv_range(k)
        out_splits[k] = b - a
    _torch.run(comm, dist.all_to_all_single, who, "all_to_all", recv, send, out_splits, in_splits, group=comm.group)


def _split(n: int, unit: int, parts: int):
    """[begin, end) of `parts` balanced pieces of n elements, cut at multiples of `unit`."""
    n_units = (n + unit - 1) // unit
    return [(min(n_units * i // parts * unit, n), min(n_units * (i + 1) // parts * unit, n)) for i in range(parts)]


def _offsets(ranges):
    out, off = [], 0
    for a, b in ranges:
        out.append((off, off + b - a))
        off += b - a
    return out


CALLS = dict(_torch.CALLS, all_reduce=all_reduce)
