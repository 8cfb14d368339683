"""One communicator per process group: rendezvous, host detection and the three transports.

Setup (at the group's first all-reduce; every rank of the group takes part, bounded by one timeout):
  1. Each rank writes "<host id> <pid> <LEPTON_TRANSPORT>" under the group's store; the host id is
     LEPTON_HOST_ID, or the host name plus the kernel's boot id (two containers on one machine share
     the boot id but may not share /dev/shm: set LEPTON_HOST_ID to tell them apart or together).
     Ranks that disagree on LEPTON_TRANSPORT raise CommError (rather than deadlock).
  2. Transport: "shm" when every rank is on one host, "hier" when the group spans hosts that each
     hold the same number (>= 2) of ranks, "torch" otherwise. LEPTON_TRANSPORT=shm|torch forces one
     (shm: all ranks must really share a host).
  3. shm / hier: the lowest rank of each host creates a segment under a fresh random name and
     publishes the name in the store; the host's other ranks map it; every rank reports whether it
     could; if one could not, all fall back to "torch" together (with a RuntimeWarning), otherwise
     everyone unlinks the name at once (csrc/comm/shm_segment.h).

Calls: shm runs the native ring (csrc/comm/ring_allreduce.h), asynchronous calls on the native
communication thread. hier runs the native reduce-scatter inside the host; then, between hosts,
all_to_all_single on the group itself sends piece h of this rank's shard to the rank with the same
local index on host h, which reduces the pieces in rank order, and a second all_to_all returns the
reduced pieces (int8: pieces travel quantized both ways); then the native all-gather inside the
host. torch runs torch.distributed alone (16-bit types in float32; int8: an all-gather of every
rank's quantized input, summed in rank order). hier and torch run asynchronous calls on one Python
thread per group, in order. A small header all-gather precedes hier and torch calls so that ranks
that disagree on the call raise CommError instead of corrupting or hanging a collective. When a
torch.distributed collective fails, heartbeats in the group's store name the missing rank
(_liveness.py); the communicator is then broken for good, and on the hierarchical path this host's
ranks are told through the segment at once.

Lifetime: a communicator is made at its group's first use (each group's setup under its own lock)
and released with the group: when the group object goes (a weakref finalizer: after
destroy_process_group when nothing else holds it), or, for a destroyed group still referenced
somewhere, at the next first use of another group. Its segment, threads and descriptors go with it.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import datetime
import os
import secrets
import socket
import threading
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import _C
from ._checks import COMPRESSIONS, KIND_ALL_GATHER, KIND_ALLREDUCE, KIND_REDUCE_SCATTER, OP_NAME, OPS, dtype_code
from ._liveness import Heartbeat

CommError = _C.CommError

# Shared-memory geometry, chosen by the segment's creator (the others read it back from the segment).
# Measured on 2 cores (bench/notes_allreduce.md): 256 KiB x 4 ring slots beat 64-128 KiB slots once
# other load shares the cores (fewer hand-offs, each of which may wait for the peer to be
# scheduled) and cost little when idle; the latency path wins up to ~64 KiB (up to 128 KiB with 2
# ranks, ~32 KiB with 4 oversubscribed ones).
RING_SLOT_BYTES = 256 << 10
RING_SLOTS = 4
LAT_BYTES = 64 << 10

SEGMENT_PREFIX = "lepton-"
DEFAULT_TIMEOUT_S = 1800.0

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}


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


def forced_transport() -> Optional[str]:
    value = os.environ.get("LEPTON_TRANSPORT", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("shm", "torch"):
        raise ValueError(f"{OP_NAME}: LEPTON_TRANSPORT must be 'shm' or 'torch', got {value!r}")
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
        from torch.distributed import distributed_c10d as c10d

        return float(c10d._get_process_group_store(group).timeout.total_seconds())
    except Exception:  # noqa: BLE001
        return DEFAULT_TIMEOUT_S


def _comm_device(group) -> torch.device:
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


def _fail_comm(msg: str) -> Exception:
    return CommError(f"{OP_NAME}: {msg}")


class _Setup:
    """Store-based rendezvous of one communicator (keys under lepton_core/<group>/<generation>/)."""

    def __init__(self, group, generation: int, timeout_s: float):
        name = getattr(group, "group_name", "") or "group"
        self.store = dist.PrefixStore(f"lepton_core/{name}/{generation}/", _group_store(group))
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s  # the whole setup is bounded by one timeout

    def put(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str, who: int) -> str:
        try:
            left = max(0.05, self.deadline - time.monotonic())
            self.store.wait([key], datetime.timedelta(seconds=left))
            return self.store.get(key).decode()
        except Exception as e:  # noqa: BLE001 - store errors come as RuntimeError/DistStoreError
            raise _fail_comm(f"rank {who} did not join the communicator setup within the timeout of "
                             f"{self.timeout_s:g} s ({type(e).__name__}: {e})") from None


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


def get_comm(group) -> "GroupComm":
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
                slot.comm = GroupComm(group, slot.generation)
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
    def __init__(self, group, generation: int):
        self.group_ref = weakref.ref(group)  # (a strong reference would keep a destroyed group alive)
        self.closed = False
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)] \
            if group is not dist.GroupMember.WORLD else list(range(self.size))
        self.timeout_s = group_timeout_s(group)
        self.comm_device = _comm_device(group)
        self.shm = None          # native ShmComm of this host's ranks (shm, hier)
        self.n_hosts = 1
        self.local_size = 1
        self.local_rank = 0
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._store = None       # the setup's PrefixStore (heartbeats live there too)
        self.broken: Optional[str] = None  # why a torch.distributed collective failed (fatal)
        self.transport = self._setup(generation)
        # torch.distributed does not say which rank is missing when a collective fails: heartbeats do.
        self.heartbeat = None
        if self.transport in ("torch", "hier"):
            self.heartbeat = Heartbeat(self._store, self.rank, self.size,
                                       on_beat=self.shm.keep_alive if self.shm is not None else None)

    # ---- setup ----
    def _setup(self, generation: int) -> str:
        forced = forced_transport()
        if self.size == 1:
            return "single"
        setup = _Setup(self.group, generation, self.timeout_s)
        self._store = setup.store
        setup.put(f"rank{self.rank}", f"{host_id()}\n{os.getpid()}\n{forced or 'auto'}\n{_pid_namespace()}")
        hosts: List[str] = []
        transports: List[str] = []
        self.pids: List[int] = []
        pidns: List[str] = []
        for r in range(self.size):
            fields = setup.get(f"rank{r}", r).split("\n")
            hosts.append(fields[0])
            self.pids.append(int(fields[1]))
            transports.append(fields[2])
            pidns.append(fields[3])
        # pids can be checked for the ranks in this pid namespace (same host, same container)
        self.same_host = [hosts[r] == hosts[self.rank] and pidns[r] == pidns[self.rank] for r in range(self.size)]
        for r in range(1, self.size):
            if transports[r] != transports[0]:  # would deadlock: fail on every rank instead
                raise _fail_comm(f"ranks disagree on LEPTON_TRANSPORT: rank {self.global_ranks[0]} has "
                                 f"{transports[0]!r}, rank {self.global_ranks[r]} has {transports[r]!r}")
        order: List[str] = []
        for h in hosts:
            if h not in order:
                order.append(h)
        members = {h: [r for r in range(self.size) if hosts[r] == h] for h in order}
        self.n_hosts = len(order)
        if forced == "torch":
            return "torch"
        if forced == "shm" or self.n_hosts == 1:
            return "shm" if self._setup_shm(setup, "all", list(range(self.size)), forced) else "torch"
        sizes = {len(m) for m in members.values()}
        if len(sizes) != 1 or next(iter(sizes)) < 2:
            return "torch"  # uneven hosts, or one rank per host: torch.distributed alone
        mine = members[hosts[self.rank]]
        if not self._setup_shm(setup, f"host{order.index(hosts[self.rank])}", mine, forced):
            return "torch"
        # Between hosts, the ranks with my local index (one per host) exchange pieces of our shard
        # through all_to_all on the group itself: no extra process group is made.
        self.host_of = [order.index(h) for h in hosts]
        self.local_of = [members[hosts[r]].index(r) for r in range(self.size)]
        self.peers = [r for r in range(self.size) if self.local_of[r] == self.local_rank]  # rank order
        self.host_index = order.index(hosts[self.rank])
        return "hier"

    def _setup_shm(self, setup: _Setup, tag: str, local: List[int], forced: Optional[str]) -> bool:
        """Maps this host's segment. Every rank of the group then says whether it could; if one
        could not (no usable /dev/shm, or "one host" that is really several containers), all fall
        back to torch.distributed together (or raise, when LEPTON_TRANSPORT=shm). Returns whether
        shared memory is in use."""
        self.local_size = len(local)
        self.local_rank = local.index(self.rank)
        leader = local[0]
        names = [self.global_ranks[r] for r in local]  # how the native layer names the ranks
        shm, problem = None, ""
        if self.rank == leader:
            _C.shm_sweep_orphans(SEGMENT_PREFIX)
            name = f"/{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            try:
                shm = _C.ShmComm(name, True, self.local_rank, self.local_size, RING_SLOT_BYTES, RING_SLOTS,
                                 LAT_BYTES, rank_names=names)
                setup.put(f"{tag}/segment", name)
            except CommError as e:
                problem = str(e)
                setup.put(f"{tag}/segment", "!")
        else:
            name = setup.get(f"{tag}/segment", leader)
            if name == "!":
                problem = f"rank {self.global_ranks[leader]} could not create the segment"
            else:
                try:
                    shm = _C.ShmComm(name, False, self.local_rank, self.local_size, RING_SLOT_BYTES,
                                     RING_SLOTS, LAT_BYTES, rank_names=names)
                except CommError as e:
                    problem = str(e)
        try:
            setup.put(f"shm/{self.rank}", problem or "ok")
            statuses = [setup.get(f"shm/{r}", r) for r in range(self.size)]
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
            msg = f"shared memory is unusable on rank {self.global_ranks[r]}: {why}"
            if forced == "shm":
                raise _fail_comm(msg)
            warnings.warn(f"lepton_core.distributed: {msg}; using torch.distributed instead", RuntimeWarning,
                          stacklevel=4)
            return False
        shm.attach(self.timeout_s)  # everyone has mapped it: returns at once, after unlinking
        self.shm = shm
        return True

    @property
    def group(self):
        group = self.group_ref()
        if group is None or self.closed:
            raise _fail_comm("the process group was destroyed")
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
    def all_reduce(self, work: torch.Tensor, op: str, comp: Optional[str], block: int, async_op: bool,
                   finish: Callable[[], None], result: torch.Tensor):
        """Reduces the contiguous CPU tensor `work` in place; `finish` copies it back to the user's
        tensor (when they differ); returns None, or a Future of `result` for async_op."""
        if self.closed:
            raise _fail_comm("the process group was destroyed")
        if self.transport == "shm":
            return self._shm_call(work, op, comp, block, async_op, finish, result)
        fn = self._hier_call if self.transport == "hier" else self._torch_call
        return self._python_call(lambda: fn(work, op, comp, block), async_op, finish, result)

    def _shm_call(self, work, op, comp, block, async_op, finish, result):
        args = (work.data_ptr(), work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp], block,
                KIND_ALLREDUCE, 0, self.size, self.timeout_s)
        if not async_op:
            self.shm.run(*args)
            finish()
            return None
        fut = torch.futures.Future()

        def done(ok: bool, fatal: bool, err: str, work=work) -> None:  # runs on the native thread
            if not ok:
                fut.set_exception(CommError(err))
                return
            try:
                finish()
            except Exception as e:  # noqa: BLE001 - hand any failure to the future
                fut.set_exception(e)
                return
            fut.set_result(result)

        self.shm.submit(*args, done)
        return fut

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

        def relay(c) -> None:
            e = c.exception()
            if e is not None:
                fut.set_exception(e)
            else:
                fut.set_result(result)

        cf.add_done_callback(relay)
        return fut

    # ---- torch.distributed pieces ----
    def _dist(self, what: str, fn, out: torch.Tensor, *args, **kwargs):
        """Runs a torch.distributed collective whose first argument `out` is written in place.
        Groups without a CPU backend (NCCL alone) get CUDA copies of the tensors."""
        try:
            if self.comm_device.type == "cpu":
                return fn(out, *args, **kwargs)
            dev_out = out.to(self.comm_device)
            dev_args = [a.to(self.comm_device) if isinstance(a, torch.Tensor) else a for a in args]
            fn(dev_out, *dev_args, **kwargs)
            out.copy_(dev_out)
            return None
        except CommError:
            raise
        except Exception as e:  # noqa: BLE001 - Gloo/NCCL report peers' failures as RuntimeError
            raise self._fault(what, e) from None

    def _fault(self, what: str, e: BaseException) -> Exception:
        """The CommError of a torch.distributed collective that failed, naming the rank(s) to blame:
        a dead process on this host, else what the heartbeats say (_liveness.py). The communicator
        cannot be used again; this host's shared-memory peers (hierarchical path) are told at once."""
        ranks, how = self._dead_local_ranks(), "died or exited"
        if not ranks:
            ranks, how = self.heartbeat.missing() if self.heartbeat is not None else ([], "")
        names = ", ".join(str(self.global_ranks[r]) for r in ranks)
        who = f"rank{'s' if len(ranks) > 1 else ''} {names} {how}; " if ranks else (f"{how}; " if how else "")
        msg = f"{OP_NAME}: {who}torch.distributed {what} failed: {type(e).__name__}: {e}"
        self.broken = msg
        if self.shm is not None:
            self.shm.abort(msg)
        return CommError(msg)

    def _begin_torch_call(self) -> None:
        """Start of a torch / hier call (on the thread that runs it, in call order)."""
        if self.broken is not None:
            raise _fail_comm(f"this process group's communicator failed earlier and cannot be used: {self.broken}")
        self.heartbeat.calls += 1

    def _dead_local_ranks(self) -> List[int]:
        """Ranks of this host whose process is gone (a zombie counts as gone): torch.distributed's
        errors do not say which peer failed."""
        dead = []
        for r in range(self.size):
            if r == self.rank or not getattr(self, "same_host", [False] * self.size)[r]:
                continue
            try:
                with open(f"/proc/{self.pids[r]}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    dead.append(r)
            except (OSError, IndexError):
                dead.append(r)
        return dead

    def _check_headers(self, header: List[int]) -> List[List[int]]:
        """All-gathers a small int64 header across the group and raises CommError, the same on
        every rank, on the first field that differs from rank 0's. Returns every rank's header."""
        mine = torch.tensor(header, dtype=torch.int64)
        allh = torch.empty(self.size * len(header), dtype=torch.int64)
        self._dist("header exchange", _all_gather_flat, allh, mine, self.group)
        rows = allh.view(self.size, len(header)).tolist()
        names = ("numel", "dtype", "op", "compression", "block_size")
        for i, row in enumerate(rows[1:], start=1):
            for f, name in enumerate(names):
                if name == "block_size" and not (row[3] and rows[0][3]):
                    continue
                if row[f] != rows[0][f]:
                    v0, v = _field_text(name, rows[0][f]), _field_text(name, row[f])
                    raise _fail_comm(f"ranks disagree on {name}: rank {self.global_ranks[0]} has {v0}, "
                                     f"rank {self.global_ranks[i]} has {v}")
        return rows

    def _torch_call(self, work, op, comp, block) -> None:
        self._begin_torch_call()
        self._check_headers([work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp], block])
        if work.numel() == 0:
            return
        if comp is None:
            acc = work if work.dtype not in (torch.float16, torch.bfloat16) else work.to(torch.float32)
            self._dist("all_reduce", dist.all_reduce, acc, _REDUCE_OPS[op], group=self.group)
            if op == "avg":
                acc.div_(self.size)
            if acc is not work:
                _narrow_into(work, acc)
            return
        # int8: everyone's quantized input to everyone, summed in rank order (the same bits everywhere)
        msg = pack_q8(work, block)
        msgs = torch.empty(self.size * msg.numel(), dtype=torch.uint8)
        self._dist("all_gather", _all_gather_flat, msgs, msg, self.group)
        gather_q8(work, list(msgs.view(self.size, -1)), block, self.size if op == "avg" else 1)

    def _hier_call(self, work, op, comp, block) -> None:
        self._begin_torch_call()
        n, dt, op_code, comp_code = work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp]
        acc_dtype = torch.float32 if (comp or work.dtype in (torch.float16, torch.bfloat16)) else work.dtype
        b, e = self.shm.owned_range(n, dt, comp_code, block)
        shard = torch.empty(e - b, dtype=acc_dtype)
        # 1. Reduce-scatter inside the host (also checks that this host's ranks agree).
        local_error: Optional[BaseException] = None
        try:
            self.shm.run(work.data_ptr(), n, dt, op_code, comp_code, block, KIND_REDUCE_SCATTER,
                         shard.data_ptr(), self.size, self.timeout_s)
        except CommError as ex:
            if self.shm.broken:  # a local rank is missing: no agreement between hosts is possible
                self.broken = str(ex)
                self.heartbeat.report_failure()
                raise
            local_error = ex  # a disagreement inside the host: all hosts raise together (step 2)
        # 2.-3. Between hosts. Marked in the segment, so that a local peer that times out waiting for
        #    this rank meanwhile gives it the time to name the missing rank (see ShmComm.set_remote).
        self.shm.set_remote(True)
        try:
            if not self._between_hosts(n, dt, op, op_code, comp, comp_code, block, shard, acc_dtype, local_error):
                return
        finally:
            self.shm.set_remote(False)
        # 4. All-gather inside the host (finishes avg and the rounding of 16-bit types).
        self.shm.run(work.data_ptr(), n, dt, op_code, comp_code, block, KIND_ALL_GATHER, shard.data_ptr(),
                     self.size, self.timeout_s)

    def _between_hosts(self, n, dt, op, op_code, comp, comp_code, block, shard, acc_dtype, local_error) -> bool:
        """Steps 2 and 3 of a hierarchical call (see _hier_call); False when there is nothing more to do."""
        # 2. Everyone agrees? Each rank's verdict travels with its header, so all raise together.
        rows = self._check_headers([n, dt, op_code, comp_code, block, int(local_error is not None)])
        if local_error is not None:
            raise local_error
        bad = [i for i, row in enumerate(rows) if row[5]]
        if bad:
            raise _fail_comm(f"rank {self.global_ranks[bad[0]]} failed this call inside its host "
                             "(see the error raised there)")
        if n == 0:
            return False
        # 3. Between hosts: my shard's piece h goes to the peer on host h, which reduces it in rank
        #    order; then every peer gets every reduced piece (all_to_all on the group, zero bytes to
        #    the ranks of other local indices).
        unit = block if comp else 1
        pieces = _split(shard.numel(), unit, self.n_hosts)
        mine = pieces[self.host_index]
        if comp is None:
            send = torch.cat([shard[pieces[self.host_of[k]][0]:pieces[self.host_of[k]][1]] for k in self.peers])
            recv = torch.empty(len(self.peers) * (mine[1] - mine[0]), dtype=acc_dtype)
            self._exchange(recv, send, lambda k: pieces[self.host_of[k]], lambda k: mine)
            parts = list(recv.view(len(self.peers), -1))
            reduced = parts[0].clone()
            for part in parts[1:]:
                _C.reduce_accumulate(-1, reduced.data_ptr(), reduced.data_ptr(), part.data_ptr(), reduced.numel(),
                                     dtype_code(acc_dtype), OPS["sum"] if op == "avg" else op_code)
            send = torch.cat([reduced] * len(self.peers))
            recv = torch.empty(shard.numel(), dtype=acc_dtype)
            self._exchange(recv, send, lambda k: mine, lambda k: pieces[self.host_of[k]])
            offs = _offsets([pieces[self.host_of[k]] for k in self.peers])
            for k, (o0, o1) in zip(self.peers, offs):
                p0, p1 = pieces[self.host_of[k]]
                shard[p0:p1] = recv[o0:o1]
        else:
            msgs = [pack_q8(shard[pieces[self.host_of[k]][0]:pieces[self.host_of[k]][1]], block) for k in self.peers]
            mine_bytes = q8_message_bytes(mine[1] - mine[0], block)
            recv = torch.empty(len(self.peers) * mine_bytes, dtype=torch.uint8)
            self._exchange(recv, torch.cat(msgs), lambda k: (0, msgs[self.peers.index(k)].numel()),
                           lambda k: (0, mine_bytes))
            reduced = torch.empty(mine[1] - mine[0], dtype=torch.float32)
            gather_q8(reduced, list(recv.view(len(self.peers), -1)), block, 1)
            msg = pack_q8(reduced, block)
            recv = torch.empty(sum(m.numel() for m in msgs), dtype=torch.uint8)
            self._exchange(recv, torch.cat([msg] * len(self.peers)), lambda k: (0, msg.numel()),
                           lambda k: (0, msgs[self.peers.index(k)].numel()))
            offs = _offsets([(0, m.numel()) for m in msgs])
            for k, (o0, o1) in zip(self.peers, offs):
                p0, p1 = pieces[self.host_of[k]]
                gather_q8(shard[p0:p1], [recv[o0:o1]], block, 1)
        return True

    def _exchange(self, recv, send, send_range, recv_range) -> None:
        """all_to_all_single on the group: to / from each peer k the sizes of send_range(k) /
        recv_range(k) ((begin, end) pairs), nothing to / from the other ranks."""
        in_splits = [0] * self.size
        out_splits = [0] * self.size
        for k in self.peers:
            a, b = send_range(k)
            in_splits[k] = b - a
            a, b = recv_range(k)
            out_splits[k] = b - a
        self._dist("all_to_all", dist.all_to_all_single, recv, send, out_splits, in_splits, group=self.group)


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


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp, group=group)
    else:
        dist.all_gather_into_tensor(out, inp, group=group)


def _field_text(name: str, v: int) -> str:
    if name == "dtype":
        from ._checks import LP_DTYPE

        for k, code in LP_DTYPE.items():
            if code == v:
                return str(k).replace("torch.", "")
    if name == "op":
        return repr({c: o for o, c in OPS.items()}.get(v, v))
    if name == "compression":
        return repr({c: o for o, c in COMPRESSIONS.items()}.get(v, v))
    return str(v)


def _narrow_into(work: torch.Tensor, acc: torch.Tensor) -> None:
    """work = acc rounded once to work's dtype (the kernels' rounding)."""
    _C.reduce_narrow(-1, work.data_ptr(), 0, acc.data_ptr(), work.numel(), dtype_code(work.dtype), OPS["sum"], 1)


# The int8 wire layout (csrc/common/codes.h): codes, then float32 scales at an aligned offset.
q8_message_bytes = _C.q8_message_bytes
_Q8_ALIGN = _C.codes["q8_scales_align"]


def q8_scales_offset(n: int) -> int:
    return -(-n // _Q8_ALIGN) * _Q8_ALIGN


def pack_q8(x: torch.Tensor, block: int) -> torch.Tensor:
    """The int8 message (uint8 bytes) of a contiguous CPU tensor."""
    n = x.numel()
    msg = torch.zeros(q8_message_bytes(n, block), dtype=torch.uint8)
    base = msg.data_ptr()
    _C.q8_quantize(-1, base, base + q8_scales_offset(n), x.data_ptr(), n, dtype_code(x.dtype), block)
    return msg


def gather_q8(y: torch.Tensor, msgs, block: int, divisor: int) -> None:
    """y = (sum of the messages' dequantized values, in order) / divisor, rounded once to y's dtype."""
    n = y.numel()
    off = q8_scales_offset(n)
    _C.q8_gather(-1, y.data_ptr(), [m.data_ptr() for m in msgs], [m.data_ptr() + off for m in msgs], n,
                 dtype_code(y.dtype), block, divisor)
