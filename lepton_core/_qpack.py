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


def w4_range(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) float32 of groups with minimum lo and maximum hi (zero already included:
    lo <= 0 <= hi): scale = (hi - lo) / 15, zero = round(-lo / scale); an all-zero group gets 0, 0."""
    span = hi - lo
    scale = torch.where(torch.isinf(span), hi / W4_LEVELS - lo / W4_LEVELS, span / W4_LEVELS)
    scale = torch.where((scale == 0) & (span > 0), torch.full_like(scale, _TINY), scale)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.where(scale == 0, torch.zeros_like(scale), torch.round(-lo / safe)).clamp(0, W4_LEVELS)
    return scale, zero


def w4_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float codes 0..15 of float32 x under (scale, zero) of the same shape (or broadcast):
    clamp(round(x / scale) + zero, 0, 15), 0 where the scale is 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(x / safe) + zero
    return torch.where(scale == 0, torch.zeros_like(q), q).clamp(0, W4_LEVELS)


def quantize_w4(w: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K) in 0..15, scale float32 (N, G), zero point uint8 (N, G)) of a float (N, K)
    weight, per group_size consecutive inputs of each row (the last group possibly short): §2's "uint8"
    formula with 16 levels, in float32 (round half to even)."""
    n, k = w.shape
    g = math.ceil(k / group_size)
    w = w.detach().to(torch.float32)
    padded = torch.nn.functional.pad(w, (0, g * group_size - k)).reshape(n, g, group_size)
    # padding zeros leave min(., 0) and max(., 0) unchanged
    scale, zero = w4_range(padded.amin(dim=2).clamp(max=0.0), padded.amax(dim=2).clamp(min=0.0))
    q = w4_codes(padded, scale[..., None], zero[..., None])
    codes = q.reshape(n, g * group_size)[:, :k].to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


# Clip search of the int8 weights (conversion time): each row's absmax is shrunk by the ratio of this grid
# that gives the smallest squared reconstruction error of the row; ratio 1 (§2's formula) keeps ties and
# wins within float32 rounding, so the error is never above absmax's. Clipping a row's rare extremes buys
# a finer step for the rest (with 255 levels the best ratio is near 1). Measured on MiniLM
# (bench/quant_ceiling.py, bench/RESULTS.md): it raises w8a8 / w8 top-1; the same search on w4 groups
# (squared error, ratios down to 0.5) raised cosine but lowered top-1, so w4 keeps absmax.
W8_CLIP_RATIOS = tuple(1.0 - i / 200 for i in range(21))  # 1.0, 0.995, ..., 0.9


def _w8_row_codes(w: torch.Tensor, absmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q float (N, K) in -127..127, scale (N,)): §2's "int8" formula on rows with this absmax."""
    scale = absmax / 127
    scale = torch.where((scale == 0) & (absmax > 0), torch.full_like(scale, _TINY), scale)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w / safe[:, None]).clamp(-127, 127), scale


W8_CHUNK_BYTES = 2 << 20  # rows per step of quantize_w8's clip search: ~2 MiB of float32


def quantize_w8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (N, K) in -127..127, scale float32 (N,)) of a float (N, K) weight: §2's "int8" formula
    per output row on the row's absmax times its clip-searched ratio (W8_CLIP_RATIOS)."""
    w = w.detach().to(torch.float32)
    if w.shape[0] == 0:
        return torch.empty(w.shape, dtype=torch.int8), torch.empty(0, dtype=torch.float32)
    # Rows in chunks of ~2 MiB: the search's temporaries then stay in cache (a 4096 x 4096 weight in
    # one piece: 3.7 s; in chunks: 0.3 s). Each row's result does not depend on the chunking.
    rows = max(1, W8_CHUNK_BYTES // (4 * max(w.shape[1], 1)))
    parts = [_w8_rows(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])



def _w8_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """quantize_w8 of float32 rows."""
    hi = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])

    def sq_error(r):  # per row, summed in float64
        q, scale = _w8_row_codes(w, hi * r)
        d = q * scale[:, None] - w
        return (d * d).sum(1, dtype=torch.float64)

    err, ratio = sq_error(1.0), torch.ones_like(hi)
    for r in W8_CLIP_RATIOS[1:]:
        e = sq_error(r)
        better = e < err * (1 - 1e-6)  # a win must exceed float32 rounding
        err = torch.where(better, e, err)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    q, scale = _w8_row_codes(w, hi * ratio)
    return q.to(torch.int8), scale


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
