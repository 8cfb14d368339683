"""The jobs of tests/test_collectives.py: ld.reduce_scatter, ld.all_gather and ld.broadcast on every
rank (worker.py), checked against references built from every rank's input (jobs.make_input) and
against torch.distributed's Gloo collectives on the same inputs."""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

import lepton_core.distributed as ld
from jobs import FLOATS, INTS, _bits, _comm_of, _leave_together, abs_err, check_close, make_input, q8_bound, record_mismatches, reference

SIZES = [0, 1, 7, 33, 257, 16411, 70001]  # per-rank chunk; 16411 x 4 B x W is past the latency slot
# A broadcast past the root's ring slots (4 x 256 KiB, lepton_core/distributed/_shm.py) in every
# dtype: the star reuses each slot once every receiver has read it.
BROADCAST_WRAP = 655357


def _poisoned(n, dtype):
    t = torch.empty(n, dtype=dtype)
    if dtype in FLOATS:
        t.fill_(float("nan"))
    else:
        t.fill_(-12345)
    return t


def _gloo(ctx, fn, *args, **kwargs):
    """Runs a torch.distributed Gloo collective; False when this Gloo lacks it (recorded once)."""
    try:
        fn(*args, **kwargs)
        return True
    except (RuntimeError, NotImplementedError) as e:
        ctx.record.setdefault("gloo_missing", {})[fn.__name__] = str(e)[:200]
        return False


def _exact_inputs(seed, case, k, dtype, n):
    """Small integers in the dtype: every sum is exact, so every summation order gives the same bits."""
    g = torch.Generator().manual_seed(seed * 7919 + case * 13 + k)
    return torch.randint(-64, 64, (n,), generator=g).to(dtype)


def run_reduce_scatter(ctx, group, tag: str, sizes) -> None:
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    case = 2000
    for dtype in FLOATS + INTS:
        for op in ["sum", "max", "min"] + (["avg"] if dtype in FLOATS else []):
            for m in sizes:
                case += 1
                xs = [make_input(seed, case, k, dtype, w * m) for k in range(w)]
                inp = xs[r].clone()
                out = _poisoned(m, dtype)
                assert ld.reduce_scatter(out, inp, op, group=group) is out
                assert torch.equal(inp, xs[r]), "the input changed"
                what = f"{tag} reduce_scatter {dtype} {op} m={m}"
                check_close(out, [x[r * m:(r + 1) * m] for x in xs], op, what)
                again = _poisoned(m, dtype)
                ld.reduce_scatter(again, xs[r].clone(), op, group=group)
                assert _bits(again) == _bits(out), f"{what}: two identical calls differ"
                # every rank's chunk, gathered: the same bits everywhere
                everyone = torch.empty(w * m, dtype=dtype)
                ld.all_gather(everyone, out, group=group)
                hashes[what] = _bits(everyone)
    # Against Gloo where the answer is exact: integers, max/min, and float sums of small integers.
    for dtype in FLOATS + INTS:
        for op, gop in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
            for m in (1, 33, 70001):
                case += 1
                x = _exact_inputs(seed, case, r, dtype, w * m)
                ours, theirs = _poisoned(m, dtype), _poisoned(m, dtype)
                ld.reduce_scatter(ours, x, op, group=group)
                if not _gloo(ctx, dist.reduce_scatter_tensor, theirs, x, op=gop, group=group):
                    continue
                assert _bits(ours) == _bits(theirs), f"{tag} reduce_scatter {dtype} {op} m={m}: not Gloo's bits"
                ctx.record.setdefault("gloo_compared", set()).add(f"reduce_scatter {tag}")
    # int8 compression: within the contract's bound, chunk by chunk (blocks restart at each chunk).
    for dtype in (torch.float32, torch.bfloat16):
        for op in ("sum", "avg"):
            for m, block in ((1, 256), (1000, 32), (70001, 256)):
                case += 1
                xs = [make_input(seed, case, k, dtype, w * m) for k in range(w)]
                out = _poisoned(m, dtype)
                ld.reduce_scatter(out, xs[r].clone(), op, group=group, compression="int8", block_size=block)
                mine = [x[r * m:(r + 1) * m] for x in xs]
                err = abs_err(out, reference(mine, op))
                bound = q8_bound(mine, block, op)
                assert bool((err <= bound).all()), f"{tag} rs int8 {dtype} {op} m={m}: over the bound"


def run_all_gather(ctx, group, tag: str, sizes) -> None:
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    hashes = ctx.record.setdefault("hashes", {})
    case = 3000
    for dtype in FLOATS + INTS:
        for m in sizes:
            case += 1
            xs = [make_input(seed, case, k, dtype, m) for k in range(w)]
            out = _poisoned(w * m, dtype)
            assert ld.all_gather(out, xs[r].clone(), group=group) is out
            what = f"{tag} all_gather {dtype} m={m}"
            assert _bits(out) == _bits(torch.cat(xs)), f"{what}: wrong bytes"
            hashes[what] = _bits(out)
            if m in (1, 257, 70001):
                theirs = _poisoned(w * m, dtype)
                if _gloo(ctx, dist.all_gather_into_tensor, theirs, xs[r].clone(), group=group):
                    assert _bits(out) == _bits(theirs), f"{what}: not Gloo's bits"
                    ctx.record.setdefault("gloo_compared", set()).add(f"all_gather {tag}")


def run_broadcast(ctx, group, tag: str, sizes) -> None:
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    hashes = ctx.record.setdefault("hashes", {})
    case = 4000
    for dtype in FLOATS + INTS:
        for m in sizes:
            for src in sorted({0, w - 1}):
                case += 1
                xs = [make_input(seed, case, k, dtype, m) for k in range(w)]
                t = xs[r].clone()
                assert ld.broadcast(t, ranks[src], group=group) is t
                what = f"{tag} broadcast {dtype} m={m} src={src}"
                assert _bits(t) == _bits(xs[src]), f"{what}: wrong bytes"
                hashes[what] = _bits(t)
                if m in (1, 257, 70001):
                    theirs = xs[r].clone()
                    if _gloo(ctx, dist.broadcast, theirs, ranks[src], group=group):
                        assert _bits(theirs) == _bits(t), f"{what}: not Gloo's bits"
                        ctx.record.setdefault("gloo_compared", set()).add(f"broadcast {tag}")


def run_views_and_async(ctx, group, tag: str) -> None:
    """Non-contiguous outputs and inputs are written / read in place (the rest of the base
    untouched); async_op=True returns Futures, in order with synchronous calls."""
    seed, r, w = ctx.args["seed"], dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    # reduce_scatter: input a transposed (w*9, 37) view, output a strided (9, 37) column view
    bases = [make_input(seed, 5001, k, torch.float32, 37 * w * 9).view(37, w * 9) for k in range(w)]
    inp = bases[r].clone().t()
    obase = torch.full((9, 80), 7.0)
    out = obase[:, 3:77:2]
    ld.reduce_scatter(out, inp, group=group)
    flat = [b.t().reshape(-1) for b in bases]
    m = 9 * 37
    check_close(out.reshape(-1), [f[r * m:(r + 1) * m] for f in flat], "sum", f"{tag} rs views")
    mask = torch.ones_like(obase, dtype=torch.bool)
    mask[:, 3:77:2] = False
    assert bool((obase[mask] == 7.0).all()), "reduce_scatter wrote outside its output view"
    # all_gather: output a transposed view, input a strided view
    src = make_input(seed, 5002 + r, 0, torch.float64, 200)
    inp = src[::2]                                   # 100 elements
    obase = torch.full((100 * w + 10, 3), -1.0, dtype=torch.float64)
    out = obase[5:5 + 100 * w, 1]
    ld.all_gather(out, inp, group=group)
    want = torch.cat([make_input(seed, 5002 + k, 0, torch.float64, 200)[::2] for k in range(w)])
    assert _bits(out) == _bits(want), "all_gather into a view"
    assert bool((obase[:, 0] == -1).all()) and bool((obase[:, 2] == -1).all()), "all_gather wrote outside its view"
    # the in-place idiom: the input is the output's own chunk
    buf = torch.zeros(w * 50)
    buf[r * 50:(r + 1) * 50] = float(r + 1)
    ld.all_gather(buf, buf[r * 50:(r + 1) * 50], group=group)
    assert torch.equal(buf, torch.arange(1, w + 1, dtype=torch.float32).repeat_interleave(50)), "in-place all_gather"
    # broadcast into a permuted view
    base = make_input(seed, 5003, r, torch.float32, 5 * 6 * 7).view(5, 6, 7)
    before = base.clone()
    view = base.permute(2, 0, 1)[1:, :, ::3]
    ld.broadcast(view, ranks[w - 1], group=group)
    srcbase = make_input(seed, 5003, w - 1, torch.float32, 5 * 6 * 7).view(5, 6, 7)
    assert torch.equal(view, srcbase.permute(2, 0, 1)[1:, :, ::3]), "broadcast into a view"
    vmask = torch.ones_like(base, dtype=torch.bool)
    vmask.permute(2, 0, 1)[1:, :, ::3] = False
    assert torch.equal(base[vmask], before[vmask]), "broadcast wrote outside its view"
    # async, mixed with synchronous calls, small and ring-sized
    n = 40000
    xs = [make_input(seed, 5010, k, torch.float32, w * n) for k in range(w)]
    o1, o2, o3 = torch.empty(n), torch.empty(w * n), torch.empty(3)
    b1 = xs[r][:7].clone()
    f1 = ld.reduce_scatter(o1, xs[r].clone(), "avg", group=group, async_op=True)
    f2 = ld.all_gather(o2, xs[r][:n].clone(), group=group, async_op=True)
    ld.reduce_scatter(o3, xs[r][:3 * w].clone(), "max", group=group)  # synchronous, after the queued ones
    f3 = ld.broadcast(b1, ranks[0], group=group, async_op=True)
    for f, t in ((f1, o1), (f2, o2), (f3, b1)):
        assert isinstance(f, torch.futures.Future)
        assert f.wait() is t
    check_close(o1, [x[r * n:(r + 1) * n] for x in xs], "avg", f"{tag} async rs")
    assert torch.equal(o2, torch.cat([x[:n] for x in xs])), "async all_gather"
    check_close(o3, [x[r * 3:(r + 1) * 3] for x in xs], "max", f"{tag} sync rs among async")
    assert torch.equal(b1, xs[0][:7]), "async broadcast"


def run_mismatch_and_bad_args(ctx, group, tag: str) -> None:
    """Wrong sizes are a ValueError before any communication (the other ranks are not waiting for
    anything: the next collective lines up); ranks that disagree raise CommError naming the field."""
    r, w = dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    errors = ctx.record.setdefault("bad_args", {})
    if r == 0:
        for name, call in {
            "rs sizes": lambda: ld.reduce_scatter(torch.empty(3), torch.empty(3 * w + 1), group=group),
            "ag sizes": lambda: ld.all_gather(torch.empty(3 * w - 1), torch.empty(3), group=group),
            "bc src": lambda: ld.broadcast(torch.empty(3), w + 5, group=group),
            # (after earlier broadcasts armed the fast path, which only takes an int of the group)
            "bc src bool": lambda: ld.broadcast(torch.empty(3), True, group=group),
            "bc src float": lambda: ld.broadcast(torch.empty(3), float(ranks[0]), group=group),
            "rs dtype": lambda: ld.reduce_scatter(torch.empty(3), torch.empty(3 * w, dtype=torch.float64), group=group),
            "rs avg int": lambda: ld.reduce_scatter(torch.empty(3, dtype=torch.int32),
                                                    torch.empty(3 * w, dtype=torch.int32), "avg", group=group),
        }.items():
            try:
                call()
            except (TypeError, ValueError) as e:
                errors[f"{tag} {name}"] = f"{type(e).__name__}: {e}"
    t = torch.full((4,), float(r))
    ld.all_reduce(t, group=group)  # every rank gets here with the calls still lined up
    assert torch.equal(t, torch.full((4,), float(w * (w - 1) / 2)))
    msgs = ctx.record.setdefault("mismatch", {})
    cases = {
        "numel": lambda: ld.all_gather(torch.empty(w * (5 + (r == w - 1))), torch.ones(5 + (r == w - 1)), group=group),
        "src": lambda: ld.broadcast(torch.ones(10), ranks[r % 2], group=group),
        "collective": lambda: (ld.broadcast(torch.ones(w), ranks[0], group=group) if r == 1
                               else ld.all_gather(torch.ones(w * 1), torch.ones(1), group=group)),
        "op": lambda: ld.reduce_scatter(torch.ones(3), torch.ones(3 * w), "max" if r == 1 else "sum", group=group),
    }
    record_mismatches(msgs, tag, cases, lambda: ld.broadcast(torch.ones(3), ranks[0], group=group))


def collectives(ctx) -> None:
    w = ctx.world
    world = dist.group.WORLD
    transports = ["shm"] + (["torch", "hier"] if ctx.args.get("transports") else [])
    ctx.record["transport"] = {}
    for tr in transports:
        if tr == "shm":
            g = world
        elif tr == "torch":
            os.environ["LEPTON_TRANSPORT"] = "torch"
            g = dist.new_group(list(range(w)))
        else:
            os.environ.pop("LEPTON_TRANSPORT", None)
            os.environ["LEPTON_HOST_ID"] = f"host{ctx.rank // 2}"
            g = dist.new_group(list(range(w)))
        sizes = SIZES if tr == "shm" else [0, 7, 257, 16411]
        run_reduce_scatter(ctx, g, tr, sizes)
        run_all_gather(ctx, g, tr, sizes)
        run_broadcast(ctx, g, tr, sizes + ([BROADCAST_WRAP] if tr == "shm" else []))
        run_views_and_async(ctx, g, tr)
        run_mismatch_and_bad_args(ctx, g, tr)
        ctx.record["transport"][tr] = _comm_of(g).transport
    os.environ.pop("LEPTON_TRANSPORT", None)
    os.environ.pop("LEPTON_HOST_ID", None)
    ctx.record["gloo_compared"] = sorted(ctx.record.get("gloo_compared", ()))


def killed_rank_collectives(ctx) -> None:
    """The last rank SIGKILLs itself in a stream of reduce-scatters, all-gathers and broadcasts;
    the others raise CommError naming it, and nothing is left in /dev/shm."""
    w, r = ctx.world, ctx.rank
    victim = w - 1
    ctx.record["skip_destroy"] = True
    n = 1 << 18
    inp, out, gat, bc = torch.ones(w * n), torch.empty(n), torch.empty(w * n), torch.ones(w * n)
    calls = [lambda: ld.reduce_scatter(out, inp), lambda: ld.all_gather(gat, out), lambda: ld.broadcast(bc, 0)]
    for c in calls:
        c()
    if r == victim:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    t0 = time.monotonic()
    try:
        for i in range(1000000):
            calls[i % 3]()
    except ld.CommError as e:
        ctx.record["error"] = str(e)
        ctx.record["error_after_s"] = time.monotonic() - t0
    else:
        raise AssertionError("no CommError although a rank died")
    _leave_together(ctx, [k for k in range(w) if k != victim], "done")
