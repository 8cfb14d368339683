"""The jobs of tests/test_distributed.py, one function per job, run on every rank (worker.py).

Every input is a deterministic function of (seed, case, rank), so each rank rebuilds every other
rank's input and checks its own result against a float64 (or exact integer) reference. Results are
also hashed into ctx.record["hashes"] so the parent can check that all ranks hold the same bits.
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import lepton_core.distributed as ld
from lepton_core.distributed import _comm, _shm

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTS = (torch.int32, torch.int64)
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def _bits(t: torch.Tensor) -> str:
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return "empty"
    return hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def make_input(seed: int, case: int, rank: int, dtype, n: int) -> torch.Tensor:
    """Distinct values per rank and element (a misplaced chunk or rank shows)."""
    g = torch.Generator().manual_seed(seed * 100003 + case * 101 + rank)
    if dtype in INTS:
        span = 1 << 20 if dtype == torch.int32 else 1 << 40
        v = torch.randint(-span, span, (n,), generator=g, dtype=torch.int64)
        return (v - v % 8 + rank).to(dtype)  # rank in the low bits: all ranks differ everywhere
    return (torch.randn(n, generator=g, dtype=torch.float64) * 10 + rank).to(dtype)


def reference(xs, op: str):
    """Exact (ints, max/min) reference of the reduction of the ranks' inputs; for float sum/avg a
    NumPy long double (64-bit mantissa on x86, 113 on aarch64) array: a float64 sum of float64
    inputs would carry the same rounding error as the kernel under test, eating its bound."""
    dtype = xs[0].dtype
    if op in ("max", "min"):
        st = torch.stack(xs)
        return (st.max(0).values if op == "max" else st.min(0).values)
    if dtype in INTS:
        return torch.stack([x.to(torch.int64) for x in xs]).sum(0).to(dtype)
    s = sum(x.to(torch.float64).numpy().astype(np.longdouble) for x in xs)
    return s / len(xs) if op == "avg" else s


def abs_err(got: torch.Tensor, exact) -> torch.Tensor:
    """|got - exact| as float64, the difference taken in long double."""
    return torch.from_numpy(np.abs(got.to(torch.float64).numpy().astype(np.longdouble) - exact).astype(np.float64))


def check_close(got: torch.Tensor, xs, op: str, what: str) -> None:
    """Exact for ints and max/min; otherwise within the derived bound of a sum of W float terms in
    the accumulator (float32 for 16-bit types, W - 1 additions, each <= u_acc * partial) plus one
    rounding to the dtype (u_dtype * |result|) and, for avg, one division (u_acc * |result|)."""
    ref = reference(xs, op)
    dtype, w = got.dtype, len(xs)
    if dtype in INTS or op in ("max", "min"):
        assert torch.equal(got, ref.to(dtype)), f"{what}: not exact"
        return
    u_acc = U[torch.float64] if dtype == torch.float64 else U[torch.float32]
    abs_sum = torch.stack([x.to(torch.float64).abs() for x in xs]).sum(0)
    if op == "avg":
        abs_sum = abs_sum / w
    ref_abs = torch.from_numpy(np.abs(ref).astype(np.float64))
    tol = (w - 1) * u_acc * abs_sum * 1.01 + (U[dtype] + u_acc) * ref_abs * 1.01
    err = abs_err(got, ref)
    assert bool((err <= tol).all()), f"{what}: max err {float((err - tol).max())} over the bound"


def q8_bound(xs, block: int, op: str) -> torch.Tensor:
    """API.md §3: |result - exact sum| <= (W + 1) / 254 * sum_r m_r * (1 + W / 127), m_r = largest
    |x| of rank r in the element's block; plus the float32 arithmetic (inputs rounded to float32,
    the adds, the scale divisions and products: a few u32 * sum |x| per hop)."""
    w, n = len(xs), xs[0].numel()
    m = torch.zeros(n, dtype=torch.float64)
    abs_sum = torch.zeros(n, dtype=torch.float64)
    for x in xs:
        a = x.to(torch.float64).abs()
        abs_sum += a
        nb = (n + block - 1) // block
        pad = torch.zeros(nb * block, dtype=torch.float64)
        pad[:n] = a
        m += pad.view(nb, block).max(1).values.repeat_interleave(block)[:n]
    bound = (w + 1) / 254 * m * (1 + w / 127) + 8 * w * U[torch.float32] * abs_sum
    return bound / w if op == "avg" else bound


def _comm_of(group):
    return _comm.get_comm(group if group is not None else dist.group.WORLD)


def run_cases(ctx, group, tag: str, full: bool) -> None:
    """Every dtype x op x count on `group` (all ranks of the job)."""
    seed, r = ctx.args["seed"], dist.get_rank(group)
    w = dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    sizes = [0, 1, 7, 16 * w - 1, 33, 257, 1000, 16411, 70001]
    if full:
        sizes += [300007]
    case = 0
    for dtype in FLOATS + INTS:
        ops = ["sum", "max", "min"] + (["avg"] if dtype in FLOATS else [])
        for op in ops:
            for n in sizes:
                case += 1
                xs = [make_input(seed, case, k, dtype, n) for k in range(w)]
                t = xs[r].clone()
                out = ld.all_reduce(t, op, group=group)
                assert out is t
                what = f"{tag} {dtype} {op} n={n}"
                check_close(t, xs, op, what)
                hashes[what] = _bits(t)
    # A few MiB, and the same call twice: the same bits (reproducible).
    n = 3 * (1 << 20) // 4 + 5 if full else 100003
    xs = [make_input(seed, 999, k, torch.float32, n) for k in range(w)]
    a, b = xs[r].clone(), xs[r].clone()
    ld.all_reduce(a, group=group)
    ld.all_reduce(b, group=group)
    check_close(a, xs, "sum", f"{tag} large")
    assert torch.equal(a, b), "two identical calls gave different bits"
    hashes[f"{tag} large"] = _bits(a)


def run_views(ctx, group, tag: str) -> None:
    """Non-contiguous and expanded tensors are reduced in place; the rest of the base is untouched."""
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    for case, (shape, make_view) in enumerate([
        ((37, 29), lambda b: b.t()),
        ((64, 33), lambda b: b[:, 3:30:2]),
        ((5, 6, 7), lambda b: b.permute(2, 0, 1)[1:, :, ::3]),
    ]):
        n = 1
        for s in shape:
            n *= s
        bases = [make_input(seed, 500 + case, k, torch.float32, n).view(shape) for k in range(w)]
        base = bases[r].clone()
        before = base.clone()
        view = make_view(base)
        ld.all_reduce(view, group=group)
        check_close(view.reshape(-1), [make_view(b).reshape(-1) for b in bases], "sum", f"{tag} view {case}")
        mask = torch.ones_like(base, dtype=torch.bool)
        make_view(mask).fill_(False)
        assert torch.equal(base[mask], before[mask]), "elements outside the view changed"
        hashes[f"{tag} view {case}"] = _bits(view)
    # An expanded tensor (stride 0): every element is the one shared value, reduced.
    e = torch.full((1,), float(r + 1)).expand(6)
    ld.all_reduce(e, group=group)
    assert torch.equal(e, torch.full((6,), float(w * (w + 1) / 2)))


def run_async(ctx, group, tag: str) -> None:
    """async_op=True: a Future of the tensor, in order with synchronous calls."""
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    sizes = [5, 40000, 300001, 17]
    inputs = [[make_input(seed, 700 + i, k, torch.float32, n) for k in range(w)] for i, n in enumerate(sizes)]
    ts = [xs[r].clone() for xs in inputs]
    futs = [ld.all_reduce(ts[0], async_op=True, group=group), ld.all_reduce(ts[1], "avg", async_op=True, group=group)]
    ld.all_reduce(ts[2], group=group)  # synchronous, after the two queued ones
    futs.append(ld.all_reduce(ts[3], "max", async_op=True, group=group))
    for f, t in zip(futs, [ts[0], ts[1], ts[3]]):
        assert isinstance(f, torch.futures.Future)
        assert f.wait() is t
    for i, op in enumerate(["sum", "avg", "sum", "max"]):
        check_close(ts[i], inputs[i], op, f"{tag} async {i}")
        hashes[f"{tag} async {i}"] = _bits(ts[i])


def run_compression(ctx, group, tag: str) -> None:
    """int8: within the contract's bound, the same bits on every rank, 3.5x fewer bytes per hop."""
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    case = 800
    for dtype in FLOATS:
        for op in ("sum", "avg"):
            for n, block in [(1, 256), (1000, 32), (70001, 256), (300007, 4096)]:
                case += 1
                xs = [make_input(seed, case, k, dtype, n) for k in range(w)]
                # blocks of very different magnitudes
                for k in range(w):
                    xs[k][: n // 3] *= 1e-3
                t = xs[r].clone()
                ld.all_reduce(t, op, compression="int8", block_size=block, group=group)
                err = abs_err(t, reference(xs, op))
                bound = q8_bound(xs, block, op)
                assert bool((err <= bound).all()), f"{tag} int8 {dtype} {op} n={n}: over the bound by {float((err - bound).max())}"
                hashes[f"{tag} int8 {dtype} {op} {n}"] = _bits(t)


def run_mismatch(ctx, group, tag: str) -> None:
    """Disagreeing ranks: CommError on every rank, naming the field; the next call works."""
    r, w = dist.get_rank(group), dist.get_world_size(group)
    msgs = ctx.record.setdefault("mismatch", {})
    cases = {
        "numel": lambda: ld.all_reduce(torch.ones(10 + (r == w - 1)), group=group),
        "dtype": lambda: ld.all_reduce(torch.ones(10, dtype=torch.float64 if r == 0 else torch.float32), group=group),
        "op": lambda: ld.all_reduce(torch.ones(100000), "max" if r == 1 else "sum", group=group),
    }
    record_mismatches(msgs, tag, cases, lambda: _all_reduce_works(group, w))


def _all_reduce_works(group, w: int) -> None:
    t = torch.full((3,), 1.0)
    ld.all_reduce(t, group=group)
    assert torch.equal(t, torch.full((3,), float(w)))


def record_mismatches(msgs: dict, tag: str, cases: dict, after) -> None:
    """Runs each call of `cases` (field -> call that ranks disagree on), expecting CommError (kept in
    msgs["<tag> <field>"]), and after each a call that must work again."""
    for field, call in cases.items():
        try:
            call()
        except ld.CommError as e:
            msgs[f"{tag} {field}"] = str(e)
        else:
            raise AssertionError(f"{tag}: mismatched {field} did not raise")
        after()


def run_shm_fallback(ctx) -> None:
    """A rank that cannot map the segment (simulated): every rank falls back to torch.distributed
    together, with a RuntimeWarning, and results stay right."""
    import warnings

    w, r = ctx.world, ctx.rank
    g = dist.new_group(list(range(w)))
    real = _shm._C.ShmComm

    def broken(*args, **kwargs):
        raise ld.CommError("simulated: no usable /dev/shm here")

    if r == w - 1:
        _shm._C.ShmComm = broken
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = torch.full((1000,), float(r))
            ld.all_reduce(t, group=g)
    finally:
        _shm._C.ShmComm = real
    assert torch.equal(t, torch.full((1000,), float(w * (w - 1) / 2)))
    ctx.record["fallback"] = {"transport": _comm_of(g).transport,
                              "warnings": [str(x.message) for x in caught if x.category is RuntimeWarning]}



def _transport_checks(ctx, w, name, *checks):
    """A new group of every rank (its transport chosen by the environment now), the basic cases on it,
    then each of `checks`; records the transport it got under `name`."""
    g = dist.new_group(list(range(w)))
    run_cases(ctx, g, name, full=False)
    for check in checks:
        check(ctx, g, name)
    ctx.record["transport"][name] = _comm_of(g).transport

def correctness(ctx) -> None:
    w = ctx.world
    world = dist.group.WORLD
    run_cases(ctx, world, "shm", full=True)
    run_views(ctx, world, "shm")
    run_async(ctx, world, "shm")
    run_compression(ctx, world, "shm")
    run_mismatch(ctx, world, "shm")
    ctx.record["transport"] = {"shm": _comm_of(world).transport}
    run_shm_fallback(ctx)
    # Groups of one rank (world size 1) and, with 3+ ranks, a subgroup.
    singles = [dist.new_group([k]) for k in range(w)]
    t = torch.arange(5.0)
    assert ld.all_reduce(t, "avg", group=singles[ctx.rank]) is t and torch.equal(t, torch.arange(5.0))
    if w >= 3:
        sub = dist.new_group([0, w - 1])
        if ctx.rank in (0, w - 1):
            t = torch.full((1000,), float(ctx.rank))
            ld.all_reduce(t, group=sub)
            assert torch.equal(t, torch.full((1000,), float(w - 1)))
    if ctx.args.get("transports"):
        # torch.distributed alone (the variable is read when the group's communicator is made)
        os.environ["LEPTON_TRANSPORT"] = "torch"
        _transport_checks(ctx, w, "torch", run_compression, run_mismatch)
        del os.environ["LEPTON_TRANSPORT"]
        # two "hosts" of w/2 ranks: hierarchical
        os.environ["LEPTON_HOST_ID"] = f"host{ctx.rank // 2}"
        _transport_checks(ctx, w, "hier", run_views, run_async, run_compression, run_mismatch)
        # uneven hosts (3 + 1): torch.distributed between all ranks
        os.environ["LEPTON_HOST_ID"] = f"host{int(ctx.rank == w - 1)}"
        _transport_checks(ctx, w, "uneven")
        del os.environ["LEPTON_HOST_ID"]


def smoke(ctx) -> None:
    for n in [0, 1, 7, 1000, 100000, 1 << 20]:
        x = torch.arange(n, dtype=torch.float32) * (ctx.rank + 1)
        ld.all_reduce(x)
        ref = torch.arange(n, dtype=torch.float32) * (ctx.world * (ctx.world + 1) / 2)
        assert torch.equal(x, ref)
    ctx.record["transport"] = _comm_of(None).transport



def _freeze_last_rank_in_stream(ctx, group, numel: int, after_s: float, calls: int) -> None:
    """Every rank writes its pid (the parent resumes the frozen one) and streams all-reduces of `numel`
    ones on `group`; the last rank SIGSTOPs itself `after_s` in. The others record the CommError
    (error2) and how long it took (error2_after_s)."""
    r, w = ctx.rank, ctx.world
    with open(os.path.join(ctx.out, f"pid{r}"), "w") as f:
        f.write(str(os.getpid()))
    big = torch.ones(numel)
    if r == w - 1:
        threading.Timer(after_s, lambda: os.kill(os.getpid(), signal.SIGSTOP)).start()
    t0 = time.monotonic()
    try:
        for _ in range(calls):
            ld.all_reduce(big, group=group)
    except ld.CommError as e:
        ctx.record.update(error2=str(e), error2_after_s=time.monotonic() - t0)
    else:
        raise AssertionError("no CommError although a rank froze")


def _segments_of_this_process():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"lepton-{os.getpid()}-"))


def killed_rank(ctx) -> None:
    """The last rank SIGKILLs itself in the middle of a stream of large all-reduces; the others
    must raise CommError naming it, fast (the pid is watched: far sooner than the group timeout)."""
    import datetime

    w, r = ctx.world, ctx.rank
    victim = w - 1
    ctx.record["pid"] = os.getpid()
    ctx.record["skip_destroy"] = True  # Gloo's teardown with a dead peer is not what we test
    os.environ["LEPTON_TRANSPORT"] = "torch"
    over_torch = dist.new_group(list(range(w)), timeout=datetime.timedelta(seconds=ctx.pg_timeout_s))
    ld.all_reduce(torch.ones(10), group=over_torch)
    del os.environ["LEPTON_TRANSPORT"]
    t = torch.ones(1 << 20)
    for _ in range(3):
        ld.all_reduce(t)
    ctx.record["segments_after_setup"] = _segments_of_this_process()
    if r == victim:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    t0 = time.monotonic()
    try:
        for _ in range(100000):
            ld.all_reduce(t)
    except ld.CommError as e:
        ctx.record["error"] = str(e)
        ctx.record["error_after_s"] = time.monotonic() - t0
    else:
        raise AssertionError("no CommError although a rank died")
    try:
        ld.all_reduce(torch.ones(3))
    except ld.CommError as e:
        ctx.record["error_again"] = str(e)
    # The torch transport: Gloo fails on the dead peer; the error names it too.
    try:
        ld.all_reduce(torch.ones(1000), group=over_torch)
    except ld.CommError as e:
        ctx.record["error_torch"] = str(e)
    # Survivors leave together (a survivor that exits first would be a dead peer to the other).
    open(os.path.join(ctx.out, f"done{r}"), "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
            os.path.exists(os.path.join(ctx.out, f"done{k}")) for k in range(w) if k != victim):
        time.sleep(0.01)


def stopped_rank(ctx) -> None:
    """Rank 1 stops calling: the others raise CommError naming it once the group timeout has
    passed; when it calls later, it raises too. Then, on a second group, the last rank freezes
    (SIGSTOP) inside a call: the others name it at the timeout."""
    w, r = ctx.world, ctx.rank
    ctx.record["pid"] = os.getpid()
    ctx.record["skip_destroy"] = True
    import datetime

    second = dist.new_group(list(range(w)), timeout=datetime.timedelta(seconds=ctx.pg_timeout_s))
    ld.all_reduce(torch.ones(10))
    ld.all_reduce(torch.ones(10), group=second)
    t0 = time.monotonic()
    if r == 1:
        time.sleep(ctx.pg_timeout_s + 2)
    try:
        ld.all_reduce(torch.ones(1000))
    except ld.CommError as e:
        ctx.record["error"] = str(e)
        ctx.record["error_after_s"] = time.monotonic() - t0
    else:
        raise AssertionError("no CommError although rank 1 did not call")
    ctx.save()
    # Phase 2 (the ranks are desynchronised by phase 1: line up through the store first).
    dist.barrier(group=second)
    victim = w - 1
    _freeze_last_rank_in_stream(ctx, second, 1 << 21, 0.2, 100000)
    open(os.path.join(ctx.out, f"done{r}"), "w").close()
    if r == 0:  # once every survivor has its error, end the frozen rank (not the launcher's deadline)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(ctx.out, f"done{k}")) for k in range(w) if k != victim):
            time.sleep(0.01)
        with open(os.path.join(ctx.out, f"pid{victim}")) as f:
            os.kill(int(f.read()), signal.SIGKILL)


def ddp(ctx) -> None:
    """DDP with ld.allreduce_hook: replicas stay bitwise identical and the model trains as well as
    with DDP's default all-reduce; HookState survives a checkpoint round trip."""
    import io

    from torch.nn.parallel import DistributedDataParallel as DDP

    r, w = ctx.rank, ctx.world
    hashes = ctx.record.setdefault("hashes", {})
    losses = ctx.record.setdefault("losses", {})

    target = torch.randn(32, 4, generator=torch.Generator().manual_seed(7)) / 4

    def data(step):  # each rank its own shard of a smooth regression task
        g = torch.Generator().manual_seed(1000 * step + r)
        x = torch.randn(64, 32, generator=g)
        return x, torch.tanh(x @ target) * 2

    def train(kind):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128),
                                    torch.nn.Tanh(), torch.nn.Linear(128, 4))
        ddp_model = DDP(model, bucket_cap_mb=0.02)  # several buckets, rebuilt after step 1
        state = None
        if kind != "default":
            state = ld.HookState(compression=None if kind == "hook-none" else "int8", error_feedback=True)
            ddp_model.register_comm_hook(state, ld.allreduce_hook)
        opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
        hist = []
        for step in range(60):
            x, y = data(step)
            loss = torch.nn.functional.mse_loss(ddp_model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        hashes[f"ddp {kind}"] = _bits(params)
        losses[kind] = hist
        return state

    train("default")
    train("hook-none")
    state = train("hook-int8")
    sd = state.state_dict()
    assert len(sd["residuals"]) == 6 and any(float(v.abs().max()) > 0 for v in sd["residuals"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True by default
    fresh = ld.HookState()
    fresh.load_state_dict(loaded)
    sd2 = fresh.state_dict()
    assert sd2["residuals"].keys() == sd["residuals"].keys()
    assert all(torch.equal(sd2["residuals"][k], sd["residuals"][k]) for k in sd["residuals"])


def nonfinite(ctx) -> None:
    """Issue 9.8: NaN/Inf under int8 compression, on every transport (shm latency and ring paths,
    torch, hierarchical with 4 ranks): a block holding a non-finite input on any rank is
    non-finite on every rank (the same bits), the other blocks stay finite and within the bound.
    Then the fp16 autocast + GradScaler recipe through DDP with error feedback: the scaler skips
    the overflowing steps and trains on, and the residuals stay finite."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    w, r, seed = ctx.world, ctx.rank, ctx.args["seed"]
    hashes = ctx.record.setdefault("hashes", {})
    groups = {"shm": dist.group.WORLD}
    os.environ["LEPTON_TRANSPORT"] = "torch"  # read when the group's communicator is made
    groups["torch"] = dist.new_group(list(range(w)))
    _comm_of(groups["torch"])
    del os.environ["LEPTON_TRANSPORT"]
    if w == 4:
        os.environ["LEPTON_HOST_ID"] = f"host{r // 2}"
        groups["hier"] = dist.new_group(list(range(w)))
        _comm_of(groups["hier"])
        del os.environ["LEPTON_HOST_ID"]
    transports = {}
    for tag, g in groups.items():
        transports[tag] = _comm_of(g).transport
        for case, (n, block) in enumerate([(1000, 64), (300007, 256)]):
            xs = [make_input(seed, 900 + case, k, torch.float32, n) for k in range(w)]
            bad_blocks = set()
            for k in range(w):  # rank k spoils block 3k + 1 with +Inf, -Inf or NaN
                xs[k][(3 * k + 1) * block + 17] = (float("inf"), float("-inf"), float("nan"))[k % 3]
                bad_blocks.add(3 * k + 1)
            t = xs[r].clone()
            ld.all_reduce(t, "avg", compression="int8", block_size=block, group=g)
            finite = torch.ones(n, dtype=torch.bool)
            for b in range((n + block - 1) // block):
                blk = t[b * block:(b + 1) * block]
                if b in bad_blocks:
                    assert not torch.isfinite(blk).any(), f"{tag} n={n}: block {b} lost its non-finite value"
                    finite[b * block:(b + 1) * block] = False
                else:
                    assert torch.isfinite(blk).all(), f"{tag} n={n}: block {b} turned non-finite"
            clean = [x.masked_fill(~finite, 0.0) for x in xs]
            err = abs_err(t.masked_fill(~finite, 0.0), reference(clean, "avg"))
            assert bool((err <= q8_bound(clean, block, "avg")).all()), f"{tag} n={n}: over the bound"
            hashes[f"{tag} nonfinite {n}"] = _bits(t)
    ctx.record["transports"] = transports

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    ddp_model = DDP(model, bucket_cap_mb=0.01)
    state = ld.HookState(compression="int8", error_feedback=True)
    ddp_model.register_comm_hook(state, ld.allreduce_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # overflows for the first few steps
    taken = 0
    for step in range(40):
        g = torch.Generator().manual_seed(10 * step + r)
        x, y = torch.randn(64, 32, generator=g), torch.randn(64, 4, generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(ddp_model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        taken += any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ctx.record["steps_taken"] = taken
    residuals = state.state_dict()["residuals"].values()
    ctx.record["residuals_finite"] = all(bool(torch.isfinite(v).all()) for v in residuals)
    hashes["ddp fp16 params"] = _bits(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    del ddp_model


def resume(ctx) -> None:
    """Issue 9.3: training continues bitwise identically after the model, its DDP wrapper and the
    optimizer are re-created from a snapshot, with (a) the same HookState object and (b) a fresh
    one restored with load_state_dict, and (c), when both runs let DDP settle its buckets first
    (as the trainer does), exactly as the uninterrupted run. The old model is garbage-collected."""
    import copy
    import gc
    import io
    import weakref

    from torch.nn.parallel import DistributedDataParallel as DDP

    r = ctx.rank
    hashes = ctx.record.setdefault("hashes", {})
    n_steps = 4  # before and after the snapshot

    def data(step):
        g = torch.Generator().manual_seed(1000 * step + r)
        return torch.randn(16, 24, generator=g), torch.randn(16, 3, generator=g)

    bypass = [False]

    def hook(state, bucket):  # the trainer's way of letting DDP settle its buckets without communicating
        if bypass[0]:
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        return ld.allreduce_hook(state, bucket)

    def build(state, snapshot=None, settle=False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                    torch.nn.Tanh(), torch.nn.Linear(64, 3))
        if snapshot is not None:
            model.load_state_dict(snapshot["model"])
        ddp_model = DDP(model, bucket_cap_mb=0.01)  # several buckets, rebuilt after the first backward
        ddp_model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
        if snapshot is not None:
            opt.load_state_dict(copy.deepcopy(snapshot["opt"]))  # (it adopts the momentum tensors)
        if settle:
            bypass[0] = True
            x, y = data(-1)
            torch.nn.functional.mse_loss(ddp_model(x), y).backward()
            bypass[0] = False
            opt.zero_grad(set_to_none=True)
        return model, ddp_model, opt

    def train(model, ddp_model, opt, steps):
        for step in steps:
            x, y = data(step)
            loss = torch.nn.functional.mse_loss(ddp_model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return _bits(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))

    def snapshot_of(model, opt, state):
        buf = io.BytesIO()
        torch.save(state.state_dict(), buf)  # through a file, as a checkpoint would go
        buf.seek(0)
        return {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": copy.deepcopy(opt.state_dict()), "hook": torch.load(buf)}

    results = {}
    for settle in (False, True):
        tag = "settled" if settle else "plain"
        if settle:
            state = ld.HookState(compression="int8")
            results["uninterrupted"] = train(*build(state, settle=True), range(2 * n_steps))
        state = ld.HookState(compression="int8")
        model, ddp_model, opt = build(state, settle=settle)
        train(model, ddp_model, opt, range(n_steps))
        snap = snapshot_of(model, opt, state)
        old = weakref.ref(model[0].weight)
        if settle:  # the old model goes before the new one is built, and must really go
            del model, ddp_model, opt
            gc.collect()
            ctx.record["old_model_collected_before"] = old() is None
        # (a) the same HookState object continues on the re-created model
        results[f"{tag} same state"] = train(*build(state, snap, settle), range(n_steps, 2 * n_steps))
        # (b) a fresh HookState restored from the snapshot
        fresh = ld.HookState(compression="int8")
        fresh.load_state_dict(snap["hook"])
        results[f"{tag} restored state"] = train(*build(fresh, snap, settle), range(n_steps, 2 * n_steps))
        if not settle:
            del model, ddp_model, opt
        gc.collect()
        ctx.record[f"old model collected ({tag})"] = old() is None
    ctx.record["params"] = results
    hashes.update({f"resume {k}": v for k, v in results.items()})


def _resources() -> dict:
    """This process's open file descriptors, threads and shared-memory segments still mapped."""
    with open("/proc/self/maps") as f:
        shm = {line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1]
               for line in f if "/dev/shm/lepton-" in line}
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task")),
            "shm_segments": len(shm)}


def cycles(ctx) -> None:
    """Issue 9.9: init_process_group / destroy_process_group cycles, each using the shared-memory
    and the torch.distributed transports (synchronous and asynchronous calls, a subgroup): file
    descriptors, threads and mapped segments must stay flat. Then cycles whose group objects the
    caller keeps (as a model wrapper would): their communicators go at the next group's first use."""
    import datetime

    w, r = ctx.world, ctx.rank
    dist.destroy_process_group()  # the worker's own group; each cycle makes its own
    timeout = datetime.timedelta(seconds=ctx.pg_timeout_s)

    def cycle(i):
        dist.init_process_group("gloo", init_method=f"file://{ctx.out}/store-cycle{i}", rank=r, world_size=w,
                                timeout=timeout)
        t = torch.full((1000,), float(r + 1))
        ld.all_reduce(t)
        mid = _resources()
        fut = ld.all_reduce(torch.ones(100000), async_op=True)
        assert torch.equal(fut.wait(), torch.full((100000,), float(w)))
        os.environ["LEPTON_TRANSPORT"] = "torch"
        g = dist.new_group(list(range(w)))
        ld.all_reduce(t, group=g)
        del os.environ["LEPTON_TRANSPORT"]
        ld.all_reduce(t, group=g, async_op=True).wait()
        assert torch.equal(t, torch.full((1000,), float(w * w * w * (w + 1) / 2)))
        return mid

    samples = []
    for i in range(ctx.args["cycles"]):
        cycle(i)
        dist.destroy_process_group()
        samples.append(_resources())
    ctx.record["samples"] = samples
    held, kept = [], []
    for i in range(ctx.args["cycles"], ctx.args["cycles"] + 4):
        mid = cycle(i)
        held.append(dist.group.WORLD)
        dist.destroy_process_group()
        kept.append({"segments_in_next_cycle": mid["shm_segments"], "communicators": len(_comm._comms)})
    ctx.record["held"] = kept
    ctx.record["skip_destroy"] = True  # no group left for the worker to destroy

def setup_in_two_threads(ctx) -> None:
    """Issue 9.10: two groups first used from two threads, in opposite orders on the two ranks.
    One global lock held through a whole setup made each rank's second setup wait for its first,
    which waited for the other rank's first use of that group: both waited out the timeout."""
    import datetime

    w, r = ctx.world, ctx.rank
    timeout = datetime.timedelta(seconds=ctx.pg_timeout_s)
    groups = [dist.new_group(list(range(w)), timeout=timeout) for _ in range(2)]
    order = [0, 1] if r % 2 == 0 else [1, 0]
    sums, errors = {}, {}

    def use(i):
        try:
            t = torch.full((1000,), float(r + 10 * i))
            ld.all_reduce(t, group=groups[i])
            sums[i] = float(t[0])
        except Exception as e:  # noqa: BLE001 - reported to the parent
            errors[i] = f"{type(e).__name__}: {e}"

    first = threading.Thread(target=use, args=(order[0],))
    first.start()
    time.sleep(1.0)  # (so that the first setup is under way, waiting for the other rank)
    second = threading.Thread(target=use, args=(order[1],))
    second.start()
    first.join()
    second.join()
    ctx.record["errors"] = errors
    ctx.record["sums"] = sums
    ctx.record["transports"] = [_comm_of(g).transport for g in groups]


def _host_ids(ctx, layout: str) -> None:
    """LEPTON_HOST_ID for a simulated layout: "torch" one host per rank (torch.distributed alone,
    no process to look at for a peer), "hier" two ranks per host, "shm" one host."""
    if layout == "torch":
        os.environ["LEPTON_HOST_ID"] = f"host{ctx.rank}"
    elif layout == "hier":
        os.environ["LEPTON_HOST_ID"] = f"host{ctx.rank // 2}"


def _leave_together(ctx, survivors, tag: str) -> None:
    """Survivors wait for each other before exiting (one that exits first is a dead peer)."""
    open(os.path.join(ctx.out, f"{tag}{ctx.rank}"), "w").close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(os.path.exists(os.path.join(ctx.out, f"{tag}{k}"))
                                                  for k in survivors):
        time.sleep(0.01)


def ddp_dead_peer(ctx) -> None:
    """Issue 9.11: the last rank is killed during training through DDP with ld.allreduce_hook on
    the shm, torch (a host per rank: only heartbeats tell who is gone) or hierarchical transport.
    loss.backward() on the survivors must raise ld.CommError itself, naming the killed rank."""
    import datetime

    from torch.nn.parallel import DistributedDataParallel as DDP

    w, r = ctx.world, ctx.rank
    victim = w - 1
    ctx.record["skip_destroy"] = True
    _host_ids(ctx, ctx.args["transport"])
    g = dist.new_group(list(range(w)), timeout=datetime.timedelta(seconds=ctx.pg_timeout_s))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    ddp_model = DDP(model, process_group=g, bucket_cap_mb=0.005)
    ddp_model.register_comm_hook(ld.HookState(group=g, compression="int8"), ld.allreduce_hook)
    ctx.record["transport"] = _comm_of(g).transport
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.01)
    for step in range(10):
        if step == 5 and r == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        gen = torch.Generator().manual_seed(step * 10 + r)
        loss = torch.nn.functional.mse_loss(ddp_model(torch.randn(8, 16, generator=gen)),
                                            torch.randn(8, 4, generator=gen))
        opt.zero_grad()
        t0 = time.monotonic()
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001 - what reaches the user is the point
            ctx.record.update(error_type=f"{type(e).__module__}.{type(e).__name__}",
                              is_comm_error=isinstance(e, ld.CommError), error=str(e), at_step=step,
                              error_after_s=time.monotonic() - t0)
            break
        opt.step()
    _leave_together(ctx, [k for k in range(w) if k != victim], "left")


def silent_rank(ctx) -> None:
    """Issue 9.11 on the torch (a host per rank) and hierarchical transports: (1) rank 1 stops
    calling: the others name it once the timeout has passed; (2) on a second group, the last rank
    freezes (SIGSTOP) inside a stream of calls: the others name it. Gloo's own errors say neither."""
    import datetime

    w, r = ctx.world, ctx.rank
    ctx.record["skip_destroy"] = True
    _host_ids(ctx, ctx.args["transport"])
    timeout = datetime.timedelta(seconds=ctx.pg_timeout_s)
    first, second = (dist.new_group(list(range(w)), timeout=timeout) for _ in range(2))
    ld.all_reduce(torch.ones(10), group=first)
    ld.all_reduce(torch.ones(10), group=second)
    ctx.record["transports"] = [_comm_of(first).transport, _comm_of(second).transport]
    # 1. Rank 1 does not call (until the others have had their error and named it).
    if r != 1:
        t0 = time.monotonic()
        try:
            ld.all_reduce(torch.ones(1000), group=first)
        except ld.CommError as e:
            ctx.record.update(error=str(e), error_after_s=time.monotonic() - t0)
        else:
            raise AssertionError("no CommError although rank 1 did not call")
    ctx.save()
    _leave_together(ctx, range(w), "phase2-")
    # 2. The last rank freezes inside a call.
    victim = w - 1
    _freeze_last_rank_in_stream(ctx, second, 1 << 18, 0.5, 1000000)
    ctx.save()
    _leave_together(ctx, [k for k in range(w) if k != victim], "done")
    if r == 0:  # end the frozen rank once every survivor has its error
        with open(os.path.join(ctx.out, f"pid{victim}")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
