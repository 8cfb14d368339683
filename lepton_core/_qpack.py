"""Weight quantization of lc.nn.QuantLinear (API.md §5) and the packed layout its kernels read.

The layout is described once, in csrc/cpu/qlinear/qlinear.h; these functions write it (`pack_w8`,
`pack_w4`, at conversion) and read it back (`unpack`, for `dequantize_weight` and the input gradient).
Needs torch.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ._codes import QLINEAR_PANEL

P = QLINEAR_PANEL
W4_LEVELS = 15  # codes 0..15
_TINY = 2.0 ** -149  # §2: a group that is not all zeros never gets a zero scale


# Clip search (conversion time): each group's range is shrunk by the ratio of its scheme's grid that
# gives the smallest squared reconstruction error of its weights; ratio 1 (absmax, §2's formula) wins
# ties, so the error is never above absmax's. Clipping a few outliers buys finer steps for the rest;
# with 255 levels the best clip is near 1, with 16 far below.
W4_CLIP_RATIOS = tuple(1.0 - i / 40 for i in range(21))  # 1.0, 0.975, ..., 0.5
W8_CLIP_RATIOS = tuple(1.0 - i / 200 for i in range(21))  # 1.0, 0.995, ..., 0.9


def _w4_group_codes(padded: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """(q float (N, G, B) in 0..15, scale (N, G), zero float (N, G)) of groups with range [lo, hi]."""
    span = hi - lo
    scale = torch.where(torch.isinf(span), hi / W4_LEVELS - lo / W4_LEVELS, span / W4_LEVELS)
    scale = torch.where((scale == 0) & (span > 0), torch.full_like(scale, _TINY), scale)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.where(scale == 0, torch.zeros_like(scale), torch.round(-lo / safe)).clamp(0, W4_LEVELS)
    q = torch.round(padded / safe[..., None]) + zero[..., None]
    q = torch.where(scale[..., None] == 0, torch.zeros_like(q), q).clamp(0, W4_LEVELS)
    return q, scale, zero


def _sq_error(padded: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error per group of the dequantized (q - zero) * scale, summed in float64."""
    d = (q - zero[..., None]) * scale[..., None] - padded
    return (d * d).sum(-1, dtype=torch.float64)


def _searched(padded: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, codes_of, ratios):
    """codes_of(padded, lo * r, hi * r) for the ratio r (ratios[0] == 1) of least squared error per
    group. A ratio must win by more than float32 rounding (1e-6 relative), so ratio 1 keeps near-ties."""
    err = _sq_error(padded, *codes_of(padded, lo, hi))
    ratio = torch.ones_like(lo)
    for r in ratios[1:]:
        e = _sq_error(padded, *codes_of(padded, lo * r, hi * r))
        better = e < err * (1 - 1e-6)
        err = torch.where(better, e, err)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    return codes_of(padded, lo * ratio, hi * ratio)


def quantize_w4(w: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K) in 0..15, scale float32 (N, G), zero point uint8 (N, G)) of a float (N, K)
    weight, per group_size consecutive inputs of each row (the last group possibly short): §2's "uint8"
    formula with 16 levels, in float32 (round half to even), on each group's range [lo, hi] shrunk by
    its clip-searched ratio (W4_CLIP_RATIOS)."""
    n, k = w.shape
    g = math.ceil(k / group_size)
    w = w.detach().to(torch.float32)
    padded = torch.nn.functional.pad(w, (0, g * group_size - k)).reshape(n, g, group_size)
    # padding zeros leave min(., 0) and max(., 0) unchanged, and reconstruct exactly (zero is a code)
    lo = padded.amin(dim=2).clamp(max=0.0)
    hi = padded.amax(dim=2).clamp(min=0.0)
    q, scale, zero = _searched(padded, lo, hi, _w4_group_codes, W4_CLIP_RATIOS)
    codes = q.reshape(n, g * group_size)[:, :k].to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


def _w8_row_codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """(q float (N, 1, K) in -127..127, scale (N, 1), zero 0 (N, 1)) of rows with absmax hi (lo = -hi)."""
    scale = hi / 127
    scale = torch.where((scale == 0) & (hi > 0), torch.full_like(scale, _TINY), scale)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / safe[..., None]).clamp(-127, 127)
    return q, scale, torch.zeros_like(scale)


def quantize_w8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (N, K) in -127..127, scale float32 (N,)) of a float (N, K) weight: §2's "int8"
    formula per output row on its absmax shrunk by the row's clip-searched ratio (W8_CLIP_RATIOS)."""
    w = w.detach().to(torch.float32)[:, None, :]
    hi = w.abs().amax(dim=2) if w.shape[2] else w.new_zeros(w.shape[:2])
    q, scale, _ = _searched(w, -hi, hi, _w8_row_codes, W8_CLIP_RATIOS)
    return q[:, 0].to(torch.int8), scale[:, 0]


def _panels(t: torch.Tensor) -> torch.Tensor:
    """(N, X) -> (N_pad / P, X, P): rows padded with zeros to a multiple of P, then panel-major."""
    n = t.shape[0]
    n_pad = -(-n // P) * P
    t = torch.nn.functional.pad(t, (0, 0, 0, n_pad - n))
    return t.reshape(n_pad // P, P, t.shape[1]).transpose(1, 2).contiguous()


def pack_w8(q: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and per-row scales (N,) -> (codes (N_pad/32, K, 32), scale (N_pad,))."""
    n = q.shape[0]
    n_pad = -(-n // P) * P
    return _panels(q), torch.nn.functional.pad(scale.to(torch.float32), (0, n_pad - n)).contiguous()


def pack_w4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """codes (N, K) in 0..15, scale / zero (N, G) -> (codes (N_pad/32, ceil(K/2), 32) two per byte, low
    nibble the even k; scale (N_pad/32, G, 32) float32; zero (N_pad/32, G, 32) uint8)."""
    k = q.shape[1]
    q = torch.nn.functional.pad(q, (0, k % 2))
    pairs = q[:, 0::2] | (q[:, 1::2] << 4)
    return _panels(pairs), _panels(scale.to(torch.float32)), _panels(zero)


def _unpanel(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _panels: (N_pad / P, X, P) -> (n, X)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def unpack(scheme: str, codes, scale, zero, n: int, k: int, group_size: int) -> torch.Tensor:
    """The float32 (n, k) weight the packed buffers stand for: (code - zero) * scale in float32."""
    if scheme == "w8a8":  # stored unpacked: the int8 GEMM consumes the (N, K) codes as they are
        return codes.to(torch.float32) * scale[:n, None]
    if scheme == "w8":
        return _unpanel(codes, n).to(torch.float32) * scale[:n, None]
    pairs = _unpanel(codes, n)
    q = torch.stack((pairs & 15, pairs >> 4), dim=2).reshape(n, -1)[:, :k].to(torch.float32)
    s = _unpanel(scale, n).repeat_interleave(group_size, dim=1)[:, :k]
    z = _unpanel(zero, n).to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    return (q - z) * s
