"""pytest-benchmark view of the CUDA backend (skipped without a usable GPU): lc.gemm and lc.quantize
on CUDA tensors next to their torch baselines. Each benchmark synchronizes the device after the call
so the measured time is the kernel's, not the launch's. `python -m lepton_core.benchmarks.cuda` prints the full table
(TFLOP/s and GB/s against the measured peak and copy bandwidth)."""
import pytest
import torch

import lepton_core as lc

INFO = lc.info()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif("cuda" not in INFO["backends"],
                                 reason=f"CUDA backend unavailable: {INFO['cuda_unavailable_reason']}")]

N = 4096


def _synced(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.fixture(scope="module")
def bf16_operands():
    a = torch.randn(N, N, device="cuda").to(torch.bfloat16)
    w = torch.randn(N, N, device="cuda").to(torch.bfloat16)
    return a, w.t()


@pytest.fixture(scope="module")
def int8_operands():
    a = torch.randint(-127, 128, (N, N), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (N, N), dtype=torch.int8, device="cuda")
    return a, w.t()


@pytest.mark.benchmark(group="gemm bf16 4096^3")
def test_gemm_bf16_lepton(benchmark, bf16_operands):
    a, b = bf16_operands
    benchmark(_synced(lambda: lc.gemm(a, b)))


@pytest.mark.benchmark(group="gemm bf16 4096^3")
def test_gemm_bf16_torch(benchmark, bf16_operands):
    a, b = bf16_operands
    benchmark(_synced(lambda: torch.matmul(a, b)))


@pytest.mark.benchmark(group="gemm int8 4096^3")
def test_gemm_int8_lepton(benchmark, int8_operands):
    a, b = int8_operands
    benchmark(_synced(lambda: lc.gemm(a, b)))


@pytest.mark.benchmark(group="gemm int8 4096^3")
def test_gemm_int8_torch_int_mm(benchmark, int8_operands):
    a, b = int8_operands
    benchmark(_synced(lambda: torch._int_mm(a, b)))


@pytest.mark.benchmark(group="quantize int8 block256 64M f32")
def test_quantize_block_lepton(benchmark):
    x = torch.randn(64 << 20, device="cuda")
    benchmark(_synced(lambda: lc.quantize(x, "int8", block_size=256)))


@pytest.mark.benchmark(group="quantize int8 block256 64M f32")
def test_quantize_block_eager_torch(benchmark):
    from lepton_core.benchmarks.cuda import _eager_quantize_block

    x = torch.randn(64 << 20, device="cuda")
    benchmark(_synced(lambda: _eager_quantize_block(x, 256)))
