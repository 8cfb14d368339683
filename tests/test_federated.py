"""lepton_core.federated (API.md §6): secure aggregation, Shamir sharing, DP accounting, FedAvg runs."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("cryptography")
pytest.importorskip("dp_accounting")

import lepton_core  # noqa: E402
from lepton_core.federated import FedConfig, FedError, SecAggAbort, run_federated  # noqa: E402
from lepton_core.federated import dp, secagg, shamir  # noqa: E402
from lepton_core.federated.core import sample_clients  # noqa: E402
from lepton_core.federated.data import dirichlet_split  # noqa: E402

WORKER = Path(__file__).parent / "fed_workers" / "worker.py"
PKG_PARENT = Path(lepton_core.__file__).resolve().parents[1]


def _encoded(rng, n_clients, length, bits=20, clip=1.0):
    deltas = {c: rng.normal(0, 0.3, length) for c in range(n_clients)}
    weights = {c: int(rng.integers(1, 40)) for c in range(n_clients)}
    return {c: secagg.encode(deltas[c], bits, clip, weights[c]) for c in deltas}


def _plain_sum(vectors, keep):
    total = np.zeros(next(iter(vectors.values())).size, dtype=np.uint32)
    for c in keep:
        total += vectors[c]
    return total


# ---------------------------------------------------------------------------------------------------
# Fixed point and secure aggregation
# ---------------------------------------------------------------------------------------------------
def test_fixed_point_error_and_range(rng):
    x = rng.normal(0, 0.5, 10001)
    x[:3] = [5.0, -5.0, 0.0]
    bits = secagg.fixed_point_bits(weight_bound=600, clip_range=1.0)
    assert 600 * 1.0 * 2**bits < 2**31 <= 600 * 1.0 * 2**(bits + 1)
    back = secagg.decode(secagg.encode(x, bits, 1.0), bits)
    clipped = np.clip(x, -1, 1)
    assert np.max(np.abs(back - clipped)) < 2.0**-bits  # truncation error bound
    assert np.all(np.abs(back) <= np.abs(clipped))  # truncation toward zero never grows a value
    # weighted sums at the bound do not overflow int32
    many = [secagg.encode(np.full(4, 1.0), bits, 1.0, 100) for _ in range(6)]
    total = np.sum(many, axis=0, dtype=np.uint32)
    assert np.allclose(secagg.decode(total, bits), 600.0, atol=600 * 2.0**-bits)
    with pytest.raises(ValueError, match="fixed_point_bits"):
        secagg.fixed_point_bits(2**30, 4.0)


@pytest.mark.parametrize("n,length", [(2, 1), (7, 33), (10, 1000)])
def test_secure_sum_bitwise_equals_plain_fixed_point_sum(rng, n, length):
    enc = _encoded(rng, n, length)
    got = secagg.simulate(enc, t=secagg.default_threshold(n))
    assert got.dtype == np.uint32
    assert np.array_equal(got, _plain_sum(enc, enc))


def test_masked_vector_is_uniform_and_unmasked_is_not(rng):
    from scipy.stats import chisquare

    enc = _encoded(rng, 5, 50000)
    masked = {}
    total = secagg.simulate(enc, t=3, masked_out=masked)
    assert np.array_equal(total, _plain_sum(enc, enc))
    for c in (0, 3):
        counts = np.bincount(masked[c].view(np.uint8), minlength=256)
        assert chisquare(counts).pvalue > 1e-4, f"client {c}'s masked bytes fail the uniformity test"
        assert not np.array_equal(masked[c], enc[c])
    plain_counts = np.bincount(enc[0].view(np.uint8), minlength=256)
    assert chisquare(plain_counts).pvalue < 1e-10


def test_dropouts_after_masking_are_recovered_exactly(rng):
    n, t = 10, 6
    enc = _encoded(rng, n, 257)
    for k in (1, 2, n - t):
        drop = rng.choice(n, k, replace=False).tolist()
        got = secagg.simulate(enc, t, drop=drop)
        assert np.array_equal(got, _plain_sum(enc, [c for c in range(n) if c not in drop])), drop


def test_fewer_than_t_survivors_abort(rng):
    n, t = 8, 5
    enc = _encoded(rng, n, 16)
    with pytest.raises(SecAggAbort, match=r"3 of 8 clients survived, below the threshold t = 5"):
        secagg.simulate(enc, t, drop=[0, 2, 4, 6, 7])


def test_secagg_plus_graph_sum_and_abort(rng):
    ids = list(range(3, 23))
    g = secagg.harary_graph(ids, 6, np.random.default_rng(1))
    assert g == secagg.harary_graph(ids, 6, np.random.default_rng(1))
    assert all(len(g[u]) == 6 and u not in g[u] and all(u in g[v] for v in g[u]) for u in ids)
    assert secagg.harary_graph(ids, 7, np.random.default_rng(1)) != g  # rounded up to 8
    assert secagg.harary_graph(ids, 19, np.random.default_rng(1)) == secagg.complete_graph(ids)
    enc = {c: v for c, v in zip(ids, _encoded(rng, len(ids), 65).values())}
    t = 4  # of 7 holders (6 neighbours + itself)
    for drop in ([], [3, 9], rng.choice(ids, 3, replace=False).tolist()):
        got = secagg.simulate(enc, t, drop=drop, graph=g)
        assert np.array_equal(got, _plain_sum(enc, [c for c in ids if c not in drop])), drop
    victim = ids[0]
    with pytest.raises(SecAggAbort, match="holders of client"):
        secagg.simulate(enc, t, drop=g[victim][:4], graph=g)  # 3 of the victim's 7 holders are left
    assert secagg.upload_bytes(6, 65) == 64 + 6 * secagg.CIPHERTEXT_BYTES + 4 * 65 + 7 * secagg.SHARE_BYTES


def test_client_never_reveals_both_secrets():
    c, d = secagg.Client(0), secagg.Client(1)
    roster = {0: c.public_keys(), 1: d.public_keys()}
    c.share_keys(roster, 1)
    c.receive_shares(roster, {1: d.share_keys(roster, 1)[0]})
    with pytest.raises(SecAggAbort, match="holds no share from client 2"):
        c.unmask_shares([2], [])
    c.unmask_shares([0], [1])
    with pytest.raises(SecAggAbort, match="refuses to reveal both"):
        c.unmask_shares([1], [])


def test_prg_is_chacha20_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(32))
    a = secagg.prg_uint32(seed, 1000)
    assert np.array_equal(a, secagg.prg_uint32(seed, 1000))
    assert not np.array_equal(a, secagg.prg_uint32(bytes(32), 1000))
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = secagg._hkdf(seed, secagg._INFO_PAIR)  # RFC 5869 on the stdlib's HMAC: cryptography's bytes
    assert key == HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=secagg._INFO_PAIR).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8))
    assert a[:2].tobytes() == stream


# ---------------------------------------------------------------------------------------------------
# Shamir
# ---------------------------------------------------------------------------------------------------
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_reveal_nothing(rng):
    n, t = 9, 5
    secret = shamir.random_secret()
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    for _ in range(10):
        xs = rng.choice(np.arange(1, n + 1), t, replace=False).tolist()
        assert shamir.combine({x: shares[x] for x in xs}, t) == secret
    few = {x: shares[x] for x in rng.choice(np.arange(1, n + 1), t - 1, replace=False).tolist()}
    with pytest.raises(ValueError, match="need 5 shares"):
        shamir.combine(few, t)
    # Information-theoretic: for any candidate secret there is a degree t-1 polynomial through it and the
    # t-1 shares, completed by a t-th share that reconstructs the candidate.
    points = sorted(few.items())
    missing = next(x for x in range(1, n + 1) if x not in few)
    for candidate in (0, 1, secret, shamir.random_secret(), shamir.P - 1):
        y = shamir.interpolate([(0, candidate)] + points, missing)
        assert shamir.combine({**few, missing: y}, t) == candidate
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, n + 1, list(range(1, n + 1)))


# ---------------------------------------------------------------------------------------------------
# DP
# ---------------------------------------------------------------------------------------------------
def test_accountant_matches_published_values():
    # dp-accounting's own test vector (test_compute_epsilon_delta_gaussian): noise 4.530877117 without
    # sampling gives exactly (1, 1e-6)-DP.
    assert dp.Accountant(4.530877117, 1.0, 1e-6).epsilon(1) == pytest.approx(1.0, rel=0.01)
    # the scaled one-round curve equals a full composition through the public API
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant(orders=dp.RDP_ORDERS)
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 200)
    acc = dp.Accountant(1.2, 0.1, 1e-5)
    assert acc.epsilon(200) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert acc.epsilon(0) == 0.0 and acc.epsilon(10) < acc.epsilon(200)


def test_clip_l2(rng):
    d = rng.normal(size=100)
    assert np.linalg.norm(dp.clip_l2(d, 0.5)) == pytest.approx(0.5)
    assert np.array_equal(dp.clip_l2(d * 1e-3, 0.5), d * 1e-3)


# ---------------------------------------------------------------------------------------------------
# Runs (one process)
# ---------------------------------------------------------------------------------------------------
def _toy(clients=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=g)
    sets = []
    for c in range(clients):
        x = torch.randn(4 + c % 9, 16, generator=g)
        sets.append(TensorDataset(x, (x @ w).argmax(1)))
    x = torch.randn(100, 16, generator=g)
    return sets, TensorDataset(x, (x @ w).argmax(1))


def _run(cfg, clients, test, **kw):
    models = []

    def model_fn():
        models.append(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
        return models[-1]

    history = run_federated(model_fn, clients, test, cfg, **kw)
    return history, torch.nn.utils.parameters_to_vector(models[-1].parameters()).detach().clone()


def test_secure_aggregation_run_equals_fixed_point_run_and_is_deterministic():
    clients, test = _toy()
    base = dict(rounds=4, clients=16, clients_per_round=6, local_epochs=2, lr=0.2, seed=3, dropout=0.2)
    h_sec, m_sec = _run(FedConfig(secure_aggregation=True, **base), clients, test)
    h_fix, m_fix = _run(FedConfig(fixed_point=True, **base), clients, test)
    assert torch.equal(m_sec, m_fix)
    assert [h["test_loss"] for h in h_sec] == [h["test_loss"] for h in h_fix]
    assert [h["survivors"] for h in h_sec] != [h["clients"] for h in h_sec]  # some dropped out
    _, m_plus = _run(FedConfig(secure_aggregation=True, secagg_neighbors=2, **base), clients, test)
    assert torch.equal(m_plus, m_fix)  # SecAgg+ (each client masks with 2 neighbours): the same sums
    h_again, m_again = _run(FedConfig(secure_aggregation=True, **base), clients, test)
    assert torch.equal(m_again, m_sec)
    _, m_other = _run(FedConfig(secure_aggregation=True, **{**base, "seed": 4}), clients, test)
    assert not torch.equal(m_other, m_sec)
    # the float path is a different rounding of the same arithmetic
    _, m_float = _run(FedConfig(**base), clients, test)
    assert torch.allclose(m_float, m_fix, atol=1e-4)


def test_rounds_with_too_few_survivors_abort_and_keep_the_model():
    clients, test = _toy()
    cfg = FedConfig(rounds=6, clients=16, clients_per_round=6, local_epochs=1, lr=0.2, seed=0,
                    secure_aggregation=True, dropout=0.5)
    history, _ = _run(cfg, clients, test)
    aborted = [i for i, h in enumerate(history) if "aborted" in h]
    assert aborted and len(aborted) < len(history), [h["survivors"] for h in history]
    for i in aborted:
        assert "below the threshold t = 4" in history[i]["aborted"]
        before = history[i - 1]["test_loss"] if i else None
        if before is not None:
            assert history[i]["test_loss"] == before  # the model did not change


def test_fedprox_and_dp_runs(tmp_path):
    clients, test = _toy()
    h_prox, m_prox = _run(FedConfig(rounds=2, clients=16, clients_per_round=4, algorithm="fedprox", prox_mu=1.0, local_epochs=3,
                                    seed=2), clients, test)
    _, m_avg = _run(FedConfig(rounds=2, clients=16, clients_per_round=4, local_epochs=3, seed=2), clients, test)
    assert not torch.equal(m_prox, m_avg)
    cfg = FedConfig(rounds=3, clients=16, clients_per_round=4, seed=2, dp_clip=0.5, dp_noise_multiplier=1.0,
                    secure_aggregation=True)
    history, _ = _run(cfg, clients, test, checkpoint_dir=str(tmp_path))
    eps = [h["epsilon"] for h in history]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(dp.Accountant(1.0, 0.25, 1e-5).epsilon(3))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    # resume continues to the same result as an uninterrupted run
    more = FedConfig(**{**cfg.__dict__, "rounds": 4})
    resumed, m_res = _run(more, clients, test, checkpoint_dir=str(tmp_path), resume=True)
    full, m_full = _run(more, clients, test)
    assert torch.equal(m_res, m_full) and len(resumed) == 4
    with pytest.raises(FedError, match="seed"):
        _run(FedConfig(**{**more.__dict__, "seed": 9}), clients, test, checkpoint_dir=str(tmp_path), resume=True)


def test_sampling_and_split_are_deterministic():
    cfg = FedConfig(rounds=5, clients=100, clients_per_round=10, seed=7)
    assert sample_clients(cfg, 3) == sample_clients(cfg, 3)
    assert sample_clients(cfg, 3) != sample_clients(cfg, 4)
    assert len(sample_clients(cfg, 3)) == 10
    labels = np.repeat(np.arange(10), 50)
    a, b = dirichlet_split(labels, 20, 0.5, 1), dirichlet_split(labels, 20, 0.5, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(500))
    # small alpha: clients see few classes
    assert np.mean([len(np.unique(labels[i])) for i in dirichlet_split(labels, 20, 0.1, 1)]) < \
        np.mean([len(np.unique(labels[i])) for i in dirichlet_split(labels, 20, 100.0, 1)])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="clients_per_round must be <= clients"):
        FedConfig(clients=5, clients_per_round=6).validate()
    with pytest.raises(ValueError, match="dp_clip and dp_noise_multiplier go together"):
        FedConfig(dp_clip=1.0).validate()
    with pytest.raises(ValueError, match="algorithm"):
        FedConfig(algorithm="sgd").validate()
    with pytest.raises(ValueError, match="secure_aggregation needs the fixed-point path"):
        FedConfig(secure_aggregation=True, fixed_point=False).validate()
    clients, test = _toy()
    with pytest.raises(ValueError, match="16 client datasets for FedConfig.clients = 10"):
        run_federated(lambda: nn.Linear(16, 4), clients, test, FedConfig(clients=10, clients_per_round=2))


# ---------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------
def _launch(mode, world, tmp, timeout_s, job_timeout_s):
    store = os.path.join(tmp, "store")
    env = dict(os.environ, PYTHONPATH=str(PKG_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(r), str(world), store, tmp, str(timeout_s)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + job_timeout_s
    outs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append(out)
        codes.append(p.returncode)
    return codes, outs


def test_two_processes_secure_equals_fixed_and_int32_sums_wrap():
    with tempfile.TemporaryDirectory() as tmp:
        codes, outs = _launch("equal", 2, tmp, timeout_s=30, job_timeout_s=120)
        assert codes == [0, 0], outs
        r0 = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    # ld.all_reduce of int32 wraps around in two's complement: (2^31-1)*2 = -2, (-2^31)*2 = 0 mod 2^32
    assert r0["wrap"].tolist() == [-2, 0, 14]
    assert torch.equal(r0["secure"], r0["fixed"]) and torch.equal(r0["secure"], r1["secure"])
    assert r0["secure_history"] == r1["secure_history"]  # every rank returns the same history
    assert r0["secure_history"] == r0["fixed_history"]
    assert any(h["survivors"] < h["clients"] for h in r0["secure_history"])


def test_killed_process_is_a_clear_error_not_a_hang():
    with tempfile.TemporaryDirectory() as tmp:
        codes, outs = _launch("kill", 2, tmp, timeout_s=10, job_timeout_s=60)
    assert codes[1] == -9, outs[1]
    # the survivor exits by itself with the error (a hang would end in the job timeout's kill instead)
    assert codes[0] == 3, outs[0]
    assert "FedError: federated round" in outs[0] and "a peer process died or stopped answering" in outs[0]


def test_cli_runs_resumes_and_reports(tmp_path, capfd):
    from lepton_core.federated import cli

    out = str(tmp_path / "run")
    argv = ["--clients", "20", "--clients-per-round", "5", "--rounds", "2", "--secure-agg", "--dropout", "0.1",
            "--dp-clip", "1.0", "--dp-noise", "1.0", "--nproc", "2", "--local-epochs", "1", "--out", out]
    assert cli.main(cli.build_parser().parse_args(argv)) == 0
    text = capfd.readouterr().out
    assert "round 2/2" in text
    final = [line for line in text.splitlines() if "done:" in line][-1]
    assert "test accuracy" in final and "%" in final and "epsilon" in final
    argv[argv.index("--rounds") + 1] = "3"
    assert cli.main(cli.build_parser().parse_args(argv + ["--resume"])) == 0
    text = capfd.readouterr().out
    assert "round 3/3" in text and "round 1/3" not in text
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli.main(cli.build_parser().parse_args(argv[:-2] + ["--out", out, "--resume", "--seed", "1"])) == 2
    assert "was made with seed=0" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------
# `lepton bench federated`: the Flower table
# ---------------------------------------------------------------------------------------------------
def _fake_lepton_rows(calls):
    def run_variants(job):
        (name, extra), = job["variants"]
        calls.append((name, job["rounds"], job["per_round"]))
        ms = 70.0 if extra.get("secure_aggregation") else 50.0
        return [{"clients_per_round": job["per_round"][0], "variant": name, "rounds": job["rounds"] - 1,
                 "ms_per_round": ms, "test_accuracy": 0.9}]
    return run_variants


def test_bench_flower_rows_say_why_when_flwr_is_missing(monkeypatch):
    from lepton_core.benchmarks import federated, federated_flower as ff

    calls = []
    monkeypatch.setattr(federated, "run_variants", _fake_lepton_rows(calls))
    monkeypatch.setattr(federated, "digits_job", lambda: {})
    monkeypatch.setattr(ff, "unavailable", lambda: "flwr is not installed (test)")
    monkeypatch.setattr(ff, "run_variant", lambda *a: pytest.fail("Flower ran although it is unavailable"))
    rows = ff.run(quick=True)
    assert [r["variant"] for r in rows] == [v for _, v, _ in ff.PLAN]
    assert calls == [("fedavg", ff.QUICK_ROUNDS, (10,)), ("secure agg", ff.QUICK_ROUNDS, (10,))]
    for r in rows:
        if r["framework"] == "flwr":
            assert r["note"] == "skipped: flwr is not installed (test)" and "ms_per_round" not in r
        else:
            assert r["rounds"] == ff.QUICK_ROUNDS  # the run's rounds, not the timed ones
    secure = next(r for r in rows if r["variant"] == "secure agg")
    assert secure["vs_plain"] == pytest.approx(1.4) and secure["vs_lepton"] == 1.0


def test_bench_flower_ratios_and_the_table_in_lepton_bench(monkeypatch, capsys):
    from lepton_core import cli
    from lepton_core.benchmarks import federated, federated_flower as ff

    ms = {"flower fedavg": 200.0, "flower fedavg (legacy)": 210.0, "flower secagg+": 840.0}
    monkeypatch.setattr(federated, "run_variants", _fake_lepton_rows([]))
    monkeypatch.setattr(federated, "digits_job", lambda: {})
    monkeypatch.setattr(ff, "unavailable", lambda: None)
    monkeypatch.setattr(ff, "run_variant", lambda v, rounds, k: {"framework": "flwr x", "variant": v, "rounds": rounds,
                                                                 "clients_per_round": k, "ms_per_round": ms[v]})
    rows = {r["variant"]: r for r in ff.run(rounds=7)}
    assert rows["fedavg"]["rounds"] == 7 and rows["flower fedavg"]["rounds"] == 7
    assert rows["flower secagg+"]["vs_plain"] == pytest.approx(4.0)  # against Flower's own unmasked path
    assert rows["flower secagg+"]["vs_lepton"] == pytest.approx(12.0)  # against our secure aggregation
    assert rows["flower fedavg"]["vs_lepton"] == pytest.approx(4.0) and rows["flower fedavg"]["vs_plain"] == 1.0
    monkeypatch.setattr(federated, "run", lambda quick=False: [{"variant": "fixed point"}])
    assert cli.main(["bench", "federated", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "### federated\n" in out and f"### {ff.TITLE}\n" in out and "flower secagg+" in out


def test_flower_simulation_runs_the_same_job():
    """Needs flwr[simulation] (not a dependency of lepton_core: skipped in CI). In a subprocess: Ray's and
    Flower's own deprecation warnings and threads are theirs, not this suite's (warnings are errors here)."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    code = ("import json; from lepton_core.benchmarks import federated_flower as ff; assert ff.unavailable() is None; "
            "print(json.dumps([ff.run_variant(v, 2, 10) for v in ('flower fedavg', 'flower secagg+')]))")
    env = {**os.environ, "PYTHONPATH": str(PKG_PARENT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["variant"] for r in rows] == ["flower fedavg", "flower secagg+"]
    for row in rows:
        assert row["rounds"] == 2 and 0.0 <= row["test_accuracy"] <= 1.0 and row["ms_per_round"] > 0
