"""pytest-benchmark: lc.gemm and torch side by side on a small set of shapes.

    PYTHONPATH=$PWD python -m pytest bench/bench_gemm.py --benchmark-group-by=param:case -q

Each case runs once with `impl=lepton` and once with `impl=torch` (grouped together in the report).
Both use the same thread count. The full table with ratios and % of peak is `lepton bench gemm`
(lepton_core/benchmarks/gemm.py); this file is the quick, CI-friendly view.
"""
import pytest
import torch

import lepton_core as lc

# name -> (m, k, n, dtype): kept small so the whole file runs in seconds (torch's bf16 / int8 CPU
# paths are reference loops on AVX2-only machines, so those cases are tiny).
CASES = {
    "f32-64": (64, 64, 64, torch.float32),
    "f32-512": (512, 512, 512, torch.float32),
    "f32-1024": (1024, 1024, 1024, torch.float32),
    "bf16-256": (256, 256, 256, torch.bfloat16),
    "int8-256": (256, 256, 256, torch.int8),
}


def _operands(m, k, n, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        return (torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
                torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g))
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


@pytest.fixture(autouse=True)
def same_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(lc.get_num_threads())
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", ["lepton", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_gemm(benchmark, case, impl):
    m, k, n, dtype = CASES[case]
    a, b = _operands(m, k, n, dtype)
    if impl == "lepton":
        fn = lambda: lc.gemm(a, b)  # noqa: E731
    elif dtype == torch.int8:
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    out = benchmark(fn)
    # checked once, outside the timed part
    if dtype == torch.int8:
        assert torch.equal(out.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
    else:
        want = a.double() @ b.double()
        assert (out.double() - want).norm() <= 1e-2 * want.norm()
    benchmark.extra_info["gflops"] = 2.0 * m * k * n / benchmark.stats.stats.median / 1e9
