"""pytest-benchmark timings of lc.quantize / lc.dequantize next to the same op in eager PyTorch.

Small on purpose (1M elements, a few seconds in all); `lepton bench quant`
(lepton_core/benchmarks/quant.py) is the full, interleaved comparison with torch.compile.

    PYTHONPATH=$PWD python -m pytest bench/bench_quant.py -q -p no:cacheprovider
"""
import pytest
import torch

import lepton_core as lc
from lepton_core.benchmarks.quant import _eager_dequantize, _eager_quantize

N_ELEMS = 1 << 20
CASES = [("int8", {"block_size": 256}, "block"), ("int8", {}, "tensor"), ("fp8_e4m3", {"block_size": 256}, "block")]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = (lc.get_num_threads(), torch.get_num_threads())
    lc.set_num_threads(2)
    torch.set_num_threads(2)
    yield
    lc.set_num_threads(before[0])
    torch.set_num_threads(before[1])


@pytest.fixture(scope="module")
def x():
    return torch.randn(N_ELEMS, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt,kw,mode", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_quantize_ours(benchmark, x, fmt, kw, mode):
    q = benchmark(lc.quantize, x, fmt, **kw)
    want_q, want_s = _eager_quantize(x, fmt, mode)  # checked once, outside the timing
    assert torch.equal(q.data.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(q.scale.reshape(-1), want_s)


@pytest.mark.parametrize("fmt,kw,mode", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_quantize_eager_torch(benchmark, x, fmt, kw, mode):
    benchmark(_eager_quantize, x, fmt, mode)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_dequantize_ours(benchmark, x, fmt):
    q = lc.quantize(x, fmt, block_size=256)
    out = benchmark(lc.dequantize, q)
    assert torch.equal(out, _eager_dequantize(q.data, q.scale))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_dequantize_eager_torch(benchmark, x, fmt):
    q = lc.quantize(x, fmt, block_size=256)
    benchmark(_eager_dequantize, q.data, q.scale)


def test_quantize_1kib_ours(benchmark):
    benchmark(lc.quantize, torch.randn(256), "int8")


def test_quantize_1kib_eager_torch(benchmark):
    benchmark(_eager_quantize, torch.randn(256), "int8", "tensor")
