"""Training-step micro-benchmark (pytest-benchmark): one process, a small MLP under bf16 autocast,
forward + backward + AdamW, with torch.nn.Linear vs lc.nn.Linear. The 2-worker comparison with the
gradient hook is `lepton bench train` (lepton_core/benchmarks/train.py); see bench/notes_train.md.

    PYTHONPATH=$PWD python -m pytest bench/bench_train.py --benchmark-only -q
"""
import pytest
import torch
from torch import nn

import lepton_core.nn as lnn

DIMS = [256, 512, 512, 10]
BATCH = 64


def _setup(layers):
    torch.manual_seed(0)
    mods = []
    for i in range(len(DIMS) - 1):
        mods.append(nn.Linear(DIMS[i], DIMS[i + 1]))
        if i < len(DIMS) - 2:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods)
    if layers == "lc":
        lnn.convert(model, dtype=None)  # compute in the autocast dtype
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, DIMS[0], generator=g)
    y = torch.randint(0, DIMS[-1], (BATCH,), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, x, step


def test_outputs_agree():
    """Checked once, outside the timed runs: both models compute the same function (bf16 tolerance:
    each side is within 1e-2 normwise of the exact product, so they are within 2e-2 of each other)."""
    (m_torch, x, _), (m_lc, _, _) = _setup("torch"), _setup("lc")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = m_torch(x).double(), m_lc(x).double()
    assert ((a - b).norm() / a.norm()).item() <= 2e-2


@pytest.mark.parametrize("layers", ["torch", "lc"])
def test_train_step_bf16(benchmark, layers):
    benchmark.group = f"train step: MLP {'-'.join(map(str, DIMS))}, batch {BATCH}, bf16 autocast, AdamW"
    _, _, step = _setup(layers)
    loss = benchmark(step)
    assert torch.isfinite(loss)
