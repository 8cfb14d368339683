"""The progress bar of a training epoch (rank 0 only): tqdm when installed, plain lines on stderr
otherwise. The per-epoch lines are separate (train/metrics.py) and appear either way."""
from __future__ import annotations

import sys


class Progress:
    """A bar of `total` steps starting at `initial` (a resumed epoch); `update` once per step, `close` at
    the end. Draws nothing unless `enabled`."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0) -> None:
        self.bar = None
        self.plain = False
        self.total, self.n, self.desc = total, initial, desc
        self.next_plain = 0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.plain = True
            self.next_plain = initial + max(1, total // 4)
            return
        # disable=None: tqdm draws only on a terminal; the per-epoch lines are printed either way
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                        disable=None, file=sys.stderr)

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.plain and (self.n >= self.next_plain or self.n == self.total):
            print(f"  {self.desc}: step {self.n}/{self.total}  loss {loss:.4f}", file=sys.stderr, flush=True)
            self.next_plain = self.n + max(1, self.total // 4)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
