"""One communicator per process group: made at the group's first collective, it picks the
transport and runs every call of the group through it, in call order.

  _rendezvous.py  who is where: the store-based setup and the choice of transport
  _shm.py         shared memory inside a host (the native collectives of csrc/comm)
  _torch.py       torch.distributed alone
  _hier.py        shared memory inside each host, torch.distributed between hosts
  _wire.py        the int8 wire format that the Python transports send

shm calls run on the caller's thread or, asynchronous ones, on the native communication thread;
hier and torch calls run inline or in order on one Python thread per group.

Lifetime: a communicator is made at its group's first use (each group's setup under its own lock)
and released with the group: when the group object goes (a weakref finalizer: after
destroy_process_group when nothing else holds it), or, for a destroyed group still referenced
somewhere, at the next first use of another group. Its segment, threads and descriptors go with it.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from . import _hier, _shm, _torch
from ._checks import COMPRESSIONS, DTYPES, KINDS, OP_NAME, OPS, dtype_code
from ._liveness import Heartbeat
from ._rendezvous import CommError, Members, Setup, comm_device, fail_comm, forced_transport, group_timeout_s

__all__ = ["Call", "CommError", "GroupComm", "fast_comms", "fast_shm", "get_comm", "remember_fast"]


@dataclass
class Call:
    """One collective call on contiguous CPU tensors (staged by the public function)."""
    kind: str                             # "all_reduce", "reduce_scatter", "all_gather", "broadcast"
    data: torch.Tensor                    # all_reduce, broadcast: reduced / overwritten in place; else the input
    out: Optional[torch.Tensor] = None    # reduce_scatter, all_gather: the output
    op: str = "sum"
    comp: Optional[str] = None
    block: int = 256
    root: int = 0                         # broadcast: the source's rank in the group

    @property
    def who(self) -> str:
        return f"ld.{self.kind}"


class _Slot:
    """A group's communicator, made at most once. Its setup runs under the slot's own lock, so the
    setups of two groups (first used from two threads, in any order on any rank) never wait for
    each other: only the dict of slots is behind the global lock."""

    def __init__(self, generation: int):
        self.lock = threading.Lock()
        self.generation = generation
        self.comm: Optional["GroupComm"] = None
        self.error: Optional[BaseException] = None
        self.released = False


# Slots by id(group): the group itself is held weakly, so that a destroyed group (and its Gloo
# threads and sockets) can go, and its communicator with it (_release).
_generations: Dict[str, int] = {}
_comms: Dict[int, _Slot] = {}
_comms_lock = threading.Lock()  # guards _comms, _generations and fast_comms; never held through a setup
# ld.all_reduce's fast path: the group argument as given (None, or id of the group) -> its shm
# communicator. Emptied of a communicator when it is released.
fast_comms: Dict[Optional[int], "GroupComm"] = {}
# (key, slot) of groups that went, to release outside _comms_lock (see _on_group_gone).
_gone: List = []


@contextlib.contextmanager
def _registry():
    """_comms_lock, then the releases that group finalizers left while it was held."""
    with _comms_lock:
        yield
    _release_gone()


def get_comm(group, who: str = OP_NAME) -> "GroupComm":
    key = id(group)
    with _registry():
        slot = _comms.get(key)
        if slot is None:
            _gone.extend(_destroyed_slots())
            name = getattr(group, "group_name", "") or "group"
            gen = _generations.get(name, 0)
            _generations[name] = gen + 1
            slot = _Slot(gen)
            _comms[key] = slot
            weakref.finalize(group, _on_group_gone, key, slot)
    comm = slot.comm
    if comm is not None:
        return comm
    with slot.lock:
        if slot.comm is None:
            if slot.error is not None:  # this very setup failed in another thread
                raise slot.error
            try:
                slot.comm = GroupComm(group, slot.generation, who)
            except BaseException as e:
                slot.error = e
                with _registry():  # the next call sets up afresh (a new generation)
                    if _comms.get(key) is slot:
                        del _comms[key]
                raise
            if slot.released:  # the group was destroyed meanwhile
                slot.comm.shutdown()
        return slot.comm


def remember_fast(key: Optional[int], comm: "GroupComm") -> None:
    with _registry():
        if not comm.closed:
            fast_comms[key] = comm


_FAST_CODES = {d: dtype_code(d) for d in DTYPES}


def fast_shm(tensor, group):
    """(communicator, dtype code) when a synchronous call on `tensor` may go straight to the native
    collective (small messages are all overhead): a contiguous CPU tensor of a supported dtype and
    a group whose shm communicator a checked call of this process remembered; otherwise None (the
    public function's full checks and staging)."""
    comm = fast_comms.get(None if group is None else id(group))
    if comm is None or type(tensor) is not torch.Tensor or tensor.layout is not torch.strided:
        return None
    code = _FAST_CODES.get(tensor.dtype)
    if (code is None or not tensor.is_cpu or not tensor.is_contiguous()
            or comm.group_ref() is not (group if group is not None else dist.GroupMember.WORLD)):
        return None
    return comm, code


def _destroyed_slots():
    """(key, slot) of groups that torch.distributed no longer knows (destroy_process_group) but that
    are still alive, held by someone (a model wrapper, a variable), so their finalizer has not run."""
    try:
        from torch.distributed import distributed_c10d as c10d

        live = {id(g) for g in c10d._world.pg_map}
    except Exception:  # noqa: BLE001 - a torch without this registry: groups go by their finalizer only
        return []
    return [(k, slot) for k, slot in _comms.items() if k not in live]


def _on_group_gone(key: int, slot: _Slot) -> None:
    """Finalizer of a process group object. It may run in any thread at any allocation (the cyclic
    garbage collector), even inside _comms_lock: it only queues the release, and releases at once
    when the lock is free; otherwise whoever holds the lock does on leaving it (_registry)."""
    _gone.append((key, slot))
    if _comms_lock.acquire(blocking=False):
        _comms_lock.release()
        _release_gone()


def _release_gone() -> None:
    while _gone:
        try:
            key, slot = _gone.pop()
        except IndexError:  # another thread took the last one
            return
        _release(key, slot)


def _release(key: int, slot: _Slot) -> None:
    """Shuts a group's communicator down and frees it (segment, threads, descriptors): when the
    group object goes (its finalizer) or once torch.distributed no longer knows it. torch offers no
    destroy callback for a process group; nothing of torch is patched."""
    with _comms_lock:
        slot.released = True  # (set before reading slot.comm; get_comm checks in the other order)
        if _comms.get(key) is slot:
            del _comms[key]
        comm = slot.comm
        for k in [k for k, c in fast_comms.items() if c is comm]:
            del fast_comms[k]
    if comm is not None:
        comm.shutdown()


def _shutdown_all() -> None:
    with _comms_lock:
        slots = list(_comms.items())
    for key, slot in slots:
        _release(key, slot)


atexit.register(_shutdown_all)


class GroupComm:
    def __init__(self, group, generation: int, who: str = OP_NAME):
        self.group_ref = weakref.ref(group)  # (a strong reference would keep a destroyed group alive)
        self.closed = False
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)] \
            if group is not dist.GroupMember.WORLD else list(range(self.size))
        self.timeout_s = group_timeout_s(group)
        self.comm_device = comm_device(group)
        self.shm = None          # native ShmComm of this host's ranks (shm, hier)
        self.n_hosts = 1
        self.local_size = 1      # this host's ranks of the group that share the segment (shm, hier)
        self.same_host: List[bool] = [False] * self.size
        self.pids: List[int] = []
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._store = None       # the setup's PrefixStore (heartbeats live there too)
        self.broken: Optional[str] = None  # why a torch.distributed collective failed (fatal)
        self.transport = self._setup(generation, who)
        # torch.distributed does not say which rank is missing when a collective fails: heartbeats do.
        self.heartbeat = None
        if self.transport in ("torch", "hier"):
            self.heartbeat = Heartbeat(self._store, self.rank, self.size,
                                       on_beat=self.shm.keep_alive if self.shm is not None else None)

    def _setup(self, generation: int, who: str) -> str:
        forced = forced_transport(who)
        if self.size == 1:
            return "single"
        setup = Setup(self.group, generation, self.timeout_s, who)
        self._store = setup.store
        m = Members(setup, self.rank, self.size, self.global_ranks, forced)
        self.pids, self.same_host, self.n_hosts = m.pids, m.same_host, len(m.order)
        transport = m.transport(forced)
        if transport == "torch":
            return "torch"
        mine = m.hosts[self.rank]
        local = list(range(self.size)) if transport == "shm" else m.members[mine]
        tag = "all" if transport == "shm" else f"host{m.order.index(mine)}"
        self.shm = _shm.open_segment(setup, tag, self.rank, local, self.global_ranks, self.timeout_s, forced)
        if self.shm is None:
            return "torch"
        self.local_size = len(local)
        if transport == "hier":
            # Between hosts, the ranks with my local index (one per host) exchange pieces of our
            # shard through all_to_all on the group itself.
            self.host_of = [m.order.index(h) for h in m.hosts]
            local_of = [m.members[m.hosts[r]].index(r) for r in range(self.size)]
            self.peers = [r for r in range(self.size) if local_of[r] == local_of[self.rank]]  # rank order
            self.host_index = m.order.index(mine)
        return transport

    @property
    def group(self):
        group = self.group_ref()
        if group is None or self.closed:
            raise fail_comm(OP_NAME, "the process group was destroyed")
        return group

    def shutdown(self) -> None:
        """Ends the communication threads (after the calls queued on them) and frees the segment
        and descriptors. Idempotent."""
        self.closed = True
        if getattr(self, "heartbeat", None) is not None:
            self.heartbeat.stop()
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.shutdown()  # the native ShmComm goes with its last reference (an in-flight call's)
        if self._executor is not None:  # (not waiting for itself, when a finalizer runs on it)
            self._executor.shutdown(wait=threading.current_thread() not in getattr(self._executor, "_threads", ()))

    # ---- calls ----
    def run(self, c: Call, async_op: bool, finish: Callable[[], None], result):
        """Runs the call `c`; `finish` then copies its result back to the user's tensor (when they
        differ). Returns None, or a Future of `result` for async_op."""
        if self.closed:
            raise fail_comm(c.who, "the process group was destroyed")
        if self.transport == "shm":
            args = dict(data=c.data.data_ptr(), n=c.data.numel(), dtype=dtype_code(c.data.dtype), op=OPS[c.op],
                        compression=COMPRESSIONS[c.comp], block=c.block, kind=KINDS[c.kind],
                        out=0 if c.out is None else c.out.data_ptr(), root=c.root, divisor=self.size)
            return _shm.call(self.shm, args, self.timeout_s, async_op, finish, result, keep=(c.data, c.out))
        fn = (_hier.CALLS if self.transport == "hier" else _torch.CALLS)[c.kind]
        return self._python_call(lambda: fn(self, c), async_op, finish, result)

    def _python_call(self, fn, async_op, finish, result):
        """hier / torch calls: inline, or in order on this group's Python communication thread."""
        with self._pending_lock:
            inline = not async_op and self._pending == 0
            if not inline:
                self._pending += 1
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lepton-comm")
        if inline:
            fn()
            finish()
            return None

        def task():
            try:
                fn()
                finish()
            finally:
                with self._pending_lock:
                    self._pending -= 1

        cf = self._executor.submit(task)
        if not async_op:
            cf.result()
            return None
        fut = torch.futures.Future()

        def relay(f) -> None:
            e = f.exception()
            if e is not None:
                fut.set_exception(e)
            else:
                fut.set_result(result)

        cf.add_done_callback(relay)
        return fut
