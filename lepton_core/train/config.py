"""TrainConfig: everything that defines a training run, checked once before any process starts."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSIONS = ("none", "int8")
BACKENDS = ("auto", "gloo", "nccl")
LR_SCHEDULES = ("cosine", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """A data-parallel training run (see Trainer).

    Sizes are per worker: each optimizer step consumes `batch_size * grad_accum` samples on each of the
    world's workers. The learning rate follows `lr_schedule` over `epochs` (cosine decays to 0 at the
    end), so a run stopped by `max_steps` and resumed ends exactly where an uninterrupted run does.
    """

    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    lr_schedule: str = "cosine"
    precision: str = "bf16"           # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    compression: str = "int8"         # none | int8 (gradient all-reduce through ld.allreduce_hook)
    error_feedback: bool = True       # carry int8 quantization residuals into the next step
    block_size: int = 256             # int8 block size (elements per float32 scale)
    grad_accum: int = 1               # micro-batches per optimizer step
    seed: int = 0
    checkpoint_dir: Optional[str] = None  # checkpoint.pt (+ metrics.jsonl) go here; None: no checkpoints
    resume: bool = False              # continue from checkpoint_dir/checkpoint.pt
    checkpoint_every: int = 1         # epochs between checkpoints (one is also written at the end)
    keep_checkpoints: int = 0         # also keep the last N epochs' checkpoints as checkpoint-epochNNNN.pt
    metrics_path: Optional[str] = None    # JSONL, one line per epoch; default checkpoint_dir/metrics.jsonl
    max_steps: Optional[int] = None   # stop (with a checkpoint) after this many optimizer steps in total
    eval_batch_size: int = 512
    backend: str = "auto"             # auto: nccl when a CUDA device is usable, else gloo
    timeout_s: float = 60.0           # process-group timeout: a dead or stuck peer is an error after it
    progress: bool = True             # progress bar (tqdm if installed) on rank 0

    def validate(self) -> "TrainConfig":
        """Raises ValueError/TypeError naming the field and the value; returns self."""
        for field in ("checkpoint_dir", "metrics_path"):
            v = getattr(self, field)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)):
                    raise TypeError(f"TrainConfig: {field} must be a path or None, got {v!r}")
                setattr(self, field, os.fspath(v))

        def need(cond: bool, field: str, what: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {field} must be {what}, got {getattr(self, field)!r}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "Optional[int]") and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"TrainConfig: {f.name} must be an int, got {v!r}")
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"TrainConfig: {f.name} must be a number, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise TypeError(f"TrainConfig: {f.name} must be a bool, got {v!r}")
        need(self.epochs >= 1, "epochs", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a positive finite number")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(self.compression in COMPRESSIONS, "compression", f"one of {', '.join(COMPRESSIONS)}")
        need(self.block_size >= 32 and self.block_size & (self.block_size - 1) == 0 and self.block_size <= 4096,
             "block_size", "a power of two in 32..4096")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.seed >= 0, "seed", ">= 0")
        need(self.checkpoint_every >= 1, "checkpoint_every", ">= 1")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", ">= 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "None or >= 1")
        need(self.eval_batch_size >= 1, "eval_batch_size", ">= 1")
        need(self.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}")
        need(math.isfinite(self.timeout_s) and self.timeout_s > 0, "timeout_s", "a positive number of seconds")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("TrainConfig: resume=True needs a checkpoint_dir")
        return self

    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.checkpoint_dir, CHECKPOINT_NAME) if self.checkpoint_dir else None

    @property
    def resolved_metrics_path(self) -> Optional[str]:
        if self.metrics_path:
            return self.metrics_path
        return os.path.join(self.checkpoint_dir, METRICS_NAME) if self.checkpoint_dir else None
