"""lc.nn.QuantLinear and lc.nn.quantize_model (API.md §5): quantization formulas, exactness against the
dequantized-weight reference on every CPU ISA, dtypes, leading dims and views, state_dict round trips
with weights_only=True, no_grad / inference_mode / torch.compile, input gradients, model conversion
(filter_fn, deep copy, HF Conv1D, the nothing-converted warning) and argument errors.

Tolerance: API.md §1's float32 bound against F.linear(x.float(), dequantize_weight(), bias) in float64,
plus the output dtype's rounding (tests/tolerances.py).
"""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lepton_core as lc
import lepton_core.nn as lnn
from lepton_core import _qpack
from tolerances import gemm_rel_norm_bound, rel_err as _rel_err

SCHEMES = [("w8", 128), ("w4", 32), ("w4", 64), ("w8a8", 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _name(dt):
    return str(dt).replace("torch.", "")


def _terms(x, q):
    """|x| |W|^T + |bias| in float64: the size of the products and bias an output sums."""
    t = x.float().double().abs() @ q.dequantize_weight().double().abs().t()
    return t if q.bias is None else t + q.bias.double().abs()


def _ref(x, q):
    """F.linear(x.float(), dequantize_weight(), bias) in float64, on the CPU (also for CUDA layers:
    tests/test_cuda_qlinear.py uses these helpers)."""
    b = None if q.bias is None else q.bias.double().cpu()
    return F.linear(x.float().double().cpu(), q.dequantize_weight().double().cpu(), b)


def _w8a8_ref(x, q):
    """scaled_gemm of x quantized per row (lc.quantize "int8", axis=0) and the int8 weight."""
    xq = lc.quantize(x.float().reshape(-1, x.shape[-1]).contiguous(), "int8", axis=0)
    acc = xq.data.double() @ q.codes.double().t()
    y = acc * xq.scale.double()[:, None] * q.scale.double()[None, :]
    y = y if q.bias is None else y + q.bias.double()
    return y.reshape(*x.shape[:-1], q.out_features)


def _bound(dt, k):
    return gemm_rel_norm_bound("float32" if dt == torch.float64 else _name(dt), k)


# ---- quantization formulas (§5: lc.quantize's nearest rounding per group; int8 on a clip-searched absmax) ----

def test_w8_codes_are_lc_quantize_per_row(rng, monkeypatch):
    lin = nn.Linear(70, 9)
    w = lin.weight.detach()
    for scheme in ("w8", "w8a8"):
        wd = lnn.QuantLinear.from_linear(lin, scheme).dequantize_weight()
        for j in range(w.shape[0]):  # §2's "int8" formula on the row's absmax times one of the ratios
            hits = [r for r in _qpack.W8_CLIP_RATIOS if torch.equal(wd[j], _int8_row(w[j], r))]
            assert hits, (scheme, j)
    monkeypatch.setattr(_qpack, "W8_CLIP_RATIOS", (1.0,))  # no search: exactly lc.quantize per row
    for scheme in ("w8", "w8a8"):
        q = lnn.QuantLinear.from_linear(lin, scheme)
        ref = lc.quantize(w, "int8", axis=0)
        assert torch.equal(q.dequantize_weight(), ref.data.float() * ref.scale[:, None])


def _int8_row(row, r):
    scale = row.abs().max() * torch.tensor(r, dtype=torch.float32) / 127
    return torch.clamp(torch.round(row / scale), -127, 127) * scale


@pytest.mark.parametrize("group_size", [32, 64])
def test_w4_formula_per_group(rng, group_size):
    k, n = 100, 5  # K not a multiple of the group: the last group is short
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[0, :group_size] = torch.rand(group_size) + 0.5  # a group of positive values: lo = 0
    q = lnn.QuantLinear.from_linear(lin, "w4", group_size)
    w, wd = lin.weight.detach(), q.dequantize_weight()
    for j in range(n):
        for g0 in range(0, k, group_size):
            grp = w[j, g0:g0 + group_size]
            lo, hi = min(grp.min().item(), 0.0), max(grp.max().item(), 0.0)
            scale = torch.tensor((hi - lo), dtype=torch.float32) / 15
            zp = torch.round(-torch.tensor(lo, dtype=torch.float32) / scale)
            codes = torch.clamp(torch.round(grp / scale) + zp, 0, 15)
            assert torch.equal(wd[j, g0:g0 + group_size], (codes - zp) * scale)
            assert (wd[j, g0:g0 + group_size] - grp).abs().max() <= scale / 2 * (1 + 1e-5)


def _sq_err(wd, w):
    """Squared reconstruction error per row in float64."""
    return (wd.double() - w.double()).square().sum(1)


@pytest.mark.parametrize("scheme", ["w8", "w8a8"])
def test_int8_clip_search_never_increases_the_reconstruction_error(rng, monkeypatch, scheme):
    """The searched scale's error per row is at most absmax's, some rows do clip, codes stay in
    -127..127, and conversion is deterministic (bitwise the same twice)."""
    n, k = 48, 2048
    w = torch.randn(n, k) * torch.rand(n, 1)  # gaussian rows: long rows' rare extremes are worth clipping
    w[3] = 0  # all-zero row: scale 0, codes 0
    w[5] = torch.randn(k) * 1e-44  # subnormal row: a positive scale
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
    q1 = lnn.QuantLinear.from_linear(lin, scheme)
    q2 = lnn.QuantLinear.from_linear(lin, scheme)
    for name, buf in q1.state_dict().items():
        assert torch.equal(buf, q2.state_dict()[name]), name
    with monkeypatch.context() as mp:
        mp.setattr(_qpack, "W8_CLIP_RATIOS", (1.0,))
        absmax = lnn.QuantLinear.from_linear(lin, scheme).dequantize_weight()
    searched = q1.dequantize_weight()
    e_search, e_absmax = _sq_err(searched, w), _sq_err(absmax, w)
    assert (e_search <= e_absmax).all()
    assert (e_search < e_absmax).sum() >= n // 10  # the search does something
    assert e_search.sum() < e_absmax.sum()
    assert torch.equal(searched[3], torch.zeros(k))
    codes, scale = _qpack.quantize_w8(w)
    assert codes.dtype == torch.int8 and codes.min() >= -127
    assert scale[3] == 0 and scale[5] > 0 and torch.isfinite(scale).all()
    assert (scale <= (w.abs().amax(1) / 127).clamp(min=2.0 ** -149)).all()  # a clip, never a widening


# ---- forward ----

@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 33), (7, 33, 257), (33, 257, 7), (3, 100, 40)])
def test_forward_matches_reference(rng, isa, scheme, group_size, m, k, n):
    lin = nn.Linear(k, n)
    q = lnn.QuantLinear.from_linear(lin, scheme, group_size)
    for dt in DTYPES:
        x = torch.randn(m, k).to(dt)
        y = q(x)
        assert y.dtype == dt and y.shape == (m, n)
        ref = _w8a8_ref(x, q) if scheme == "w8a8" else _ref(x, q)
        assert _rel_err(y, ref, _terms(x, q), k) <= _bound(dt, k), (dt, scheme)


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_leading_dims_views_and_no_bias(rng, isa, scheme, group_size):
    lin = nn.Linear(40, 24, bias=False)
    q = lnn.QuantLinear.from_linear(lin, scheme, group_size)
    assert q.bias is None
    for x in (torch.randn(2, 3, 5, 40), torch.randn(40, 6).t(), torch.randn(4, 80)[:, 1::2], torch.randn(0, 40)):
        y = q(x)
        assert y.shape == (*x.shape[:-1], 24)
        ref = _w8a8_ref(x, q) if scheme == "w8a8" else _ref(x, q)
        assert _rel_err(y, ref) <= _bound(torch.float32, 40)


# K past one and two shallow K blocks (1024 int8), and past two of the deep ones (4096) a pre-packed
# weight takes on AVX-512; on AMX the tiles read the weight from 16 rows (K blocks of 1024 on a 48 KiB
# L1d, a tail that is no multiple of the 64-deep tile step), the AVX-512 kernels below.
@pytest.mark.parametrize("m,k,n", [(1, 5, 1), (20, 384, 96), (13, 1100, 70), (25, 2100, 33), (9, 8200, 40),
                                   (16, 64, 32), (64, 1030, 65), (100, 2049, 33)])
def test_w8a8_packed_weight_is_bitwise_the_per_call_packing(rng, isa, threads, m, k, n):
    """The w8a8 weight is packed once per kernel table (backends/cpu.py _packed_b): results equal
    scaled_gemm packing codes^T on every call, bit for bit, also over several K blocks and after the
    codes are written in place (the packing is redone) or the layer is loaded from a state_dict."""
    from lepton_core.backends import cpu

    q = lnn.QuantLinear.from_linear(nn.Linear(k, n), "w8a8")
    x = torch.randn(m, k)

    def per_call(q):
        xq = lc.quantize(x, "int8", axis=0)
        return cpu.scaled_gemm(xq.data, q.codes.t(), xq.scale, q.scale, q.bias, "float32")

    assert torch.equal(q(x), per_call(q)) and torch.equal(q(x), per_call(q))
    with torch.no_grad():
        q.codes[:, 0] = torch.where(q.codes[:, 0] == 0, 1, 0).to(torch.int8)
    assert torch.equal(q(x), per_call(q))
    fresh = lnn.QuantLinear(k, n, scheme="w8a8")
    fresh(x)  # packs its zero codes first
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), per_call(q))


def test_w8a8_packed_weight_stays_out_of_the_state_dict(rng):
    q = lnn.QuantLinear.from_linear(nn.Linear(64, 32), "w8a8")
    x = torch.randn(3, 64)
    y = q(x)  # packs the weight
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = lnn.QuantLinear(64, 32, scheme="w8a8")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)


def test_weight_only_is_close_to_the_float_layer(rng):
    """Sanity of the scale: w8 and w4 outputs stay near the unquantized layer's."""
    lin = nn.Linear(256, 64)
    x = torch.randn(8, 256)
    for scheme, tol in (("w8", 0.02), ("w8a8", 0.03), ("w4", 0.2)):
        y = lnn.QuantLinear.from_linear(lin, scheme, 64)(x)
        assert _rel_err(y, lin(x).detach().double()) < tol, scheme


# inductor imports torch.utils.mkldnn, which warns about its own use of torch.jit (not ours)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_no_grad_inference_mode_compile_and_input_grad(rng, scheme, group_size):
    q = lnn.QuantLinear.from_linear(nn.Linear(33, 17), scheme, group_size)
    x = torch.randn(4, 33)
    eager = q(x)
    with torch.no_grad():
        assert torch.equal(q(x), eager)
    with torch.inference_mode():
        assert torch.equal(q(x), eager)
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), eager)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    g = torch.randn_like(y)
    y.backward(g)
    assert _rel_err(xg.grad, g.double() @ q.dequantize_weight().double()) <= gemm_rel_norm_bound("float32", 17)
    assert not any(t.requires_grad for t in q.buffers())


def test_opcheck(rng):
    q = lnn.QuantLinear.from_linear(nn.Linear(20, 9), "w4", 32)
    args = (torch.randn(3, 20), q.codes, q.scale, q.zero_point, q.bias, "w4", 32, 9)
    torch.library.opcheck(torch.ops.lepton.quant_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- state_dict ----

@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_state_dict_round_trip_weights_only(rng, scheme, group_size):
    model = nn.Sequential(nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 10))
    qm = lnn.quantize_model(model, scheme, group_size=group_size)
    buf = io.BytesIO()
    torch.save(qm.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert not any(k.endswith("weight") for k in sd)  # no float weight kept
    fresh = nn.Sequential(lnn.QuantLinear(50, 30, True, scheme, group_size), nn.ReLU(),
                          lnn.QuantLinear(30, 10, True, scheme, group_size))
    fresh.load_state_dict(sd)
    x = torch.randn(5, 50)
    assert torch.equal(fresh(x), qm(x))


# ---- quantize_model / convert ----

def test_quantize_model_copies_unless_inplace_and_filters_by_name(rng):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(lnn.Linear(8, 8), nn.Linear(8, 4)))
    seen = []

    def keep(m, name):
        seen.append((type(m).__name__, name))
        return name != "1.1"

    qm = lnn.quantize_model(model, "w8", filter_fn=keep)
    assert seen == [("Linear", "0"), ("Linear", "1.0"), ("Linear", "1.1")]
    assert isinstance(qm[0], lnn.QuantLinear) and isinstance(qm[1][0], lnn.QuantLinear)
    assert type(qm[1][1]) is nn.Linear
    assert type(model[0]) is nn.Linear  # the original is untouched
    same = lnn.quantize_model(model, "w4", group_size=32, inplace=True)
    assert same is model and isinstance(model[1][1], lnn.QuantLinear)
    assert isinstance(lnn.quantize_model(nn.Linear(4, 4), "w8"), lnn.QuantLinear)


def test_nothing_to_convert_warns_with_the_module_types(rng):
    with pytest.warns(UserWarning, match=r"nothing to convert.*Conv2d.*ReLU.*Sequential"):
        lnn.quantize_model(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()), "w8")
    with pytest.warns(UserWarning, match="nothing to convert"):
        lnn.quantize_model(nn.Sequential(nn.Linear(2, 2)), "w8", filter_fn=lambda m, name: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lnn.quantize_model(nn.Sequential(nn.Linear(2, 2)), "w8")


def test_hf_conv1d_is_a_transposed_linear(rng):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="needs the [infer] extra (transformers)")
    conv = pytorch_utils.Conv1D(12, 20)  # nf=12 outputs, nx=20 inputs; weight (20, 12)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 20)
    model = nn.Sequential(conv)
    qm = lnn.quantize_model(model, "w8")
    assert isinstance(qm[0], lnn.QuantLinear) and (qm[0].in_features, qm[0].out_features) == (20, 12)
    assert _rel_err(qm(x), conv(x).detach().double()) < 0.02
    lm = lnn.convert(model, dtype=torch.float32)
    assert isinstance(lm[0], lnn.Linear)
    assert _rel_err(lm(x), conv(x).detach().double()) <= gemm_rel_norm_bound("float32", 20)


def test_convert_filter_fn(rng):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lnn.convert(model, filter_fn=lambda m, name: name == "1")
    assert type(model[0]) is nn.Linear and isinstance(model[1], lnn.Linear)


# ---- errors ----

def test_errors(rng):
    for bad in ("int8", "w2", None):
        with pytest.raises(ValueError, match="lc.nn.quantize_model: scheme"):
            lnn.quantize_model(nn.Linear(2, 2), bad)
    for g in (16, 48, 2048, 64.0, True):
        with pytest.raises(ValueError, match="group_size"):
            lnn.quantize_model(nn.Linear(2, 2), "w4", group_size=g)
        with pytest.raises(ValueError, match="lc.nn.QuantLinear: group_size"):
            lnn.QuantLinear(2, 2, scheme="w4", group_size=g)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lnn.quantize_model("model", "w8")
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        lnn.quantize_model(nn.Linear(2, 2), "w8", filter_fn=3)
    with pytest.raises(TypeError, match="from_linear: linear must be"):
        lnn.QuantLinear.from_linear(nn.Conv2d(1, 1, 1), "w8")
    with pytest.raises(ValueError, match="non-finite"):
        lin = nn.Linear(2, 2)
        with torch.no_grad():
            lin.weight[0, 0] = float("nan")
        lnn.QuantLinear.from_linear(lin, "w8")
    q = lnn.QuantLinear.from_linear(nn.Linear(6, 3), "w8")
    with pytest.raises(ValueError, match=r"last dimension must be in_features=6, got shape \(2, 5\)"):
        q(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point tensor, got int64"):
        q(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        q([1.0] * 6)
    w8a8 = lnn.QuantLinear.from_linear(nn.Linear(6, 3), "w8a8")
    with pytest.raises(ValueError, match="lc.nn.QuantLinear: input contains \\+Inf"):
        w8a8(torch.full((2, 6), float("inf")))
