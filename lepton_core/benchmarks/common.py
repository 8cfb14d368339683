"""Timing helpers for benchmarks on a shared, noisy machine.

Rules (bench/RESULTS.md relies on them): the baseline and our kernel are timed interleaved in one
process (A B A B ..., the order reversed every other round), each sample long enough to dwarf timer
resolution, and we report medians and a ratio (of the medians, or the median of per-round ratios:
paired_ratio), never a single absolute time.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Sequence


def _calibrate(fn: Callable[[], object], min_sample_s: float) -> int:
    """Calls per sample so that one sample takes at least min_sample_s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or n >= 1 << 20:
            return n
        n = max(n * 2, int(n * min_sample_s / max(dt, 1e-9) * 1.2))


def interleaved_samples(fns: Dict[str, Callable[[], object]], *, rounds: int = 7, min_sample_s: float = 0.02,
                        warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of each function in every round, sampled round-robin, the order reversed every
    other round (A B C, C B A, A B C ...): no function always runs right after the same other one (a
    peak probe's heat, another's cache footprint), and functions next to each other in `fns` stay next
    to each other, so that their per-round ratio (paired_ratio) compares samples taken moments apart."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calibrate(fn, min_sample_s) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def interleaved(fns: Dict[str, Callable[[], object]], *, rounds: int = 7, min_sample_s: float = 0.02,
                warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function, sampled as interleaved_samples does."""
    samples = interleaved_samples(fns, rounds=rounds, min_sample_s=min_sample_s, warmup=warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratio(samples: Dict[str, List[float]], base: str, ours: str) -> float:
    """Median over rounds of base's time / ours in the same round (> 1: ours is faster). On a machine
    whose speed shifts between rounds (a neighbour's load, a phase of the host) this follows the two
    functions' relative speed, where the ratio of their medians can pair a slow round of one with a
    fast round of the other."""
    return statistics.median(b / o for b, o in zip(samples[base], samples[ours]))


def paired_ratio_spread(samples: Dict[str, List[float]], base: str, ours: str) -> str:
    """The per-round ratios' spread, "lo-hi": without the lowest and highest where there are 5 rounds
    or more (one stray round does not widen it), all of them otherwise."""
    r = sorted(b / o for b, o in zip(samples[base], samples[ours]))
    if len(r) >= 5:
        r = r[1:-1]
    return f"{r[0]:.2f}-{r[-1]:.2f}"


_copy_gbps = None


def copy_bandwidth_gbps(n_bytes: int = 256 << 20) -> float:
    """This machine's memory copy bandwidth, counting bytes read plus written (GB/s, 1e9), measured
    once per process with a large torch copy (well beyond the last-level cache)."""
    global _copy_gbps
    if _copy_gbps is None:
        import torch

        src = torch.ones(n_bytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = interleaved({"copy": lambda: dst.copy_(src)}, rounds=5, min_sample_s=0.05)["copy"]
        _copy_gbps = 2 * n_bytes / t / 1e9
    return _copy_gbps


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1, 1)}f}".rstrip("0").rstrip(".")
        return f"{v:.2e}"
    return str(v)


class ProgressRows(list):
    """A family's result rows; each row added prints one progress line on stderr (the tables go to
    stdout), outside any timed part, so a run of many minutes shows where it is."""

    def __init__(self, family: str, columns: Sequence[str]) -> None:
        super().__init__()
        self.family, self.columns = family, list(columns)
        self.start = time.perf_counter()

    def append(self, row: dict) -> None:
        super().append(row)
        label = ", ".join(fmt(row[c]) for c in self.columns[:2] if c in row)
        print(f"lepton bench {self.family}: row {len(self)} done ({label}), {time.perf_counter() - self.start:.1f} s",
              file=sys.stderr, flush=True)

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.append(row)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> str:
    """Prints rows as an aligned Markdown table (also pasteable into bench/RESULTS.md); returns it."""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(f"### {title}")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
