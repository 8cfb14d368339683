"""`lepton bench dp` (run as `python -m lepton_core.benchmarks.dp`): the cost of a DP-SGD step.

Three models, one process: the digits MLP (64-256-256-10, batch 256, one row per example) and two
transformer-shaped stacks of lc.nn.Linear layers over sequences of T = 128 tokens: width 256 (batch
32) and width 512 (batch 16), whose hidden layers take the Gram form of the per-example norms
(in out > T^2) and whose 10-way output layer materializes its per-example gradients. Variants, timed interleaved (A B C D A B C D ...) on the
same fixed batch, float32: our non-private step (forward, backward, AdamW), our DP-SGD step (ghost
norms, clipping GEMMs, noise, AdamW), and Opacus's PrivacyEngine on the same model in torch.nn.Linear
form, in its default hooks mode (per-example gradients materialized) and in ghost clipping mode
(`grad_sample_mode="ghost"`), when Opacus is installed (rows say why not, otherwise). `peak_MB`: the
growth of the process's peak RSS over 5 steps, each variant in a fresh process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List

COLUMNS = ["case", "variant", "ms_per_step", "vs_nonprivate", "vs_opacus_hooks", "peak_MB", "note"]
CASES = {  # name: (batch, tokens (0: flat input), width in, hidden, out, layers)
    "digits MLP b256": (256, 0, 64, 256, 10, 3),
    "seq T=128 d256 b32": (32, 128, 256, 256, 10, 4),  # hidden layers: the Gram form (in out > T^2)
    "seq T=128 d512 b16": (16, 128, 512, 512, 10, 3),
}
VARIANTS = ("ours non-private", "ours DP-SGD", "opacus hooks", "opacus ghost")
CLIP, NOISE = 1.0, 1.0


def _model(case: str, lc_layers: bool):
    import torch
    from torch import nn

    from ..nn import Linear

    batch, tokens, d_in, hidden, d_out, n_layers = CASES[case]
    lin = Linear if lc_layers else nn.Linear
    torch.manual_seed(0)
    dims = [d_in] + [hidden] * (n_layers - 1) + [d_out]
    layers: List[nn.Module] = []
    for i in range(n_layers):
        layers.append(lin(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch, tokens, d_in) if tokens else (batch, d_in), generator=g)
    y = torch.randint(0, d_out, (batch,), generator=g)
    return model, x, y


def _loss(out, y):
    from torch.nn import functional as F

    return F.cross_entropy(out.mean(1) if out.dim() == 3 else out, y)


def _step_fn(case: str, variant: str) -> Callable[[], None]:
    """A function doing one training step of `variant` on `case`'s fixed batch; ImportError without Opacus."""
    import torch

    if variant.startswith("ours"):
        from ..train.config import TrainConfig
        from ..train.dp import DPSGD

        model, x, y = _model(case, True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if variant == "ours non-private":
            def step():
                _loss(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        cfg = TrainConfig(dp_clip=CLIP, dp_noise_multiplier=NOISE, batch_size=x.shape[0]).validate()
        dp = DPSGD(model, cfg, x.shape[0] * 10, 1)
        counter = [0]

        def dp_step():
            with dp.capture() as cap:
                out = model(x)
                flat = dp.clipped_grads(cap, _loss(out, y) * x.shape[0], 1.0)
            dp.add_noise(flat, counter[0])
            counter[0] += 1
            flat.div_(dp.expected_batch)
            off = 0
            for p in dp.params:
                p.grad = flat[off:off + p.numel()].view_as(p)
                off += p.numel()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return dp_step

    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = _model(case, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    with warnings.catch_warnings():  # Opacus warns that its secure RNG is off (as benchmarks want)
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        if variant == "opacus hooks":
            model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                     noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False)
            crit = _loss
        else:
            crit_mod = torch.nn.CrossEntropyLoss()
            model, opt, crit_mod, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, criterion=crit_mod, noise_multiplier=NOISE,
                max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="ghost")

            def crit(out, yy):
                return crit_mod(out.mean(1) if out.dim() == 3 else out, yy)

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


_PEAK_CODE = """
import sys, json, os, threading, time
sys.path.insert(0, {repo!r})
import torch
from lepton_core.benchmarks.dp import _step_fn
torch.set_num_threads({threads})
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
fn = _step_fn({case!r}, {variant!r})
base, peak, done = rss(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
for _ in range(5):
    fn()
done.append(1); t.join()
print(json.dumps((max(peak[0], rss()) - base) / 2**20))
"""


def _peak_mb(case: str, variant: str) -> float:
    """Peak growth of the resident set over the first 5 steps (sampled every 0.5 ms by a thread), in a
    fresh process, from the model and its batch built: what a step allocates (saved activations,
    per-example gradients or norms, optimizer state)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _PEAK_CODE.format(repo=repo, threads=_threads(), case=case, variant=variant)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run(quick: bool = False) -> List[Dict[str, Any]]:
    from .common import interleaved

    rows: List[Dict[str, Any]] = []
    for case in CASES:
        fns, notes = {}, {}
        for v in VARIANTS:
            try:
                fns[v] = _step_fn(case, v)
            except ImportError as exc:
                notes[v] = f"skipped: {exc} (pip install opacus)"
            except Exception as exc:  # an Opacus version without this mode
                notes[v] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        t = interleaved(fns, rounds=3 if quick else 7, min_sample_s=0.05 if quick else 0.2)
        for v in VARIANTS:
            row: Dict[str, Any] = {"case": case, "variant": v, "note": notes.get(v, "")}
            if v in t:
                row["ms_per_step"] = 1e3 * t[v]
                row["vs_nonprivate"] = t[v] / t["ours non-private"]
                if "opacus hooks" in t:
                    row["vs_opacus_hooks"] = t[v] / t["opacus hooks"]
                if not quick:
                    row["peak_MB"] = _peak_mb(case, v)
            rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse

    from .common import print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print_table(run(quick=ap.parse_args().quick), COLUMNS, title="dp")
