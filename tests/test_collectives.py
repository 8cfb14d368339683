"""ld.reduce_scatter, ld.all_gather and ld.broadcast (API.md §3): argument checks in this process, then
multi-process jobs (tests/dist_workers/collective_jobs.py, bounded in time, /dev/shm checked after
each): every dtype / op / odd size on the latency and ring paths, against references and against
torch.distributed's Gloo collectives; non-contiguous views; async calls; int8 compression; wrong
sizes (ValueError before any communication); ranks that disagree; a killed rank; 2 and 4 ranks,
the 4-rank job over the shm, torch and hierarchical transports."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lepton_core.distributed as ld
from test_distributed import _assert_same_bits, _run


def test_bad_arguments_name_the_function_and_argument():
    t = torch.ones(4)
    with pytest.raises(TypeError, match="ld.reduce_scatter: output must be a torch.Tensor"):
        ld.reduce_scatter(np.ones(4, dtype=np.float32), t)
    with pytest.raises(TypeError, match="ld.reduce_scatter: input has dtype int8"):
        ld.reduce_scatter(t, torch.ones(4, dtype=torch.int8))
    with pytest.raises(TypeError, match="ld.reduce_scatter: output and input must have one dtype, got float32 and float64"):
        ld.reduce_scatter(t, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="ld.reduce_scatter: op must be one of"):
        ld.reduce_scatter(t, t, "prod")
    with pytest.raises(TypeError, match="ld.reduce_scatter: op 'avg' needs a floating-point input, got dtype int64"):
        ld.reduce_scatter(torch.ones(2, dtype=torch.int64), torch.ones(4, dtype=torch.int64), "avg")
    with pytest.raises(TypeError, match="ld.reduce_scatter: compression 'int8' works with op 'sum' or 'avg' only"):
        ld.reduce_scatter(t, t, "min", compression="int8")
    with pytest.raises(ValueError, match=r"ld.reduce_scatter: block_size must be a power of two"):
        ld.reduce_scatter(t, t, compression="int8", block_size=100)
    with pytest.raises(TypeError, match="ld.reduce_scatter: async_op must be a bool"):
        ld.reduce_scatter(t, t, async_op=1)
    with pytest.raises(TypeError, match="ld.all_gather: input must be a torch.Tensor, got list"):
        ld.all_gather(t, [1.0])
    with pytest.raises(TypeError, match="ld.all_gather: output has dtype complex64"):
        ld.all_gather(torch.ones(4, dtype=torch.complex64), t)
    with pytest.raises(TypeError, match="ld.broadcast: src must be an int"):
        ld.broadcast(t, 0.0)
    with pytest.raises(TypeError, match="ld.broadcast: src must be an int"):
        ld.broadcast(t, True)
    with pytest.raises(TypeError, match="ld.broadcast: tensor must be a torch.Tensor"):
        ld.broadcast(np.ones(3), 0)
    # Valid arguments, but no process group: a ValueError saying so (as torch.distributed does).
    for call in (lambda: ld.reduce_scatter(t, t), lambda: ld.all_gather(t, t), lambda: ld.broadcast(t, 0)):
        with pytest.raises(ValueError, match=r"ld\.\w+: torch.distributed is not initialized"):
            call()


def _check_job(res, world, transports):
    _assert_same_bits(res)
    for r in res.results:
        assert r["transport"] == {t: t for t in transports}, r["transport"]
        assert set(r["gloo_compared"]) >= {f"{c} {t}" for c in ("all_gather", "broadcast") for t in transports}, \
            (r["gloo_compared"], r.get("gloo_missing"))
        for key, msg in r["mismatch"].items():
            field = key.split(" ", 1)[1]
            assert f"ranks disagree on {'the collective' if field == 'collective' else field}: rank 0 has " in msg, msg
            assert msg.startswith(("ld.all_gather: ", "ld.broadcast: ", "ld.reduce_scatter: ")), msg
        assert len(r["mismatch"]) == 4 * len(transports)
    bad = res.results[0]["bad_args"]
    for t in transports:
        assert bad[f"{t} rs sizes"].startswith(f"ValueError: ld.reduce_scatter: input must have world size x output's "
                                               f"elements, {world} x 3 = {3 * world}, got {3 * world + 1}")
        assert bad[f"{t} ag sizes"].startswith("ValueError: ld.all_gather: output must have world size x input's")
        assert bad[f"{t} bc src"].startswith("ValueError: ld.broadcast: src must be a global rank of the group")
        for kind in ("bool", "float"):
            assert bad[f"{t} bc src {kind}"] == f"TypeError: ld.broadcast: src must be an int (a global rank), got {kind}"
        assert bad[f"{t} rs dtype"].startswith("TypeError: ld.reduce_scatter: output and input must have one dtype")
        assert bad[f"{t} rs avg int"].startswith("TypeError: ld.reduce_scatter: op 'avg' needs a floating-point")


@pytest.mark.distributed
def test_collectives_two_ranks_shm(rng):
    res = _run("collectives", 2, args={"seed": int(rng.integers(1 << 30))}, timeout_s=240)
    _check_job(res, 2, ["shm"])
    assert "reduce_scatter shm" in res.results[0]["gloo_compared"], res.results[0].get("gloo_missing")


@pytest.mark.distributed
def test_collectives_four_ranks_shm_torch_and_hierarchical(rng):
    res = _run("collectives", 4, args={"seed": int(rng.integers(1 << 30)), "transports": True}, timeout_s=400)
    _check_job(res, 4, ["shm", "torch", "hier"])


@pytest.mark.distributed
def test_killed_rank_in_collectives_gives_commerror_naming_it():
    res = _run("killed_rank_collectives", 3, expect_codes=[0, 0, -9], pg_timeout_s=60.0, timeout_s=90)
    for r in res.results[:2]:
        assert "rank 2" in r["error"] and "died" in r["error"], r["error"]
        assert r["error"].startswith(("ld.reduce_scatter: ", "ld.all_gather: ", "ld.broadcast: ")), r["error"]
        assert r["error_after_s"] < 10, r["error_after_s"]
