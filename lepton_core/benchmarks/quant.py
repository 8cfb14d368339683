"""`lepton bench quant`: lc.quantize / lc.dequantize against the same ops written in eager PyTorch and
that eager code under torch.compile, timed interleaved in one process with 2 threads.

Bytes are counted as the algorithm's minimum traffic (x read once, codes and scales written once;
dequantize: codes and scales read, output written), the same count for every implementation, so
GB/s compares directly with the machine's copy bandwidth (bytes read + written).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import torch

import lepton_core as lc

from .common import ProgressRows, copy_bandwidth_gbps, interleaved, print_table

COLUMNS = ["case", "MB", "ours_ms", "eager_ms", "compiled_ms", "ours_GB/s", "%copy", "x_eager", "x_compiled"]
THREADS = 2
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


# ---- the same ops in eager PyTorch (what a user would otherwise write) ----
def _eager_quantize(x: torch.Tensor, fmt: str, mode: str, block: int = 256):
    """mode: "block" (block of `block` elements of the flattening), "tensor", or "channel" (axis 0)."""
    qmax = _QMAX[fmt]
    xg = x.reshape(-1, block) if mode == "block" else (x.reshape(1, -1) if mode == "tensor" else x.reshape(x.shape[0], -1))
    scale = xg.abs().amax(dim=1, keepdim=True) / qmax
    t = torch.where(scale == 0, 0.0, xg / scale)
    if fmt == "int8":
        q = torch.round(t).clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = t.to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.reshape(-1)


def _eager_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 256):
    return (q.reshape(-1, block).float() * scale[:, None]).reshape(q.shape)


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _quantize_case(name: str, x: torch.Tensor, fmt: str, mode: str, compile_baseline: bool) -> dict:
    kw = {"block": {"block_size": 256}, "tensor": {}, "channel": {"axis": 0}}[mode]
    n = x.numel()
    n_groups = n // 256 if mode == "block" else (1 if mode == "tensor" else x.shape[0])
    n_bytes = n * x.element_size() + n + 4 * n_groups

    def eager():
        return _eager_quantize(x, fmt, mode)

    fns: Dict[str, Callable] = {"ours": lambda: lc.quantize(x, fmt, **kw), "eager": eager}
    if compile_baseline:
        compiled = _compiled(eager)
        fns["compiled"] = lambda: compiled()
    # check once, outside the timed part: same codes and scales as the eager baseline
    q = lc.quantize(x, fmt, **kw)
    want_q, want_s = eager()
    assert torch.equal(q.data.view(torch.uint8), want_q.view(torch.uint8)), name
    assert torch.equal(q.scale.reshape(-1), want_s), name
    return _row(name, n_bytes, fns)


def _dequantize_case(name: str, x: torch.Tensor, fmt: str, compile_baseline: bool) -> dict:
    q = lc.quantize(x, fmt, block_size=256)
    n = x.numel()
    n_bytes = n + 4 * (n // 256) + 4 * n
    data, scale = q.data, q.scale

    def eager():
        return _eager_dequantize(data, scale)

    fns: Dict[str, Callable] = {"ours": lambda: lc.dequantize(q), "eager": eager}
    if compile_baseline:
        compiled = _compiled(eager)
        fns["compiled"] = lambda: compiled()
    assert torch.equal(lc.dequantize(q), eager()), name
    return _row(name, n_bytes, fns)


def _row(name: str, n_bytes: int, fns: Dict[str, Callable]) -> dict:
    t = interleaved(fns, rounds=5, min_sample_s=0.05)
    gbps = n_bytes / t["ours"] / 1e9
    row = {"case": name, "MB": n_bytes / 1e6, "ours_ms": t["ours"] * 1e3, "eager_ms": t["eager"] * 1e3,
           "ours_GB/s": gbps, "%copy": 100 * gbps / copy_bandwidth_gbps(), "x_eager": t["eager"] / t["ours"]}
    if "compiled" in t:
        row["compiled_ms"] = t["compiled"] * 1e3
        row["x_compiled"] = t["compiled"] / t["ours"]
    return row


def _dequantize_prealloc_case(name: str, x: torch.Tensor) -> dict:
    """The dequantize kernel writing into an output allocated once: the same work as
    `dequantize int8 block256` without the fresh output's page faults and zeroing (which the
    allocator charges to every op that returns a new 64 MiB tensor, baselines included)."""
    from lepton_core._codes import FORMATS
    from lepton_core.backends.cpu import dequantize_into

    q = lc.quantize(x, "int8", block_size=256)
    n = x.numel()
    out = torch.empty(n)
    out_eager = torch.empty(n)
    data, scale = q.data, q.scale

    def ours():
        dequantize_into(data, scale, None, FORMATS["int8"], (n,), None, 256, out)

    def eager():
        torch.mul(data.view(-1, 256), scale[:, None], out=out_eager.view(-1, 256))

    ours()
    eager()
    assert torch.equal(out, out_eager), name
    return _row(name, n + 4 * (n // 256) + 4 * n, {"ours": ours, "eager": eager})


def _fixed_cost_case() -> dict:
    """A 1 KiB per-tensor int8 quantize: call overhead, in microseconds."""
    x = torch.randn(256)

    def eager():
        return _eager_quantize(x, "int8", "tensor")

    t = interleaved({"ours": lambda: lc.quantize(x, "int8"), "eager": eager}, rounds=7, min_sample_s=0.02)
    return {"case": "quantize int8 tensor, 1 KiB (us)", "MB": 1024 / 1e6, "ours_ms": t["ours"] * 1e6,
            "eager_ms": t["eager"] * 1e6, "x_eager": t["eager"] / t["ours"]}


def run(quick: bool = False) -> List[dict]:
    """Rows of COLUMNS. quick: 4M elements and no torch.compile baseline (it compiles for seconds)."""
    before = (lc.get_num_threads(), torch.get_num_threads())
    lc.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    rows = ProgressRows("quant", COLUMNS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own deprecation notices
            n = (4 if quick else 16) << 20
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, generator=gen)
            comp = not quick
            rows.append(_quantize_case("quantize int8 block256", x, "int8", "block", comp))
            rows.append(_dequantize_case("dequantize int8 block256", x, "int8", comp))
            rows.append(_dequantize_prealloc_case("dequantize int8 block256, preallocated out", x))
            rows.append(_quantize_case("quantize int8 tensor", x, "int8", "tensor", comp))
            rows.append(_quantize_case("quantize int8 channel", x.reshape(4096, -1), "int8", "channel", comp))
            rows.append(_quantize_case("quantize fp8_e4m3 block256", x, "fp8_e4m3", "block", comp))
            rows.append(_quantize_case("quantize fp8_e4m3 tensor", x, "fp8_e4m3", "tensor", comp))
            rows.append(_dequantize_case("dequantize fp8_e4m3 block256", x, "fp8_e4m3", comp))
            rows.append(_fixed_cost_case())
    finally:
        lc.set_num_threads(before[0])
        torch.set_num_threads(before[1])
    return rows


if __name__ == "__main__":
    import sys

    print(f"copy bandwidth {copy_bandwidth_gbps():.1f} GB/s, {THREADS} threads, lc {lc.info()['cpu_isa']}")
    print_table(run(quick="--quick" in sys.argv), COLUMNS, "quantize / dequantize")
