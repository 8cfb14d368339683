"""DP-SGD in the trainer (lepton_core/train/dp.py): ghost per-example norms against torch.func
per-example gradients (float64), the clipping bound per example, the noise's calibration, ranks
bitwise identical, exact resume with the accountant's state, epsilon against a published value, and
the errors."""
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("dp_accounting")

import lepton_core  # noqa: E402
import lepton_core.nn as lnn  # noqa: E402
from lepton_core.privacy import Accountant, noise_for_epsilon  # noqa: E402
from lepton_core.train import TrainConfig, Trainer  # noqa: E402
from lepton_core.train import dp as dpmod  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lepton_core.__file__)))


def _fixed_out_grad(b, t, d_out, seed):
    """A loss whose gradient with respect to the layer output is a fixed random tensor w: sum(w * out)."""
    w = torch.randn(b, t, d_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,t,d_in,d_out", [(7, 1, 33, 5), (5, 4, 32, 33), (3, 40, 3, 6), (1, 7, 9, 257)])
def test_per_example_norms_match_torch_func(b, t, d_in, d_out, bias):
    torch.manual_seed(0)
    layer = lnn.Linear(d_in, d_out, bias=bias)
    a = torch.randn(b, t, d_in)
    w = _fixed_out_grad(b, t, d_out, 1)
    # per-example gradient of sum_t w_t . (W a_t + bias): reference in float64 through torch.func
    ref_layer = nn.Linear(d_in, d_out, bias=bias).double()
    with torch.no_grad():
        ref_layer.weight.copy_(layer.weight)
        if bias:
            ref_layer.bias.copy_(layer.bias)
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in ref_layer.named_parameters()}
    per = vmap(grad(lambda p, ai, wi: (functional_call(ref_layer, p, (ai,)) * wi).sum()),
               in_dims=(None, 0, 0))(params, a.double(), w)
    want = sum(g.reshape(b, -1).square().sum(1) for g in per.values())
    got = dpmod.per_example_sq_norms(a, w.float(), with_bias=bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_both_sequence_forms_are_exercised():
    """The cases above cover the Gram form (T^2 < in out) and the materialized one."""
    assert dpmod.gram_is_cheaper(4, 32, 33) and not dpmod.gram_is_cheaper(40, 3, 6)


def test_clipped_sequence_gradients_match_torch_func():
    """Both sequence forms through the clipping: per-example clipped gradients of a 2-layer token-wise
    model (layer 1: Gram, layer 2: materialized and reused) summed, against torch.func in float64."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(lnn.Linear(24, 20), nn.Tanh(), lnn.Linear(20, 3))
    assert dpmod.gram_is_cheaper(8, 24, 20) and not dpmod.gram_is_cheaper(8, 20, 3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 8, 24, generator=g), torch.randint(0, 3, (6,), generator=g)
    clip = 0.1
    engine = dpmod.DPSGD(model, TrainConfig(dp_clip=clip, dp_noise_multiplier=1.0, batch_size=6).validate(), 12, 1)
    with engine.capture() as cap:
        out = model(x.detach().requires_grad_(True))
        got = engine.clipped_grads(cap, nn.functional.cross_entropy(out.mean(1), y) * 6, 1.0)
    # An input without grad (the trainer's case): the first layer's output becomes a leaf, so no input
    # gradient is computed for it, and the clipped sum is the same.
    with engine.capture() as cap:
        got_leaf = engine.clipped_grads(cap, nn.functional.cross_entropy(model(x).mean(1), y) * 6, 1.0)
    torch.testing.assert_close(got_leaf, got, rtol=1e-6, atol=1e-8)
    ref = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(ref, p, (xi,)).mean(0, keepdim=True), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    flat = torch.cat([per[k].reshape(6, -1) for k, _ in ref.named_parameters()], 1)
    want = (flat * (clip / flat.norm(dim=1)).clamp(max=1.0)[:, None]).sum(0)
    assert (flat.norm(dim=1) > clip).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def _mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(lnn.Linear(6, 9, bias=bias), nn.Tanh(), lnn.Linear(9, 4, bias=bias))


def _reference_clipped(model, x, y, clip):
    """float64 per-example gradients by torch.func, each scaled to norm <= clip: (B, P) and the norms."""
    from torch.func import functional_call, grad, vmap

    ref = nn.Sequential(nn.Linear(6, 9, bias=model[0].bias is not None), nn.Tanh(),
                        nn.Linear(9, 4, bias=model[0].bias is not None)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(ref, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    flat = torch.cat([per[k].reshape(x.shape[0], -1) for k, _ in ref.named_parameters()], 1)
    norms = flat.norm(dim=1)
    return flat * (clip / norms).clamp(max=1.0)[:, None], norms


def _clipped_sum(engine, model, x, y):
    with engine.capture() as cap:
        out = model(x.detach().requires_grad_(True))
        loss = nn.functional.cross_entropy(out, y) * x.shape[0]
        return engine.clipped_grads(cap, loss, 1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_every_example_is_clipped_to_the_bound(bias):
    model = _mlp(bias)
    clip = 0.05  # below most examples' norms, so clipping is active
    engine = dpmod.DPSGD(model, TrainConfig(dp_clip=clip, dp_noise_multiplier=1.0, batch_size=4).validate(), 32, 1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(11, 6, generator=g), torch.randint(0, 4, (11,), generator=g)
    want, norms = _reference_clipped(model, x, y, clip)
    assert (norms > clip).sum() >= 8
    for i in range(x.shape[0]):  # each example's contribution alone
        got = _clipped_sum(engine, model, x[i:i + 1], y[i:i + 1])
        assert float(got.norm()) <= clip * (1 + 1e-5)
        torch.testing.assert_close(got.double(), want[i], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_clipped_sum(engine, model, x, y).double(), want.sum(0), rtol=1e-4, atol=1e-6)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 3
    return TensorDataset(centers[y] + torch.randn(n, 16, generator=g), y)


def _model():
    torch.manual_seed(0)
    return lnn.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), dtype=None)


def test_noise_has_std_z_times_c_on_a_zero_gradient_model():
    """One SGD step (lr 1, constant) of a model whose loss has zero gradient moves each parameter by exactly the
    noise / (q N); the sample std of (q N) x the moves is Z C within 5 standard errors."""
    z, clip, n = 1.7, 0.3, 200
    model = _model()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    cfg = TrainConfig(dp_clip=clip, dp_noise_multiplier=z, batch_size=20, epochs=1, max_steps=1, precision="fp32",
                      lr=1.0, lr_schedule="constant",
                      compression="none", progress=False)
    with Trainer(model, _blobs(n, 1), None, cfg, loss_fn=lambda out, y: (out * 0).sum(),
                 optimizer=lambda p: torch.optim.SGD(p, lr=1.0)) as t:
        t.fit()
        after = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
        expected_batch = t.dp.expected_batch
    assert expected_batch == pytest.approx(20.0)
    noise = (before - after).double() * expected_batch
    m = noise.numel()
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(m)
    assert abs(float(noise.std()) / (z * clip) - 1) < 5 / math.sqrt(2 * (m - 1))


def _fit(cfg, callbacks=()):
    with Trainer(_model(), _blobs(240, 1), _blobs(100, 2), cfg, callbacks=callbacks) as t:
        summary = t.fit()
        return summary, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.mark.parametrize("precision,compression", [("fp32", "none"), ("bf16", "int8"), ("fp16", "int8")])
def test_resume_is_exact_and_carries_the_accountant(tmp_path, precision, compression):
    common = dict(epochs=3, batch_size=24, lr=0.01, precision=precision, compression=compression, progress=False,
                  dp_clip=1.0, dp_target_epsilon=4.0)
    full, w_full = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "a"), **common))
    assert full["steps"] == 30 and full["eval_accuracy"] > 0.5
    eps = [r["epsilon"] for r in full["history"]]
    assert eps[0] < eps[1] < eps[2] <= 4.0 * 1.001 and eps[2] > 3.9  # the planned run spends the target
    part, _ = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), max_steps=14, **common))
    assert part["stopped_early"]
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ranks"][0]["callbacks"]["dp_sgd"]
    assert saved["sampling_rate"] == pytest.approx(0.1) and saved["noise_multiplier"] > 0
    rest, w_rest = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), resume=True, **common))
    assert all(torch.equal(w_rest[k], w_full[k]) for k in w_full)
    strip = [{k: v for k, v in r.items() if k not in ("samples_per_s", "epoch_s")} for r in rest["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("samples_per_s", "epoch_s")} for r in full["history"]]


def test_resume_with_another_noise_is_refused(tmp_path):
    common = dict(epochs=2, batch_size=24, progress=False, dp_clip=1.0, checkpoint_dir=str(tmp_path))
    _fit(TrainConfig(dp_noise_multiplier=1.0, max_steps=3, **common))
    with pytest.raises(ValueError, match="dp_noise_multiplier=1.0"):
        _fit(TrainConfig(dp_noise_multiplier=2.0, resume=True, **common))


def test_epsilon_matches_a_published_value():
    """dp-accounting's own test vector (test_compute_epsilon_delta_gaussian): z = 4.530877117, one step
    without sampling, is epsilon 1 at delta 1e-6; and the DP-SGD setting of Abadi et al. 2016's MNIST
    example (q = 256/60000, z = 1.1, 60 epochs, delta 1e-5) agrees with Opacus's RDP accountant within 1%
    (2.597 both, measured) when Opacus is installed."""
    assert Accountant(4.530877117, 1.0, 1e-6).epsilon(1) == pytest.approx(1.0, rel=0.01)
    q, z, steps = 256 / 60000, 1.1, 60 * 60000 // 256
    eps = Accountant(z, q, 1e-5).epsilon(steps)
    assert eps == pytest.approx(2.597, rel=0.01)
    rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    from opacus.accountants import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    eps_opacus, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps,
                                                                             orders=orders), delta=1e-5)
    assert eps == pytest.approx(float(eps_opacus), rel=0.01)


def test_noise_for_epsilon_inverts_the_accountant():
    z = noise_for_epsilon(3.0, 0.01, 1000, 1e-5)
    assert Accountant(z, 0.01, 1e-5).epsilon(1000) <= 3.0
    assert Accountant(z * 0.99, 0.01, 1e-5).epsilon(1000) > 3.0
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_for_epsilon(0.0, 0.01, 10, 1e-5)


def test_layers_that_cannot_be_clipped_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(lnn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"1\.weight, 1\.bias, 2\.weight, 2\.bias"):
        Trainer(model, _blobs(40, 1), None, TrainConfig(dp_clip=1.0, dp_noise_multiplier=1.0, progress=False))
    model[1].requires_grad_(False)
    model[2] = lnn.Linear(8, 4)
    with Trainer(model, _blobs(40, 1), None, TrainConfig(dp_clip=1.0, dp_noise_multiplier=1.0, progress=False,
                                                         epochs=1)) as t:
        t.fit()  # frozen other layers are fine


@pytest.mark.parametrize("kw,match", [
    (dict(dp_clip=1.0), "exactly one of dp_noise_multiplier and dp_target_epsilon"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_target_epsilon=2.0), "exactly one of"),
    (dict(dp_noise_multiplier=1.0), "dp_clip must be set"),
    (dict(dp_clip=-1.0, dp_noise_multiplier=1.0), "dp_clip must be None or a positive number"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=1.5), "dp_delta must be in"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, grad_accum=2), "grad_accum must be 1 with DP-SGD"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def test_cli_options_reach_the_config():
    from lepton_core.train import cli

    args = cli.build_parser().parse_args(["--dp-clip", "0.5", "--dp-epsilon", "3", "--dp-delta", "1e-6"])
    cfg = cli._config_from_args(args)
    assert (cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_target_epsilon, cfg.dp_delta) == (0.5, None, 3.0, 1e-6)
    args = cli.build_parser().parse_args(["--dp-clip", "0.5", "--dp-noise", "1.1"])
    assert cli._config_from_args(args).dp_noise_multiplier == 1.1


_WORKER = r"""
import sys, torch
from torch import nn
from torch.utils.data import TensorDataset
import lepton_core.nn as lnn
from lepton_core.train import TrainConfig, Trainer
g = torch.Generator().manual_seed(1)
y = torch.randint(0, 4, (300,), generator=g)
x = torch.randn(4, 16, generator=torch.Generator().manual_seed(99))[y] * 3 + torch.randn(300, 16, generator=g)
torch.manual_seed(0)
model = lnn.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), dtype=None)
cfg = TrainConfig(epochs=2, batch_size=16, precision="bf16", compression="int8", progress=False, dp_clip=1.0,
                  dp_noise_multiplier=1.0, timeout_s=60)
with Trainer(model, TensorDataset(x, y), None, cfg) as t:
    t.fit()
    torch.save(t.model.state_dict(), sys.argv[1])
"""


@pytest.mark.distributed
def test_two_ranks_stay_bitwise_identical(tmp_path):
    """2 processes, bf16, int8-compressed all-reduce: after training the ranks' models are equal, bit for
    bit (the noise is drawn alike on every rank and added to the identical reduced sum)."""
    (tmp_path / "worker.py").write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / f"r{rank}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = _model().state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)  # it trained


@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (the digits data) is not installed")
def test_lepton_train_reports_epsilon_every_epoch(tmp_path):
    """`lepton train --dp-clip --dp-epsilon` on 2 workers (bf16, int8): epsilon at the end of each epoch's
    line, in metrics.jsonl and in the final lines; the run spends the target."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lepton_core.train", "--dp-clip", "1", "--dp-epsilon", "4", "--epochs",
                        "2", "--hidden", "32", "--batch-size", "64", "--no-progress", "--checkpoint-dir", "ck"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all(re.search(r"  epsilon \d+\.\d+$", line) for line in lines)
    recs = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in recs] == [1, 2] and 0 < recs[0]["epsilon"] < recs[1]["epsilon"] <= 4.0
    assert f"DP-SGD: epsilon {recs[1]['epsilon']:.3f} at delta 1e-05 (clip 1)" in r.stdout
