"""lc.nn.Linear and lc.nn.convert: forward/backward through lc.gemm against float64 references and
torch.nn.Linear, autocast, torch.compile, state_dict compatibility and argument errors.

Tolerances: the reference is a float64 product of the inputs already rounded to the compute dtype, so
only lc.gemm's own error is measured, bounded by API.md §1 per output dtype (tests/tolerances.py).
Against nn.Linear (which rounds too) the bound doubles: both are within the bound of the exact product.
"""
import warnings

import pytest
import torch
from torch import nn

import lepton_core.nn as lnn
from tolerances import GEMM_REL_NORM, U, gemm_rel_norm_bound

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _name(dt):
    return str(dt).replace("torch.", "")


def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def _layer(k, n, bias=True, compute_dtype=None):
    layer = lnn.Linear(k, n, bias=bias, compute_dtype=compute_dtype)
    with torch.no_grad():  # weights of both signs and a bias far from zero
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def _ref_forward(x, layer, cd):
    """float64 x_c W_c^T + b from x and W rounded to the compute dtype (bias is added unrounded)."""
    xc = x.detach().to(cd).double()
    wc = layer.weight.detach().to(cd).double()
    y = xc @ wc.t()
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    return y


@pytest.mark.parametrize("cd", [None, torch.bfloat16], ids=["input", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_eager_path_matches_the_op(threads, cd, bias):
    """On CPU, outside tracing, lc.nn.Linear skips the torch.library op (lepton_core._ops.linear): the
    backend directly when nothing records gradients, else _EagerLinear. Both give the op's bits: the
    output, and every gradient (x, weight, bias), with a 3-D non-contiguous input."""
    torch.manual_seed(7)
    layer = _layer(24, 10, bias=bias, compute_dtype=cd)
    x = torch.randn(5, 24, 3).transpose(1, 2)  # (5, 3, 24), not contiguous
    g = torch.randn(5, 3, 10)
    cd_eff = cd or torch.float32

    def run(fn):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.backward(g)
        return y.detach(), xg.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad

    eager = run(layer)
    op = run(lambda xg: torch.ops.lepton.nn_linear(xg, layer.weight, layer.bias, cd_eff, torch.float32))
    for e, o in zip(eager, op):
        assert (e is None and o is None) or torch.equal(e, o)
    grad_fn = layer(x.clone().requires_grad_()).grad_fn
    assert type(grad_fn).__name__ == "_EagerLinearBackward"
    # It keeps x and the weight as rounded to the compute dtype, so the backward does not round the
    # weight again (a second pass over every weight a step).
    x_c, w_c = grad_fn.saved_tensors
    assert x_c.dtype == w_c.dtype == cd_eff and torch.equal(w_c, layer.weight.detach().to(cd_eff))
    assert torch.equal(x_c, x.to(cd_eff))
    with torch.no_grad():
        y = layer(x)
        assert y.grad_fn is None and torch.equal(y, op[0])


@pytest.mark.parametrize("cd", DTYPES, ids=_name)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 5), (33, 7, 257), (64, 130, 17)])
def test_forward_configured_dtype(rng, isa, cd, m, k, n):
    layer = _layer(k, n, compute_dtype=cd)
    x = torch.randn(m, k)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (m, n)  # a configured dtype keeps the input's dtype
    assert _rel_err(y, _ref_forward(x, layer, cd)) <= gemm_rel_norm_bound("float32", k)


@pytest.mark.parametrize("cd", [torch.float16, torch.bfloat16], ids=_name)
def test_forward_autocast_dtype_and_batched_noncontiguous_input(rng, cd):
    k, n = 19, 11
    layer = _layer(k, n)
    x = torch.randn(k, 5, 3).permute(2, 1, 0)  # (3, 5, 19), non-contiguous
    assert not x.is_contiguous()
    with torch.autocast("cpu", dtype=cd):
        y = layer(x)
    assert y.dtype == cd and y.shape == (3, 5, n)  # under autocast the output is the autocast dtype
    ref = _ref_forward(x.reshape(-1, k), layer, cd).reshape(3, 5, n)
    assert _rel_err(y, ref) <= gemm_rel_norm_bound(_name(cd), k)


def test_autocast_takes_precedence_over_configured_dtype(rng):
    layer = _layer(9, 4, compute_dtype=torch.float16)
    x = torch.randn(6, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, _ref_forward(x, layer, torch.bfloat16)) <= GEMM_REL_NORM["bfloat16"]


@pytest.mark.parametrize("cd", DTYPES, ids=_name)
def test_input_dtype_is_the_compute_dtype_without_config(rng, cd):
    layer = _layer(13, 6)
    x = torch.randn(4, 13).to(cd)
    y = layer(x)
    assert y.dtype == cd
    assert _rel_err(y, _ref_forward(x, layer, cd)) <= gemm_rel_norm_bound(_name(cd), 13)


@pytest.mark.parametrize("cd", DTYPES, ids=_name)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_against_float64_reference(rng, threads, cd, bias):
    m, k, n = 37, 21, 9
    layer = _layer(k, n, bias=bias, compute_dtype=cd)
    x = torch.randn(m, k, requires_grad=True)
    g = torch.randn(m, n)
    layer(x).backward(g)
    gc = g.to(cd).double()  # the incoming gradient is rounded to the compute dtype, like the operands
    xc = x.detach().to(cd).double()
    wc = layer.weight.detach().to(cd).double()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    # both gradients are rounded once to float32 from a float32 accumulation
    assert _rel_err(x.grad, gc @ wc) <= gemm_rel_norm_bound("float32", n)
    assert _rel_err(layer.weight.grad, gc.t() @ xc) <= gemm_rel_norm_bound("float32", m)
    if bias:
        # a float32 sum of m values, in any order: |error| <= (m - 1) * u32 * sum |g| per element
        ref_b = g.double().sum(0)
        bound = (m - 1) * U["float32"] * g.double().abs().sum(0) * 1.01
        assert bool(((layer.bias.grad.double() - ref_b).abs() <= bound).all())
    else:
        assert layer.bias is None


def test_weight_gradient_keeps_float32_precision_under_autocast(rng):
    """The master weights' gradient is accumulated in float32 and not rounded to bf16 on the way (as
    autocast + nn.Linear does): it matches the float64 product of the bf16-rounded operands to float32
    accuracy, far below bf16's rounding error."""
    m, k, n = 64, 24, 16
    layer = _layer(k, n)
    x = torch.randn(m, k)
    g = torch.randn(m, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g.to(torch.bfloat16))
    ref = g.to(torch.bfloat16).double().t() @ x.to(torch.bfloat16).double()
    err = _rel_err(layer.weight.grad, ref)
    assert err <= gemm_rel_norm_bound("float32", m)
    assert err < U["bfloat16"] / 10


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_float32():
    """lc.gemm has no float64 path (API.md §1: float32/float16/bfloat16), so gradcheck cannot run in
    float64. The layer is affine in each input element, so central differences are exact up to float32
    rounding of the outputs: |error| <~ u32 * |y| / eps = 6e-8 * 10 / 1e-2 = 6e-5 per entry, well
    inside atol=1e-3. A wrong formula (a transposed or missing term) errs by O(1)."""
    torch.manual_seed(1)
    layer = _layer(6, 4, compute_dtype=torch.float32)
    x = torch.randn(5, 6, requires_grad=True)
    fn = lambda x, w, b: torch.ops.lepton.nn_linear(x, w, b, torch.float32, torch.float32)  # noqa: E731
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matches_nn_linear(rng, precision):
    m, k, n = 23, 45, 12
    ours = _layer(k, n)
    ref = nn.Linear(k, n)
    ref.load_state_dict(ours.state_dict())
    x1 = torch.randn(m, k, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(m, n)
    enabled = precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        y1, y2 = ours(x1), ref(x2)
    y1.backward(g.to(y1.dtype))
    y2.backward(g.to(y2.dtype))
    assert y1.dtype == y2.dtype
    out_name = "bfloat16" if enabled else "float32"
    bound = 2 * GEMM_REL_NORM[out_name]  # each side within the bound of the exact product
    assert _rel_err(y1, y2) <= bound
    assert _rel_err(x1.grad, x2.grad) <= bound
    assert _rel_err(ours.weight.grad, ref.weight.grad) <= bound
    assert _rel_err(ours.bias.grad, ref.bias.grad) <= bound


def test_empty_batch(rng):
    layer = _layer(5, 3)
    x = torch.randn(0, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 5)
    assert torch.equal(layer.weight.grad, torch.zeros(3, 5))
    assert torch.equal(layer.bias.grad, torch.zeros(3))


def test_state_dict_compatible_with_nn_linear(rng):
    ref = nn.Linear(10, 4)
    ours = lnn.Linear(10, 4)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    back = nn.Linear(10, 4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    assert isinstance(ours, nn.Linear) and ours.weight.dtype == torch.float32
    # same default initialisation as nn.Linear from the same seed
    torch.manual_seed(5)
    a = nn.Linear(7, 3)
    torch.manual_seed(5)
    b = lnn.Linear(7, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16, bias=False))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_convert_swaps_every_linear_in_place(rng):
    net = _Net()
    before = {name: p for name, p in net.named_parameters()}
    x = torch.randn(4, 8)
    y_ref = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = lnn.convert(net, dtype=torch.float32)
    assert out is net
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(type(m) is lnn.Linear for m in linears)
    assert all(m.compute_dtype == torch.float32 for m in linears)
    # the same Parameter objects: the optimizer built before still trains the converted model
    assert all(p is before[name] for name, p in net.named_parameters())
    assert net.body[2].bias is None
    assert _rel_err(net(x), y_ref) <= 2 * GEMM_REL_NORM["float32"]
    net(x).sum().backward()
    w0 = net.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(net.head.weight, w0)
    # converting again changes the compute dtype of the lc layers already there
    lnn.convert(net, dtype=torch.bfloat16)
    assert all(m.compute_dtype == torch.bfloat16 for m in net.modules() if isinstance(m, lnn.Linear))
    assert net(x).dtype == torch.float32


def test_convert_root_linear_and_low_precision_weights():
    lin = nn.Linear(4, 2).to(torch.bfloat16)
    new = lnn.convert(lin)
    assert type(new) is lnn.Linear and new.compute_dtype == torch.bfloat16
    assert new.weight.dtype == torch.float32 and torch.equal(new.weight, lin.weight.float())
    assert new(torch.randn(3, 4)).dtype == torch.float32


# inductor imports torch.utils.mkldnn, which warns about its own use of torch.jit (not ours)
_INDUCTOR = pytest.param("inductor", marks=pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"))


@pytest.mark.parametrize("backend", ["aot_eager", _INDUCTOR])
def test_torch_compile(rng, backend):
    torch._dynamo.reset()
    net = lnn.convert(_Net(), dtype=None)
    ref = _Net()
    ref.load_state_dict(net.state_dict())
    ref = lnn.convert(ref, dtype=None)
    compiled = torch.compile(net, fullgraph=True, backend=backend)  # fullgraph: no graph break allowed
    x1 = torch.randn(6, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = compiled(x1)
        y2 = ref(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    y1.float().sum().backward()
    y2.float().sum().backward()
    if backend == "aot_eager":  # same ops in the same order: bitwise
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
        for p1, p2 in zip(net.parameters(), ref.parameters()):
            assert torch.equal(p1.grad, p2.grad)
    else:  # inductor may fuse the relu / casts differently: one bf16 rounding apart at most
        assert _rel_err(y1, y2) <= 2 * GEMM_REL_NORM["bfloat16"]
        for p1, p2 in zip(net.parameters(), ref.parameters()):
            assert _rel_err(p1.grad, p2.grad) <= 2 * GEMM_REL_NORM["bfloat16"]
    torch._dynamo.reset()


def test_errors():
    layer = lnn.Linear(5, 3)
    with pytest.raises(ValueError, match=r"lc\.nn\.Linear: .*in_features=5.*\(2, 4\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: input has dtype float64"):
        layer(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: input has dtype int64"):
        layer(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: input must be a torch\.Tensor, got list"):
        layer([1.0] * 5)
    with pytest.raises(ValueError, match=r"lc\.nn\.Linear: input must be a dense \(strided\) tensor, got layout torch\.sparse_coo"):
        layer(torch.randn(2, 5).to_sparse())
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: dtype .*float32.* got float16"):
        lnn.Linear(5, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: compute_dtype .* got float64"):
        lnn.Linear(5, 3, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"lc\.nn\.Linear: weight has dtype float64"):
        lnn.Linear(5, 3).double()(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"lc\.nn\.convert: model must be a torch\.nn\.Module, got str"):
        lnn.convert("model")
    with pytest.raises(TypeError, match=r"lc\.nn\.convert: dtype .* got 'bf16'"):
        lnn.convert(nn.Linear(2, 2), dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LazyLinear warns that it is experimental
        lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"lc\.nn\.convert: 0 is a lazy Linear"):
        lnn.convert(lazy)


def test_trains_like_nn_linear_in_float32():
    """A few SGD steps of a small MLP stay within float32 accuracy of the nn.Linear model."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    ours = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    ours.load_state_dict(ref.state_dict())
    lnn.convert(ours, dtype=torch.float32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, ours)]
    x, t = torch.randn(40, 12), torch.randint(0, 4, (40,))
    for _ in range(5):
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), t).backward()
            opt.step()
    # the parameters differ only through 5 small updates whose gradients agree to float32 accuracy
    for p1, p2 in zip(ref.parameters(), ours.parameters()):
        assert _rel_err(p2, p1) <= GEMM_REL_NORM["float32"]
