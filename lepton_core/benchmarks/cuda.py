"""The CUDA backend against PyTorch on the same GPU (`lepton bench gemm` adds these rows when a GPU is
usable; `python -m lepton_core.benchmarks.cuda` prints them alone).

GEMM: lc.gemm (bf16, fp16: mma.sync tensor cores; int8 -> int32) against torch.matmul (cuBLAS) and
torch._int_mm, in TFLOP/s, with each baseline's rate at 8192^3 standing for the device's measured
peak; lc.scaled_gemm (int8 W8A8) against torch._int_mm with an eager epilogue and torch._scaled_mm
(float8 e4m3, where the GPU and torch have it). Quantization: lc.quantize int8 blockwise (one pass) and lc.dequantize against the same ops in
eager PyTorch, in GB/s of the algorithm's minimum traffic, against the measured device-to-device
copy bandwidth (bytes read + written). lc.nn.QuantLinear w8 / w4 (bf16 activations, 4096 -> 4096 and
4096 -> 11008, M = 1 .. 128) against F.linear with the bf16 weight, in GB/s of the packed weight read.

Timing (the rules of benchmarks/common.py, on the GPU): CUDA events around a batch of calls, the
candidates sampled round-robin (A B A B ...) in one process, medians reported; every result is
checked once against its baseline outside the timed part. Without a usable GPU, run() prints why
and returns [].
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, Dict, List

import lepton_core as lc

from .common import ProgressRows, print_table

COLUMNS = ["case", "ours_ms", "base_ms", "x_base", "ours_rate", "base_rate", "unit", "%peak"]


def _gpu_interleaved(fns: Dict[str, Callable[[], object]], *, rounds: int = 7, min_sample_ms: float = 20.0,
                     warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds per call of each function, timed with CUDA events, round-robin."""
    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    reps = {}
    for name, fn in fns.items():  # calls per sample so that one sample lasts min_sample_ms
        n = 1
        while True:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(n):
                fn()
            t1.record()
            t1.synchronize()
            ms = t0.elapsed_time(t1)
            if ms >= min_sample_ms or n >= 1 << 14:
                break
            n = max(n * 2, int(n * min_sample_ms / max(ms, 1e-3) * 1.2))
        reps[name] = n
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(reps[name]):
                fn()
            t1.record()
            t1.synchronize()
            samples[name].append(t0.elapsed_time(t1) / reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


_copy_gbps = None


def device_copy_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written (GB/s, 1e9), measured once."""
    global _copy_gbps
    if _copy_gbps is None:
        import torch

        n_bytes = 1 << 30
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").normal_()
        dst = torch.empty_like(src)
        ms = _gpu_interleaved({"copy": lambda: dst.copy_(src)}, rounds=5)["copy"]
        _copy_gbps = 2 * n_bytes / (ms * 1e-3) / 1e9
    return _copy_gbps


_peak: Dict[str, float] = {}


def measured_peak_tflops(kind: str) -> float:
    """The baseline library's rate at 8192^3 (bf16/fp16: torch.matmul, int8: torch._int_mm with B = w.t(),
    its fastest layout)."""
    import torch

    if kind not in _peak:
        n = 8192
        if kind == "int8":
            a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda")
            b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda").t()  # K-major: cuBLAS's fast path
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            dt = torch.bfloat16 if kind == "bf16" else torch.float16
            a = torch.randn(n, n, device="cuda").to(dt)
            b = torch.randn(n, n, device="cuda").to(dt)
            fn = lambda: torch.matmul(a, b)  # noqa: E731
        ms = _gpu_interleaved({"peak": fn}, rounds=3)["peak"]
        _peak[kind] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _peak[kind]


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _gemm_case(m: int, n: int, k: int, kind: str, b_transposed: bool) -> dict:
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    if kind == "int8":
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=gen)
        b = torch.randint(-127, 128, (n, k) if b_transposed else (k, n), dtype=torch.int8, device="cuda",
                          generator=gen)
        b = b.t() if b_transposed else b
        base = lambda: torch._int_mm(a, b)  # noqa: E731
        ours = lambda: lc.gemm(a, b)  # noqa: E731
        assert torch.equal(ours(), base()), "lc.gemm int8 differs from torch._int_mm"
    else:
        dt = torch.bfloat16 if kind == "bf16" else torch.float16
        a = torch.randn(m, k, device="cuda", generator=gen).to(dt)
        b = torch.randn(n, k, device="cuda", generator=gen).to(dt)
        b = b.t() if b_transposed else b.t().contiguous()
        base = lambda: torch.matmul(a, b)  # noqa: E731
        ours = lambda: lc.gemm(a, b)  # noqa: E731
        err = _rel_err(ours(), a.double() @ b.double())
        assert err <= (1e-2 if kind == "bf16" else 2e-3), f"lc.gemm {kind} relative error {err}"
    t = _gpu_interleaved({"ours": ours, "base": base})
    flops = 2.0 * m * n * k
    ours_tf = flops / (t["ours"] * 1e-3) / 1e12
    return {"case": f"gemm {kind} {m}x{n}x{k}{' (b=w.t())' if b_transposed else ''} vs "
                    f"{'torch._int_mm' if kind == 'int8' else 'torch.matmul'}",
            "ours_ms": t["ours"], "base_ms": t["base"], "x_base": t["base"] / t["ours"],
            "ours_rate": ours_tf, "base_rate": flops / (t["base"] * 1e-3) / 1e12, "unit": "TFLOP/s",
            "%peak": 100 * ours_tf / measured_peak_tflops(kind)}


def _scaled_case(n: int, base_kind: str) -> dict:
    """lc.scaled_gemm (int8 W8A8, per-row / per-column scales, bf16 out) at n^3 against what a user
    would otherwise run: torch._int_mm plus the same epilogue in eager torch ("int_mm"), or
    torch._scaled_mm on float8 e4m3 with row-wise scales ("fp8", Hopper's 8-bit path)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(3)
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda", generator=gen)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda", generator=gen).t()  # (K, N) = w.t()
    sa = torch.rand(n, device="cuda", generator=gen) + 0.01
    sb = torch.rand(n, device="cuda", generator=gen) + 0.01
    qa = lc.QTensor(a, sa, None, "int8", (n, n), 0, None)
    qb = lc.QTensor(b, sb, None, "int8", (n, n), 1, None)
    ours = lambda: lc.scaled_gemm(qa, qb, out_dtype=torch.bfloat16)  # noqa: E731
    want = ((torch._int_mm(a, b).float() * sa[:, None]) * sb[None, :]).to(torch.bfloat16)
    assert torch.equal(ours(), want), "lc.scaled_gemm differs from its float32 formula"
    if base_kind == "int_mm":
        base = lambda: ((torch._int_mm(a, b).float() * sa[:, None]) * sb[None, :]).to(torch.bfloat16)  # noqa: E731
        name = "torch._int_mm + eager scales"
    else:
        a8 = torch.randn(n, n, device="cuda", generator=gen).to(torch.float8_e4m3fn)
        b8 = torch.randn(n, n, device="cuda", generator=gen).to(torch.float8_e4m3fn).t()
        sa8, sb8 = sa[:, None].contiguous(), sb[None, :].contiguous()
        base = lambda: torch._scaled_mm(a8, b8, scale_a=sa8, scale_b=sb8, out_dtype=torch.bfloat16)  # noqa: E731
        base()
        name = "torch._scaled_mm fp8 e4m3 row-wise"
    t = _gpu_interleaved({"ours": ours, "base": base})
    flops = 2.0 * n**3
    ours_tf = flops / (t["ours"] * 1e-3) / 1e12
    return {"case": f"scaled_gemm int8 {n}^3 bf16 out vs {name}", "ours_ms": t["ours"], "base_ms": t["base"],
            "x_base": t["base"] / t["ours"], "ours_rate": ours_tf,
            "base_rate": flops / (t["base"] * 1e-3) / 1e12, "unit": "TFLOP/s",
            "%peak": 100 * ours_tf / measured_peak_tflops("int8")}


def _eager_quantize_block(x, block: int):
    """What a user would write in eager PyTorch (a division by a Python scalar is a multiplication by
    its reciprocal in torch, so the scale may differ from absmax / 127 in the last bit)."""
    import torch

    xg = x.reshape(-1, block).float()
    scale = xg.abs().amax(dim=1, keepdim=True) / 127.0
    q = torch.where(scale == 0, 0.0, xg / scale).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale.reshape(-1)


def _quant_case(n: int, dtype_name: str, block: int) -> dict:
    import torch

    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dt)
    ours = lambda: lc.quantize(x, "int8", block_size=block)  # noqa: E731
    base = lambda: _eager_quantize_block(x, block)  # noqa: E731
    q = ours()
    want_q, want_s = base()
    # Sanity check against the baseline (the exact contract is tests/test_cuda.py's job): scales agree
    # to the last bit or two, codes to within one step where the scales differ.
    assert torch.allclose(q.scale, want_s, rtol=1e-6, atol=0), "lc.quantize scales differ from eager torch"
    assert (q.data.int() - want_q.int()).abs().max().item() <= 1, "lc.quantize codes differ from eager torch"
    t = _gpu_interleaved({"ours": ours, "base": base})
    n_bytes = n * x.element_size() + n + 4 * (n // block)
    gbps = n_bytes / (t["ours"] * 1e-3) / 1e9
    return {"case": f"quantize int8 block{block} {dtype_name} {n >> 20}M vs eager torch",
            "ours_ms": t["ours"], "base_ms": t["base"], "x_base": t["base"] / t["ours"], "ours_rate": gbps,
            "base_rate": n_bytes / (t["base"] * 1e-3) / 1e9, "unit": "GB/s", "%peak": 100 * gbps / device_copy_gbps()}


def _dequant_case(n: int, block: int) -> dict:
    import torch

    x = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    q = lc.quantize(x, "int8", block_size=block)
    data, scale = q.data, q.scale
    ours = lambda: lc.dequantize(q)  # noqa: E731
    base = lambda: (data.reshape(-1, block).float() * scale[:, None]).reshape(-1)  # noqa: E731
    assert torch.equal(ours(), base()), "lc.dequantize differs from eager torch"
    t = _gpu_interleaved({"ours": ours, "base": base})
    n_bytes = n + 4 * (n // block) + 4 * n
    gbps = n_bytes / (t["ours"] * 1e-3) / 1e9
    return {"case": f"dequantize int8 block{block} {n >> 20}M vs eager torch", "ours_ms": t["ours"],
            "base_ms": t["base"], "x_base": t["base"] / t["ours"], "ours_rate": gbps,
            "base_rate": n_bytes / (t["base"] * 1e-3) / 1e9, "unit": "GB/s", "%peak": 100 * gbps / device_copy_gbps()}


def _graphed(fn: Callable[[], object], calls: int = 20) -> Callable[[], object]:
    """A function replaying a CUDA graph of `calls` calls of fn: decode-shaped layers run this way in
    practice (torch.compile's cudagraphs, serving engines), and it times the kernels without the
    Python and launch cost of each call."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream before capture (torch's rule)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def _qlinear_cases(n: int, k: int, scheme: str, ms) -> List[dict]:
    """lc.nn.QuantLinear (bf16 activations) against F.linear with the bf16 weight, one row per M; the
    rate is the packed weight's bytes (codes, scales, zero points) read per second, the baseline's its
    bf16 weight's. The layer is quantized once (on the CPU, as from_linear does) for every M."""
    import torch
    import torch.nn.functional as F

    from ..nn import QuantLinear

    gen = torch.Generator(device="cuda").manual_seed(3)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    q = QuantLinear.from_linear(lin, scheme, 128)
    wb = lin.weight.detach().to(torch.bfloat16)
    w_ref = q.dequantize_weight().double()
    packed = sum(b.numel() * b.element_size() for b in q.buffers())
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            ours = lambda: q(x)  # noqa: E731
            base = lambda: F.linear(x, wb)  # noqa: E731
            err = _rel_err(ours(), F.linear(x.double(), w_ref))
            assert err <= 1e-2, f"QuantLinear {scheme} M={m} relative error {err}"
            t = _gpu_interleaved({"ours": ours, "base": base}, rounds=5, min_sample_ms=10.0)
        gbps = packed / (t["ours"] * 1e-3) / 1e9
        rows.append({"case": f"QuantLinear {scheme} M={m} {k}->{n} bf16 vs F.linear bf16", "ours_ms": t["ours"],
                     "base_ms": t["base"], "x_base": t["base"] / t["ours"], "ours_rate": gbps,
                     "base_rate": wb.numel() * 2 / (t["base"] * 1e-3) / 1e9, "unit": "GB/s (weight)",
                     "%peak": 100 * gbps / device_copy_gbps()})
        if m <= 8:  # decode shapes: the same calls replayed from CUDA graphs (kernel time alone)
            calls = 20
            with torch.inference_mode():
                t = _gpu_interleaved({"ours": _graphed(ours, calls), "base": _graphed(base, calls)}, rounds=5,
                                     min_sample_ms=10.0)
            t = {name: ms / calls for name, ms in t.items()}
            gbps = packed / (t["ours"] * 1e-3) / 1e9
            rows.append({"case": f"QuantLinear {scheme} M={m} {k}->{n} bf16 vs F.linear bf16, CUDA graph",
                         "ours_ms": t["ours"], "base_ms": t["base"], "x_base": t["base"] / t["ours"],
                         "ours_rate": gbps, "base_rate": wb.numel() * 2 / (t["base"] * 1e-3) / 1e9,
                         "unit": "GB/s (weight)", "%peak": 100 * gbps / device_copy_gbps()})
    return rows


def run(quick: bool = False) -> List[dict]:
    """Rows of COLUMNS; [] (with the reason printed) when the CUDA backend cannot run here."""
    info = lc.info()
    if "cuda" not in info["backends"]:
        print(f"lepton bench cuda: skipped, {info['cuda_unavailable_reason']}", file=sys.stderr, flush=True)
        return []
    rows = ProgressRows("cuda", COLUMNS)
    sizes = [(4096, 4096, 4096), (8192, 8192, 8192)]
    if not quick:
        sizes += [(16384, 1024, 4096), (128, 4096, 4096)]
    for kind in ("bf16", "fp16", "int8"):
        for (m, n, k) in sizes:
            rows.append(_gemm_case(m, n, k, kind, b_transposed=True))
        rows.append(_gemm_case(4096, 4096, 4096, kind, b_transposed=False))
    for n_sq in (4096, 8192):
        for base_kind in ("int_mm", "fp8"):
            try:
                rows.append(_scaled_case(n_sq, base_kind))
            except (RuntimeError, AttributeError) as e:  # no float8 _scaled_mm in this torch / on this GPU
                if base_kind != "fp8":
                    raise
                print(f"lepton bench cuda: torch._scaled_mm row skipped: {e}", file=sys.stderr, flush=True)
    n = (64 if quick else 256) << 20
    for dtype_name in ("f32", "bf16"):
        for block in ((256,) if quick else (32, 256, 4096)):
            rows.append(_quant_case(n, dtype_name, block))
    rows.append(_dequant_case(n, 256))
    for scheme in ("w8", "w4"):
        for (n_out, k) in ((4096, 4096), (11008, 4096)):
            for row in _qlinear_cases(n_out, k, scheme, (1, 32) if quick else (1, 8, 32, 128)):
                rows.append(row)
    return rows


if __name__ == "__main__":
    info = lc.info()
    if "cuda" in info["backends"]:
        print(f"{info['cuda_device']}: copy {device_copy_gbps():.0f} GB/s; peaks (8192^3): "
              f"bf16 {measured_peak_tflops('bf16'):.0f}, fp16 {measured_peak_tflops('fp16'):.0f}, "
              f"int8 {measured_peak_tflops('int8'):.0f} T(FL)OP/s")
    print_table(run(quick="--quick" in sys.argv), COLUMNS, "CUDA backend")
