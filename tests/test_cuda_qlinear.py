"""lc.nn.QuantLinear on CUDA (csrc/cuda/qlinear.cu for w8 / w4; CUDA quantize + scaled_gemm for w8a8).

Two parts:
1. Every machine: the device-mismatch error, from_linear's packing being device-independent, the
   K-split plan (a host function of the CUDA module), and the Python glue of backends/cuda.py
   (strides, dtype codes, workspace, bias) against an emulated native module that runs the CPU
   kernels on the same pointers.
2. GPU tests (skipped with lc.info()'s reason without a usable CUDA backend): the same packed buffers
   moved with .to("cuda") give the CPU layer's result within API.md §1's float32 bound and the
   float64 reference of dequantize_weight() within the same bound, for every scheme, f32 / f16 /
   bf16, M in 1, 7, 16, 33, 257, awkward N and K (1, 7, 33, 257, ~4096; K not a multiple of the group;
   odd K for w4), with and without bias, outputs poisoned (conftest), non-contiguous inputs and
   leading dims; w8a8 byte-identical to the CPU; repeated calls bitwise equal (no atomics).
"""
import copy
import importlib.util
import inspect
import math
import re

import pytest
import torch
from torch import nn

import lepton_core as lc
import lepton_core.nn as lnn
from lepton_core._codes import QLINEAR_SCHEMES
from lepton_core.backends import cuda as _cuda_backend
from test_quant_linear import _name, _ref, _rel_err
from tolerances import GEMM_REL_NORM, U

INFO = lc.info()
HAS_CUDA = "cuda" in INFO["backends"]
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason=f"CUDA backend unavailable: {INFO['cuda_unavailable_reason']}")
_BUILT = importlib.util.find_spec("lepton_core._C_cuda") is not None
requires_built = pytest.mark.skipif(not _BUILT, reason="lepton_core._C_cuda was not built (no nvcc, or LEPTON_CUDA=OFF)")

SCHEMES = [("w8", 128), ("w4", 32), ("w4", 128), ("w8a8", 128)]
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (k, n): 1, 7, 33, 257 and K not a multiple of the group (100, 300), odd K (w4's padding nibble),
# and K past the split unit so that decode shapes run the K-split path with a short last range.
KN = [(1, 1), (7, 33), (33, 257), (257, 7), (100, 40), (300, 65), (1101, 33)]
MS = [1, 7, 16, 33, 257]




def _w8a8_ref(x, q):
    xq = lc.quantize(x.float().reshape(-1, x.shape[-1]).contiguous().cpu(), "int8", axis=0)
    y = (xq.data.double() @ q.codes.double().cpu().t()) * xq.scale.double()[:, None] * q.scale.double().cpu()[None, :]
    y = y if q.bias is None else y + q.bias.double().cpu()
    return y.reshape(*x.shape[:-1], q.out_features)


def _bound(dt, k):
    """API.md §1's bound for the output dtype; past the K it covers (float32 beyond K ~ 1750), the
    typical error tests/tolerances.py derives it from (its 4 sqrt(K) u32 accumulation term)."""
    name = _name(dt)
    return max(GEMM_REL_NORM[name], U[name] + 4 * math.sqrt(k) * U["float32"])


def _layers(k, n, scheme, group_size, bias=True):
    """(CPU layer, the same layer moved to the GPU): the same packed buffers on both devices."""
    q = lnn.QuantLinear.from_linear(nn.Linear(k, n, bias=bias), scheme, group_size)
    return q, copy.deepcopy(q).to("cuda")


def _check(q_cpu, q_gpu, x, scheme):
    """The GPU result against the CPU layer and the float64 reference (both API.md §1's bound);
    w8a8 (CUDA quantize and the int8 GEMM's exact epilogue, like the CPU) byte for byte."""
    k = x.shape[-1]
    y = q_gpu(x.cuda())
    assert y.device.type == "cuda" and y.dtype == x.dtype and y.shape == (*x.shape[:-1], q_cpu.out_features)
    y = y.cpu()
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite outputs"
    y_cpu = q_cpu(x)
    if scheme == "w8a8":
        assert torch.equal(y, y_cpu), "w8a8 differs from the CPU"
        assert _rel_err(y, _w8a8_ref(x, q_cpu)) <= _bound(x.dtype, k)
        return y
    bound = _bound(x.dtype, k)
    assert _rel_err(y, _ref(x, q_cpu)) <= bound, ("reference", x.dtype, tuple(x.shape))
    assert _rel_err(y, y_cpu.double()) <= 2 * bound, ("cpu", x.dtype, tuple(x.shape))
    return y


# =============================================================================================
# Part 1: every machine
# =============================================================================================
def test_device_errors_and_meta_shapes():
    q = lnn.QuantLinear.from_linear(nn.Linear(6, 3), "w8")
    with pytest.raises(ValueError, match=r"lc.nn.QuantLinear: input and weights must be on the same device; "
                                         r"input is on meta, weights on cpu"):
        q(torch.randn(2, 6, device="meta"))
    with pytest.raises(ValueError, match="from_linear: the weight must be on the CPU or a CUDA device, got meta"):
        lnn.QuantLinear.from_linear(nn.Linear(6, 3, device="meta"), "w8")
    q_meta = lnn.QuantLinear(6, 3, scheme="w4", group_size=32).to("meta")  # shapes only, through the fake kernel
    assert q_meta(torch.randn(2, 6, device="meta")).shape == (2, 3)


@requires_built
def test_split_plan_covers_k_in_whole_units():
    """qlinear_plan (host code of the CUDA module): splits only for few-row shapes, ranges that cover
    K exactly, whole w4 groups, and a plan that depends on the shapes alone."""
    from lepton_core import _C_cuda

    for scheme in ("w8", "w4"):
        for group_size in (32, 128, 1024):
            for m in (1, 7, 16, 17, 33, 257):
                for n in (1, 33, 4096, 11008):
                    for k in (0, 1, 511, 1101, 4096, 4160, 11008):
                        splits, chunk = _C_cuda.qlinear_plan(scheme=QLINEAR_SCHEMES[scheme], m=m, n=n, k=k,
                                                             group_size=group_size)
                        assert splits >= 1 and chunk >= 1
                        if splits > 1:
                            assert m <= 16
                            assert (splits - 1) * chunk < k <= splits * chunk, (scheme, m, n, k, splits, chunk)
                            assert chunk % (group_size if scheme == "w4" else 2) == 0
                        else:
                            assert chunk >= k


@requires_built
def test_native_argument_checks_without_a_gpu():
    """_C_cuda.qlinear checks its arguments on the host before touching a device: ValueErrors."""
    from lepton_core import _C_cuda

    ok = dict(device=0, stream=0, scheme=QLINEAR_SCHEMES["w4"], m=2, n=40, k=64, group_size=32, x=4096, x_dtype=0,
              x_row=64, x_col=1, codes=4096, scale=4096, zero=4096, bias=0, out=4096, out_dtype=0, ws=0, splits=1)
    for bad, match in ((dict(scheme=7), "scheme"), (dict(x_dtype=3), "activations"), (dict(out_dtype=4), "output"),
                       (dict(x_col=-1), "negative"), (dict(group_size=48), "group_size"),
                       (dict(splits=2), "splits"), (dict(out=0), "null"), (dict(codes=4104), "aligned")):
        with pytest.raises(ValueError, match=f"lepton_core CUDA qlinear: .*{match}"):
            _C_cuda.qlinear(**{**ok, **bad})
    _C_cuda.qlinear(**{**ok, "m": 0})  # nothing to do: returns before any CUDA call


class _EmulatedQLinear:
    """Stands in for _C_cuda: qlinear_plan is the real host function; qlinear runs the CPU kernels on
    the same (host) pointers and checks what the glue passes (workspace size, splits, alignment)."""

    def __init__(self):
        from lepton_core import _C, _C_cuda

        self._C, self._C_cuda = _C, _C_cuda
        self.calls = []

    def qlinear_plan(self, **kw):
        return self._C_cuda.qlinear_plan(**kw)

    def qlinear(self, *, device, stream, scheme, m, n, k, group_size, x, x_dtype, x_row, x_col, codes, scale, zero,
                bias, out, out_dtype, ws, splits):
        binding = self._C_cuda.qlinear.__doc__.split("->")[0]
        assert re.findall(r"(\w+): ", binding) == list(inspect.signature(self.qlinear).parameters)
        want_splits, _ = self._C_cuda.qlinear_plan(scheme=scheme, m=m, n=n, k=k, group_size=group_size)
        assert splits == want_splits and (ws != 0) == (splits > 1)
        assert codes % 16 == 0 and (scheme != QLINEAR_SCHEMES["w4"] or (scale % 16 == 0 and zero % 16 == 0))
        self.calls.append((m, n, k, x_row, x_col, splits))
        self._C.qlinear(m, n, k, x, x_dtype, x_row, x_col, scheme, group_size, codes, scale, zero, bias, out,
                        out_dtype)


@requires_built
@pytest.mark.parametrize("scheme,group_size", [("w8", 128), ("w4", 32)])
def test_backend_glue_on_emulated_kernels(monkeypatch, rng, scheme, group_size):
    """backends/cuda.quant_linear passes strides, dtype codes, bias and a workspace consistently for
    views and leading dims (the CPU kernels then give the CPU layer's result bit for bit)."""
    emu = _EmulatedQLinear()
    monkeypatch.setattr(_cuda_backend, "_module", emu)
    monkeypatch.setattr(_cuda_backend, "_device_index", lambda t: 0)
    monkeypatch.setattr(_cuda_backend, "_stream", lambda device: 0)
    q = lnn.QuantLinear.from_linear(nn.Linear(1101, 40), scheme, group_size)
    for dt in X_DTYPES:
        for x in (torch.randn(1, 1101), torch.randn(2, 3, 1101), torch.randn(1101, 5).t(),
                  torch.randn(4, 2202)[:, 1::2], torch.randn(0, 1101)):
            x = x.to(dt)
            got = _cuda_backend.quant_linear(x, q.codes, q.scale, q.zero_point, q.bias, scheme, group_size, 40)
            assert got.dtype == dt and got.shape == (*x.shape[:-1], 40)
            assert torch.equal(got, q(x))
    assert any(c[-1] > 1 for c in emu.calls), "no call took the K-split path"
    assert any(c[4] != 1 for c in emu.calls), "no call passed a column stride"


def test_from_linear_packs_the_same_on_every_device(rng):
    """from_linear of a layer on another device quantizes on the CPU copy: the same buffers."""
    lin = nn.Linear(70, 9)
    for scheme, g in SCHEMES:
        a = lnn.QuantLinear.from_linear(lin, scheme, g)
        b = lnn.QuantLinear.from_linear(copy.deepcopy(lin).to(torch.float64), scheme, g)
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), (scheme, name)


# =============================================================================================
# Part 2: the GPU
# =============================================================================================
@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("m", MS)
def test_matches_cpu_and_reference(rng, scheme, group_size, m, k, n):
    for bias in (True, False):
        q_cpu, q_gpu = _layers(k, n, scheme, group_size, bias)
        for dt in X_DTYPES:
            _check(q_cpu, q_gpu, torch.randn(m, k).to(dt), scheme)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("m", [1, 7, 16, 33])
def test_large_layer(rng, scheme, group_size, m):
    """~4096 x 4096 with K not a multiple of 128 (decode rows run the K split, 33 rows do not)."""
    k, n = 4160, 4128
    q_cpu, q_gpu = _layers(k, n, scheme, group_size)
    for dt in X_DTYPES:
        _check(q_cpu, q_gpu, torch.randn(m, k).to(dt), scheme)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_views_leading_dims_and_empty(rng, scheme, group_size):
    """Leading dims and non-contiguous views, read in place with their strides on the GPU."""
    k, n = 257, 65
    q_cpu, q_gpu = _layers(k, n, scheme, group_size)
    views = [((2, 3, 5, k), lambda b: b), ((k, 6), lambda b: b.t()), ((4, 2 * k), lambda b: b[:, 1::2]),
             ((3, k + 1), lambda b: b[:, 1:]), ((2, 7, k), lambda b: b.transpose(0, 1)), ((1, 1, k), lambda b: b),
             ((k, 3, 2), lambda b: b.permute(2, 1, 0)), ((k,), lambda b: b)]
    for dt in X_DTYPES:
        for shape, view in views:
            base = torch.randn(shape).to(dt)
            x, xg = view(base), view(base.cuda())
            assert xg.stride() == x.stride()
            y = q_gpu(xg)
            assert y.shape == (*x.shape[:-1], n)
            ref = _w8a8_ref(x, q_cpu) if scheme == "w8a8" else _ref(x, q_cpu)
            assert _rel_err(y.cpu(), ref) <= _bound(dt, k), (dt, tuple(x.shape), x.stride())
        y = q_gpu(torch.randn(0, k, device="cuda").to(dt))
        assert y.shape == (0, n) and y.dtype == dt


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_empty_k_is_the_bias(scheme):
    q = lnn.QuantLinear(0, 37, scheme=scheme, group_size=32)
    with torch.no_grad():
        q.bias.copy_(torch.randn(37))
    qg = copy.deepcopy(q).to("cuda")
    for dt in X_DTYPES:
        for m in (1, 9):
            y = qg(torch.randn(m, 0, device="cuda").to(dt))
            assert torch.equal(y.cpu(), q.bias.to(dt).expand(m, 37)), (dt, m)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_deterministic_and_no_float_weight(rng, scheme, group_size):
    """Repeated calls are bitwise equal (fixed reduction order); a decode call allocates no more than
    the output and the K-split workspace (no float copy of the weight)."""
    k, n = 4160, 4128
    _, q = _layers(k, n, scheme, group_size)
    for m in (1, 16, 33):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        first = q(x)
        for _ in range(3):
            assert torch.equal(q(x), first)
    if scheme == "w8a8":
        return
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    q(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    q(x)
    torch.cuda.synchronize()
    grew = torch.cuda.max_memory_allocated() - before
    assert grew < n * k, f"a decode call allocated {grew} bytes (a float weight would be {4 * n * k})"


@pytest.mark.cuda
@requires_gpu
def test_from_linear_on_cuda_and_model_to_cuda(rng):
    lin = nn.Linear(300, 70).cuda()
    for scheme, g in SCHEMES:
        q = lnn.QuantLinear.from_linear(lin, scheme, g)
        assert all(t.device.type == "cuda" for t in q.state_dict().values())
        q_cpu = lnn.QuantLinear.from_linear(copy.deepcopy(lin).cpu(), scheme, g)
        for name, t in q.state_dict().items():
            assert torch.equal(t.cpu(), q_cpu.state_dict()[name]), (scheme, name)
        _check(q_cpu, q, torch.randn(5, 300), scheme)
    # a model converted on the CPU and moved (ReLU: bitwise the same on both devices, so w8a8's second
    # layer quantizes the same activations)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(3, 64)
    for scheme, g in SCHEMES:
        qm = lnn.quantize_model(model, scheme, group_size=g)
        want = qm(x)
        got = copy.deepcopy(qm).to("cuda")(x.cuda()).cpu()
        if scheme == "w8a8":
            assert torch.equal(got, want)
        else:
            assert _rel_err(got, want.double()) <= 2 * _bound(torch.float32, 64), scheme


@pytest.mark.cuda
@requires_gpu
def test_mixed_devices_and_errors_on_cuda():
    q = lnn.QuantLinear.from_linear(nn.Linear(6, 3), "w8").to("cuda")
    with pytest.raises(ValueError, match="same device; input is on cpu, weights on cuda:0"):
        q(torch.randn(2, 6))
    with pytest.raises(ValueError, match="same device"):
        q.cpu()(torch.randn(2, 6, device="cuda"))
    w8a8 = lnn.QuantLinear.from_linear(nn.Linear(6, 3), "w8a8").to("cuda")
    with pytest.raises(ValueError, match=r"lc.nn.QuantLinear: input contains \+Inf"):
        w8a8(torch.full((2, 6), float("inf"), device="cuda"))


@pytest.mark.cuda
@requires_gpu
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_no_grad_compile_opcheck_input_grad_and_stream(rng):
    q_cpu, q = _layers(96, 40, "w4", 32)
    x = torch.randn(4, 96, device="cuda", requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    want = g.double() @ q.dequantize_weight().double()
    assert _rel_err(x.grad, want) <= _bound(torch.float32, 40)
    xd = x.detach()
    with torch.no_grad():
        assert torch.equal(q(xd), y.detach())
    with torch.inference_mode():
        assert torch.equal(q(xd), y.detach())
    # aot_eager: the dispatcher, fake and autograd registrations without needing Triton on the machine
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(xd), y.detach())
    for scheme, gs in SCHEMES:
        _, qs = _layers(40, 9, scheme, gs)
        args = (torch.randn(3, 40, device="cuda"), qs.codes, qs.scale, qs.zero_point, qs.bias, scheme, gs, 9)
        torch.library.opcheck(torch.ops.lepton.quant_linear.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ys = q(xd)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(ys, y.detach())
