"""The quality ceiling of lc.nn.QuantLinear's schemes on `lepton bench infer`'s MiniLM text set.

Each nn.Linear of MiniLM is replaced by a plain-torch fake-quantized linear (float64 matmul, so the
int32 / float32 accumulation of the kernels adds nothing): the weight dequantized from codes made by the
formulas written out here (API.md §5, independent of lepton_core's code), and for w8a8 the activations
quantized per row to int8 (absmax / 127, round half to even, as lc.quantize). Cosine and top-1 come from
lepton_core.benchmarks.infer (the same code as the benchmark), next to our kernels' numbers.
"sim" rows quantize the weight with absmax scales; "sim (ours' weights)" rows take the weight our
conversion produced (QuantLinear.dequantize_weight), so "ours" - "sim (ours' weights)" is the kernels'
share and "sim" is the scheme's own ceiling with plain absmax.

PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python bench/quant_ceiling.py [--absmax]
(--absmax: our int8 conversion without its clip search, W8_CLIP_RATIOS = (1.0,), as before session 6)
"""
from __future__ import annotations

import copy
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

import lepton_core as lc
from lepton_core import _qpack
from lepton_core.benchmarks.infer import W4_GROUP, embed, load_minilm, quality, quantized_minilm, sentences


def w8_absmax(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, scale = absmax / 127; the dequantized weight."""
    s = w.abs().amax(1, keepdim=True) / 127
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(w / safe).clamp(-127, 127) * s


def w4_absmax(w: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric 4-bit per `group` inputs: lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / 15,
    zero = round(-lo / scale); the dequantized weight."""
    n, k = w.shape
    g = math.ceil(k / group)
    p = F.pad(w, (0, g * group - k)).reshape(n, g, group)
    lo, hi = p.amin(2, keepdim=True).clamp(max=0), p.amax(2, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    safe = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-lo / safe).clamp(0, 15)
    q = (torch.round(p / safe) + z).clamp(0, 15)
    return ((q - z) * s).reshape(n, g * group)[:, :k]


class FakeQuantLinear(nn.Module):
    """y = xq W^T + b in float64, W the given (already dequantized) weight; xq = x, or x fake-quantized
    to int8 per row when act_int8."""

    def __init__(self, w: torch.Tensor, bias, act_int8: bool) -> None:
        super().__init__()
        self.w, self.bias, self.act_int8 = w.double(), None if bias is None else bias.double(), act_int8

    def forward(self, x):
        x = x.float()
        if self.act_int8:
            s = x.abs().amax(-1, keepdim=True) / 127
            safe = torch.where(s == 0, torch.ones_like(s), s)
            x = torch.round(x / safe).clamp(-127, 127) * s
        return F.linear(x.double(), self.w, self.bias).float()


def simulated(model: nn.Module, weight_of, act_int8: bool) -> nn.Module:
    """A copy of model with each nn.Linear (or QuantLinear) replaced by a FakeQuantLinear of weight_of(layer)."""
    model = copy.deepcopy(model)
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, lc.nn.QuantLinear)):
                setattr(parent, name, FakeQuantLinear(weight_of(child), child.bias, act_int8))
    return model


def main() -> None:
    if "--absmax" in sys.argv[1:]:
        _qpack.W8_CLIP_RATIOS = (1.0,)
    texts = sentences()
    fp32 = load_minilm()
    ref = embed(fp32, texts, 32)
    rows = []
    for scheme, wq in (("w8a8", w8_absmax), ("w8", w8_absmax), ("w4", lambda w: w4_absmax(w, W4_GROUP))):
        act = scheme == "w8a8"
        ours = quantized_minilm(fp32, scheme)
        rows.append((f"ours {scheme}", quality(embed(ours, texts, 32), ref)))
        rows.append((f"sim {scheme} (ours' weights)",
                     quality(embed(simulated(ours, lambda m: m.dequantize_weight(), act), texts, 32), ref)))
        rows.append((f"sim {scheme} absmax",
                     quality(embed(simulated(fp32, lambda m: wq(m.weight.detach().float()), act), texts, 32), ref)))
    # the activation quantization alone (float weights): how much of w8a8's gap is a8
    rows.append(("sim a8 only (fp32 weights)",
                 quality(embed(simulated(fp32, lambda m: m.weight.detach().float(), True), texts, 32), ref)))
    sim = ref @ ref.t()
    sim.fill_diagonal_(-2.0)
    top2 = sim.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    print("fp32 nearest-neighbour margins (top-1 minus top-2 similarity): "
          + ", ".join(f"< {t}: {(gap < t).sum().item()} of {len(texts)}" for t in (0.001, 0.005, 0.01, 0.02)))
    print(f"| {'model':32} | cos_mean | cos_min | top1_% |")
    print(f"|{'-' * 34}|----------|---------|--------|")
    for name, q in rows:
        print(f"| {name:32} | {q['cos_mean']:.5f}  | {q['cos_min']:.4f}  | {q['top1_%']:6.2f} |")


if __name__ == "__main__":
    main()
