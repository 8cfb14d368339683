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


def _operands(dtype):
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (N, N), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 128, (N, N), dtype=torch.int8, device="cuda")
    else:
        a = torch.randn(N, N, device="cuda").to(dtype)
        w = torch.randn(N, N, device="cuda").to(dtype)
    return a, w.t()  # x @ W^T, as a linear layer runs it


# (ours, the baseline a user would otherwise call) per input dtype
GEMMS = {"bf16": (torch.bfloat16, lc.gemm, torch.matmul),
         "int8": (torch.int8, lc.gemm, torch._int_mm)}


@pytest.mark.parametrize("impl", ["lepton", "torch"])
@pytest.mark.parametrize("name", list(GEMMS))
def test_gemm(benchmark, name, impl):
    dtype, ours, theirs = GEMMS[name]
    a, b = _operands(dtype)
    fn = ours if impl == "lepton" else theirs
    benchmark.group = f"gemm {name} {N}^3"
    benchmark(_synced(lambda: fn(a, b)))


@pytest.mark.parametrize("impl", ["lepton", "eager_torch"])
def test_quantize_block(benchmark, impl):
    from lepton_core.benchmarks.cuda import _eager_quantize_block

    x = torch.randn(64 << 20, device="cuda")
    benchmark.group = "quantize int8 block256 64M f32"
    if impl == "lepton":
        benchmark(_synced(lambda: lc.quantize(x, "int8", block_size=256)))
    else:
        benchmark(_synced(lambda: _eager_quantize_block(x, 256)))
