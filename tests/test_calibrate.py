"""quantize_model(..., calibrate=...) and QuantLinear.from_linear(..., input_moment=...): GPTQ rounding
(lepton_core/_gptq.py) against an unblocked float64 reference written here from the paper's
column-by-column form (inverse of H updated by a rank-1 downdate after each column, no Cholesky, no
blocks), plus what calibration must buy (a lower output error on inputs like the calibration ones) and
what it must keep (the codes' format and meaning, the forward contract, determinism, clear errors).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lepton_core.nn as lnn
from lepton_core import _gptq, _qpack


def _correlated_inputs(rows, k, seed=0):
    """Inputs whose features are strongly correlated (what real activations look like to GPTQ)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return (torch.randn(rows, k, generator=g) @ mix) * (1 + torch.rand(k, generator=g) * 3)


def _moment(x):
    x = x.double().reshape(-1, x.shape[-1])
    return x.t() @ x / x.shape[0]


def _reference(w, h, scheme, group_size):
    """Dequantized weight of column-by-column GPTQ in float64: round column i, push its error onto the
    later columns through H^-1's row i, then drop i from H^-1 (rank-1 downdate)."""
    w = w.double().clone()
    n, k = w.shape
    h = h.clone()
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1
    hinv = torch.linalg.inv(h + _gptq.DAMP * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype))
    out = torch.empty_like(w)
    if scheme != "w4":
        _, row_scale = _qpack.quantize_w8(w.float())
    for i in range(k):
        if scheme == "w4":
            if i % group_size == 0:
                grp = w[:, i:i + group_size].float()
                scale, zero = _qpack.w4_range(grp.amin(1).clamp(max=0), grp.amax(1).clamp(min=0))
            q = (_qpack.w4_codes(w[:, i].float(), scale, zero) - zero) * scale
        else:
            safe = torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
            q = torch.round(w[:, i].float() / safe).clamp(-127, 127) * row_scale
        out[:, i] = q.double()
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return out.float()


@pytest.mark.parametrize("scheme,group_size", [("w4", 32), ("w4", 64), ("w8", 128), ("w8a8", 128)])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 100), (5, 300)])  # 300: past a 128-column block, short last group
def test_matches_the_unblocked_reference(scheme, group_size, n, k):
    torch.manual_seed(n * 1000 + k)
    lin = nn.Linear(k, n)
    x = _correlated_inputs(4 * k + 8, k)
    x[:, k // 3] = 0  # a dead input
    h = _moment(x)
    q = lnn.QuantLinear.from_linear(lin, scheme, group_size, input_moment=h)
    ref = _reference(lin.weight.detach(), h, scheme, group_size)
    ours = q.dequantize_weight()
    # float64 sums in another order may flip a code sitting on a rounding tie; then later columns differ
    # a little. Almost every weight must agree exactly.
    same = (ours == ref).double().mean().item()
    assert same >= 0.99, same
    assert torch.allclose(ours, ref, rtol=0, atol=float((ref.abs().max() + 1) * 0.05))


def _output_sq_err(x, w_q, w):
    return (x.double() @ (w_q.double() - w.double()).t()).square().sum().item()


@pytest.mark.parametrize("scheme,group_size", [("w4", 32), ("w4", 64), ("w8", 128), ("w8a8", 128)])
def test_calibration_lowers_the_output_error(scheme, group_size):
    torch.manual_seed(1)
    k, n = 192, 48
    model = nn.Sequential(nn.Linear(k, n))
    x = _correlated_inputs(1024, k, seed=1)
    nearest = lnn.quantize_model(model, scheme, group_size=group_size)
    calibrated = lnn.quantize_model(model, scheme, group_size=group_size, calibrate=lambda m: m(x[:512]))
    held_out = x[512:]  # not seen by calibrate
    w = model[0].weight.detach()
    e_near = _output_sq_err(held_out, nearest[0].dequantize_weight(), w)
    e_cal = _output_sq_err(held_out, calibrated[0].dequantize_weight(), w)
    assert e_cal < 0.8 * e_near, (e_cal, e_near)
    assert not model[0]._forward_pre_hooks  # the hooks went with the copy


@pytest.mark.parametrize("scheme,group_size", [("w4", 64), ("w8", 128), ("w8a8", 128)])
def test_calibrated_layer_keeps_the_format_and_the_forward_contract(scheme, group_size):
    torch.manual_seed(2)
    k, n = 130, 37
    model = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 9))
    x = _correlated_inputs(300, k, seed=2)
    a = lnn.quantize_model(model, scheme, group_size=group_size, calibrate=lambda m: m(x))
    b = lnn.quantize_model(model, scheme, group_size=group_size, calibrate=lambda m: m(x))
    for name, t in a.state_dict().items():  # deterministic
        assert torch.equal(t, b.state_dict()[name]), name
    layer = a[0]
    codes = _qpack._unpanel(layer.codes, n) if scheme != "w8a8" else layer.codes
    if scheme == "w4":
        nib = torch.stack((codes & 15, codes >> 4), 2).reshape(n, -1)[:, :k]
        assert int(nib.max()) <= 15
    else:
        assert int(codes.abs().max()) <= 127
    xb = torch.randn(5, k)
    ref = F.linear(xb, layer.dequantize_weight(), layer.bias)
    tol = 0.05 if scheme == "w8a8" else 1e-4  # w8a8 also rounds the activations
    assert torch.allclose(layer(xb), ref, rtol=tol, atol=tol * ref.abs().max().item())
    fresh = nn.Sequential(lnn.QuantLinear(k, n, scheme=scheme, group_size=group_size), nn.ReLU(),
                          lnn.QuantLinear(n, 9, scheme=scheme, group_size=group_size))
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh(xb), a(xb))


def test_a_layer_calibrate_never_runs_keeps_nearest_rounding_with_a_warning():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    x = _correlated_inputs(64, 16)
    with pytest.warns(UserWarning, match=r"calibrate never ran 1 layer\(s\).*: 1$"):
        q = lnn.quantize_model(model, "w8", calibrate=lambda m: m[0](x))
    assert torch.equal(q[1].dequantize_weight(), lnn.QuantLinear.from_linear(model[1], "w8").dequantize_weight())


def test_a_dead_input_keeps_its_nearest_code():
    torch.manual_seed(4)
    lin = nn.Linear(40, 6)
    x = _correlated_inputs(200, 40)
    x[:, 7] = 0
    cal = lnn.QuantLinear.from_linear(lin, "w8", input_moment=_moment(x)).dequantize_weight()
    near = lnn.QuantLinear.from_linear(lin, "w8").dequantize_weight()
    assert torch.isfinite(cal).all()
    assert torch.equal(cal[:, 7], near[:, 7])
    assert not torch.equal(cal, near)


def test_inplace_calibration_leaves_no_hooks():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    q = lnn.quantize_model(model, "w4", group_size=32, inplace=True, calibrate=lambda m: m(torch.randn(20, 8)))
    assert q is model and all(not m._forward_pre_hooks for m in model.modules())


def test_errors():
    lin = nn.Linear(6, 3)
    with pytest.raises(TypeError, match="lc.nn.quantize_model: calibrate must be callable"):
        lnn.quantize_model(lin, "w8", calibrate=[torch.randn(2, 6)])
    with pytest.raises(ValueError, match=r"from_linear: input_moment must have shape .* \(6, 6\), got \(5, 5\)"):
        lnn.QuantLinear.from_linear(lin, "w8", input_moment=torch.eye(5))
    with pytest.raises(TypeError, match="input_moment must be a floating-point tensor, got int64"):
        lnn.QuantLinear.from_linear(lin, "w8", input_moment=torch.eye(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="input_moment has non-finite values"):
        lnn.QuantLinear.from_linear(lin, "w8", input_moment=torch.full((6, 6), float("nan")))
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="calibration input of layer '0' has non-finite values"):
        lnn.quantize_model(model, "w4", group_size=32, calibrate=lambda m: m(torch.full((2, 6), float("inf"))))
    assert not model[0]._forward_pre_hooks

    def boom(m):
        raise RuntimeError("user code failed")
    with pytest.raises(RuntimeError, match="user code failed"):
        lnn.quantize_model(model, "w8", calibrate=boom, inplace=True)
    assert not model[0]._forward_pre_hooks and isinstance(model[0], nn.Linear)


def test_calibrate_with_no_convertible_layer_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lnn.quantize_model(nn.Sequential(nn.ReLU()), "w8", calibrate=lambda m: None)
    assert len(caught) == 1 and "nothing to convert" in str(caught[0].message)


def test_calibrate_may_mix_inference_mode_and_grad_mode():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(24, 8))
    x = _correlated_inputs(60, 24)

    def mixed(m):
        with torch.inference_mode():
            m(x[:30])
        m(x[30:])

    def mixed_other_order(m):
        m(x[:30])
        with torch.inference_mode():
            m(x[30:])
    plain = lnn.quantize_model(model, "w4", group_size=32,
                               calibrate=lambda m: (m(x[:30]), m(x[30:])))[0].dequantize_weight()
    for fn in (mixed, mixed_other_order):
        got = lnn.quantize_model(model, "w4", group_size=32, calibrate=fn)[0].dequantize_weight()
        assert torch.equal(got, plain)


def test_a_bare_layer_and_an_hf_conv1d_calibrate_like_the_equivalent_linear():
    torch.manual_seed(6)
    x = _correlated_inputs(100, 20)
    lin = nn.Linear(20, 12)
    want = lnn.QuantLinear.from_linear(lin, "w4", 32, input_moment=_moment(x)).dequantize_weight()
    bare = lnn.quantize_model(lin, "w4", group_size=32, calibrate=lambda m: m(x))  # the model is the layer
    assert isinstance(bare, lnn.QuantLinear) and torch.equal(bare.dequantize_weight(), want)
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="needs the [infer] extra (transformers)")
    conv = pytorch_utils.Conv1D(12, 20)  # x @ W + b with W (in, out)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
    q = lnn.quantize_model(nn.Sequential(conv), "w4", group_size=32, calibrate=lambda m: m(x))
    assert torch.equal(q[0].dequantize_weight(), want)
