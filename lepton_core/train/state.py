"""What a Trainer checkpoint holds (schema version 1), how it is checked, and the one resume check.

train/checkpoint.py writes and reads the files; this module says what is in them. A checkpoint is a
dict (torch.save, loadable with weights_only=True):

  format          FORMAT: the schema and its version
  world_size      workers of the run that wrote it
  config          dataclasses.asdict(TrainConfig) of that run ("run" in files of lepton_core 0.1.0:
                  only batch_size, grad_accum, seed, ...)
  epoch, step_in_epoch, global_step   the position in the run (epoch: finished epochs)
  model, optimizer, scaler            their state_dict()s (rank 0's: they are the same on every rank)
  history_json    the epoch records so far (metrics.jsonl is rebuilt from it on resume), as JSON
  ranks           one dict per rank: rng (every random stream, see rng_state), hook (the comm hook's
                  error-feedback residuals), sums (the running epoch's partial metrics) and, when the
                  run has callbacks with state, callbacks ({state_key: callback.state_dict()})

A key added later must be optional (old files lack it) or come with a new FORMAT version.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

FORMAT = "lepton_core.train/1"
# What every checkpoint holds (the run's options are under "config", or "run" in older files).
REQUIRED_KEYS = ("world_size", "epoch", "step_in_epoch", "global_step", "model", "optimizer", "scaler",
                 "history_json", "ranks")
# On resume, these options must be those of the run that wrote the checkpoint: they fix the order of
# the samples and the position in it (world_size too), or the layout of saved state (precision: the
# fp16 loss scaler; compression, block_size, error_feedback: the gradient hook's residuals), or the
# privacy of the run (dp_*: the accountant composes steps of one mechanism; files without them: not DP).
MUST_MATCH = ("batch_size", "grad_accum", "seed", "precision", "compression", "block_size", "error_feedback",
              "dp_clip", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta")
# These may change on resume (to train longer, or on with another rate), which changes the result.
MAY_CHANGE = ("epochs", "lr", "weight_decay", "lr_schedule")

Difference = Tuple[str, Any, Any]  # (option, the checkpoint's value, this run's value)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, not ours, or incomplete."""


def validate(obj: Any, path: str) -> Dict[str, Any]:
    """`obj` (a loaded file) if it is a checkpoint of this schema with every required key; else
    CheckpointError naming the file and what is wrong."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lepton_core.train checkpoint")
    absent = [k for k in REQUIRED_KEYS if k not in obj]
    if "config" not in obj and "run" not in obj:
        absent.append("config")
    if absent:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(absent)} (a file written "
                              f"by another program, or a cut-off copy)")
    return obj


def make(*, world_size: int, config: Dict[str, Any], epoch: int, step_in_epoch: int, global_step: int,
         model: Dict[str, Any], optimizer: Dict[str, Any], scaler: Dict[str, Any],
         history: List[Dict[str, Any]], ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A checkpoint of this schema (see the module docstring for each key)."""
    return {
        "format": FORMAT,
        "world_size": world_size,
        "config": config,  # the whole run, for resume checks and for the record
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "model": model,
        "optimizer": optimizer,
        "scaler": scaler,
        "history_json": json.dumps(history),
        "ranks": ranks,
    }


def history(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    return json.loads(state["history_json"])


def callback_keys(state: Dict[str, Any]) -> List[str]:
    """The state_keys of the callbacks whose state the checkpoint holds (none in older files)."""
    ranks = state["ranks"]
    return sorted((ranks[0].get("callbacks") or {}) if ranks and isinstance(ranks[0], dict) else {})


# ---------------------------------------------------------------------------------------------------
# Resume: the one check, used by Trainer.load_checkpoint and by `lepton train --resume` before any
# worker starts
# ---------------------------------------------------------------------------------------------------
class ResumeMismatch(ValueError):
    """The checkpoint's run and this one differ in options that resume cannot bridge."""

    def __init__(self, path: str, refused: List[Difference]) -> None:
        self.path, self.refused = path, refused
        super().__init__(f"lepton train: cannot resume from {path}: the checkpoint was made with "
                         f"{', '.join(f'{k}={a!r}' for k, a, _ in refused)}; this run has "
                         f"{', '.join(f'{k}={b!r}' for k, _, b in refused)}")


@dataclass
class ResumeCheck:
    """What check_resume found: `refused` (must match and does not) and `changed` (may change and did),
    each a list of (option, the checkpoint's value, this run's value)."""

    refused: List[Difference] = field(default_factory=list)
    changed: List[Difference] = field(default_factory=list)

    def raise_if_refused(self, path: str) -> None:
        if self.refused:
            raise ResumeMismatch(path, self.refused)


def check_resume(state: Dict[str, Any], cfg, world_size: int,
                 callbacks: Optional[Iterable[str]] = None) -> ResumeCheck:
    """Compares a loaded checkpoint with the run about to resume from it: the options in MUST_MATCH and
    world_size (refused when they differ) and in MAY_CHANGE (reported). `callbacks`, the state_keys of
    this run's callbacks with state, must name exactly the callbacks whose state the checkpoint holds
    (None: not checked, e.g. before the callbacks exist)."""
    saved = state.get("config") or state["run"]  # "run": the few options files before "config" kept
    now = dict(vars(cfg), world_size=world_size)
    saved = dict(saved, world_size=state["world_size"])

    def differ(keys):
        return [(k, saved[k], now[k]) for k in keys if k in saved and saved[k] != now[k]]

    check = ResumeCheck(differ(("world_size",) + MUST_MATCH), differ(MAY_CHANGE))
    if callbacks is not None:
        then, now_keys = callback_keys(state), sorted(callbacks)
        if then != now_keys:
            check.refused.append(("callbacks with state", then, now_keys))
    return check


# ---------------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------------
def rng_state(device: torch.device, generator: Optional[torch.Generator]) -> Dict[str, Any]:
    """Every random stream a training step can draw from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
        "generator": generator.get_state() if generator is not None else None,
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device, generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
