"""One communicator per process group: rendezvous, host detection and the three transports.

Setup (at the group's first all-reduce; every rank of the group takes part):
  1. Each rank writes "<host id> <pid>" under the group's store; the host id is LEPTON_HOST_ID, or
     the host name plus the kernel's boot id (two containers on one machine share the boot id but
     may not share /dev/shm: set LEPTON_HOST_ID to tell them apart or together).
  2. Transport: "shm" when every rank is on one host, "hier" when the group spans hosts that each
     hold the same number (>= 2) of ranks, "torch" otherwise. LEPTON_TRANSPORT=shm|torch forces one
     (shm: all ranks must really share a host).
  3. shm / hier: the lowest rank of each host creates a segment under a fresh random name and
     publishes the name in the store; the host's other ranks map it; everyone unlinks it once all
     have mapped it (csrc/comm/shm_segment.h). hier also makes, with torch.distributed, the group
     of the ranks with this rank's local index on every host.

Calls: shm runs the native ring (csrc/comm/ring_allreduce.h), asynchronous calls on the native
communication thread. hier runs the native reduce-scatter inside the host, a torch.distributed
all-reduce of this rank's shard between hosts (int8: an all-gather of the quantized shards, summed in
host order), and the native all-gather inside the host. torch runs torch.distributed alone (16-bit
types in float32; int8: an all-gather of every rank's quantized input, summed in rank order). hier
and torch run asynchronous calls on one Python thread per group, in order.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import datetime
import os
import secrets
import socket
import threading
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import _C
from ._checks import COMPRESSIONS, KIND_ALL_GATHER, KIND_ALLREDUCE, KIND_REDUCE_SCATTER, OP_NAME, OPS, dtype_code

CommError = _C.CommError

# Shared-memory geometry (the same on every rank: read back from the segment by the others).
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
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s

    def put(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str, who: int) -> str:
        try:
            self.store.wait([key], self.timeout)
            return self.store.get(key).decode()
        except Exception as e:  # noqa: BLE001 - store errors come as RuntimeError/DistStoreError
            raise _fail_comm(f"rank {who} did not join the communicator setup within the timeout of "
                             f"{self.timeout_s:g} s ({type(e).__name__}: {e})") from None


_generations: Dict[str, int] = {}
_comms: Dict[object, "GroupComm"] = {}
_comms_lock = threading.Lock()


def get_comm(group) -> "GroupComm":
    with _comms_lock:
        comm = _comms.get(group)
        if comm is None:
            name = getattr(group, "group_name", "") or "group"
            gen = _generations.get(name, 0)
            _generations[name] = gen + 1
            comm = GroupComm(group, gen)
            _comms[group] = comm
        return comm


def _shutdown_all() -> None:
    with _comms_lock:
        comms = list(_comms.values())
        _comms.clear()
    for c in comms:
        c.shutdown()


atexit.register(_shutdown_all)


class GroupComm:
    def __init__(self, group, generation: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)] \
            if group is not dist.GroupMember.WORLD else list(range(self.size))
        self.timeout_s = group_timeout_s(group)
        self.shm = None          # native ShmComm of this host's ranks (shm, hier)
        self.cross = None        # hier: torch group of the ranks with my local index on every host
        self.n_hosts = 1
        self.local_size = 1
        self.local_rank = 0
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.transport = self._setup(generation)

    # ---- setup ----
    def _setup(self, generation: int) -> str:
        forced = forced_transport()
        if self.size == 1:
            return "single"
        setup = _Setup(self.group, generation, self.timeout_s)
        setup.put(f"rank{self.rank}", f"{host_id()}\n{os.getpid()}")
        hosts: List[str] = []
        for r in range(self.size):
            hosts.append(setup.get(f"rank{r}", r).split("\n")[0])
        order: List[str] = []
        for h in hosts:
            if h not in order:
                order.append(h)
        members = {h: [r for r in range(self.size) if hosts[r] == h] for h in order}
        self.n_hosts = len(order)
        if forced == "torch":
            return "torch"
        if forced == "shm" or self.n_hosts == 1:
            self._setup_shm(setup, "all", list(range(self.size)))
            return "shm"
        sizes = {len(m) for m in members.values()}
        if len(sizes) != 1 or next(iter(sizes)) < 2:
            return "torch"  # uneven hosts, or one rank per host: torch.distributed alone
        mine = members[hosts[self.rank]]
        self._setup_shm(setup, f"host{order.index(hosts[self.rank])}", mine)
        # The ranks with my local index on every host, in host order (use_local_synchronization:
        # only they take part in creating it).
        peers = [members[h][self.local_rank] for h in order]
        self.cross_ranks = peers
        self.cross = dist.new_group([self.global_ranks[r] for r in peers],
                                    timeout=datetime.timedelta(seconds=self.timeout_s),
                                    use_local_synchronization=True)
        return "hier"

    def _setup_shm(self, setup: _Setup, tag: str, local: List[int]) -> None:
        self.local_size = len(local)
        self.local_rank = local.index(self.rank)
        leader = local[0]
        if self.rank == leader:
            _C.shm_sweep_orphans(SEGMENT_PREFIX)
            name = f"/{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            shm = _C.ShmComm(name, True, self.local_rank, self.local_size, RING_SLOT_BYTES, RING_SLOTS, LAT_BYTES)
            setup.put(f"{tag}/segment", name)
        else:
            name = setup.get(f"{tag}/segment", leader)
            shm = _C.ShmComm(name, False, self.local_rank, self.local_size, RING_SLOT_BYTES, RING_SLOTS,
                             LAT_BYTES)
        shm.attach(self.timeout_s)
        self.shm = shm

    def shutdown(self) -> None:
        if self.shm is not None:
            self.shm.shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ---- calls ----
    def all_reduce(self, work: torch.Tensor, op: str, comp: Optional[str], block: int, async_op: bool,
                   finish: Callable[[], None], result: torch.Tensor):
        """Reduces the contiguous CPU tensor `work` in place; `finish` copies it back to the user's
        tensor (when they differ); returns None, or a Future of `result` for async_op."""
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
    def _dist(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CommError:
            raise
        except Exception as e:  # noqa: BLE001 - Gloo/NCCL report peers' failures as RuntimeError
            raise _fail_comm(f"torch.distributed {what} failed: {type(e).__name__}: {e}") from None

    def _check_headers(self, group, ranks: List[int], header: List[int]) -> torch.Tensor:
        """All-gathers a small int64 header across `group` (ranks: their ranks in this group) and
        raises CommError, the same on every rank, on the first field that differs from ranks[0]'s."""
        mine = torch.tensor(header, dtype=torch.int64)
        allh = torch.empty(len(ranks) * len(header), dtype=torch.int64)
        self._dist("header exchange", dist.all_gather_into_tensor, allh, mine, group=group)
        rows = allh.view(len(ranks), len(header)).tolist()
        names = ("numel", "dtype", "op", "compression", "block_size")
        for i, row in enumerate(rows[1:], start=1):
            for f, name in enumerate(names):
                if f == 4 and not (row[3] and rows[0][3]):
                    continue
                if row[f] != rows[0][f]:
                    v0, v = _field_text(name, rows[0][f]), _field_text(name, row[f])
                    raise _fail_comm(f"ranks disagree on {name}: rank {self.global_ranks[ranks[0]]} has {v0}, "
                                     f"rank {self.global_ranks[ranks[i]]} has {v}")
        return allh.view(len(ranks), len(header))

    def _torch_call(self, work, op, comp, block) -> None:
        header = [work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp], block]
        self._check_headers(self.group, list(range(self.size)), header)
        if work.numel() == 0:
            return
        if comp is None:
            acc = work if work.dtype not in (torch.float16, torch.bfloat16) else work.to(torch.float32)
            self._dist("all_reduce", dist.all_reduce, acc, _REDUCE_OPS[op], group=self.group)
            if op == "avg":
                acc.div_(self.size)
            if acc is not work:
                _narrow_into(work, acc, op, 1)
            return
        q, s = quantize_q8(work, block)
        qs = torch.empty(self.size * q.numel(), dtype=torch.int8)
        ss = torch.empty(self.size * s.numel(), dtype=torch.float32)
        self._dist("all_gather", dist.all_gather_into_tensor, qs, q, group=self.group)
        self._dist("all_gather", dist.all_gather_into_tensor, ss, s, group=self.group)
        gather_q8(work, qs.view(self.size, -1), ss.view(self.size, -1), block, self.size if op == "avg" else 1)

    def _hier_call(self, work, op, comp, block) -> None:
        n, dt, op_code, comp_code = work.numel(), dtype_code(work.dtype), OPS[op], COMPRESSIONS[comp]
        acc_dtype = torch.float32 if (comp or work.dtype in (torch.float16, torch.bfloat16)) else work.dtype
        b, e = self.shm.owned_range(n, dt, comp_code, block)
        shard = torch.empty(e - b, dtype=acc_dtype)
        # 1. Reduce-scatter inside the host (checks this host's ranks agree).
        local_error: Optional[BaseException] = None
        try:
            self.shm.run(work.data_ptr(), n, dt, op_code, comp_code, block, KIND_REDUCE_SCATTER,
                         shard.data_ptr(), self.size, self.timeout_s)
        except CommError as ex:
            local_error = ex
        # 2. Hosts agree? (every host's verdict travels with the header, so all ranks raise together)
        rows = self._check_headers(self.cross, self.cross_ranks,
                                   [n, dt, op_code, comp_code, block, int(local_error is not None)])
        if local_error is not None:
            raise local_error
        bad = [i for i, row in enumerate(rows.tolist()) if row[5]]
        if bad:
            who = self.global_ranks[self.cross_ranks[bad[0]]]
            raise _fail_comm(f"the ranks on the host of rank {who} failed this call (see the error there)")
        # 3. Reduce my shard between hosts.
        if shard.numel():
            if comp is None:
                self._dist("all_reduce", dist.all_reduce, shard, _REDUCE_OPS[op], group=self.cross)
            else:
                h = len(self.cross_ranks)
                q, s = quantize_q8(shard, block)
                qs = torch.empty(h * q.numel(), dtype=torch.int8)
                ss = torch.empty(h * s.numel(), dtype=torch.float32)
                self._dist("all_gather", dist.all_gather_into_tensor, qs, q, group=self.cross)
                self._dist("all_gather", dist.all_gather_into_tensor, ss, s, group=self.cross)
                gather_q8(shard, qs.view(h, -1), ss.view(h, -1), block, 1)
        # 4. All-gather inside the host (finishes avg and the rounding of 16-bit types).
        self.shm.run(work.data_ptr(), n, dt, op_code, comp_code, block, KIND_ALL_GATHER, shard.data_ptr(),
                     self.size, self.timeout_s)


def _field_text(name: str, v: int) -> str:
    if name == "dtype":
        from .._tensors import LP_DTYPE

        for k, code in LP_DTYPE.items():
            if code == v:
                return str(k).replace("torch.", "")
    if name == "op":
        return repr({c: o for o, c in OPS.items()}.get(v, v))
    if name == "compression":
        return repr({c: o for o, c in COMPRESSIONS.items()}.get(v, v))
    return str(v)


def _narrow_into(work: torch.Tensor, acc: torch.Tensor, op: str, n_ranks: int) -> None:
    """work = narrow(acc) with the kernels' rounding (one rounding from float32)."""
    _C.reduce_narrow(-1, work.data_ptr(), 0, acc.data_ptr(), work.numel(), dtype_code(work.dtype),
                     OPS["sum"] if op == "avg" else OPS[op], n_ranks)


def quantize_q8(x: torch.Tensor, block: int):
    """Blockwise int8 codes and float32 scales of a contiguous CPU tensor (csrc/cpu/reduce/reduce.h)."""
    n = x.numel()
    q = torch.empty(n, dtype=torch.int8)
    s = torch.empty((n + block - 1) // block, dtype=torch.float32)
    _C.q8_quantize(-1, q.data_ptr(), s.data_ptr(), x.data_ptr(), n, dtype_code(x.dtype), block)
    return q, s


def gather_q8(y: torch.Tensor, qs: torch.Tensor, ss: torch.Tensor, block: int, divisor: int) -> None:
    """y = (sum over rows k of D(qs[k], ss[k])) / divisor, summed in row order, rounded once."""
    _C.q8_gather(-1, y.data_ptr(), [qs[k].data_ptr() for k in range(qs.shape[0])],
                 [ss[k].data_ptr() for k in range(ss.shape[0])], y.numel(), dtype_code(y.dtype), block, divisor)
