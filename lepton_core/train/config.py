"""TrainConfig: everything that defines a training run, checked once before any process starts."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional

PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSIONS = ("none", "int8")
BACKENDS = ("auto", "gloo", "nccl")
LR_SCHEDULES = ("cosine", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
DEFAULT_CHECKPOINT_DIR = "lepton-train"  # `lepton train`'s (the library's default is no checkpoints)
OPTION_GROUPS = ("job", "checkpoints and output", "distributed", "differential privacy")  # the --help sections, in order


def option(default: Any, help: str, *, group: str, **meta: Any) -> Any:
    """A dataclass field that is also a `lepton train` option (train/cli.py builds the parser from these).

    help:     its --help text (argparse's %(default)s works); group: one of OPTION_GROUPS.
    flag:     the option (default: --field-name); a bool field defaulting to True needs "--no-...".
    choices:  the allowed values (a str field). min: the least value of an int field (argparse checks
              it; a float option must be a positive number). metavar: the value's name in --help.
    cli_default: the command line's default when it differs from the library's.
    before:   (options outside TrainConfig only) the field whose option this one precedes in --help.
    Options appear in --help in field order within their group."""
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, **meta))


def option_flag(f: dataclasses.Field) -> str:
    """The command-line option of a field made with option()."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_fields(cls) -> List[dataclasses.Field]:
    """The fields of dataclass `cls` that are options, in field order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@dataclass
class TrainConfig:
    """A data-parallel training run (see Trainer).

    Sizes are per worker: each optimizer step consumes `batch_size * grad_accum` samples on each of the
    world's workers. The learning rate follows `lr_schedule` over `epochs` (cosine decays to 0 at the
    end), so a run stopped by `max_steps` and resumed ends exactly where an uninterrupted run does.
    Fields made with option() are also `lepton train` options, in this order in --help.
    """

    precision: str = option("bf16", "compute precision; fp16 uses dynamic loss scaling (default: %(default)s)",
                            group="job", choices=PRECISIONS)
    compression: str = option("int8", "gradient all-reduce compression, int8 with error feedback (default: "
                                      "%(default)s)", group="job", choices=COMPRESSIONS)
    epochs: int = option(40, "(default: %(default)s)", group="job", min=1)
    batch_size: int = option(32, "samples per worker per micro-batch (default: %(default)s)", group="job", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (default: %(default)s)", group="job", min=1)
    lr: float = option(3e-3, "peak learning rate of AdamW, cosine decay (default: %(default)s)", group="job")
    seed: int = option(0, "(default: %(default)s)", group="job", min=0)
    block_size: int = option(256, "int8 compression block size, a power of two (default: %(default)s)",
                             group="job", min=32)  # elements per float32 scale
    weight_decay: float = 1e-2
    lr_schedule: str = "cosine"
    error_feedback: bool = True       # carry int8 quantization residuals into the next step
    # checkpoint.pt (+ metrics.jsonl) go here; None: no checkpoints
    checkpoint_dir: Optional[str] = option(None, "where checkpoint.pt and metrics.jsonl go (default: ./%(default)s)",
                                           group="checkpoints and output", cli_default=DEFAULT_CHECKPOINT_DIR)
    resume: bool = option(False, "continue from <checkpoint-dir>/checkpoint.pt; options that fix the run (batch "
                                 "size, seed, precision, compression, --nproc, ...) must be those it was made with",
                          group="checkpoints and output")
    checkpoint_every: int = option(1, "epochs between checkpoints (default: %(default)s)",
                                   group="checkpoints and output", min=1)  # one is also written at the end
    # also keep the last N epochs' checkpoints as checkpoint-epochNNNN.pt
    keep_checkpoints: int = option(0, "besides checkpoint.pt (always the latest, which --resume reads), keep the "
                                      "checkpoints of the last N epochs as checkpoint-epochNNNN.pt (default: "
                                      "%(default)s)", group="checkpoints and output", flag="--keep", min=0,
                                   metavar="N")
    max_steps: Optional[int] = option(None, "stop (with a checkpoint) after this many optimizer steps; --resume "
                                            "continues", group="checkpoints and output", min=1)
    metrics_path: Optional[str] = option(None, "JSONL metrics file (default: <checkpoint-dir>/metrics.jsonl)",
                                         group="checkpoints and output", flag="--metrics")
    progress: bool = option(True, "no progress bar", group="checkpoints and output",
                            flag="--no-progress")  # tqdm if installed, on rank 0
    eval_batch_size: int = 512
    backend: str = option("auto", "torch.distributed backend; auto: nccl with a usable GPU, else gloo (default: "
                                  "%(default)s)", group="distributed", choices=BACKENDS)
    timeout_s: float = option(60.0, "seconds before a dead or stuck worker is reported as an error (default: "
                                    "%(default)s)", group="distributed", flag="--timeout")  # process-group timeout
    # DP-SGD (train/dp.py): on when dp_clip is set, with exactly one of dp_noise_multiplier, dp_target_epsilon
    dp_clip: Optional[float] = option(None, "DP-SGD: clip every example's gradient to this L2 norm; needs --dp-noise "
                                            "or --dp-epsilon", group="differential privacy", metavar="C")
    dp_noise_multiplier: Optional[float] = option(None, "DP-SGD: Gaussian noise std as a multiple of --dp-clip",
                                                  group="differential privacy", flag="--dp-noise", metavar="Z")
    dp_target_epsilon: Optional[float] = option(None, "DP-SGD: choose the noise so that the planned run spends "
                                                      "this epsilon", group="differential privacy",
                                                flag="--dp-epsilon", metavar="E")
    dp_delta: float = option(1e-5, "DP-SGD: the delta of (epsilon, delta)-DP (default: %(default)s)",
                             group="differential privacy", metavar="D")

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
            if f.type == "Optional[float]" and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"TrainConfig: {f.name} must be a number or None, got {v!r}")
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
        for field in ("dp_clip", "dp_noise_multiplier", "dp_target_epsilon"):
            v = getattr(self, field)
            need(v is None or (math.isfinite(v) and v > 0), field, "None or a positive number")
        need(0 < self.dp_delta < 1, "dp_delta", "in (0, 1)")
        if self.dp_clip is not None:
            if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
                raise ValueError("TrainConfig: dp_clip (DP-SGD) needs exactly one of dp_noise_multiplier and "
                                 f"dp_target_epsilon, got {self.dp_noise_multiplier!r} and {self.dp_target_epsilon!r}")
            need(self.grad_accum == 1, "grad_accum", "1 with DP-SGD (dp_clip): a Poisson-sampled batch is one step")
        elif self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None:
            raise ValueError("TrainConfig: dp_clip must be set (DP-SGD) when dp_noise_multiplier or "
                             "dp_target_epsilon is, got None")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("TrainConfig: resume=True needs a checkpoint_dir")
        return self

    @property
    def dp(self) -> bool:
        """DP-SGD is on."""
        return self.dp_clip is not None

    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.checkpoint_dir, CHECKPOINT_NAME) if self.checkpoint_dir else None

    @property
    def resolved_metrics_path(self) -> Optional[str]:
        if self.metrics_path:
            return self.metrics_path
        return os.path.join(self.checkpoint_dir, METRICS_NAME) if self.checkpoint_dir else None
