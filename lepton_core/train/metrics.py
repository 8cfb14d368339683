"""The Trainer's measurements: the record of each epoch, its console line, metrics.jsonl, the summary.

An epoch's record is a flat dict of JSON values. The Trainer writes the keys in EPOCH_KEYS; a
callback's on_epoch_end may add its own (e.g. "epsilon"), which then appear in the checkpoint's
history, in metrics.jsonl and at the end of the epoch's line ("  epsilon 1.234").
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

# The keys the Trainer itself writes into an epoch's record (loss_scale: under fp16 only).
EPOCH_KEYS = ("epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "samples_per_s",
              "epoch_s", "comm_bytes", "lr", "loss_scale")
# The last epoch's values the summary of a run repeats.
SUMMARY_KEYS = ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy")


def _value_text(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def epoch_line(rec: Dict[str, Any], epochs: int) -> str:
    """The console line of an epoch's record ("epoch   3/40  loss 0.1234  acc 97.00%  ..."), with the
    keys callbacks added at its end, in the order they were added."""
    acc = "" if rec["train_accuracy"] is None else f"  acc {100 * rec['train_accuracy']:.2f}%"
    ev_txt = "" if rec["eval_loss"] is None else f"  test loss {rec['eval_loss']:.4f}"
    if rec["eval_accuracy"] is not None:
        ev_txt += f"  test acc {100 * rec['eval_accuracy']:.2f}%"
    extra = "".join(f"  {k} {_value_text(v)}" for k, v in rec.items() if k not in EPOCH_KEYS)
    return (f"epoch {rec['epoch']:>3}/{epochs}  loss {rec['train_loss']:.4f}{acc}{ev_txt}  "
            f"{rec['samples_per_s'] or 0:,.0f} samples/s  comm {rec['comm_bytes'] / 1e6:.2f} MB{extra}")


class MetricsFile:
    """metrics.jsonl: one JSON record per epoch. `path` None: writes nothing (no file configured, or a
    rank other than 0)."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path

    def rewrite(self, history: List[Dict[str, Any]]) -> None:
        """The file becomes `history` (on start and resume: it mirrors the checkpoint's history)."""
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in history:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, rec: Dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def run_summary(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The last epoch's SUMMARY_KEYS and the run's samples/s over its training time (evaluation and
    checkpoints excluded); {} before the first epoch."""
    if not history:
        return {}
    last = history[-1]
    summary = {key: last.get(key) for key in SUMMARY_KEYS}
    timed = [r for r in history if r.get("samples_per_s") and r.get("epoch_s")]
    secs = sum(r["epoch_s"] for r in timed)
    summary["samples_per_s"] = sum(r["samples_per_s"] * r["epoch_s"] for r in timed) / secs if secs else None
    return summary
