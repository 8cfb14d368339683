"""Calibrated rounding of QuantLinear weights (quantize_model(..., calibrate=...); API.md §5).

Nearest rounding picks each weight's code alone, so it makes the weight error small. What matters is
the layer's output error on the inputs it really sees: E|(W - Q) x|^2 = sum over rows of
(w - q)^T H (w - q) with H = E[x x^T], the second moment of the layer's inputs. This is the GPTQ method
(Frantar et al., 2022, arXiv:2210.17323), written here from the paper:
  - Round the input columns in order.
  - After each column, spread its rounding error over the columns not rounded yet, along H's inverse.
    Those columns then absorb what the rounded one lost.
  - Columns go in blocks of BLOCK. The update to the columns after a block is one matrix product.
The codes keep their meaning, (code - zero) * scale, in the same buffers and kernels. Only two things
change:
  - which code each weight gets;
  - for w4, each group's range: it is §5's min / max formula, taken from the weights as updated when
    the group's first column comes up.
w8 / w8a8 keep the clip-searched row scale of the original weight.

H is collected by forward pre-hooks while the user's `calibrate(model)` runs the float model. Every
input row each layer sees counts, padding included. It is accumulated in float64 on the input's device,
(in_features^2 x 8 bytes a layer), then moved to the CPU. Measured on MiniLM w4 g64 (bench/RESULTS.md,
session 10): cosine 0.9695 -> 0.9895 and top-1 82.9% -> 88.8% with 256 calibration sentences.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from . import _qpack

BLOCK = 128  # columns per lazy update; a multiple of every w4 group up to 128, else the group size
DAMP = 0.01  # H += DAMP * mean(diag H) * I: keeps H invertible (the paper's value; best of 0.01/0.1/0.3 on MiniLM)


class InputMoments:
    """Forward pre-hooks on `layers` (name -> module) that sum x^T x and count the rows of each input.
    Use as a context manager around the calibration run."""

    def __init__(self, layers: Dict[str, nn.Module], op: str) -> None:
        self.layers, self.op = layers, op
        self.sums: Dict[str, torch.Tensor] = {}
        self.rows: Dict[str, int] = {name: 0 for name in layers}
        self._last = None  # (input, x^T x): q / k / v read the same tensor; its product is made once
        self._hooks = []

    def _hook(self, name: str, module: nn.Module, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.shape[-1] == 0:
            return
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last
        if last is not None and last[0] is x and last[1] == version:
            xtx = last[2]
        else:
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if not torch.isfinite(flat).all():
                raise ValueError(f"{self.op}: calibration input of layer {name!r} has non-finite values")
            xtx = flat.t() @ flat
            self._last = (x, version, xtx)
        rows = x.numel() // x.shape[-1]
        with torch.inference_mode(False):  # a normal tensor: calibrate may run in and out of inference mode
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(xtx)
            self.sums[name].add_(xtx.to(self.sums[name].device))
        self.rows[name] += rows

    def __enter__(self) -> "InputMoments":
        for name, m in self.layers.items():
            self._hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: self._hook(name, mod, args, kwargs), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._last = [], None

    def second_moment(self, name: str):
        """E[x x^T] (float64 CPU (in, in)) of the layer's inputs, or None if it saw no rows."""
        if self.rows[name] == 0:
            return None
        return (self.sums[name] / self.rows[name]).cpu()


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1 (float64): row i of U, divided by U[i, i], carries
    column i's rounding error onto columns > i."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0  # an input that was always zero: its column gets no error and passes none on
    diag[dead] = 1.0
    damp = DAMP * diag.mean()
    for _ in range(4):  # rank-deficient H: more damping until it factors
        chol, info = torch.linalg.cholesky_ex(h + damp * torch.eye(h.shape[0], dtype=h.dtype))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        damp = damp * 10
    raise ValueError("lc.nn.quantize_model: calibration second moment is not positive definite "
                     "(non-finite or degenerate calibration inputs)")


def _rounded(w: torch.Tensor, h: torch.Tensor, group: int, column_codes) -> None:
    """The blocked GPTQ loop over the input columns of the float (N, K) weight w. The work is on its
    transpose (K, N) in float64, so that one input column is one contiguous row and the updates stream.
    column_codes(j, col, cur) gets the current block's rows cur (block, N), rounds row j (input col),
    records its codes and returns the dequantized row."""
    wt = w.detach().t().to(torch.float64).contiguous()
    k = wt.shape[0]
    u = _inverse_factor(h)
    block = max(BLOCK, group)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        cur = wt[i1:i2]  # a view: updated in place
        err = torch.empty_like(cur)
        for j in range(i2 - i1):
            col = i1 + j
            e = (cur[j] - column_codes(j, col, cur)) / u[col, col]
            cur[j:].addr_(u[col, col:i2], e, alpha=-1)  # the later columns of the block absorb the error
            err[j] = e
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)  # and, once per block, all columns after it


def quantize_w4(w: torch.Tensor, h: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_qpack.quantize_w4's (codes, scale, zero), rounded against the input second moment h."""
    n, k = w.shape
    g = -(-k // group_size)
    codes_t = torch.empty(k, n, dtype=torch.uint8)
    scale = torch.empty(g, n, dtype=torch.float32)
    zero = torch.empty(g, n, dtype=torch.float32)

    def column_codes(j, col, cur):
        grp = col // group_size
        if col % group_size == 0:  # the group's range from its columns as updated so far
            x = cur[j:j + group_size].to(torch.float32)
            scale[grp], zero[grp] = _qpack.w4_range(x.amin(0).clamp(max=0.0), x.amax(0).clamp(min=0.0))
        s, z = scale[grp], zero[grp]
        q = _qpack.w4_codes(cur[j].to(torch.float32), s, z)
        codes_t[col] = q.to(torch.uint8)
        return ((q - z) * s).to(torch.float64)

    _rounded(w, h, group_size, column_codes)
    return codes_t.t().contiguous(), scale.t().contiguous(), zero.t().contiguous().to(torch.uint8)


def quantize_w8(w: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """_qpack.quantize_w8's (codes, scale): the same clip-searched row scales, codes rounded against h."""
    _, scale = _qpack.quantize_w8(w)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes_t = torch.empty(w.shape[1], w.shape[0], dtype=torch.int8)

    def column_codes(j, col, cur):
        q = torch.round(cur[j].to(torch.float32) / safe).clamp(-127, 127)
        codes_t[col] = q.to(torch.int8)
        return (q * scale).to(torch.float64)

    _rounded(w, h, BLOCK, column_codes)
    return codes_t.t().contiguous(), scale
