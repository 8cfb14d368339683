"""Checkpoint files: written atomically, loadable with torch.load(weights_only=True).

A checkpoint is one file holding the state every rank shares (model, optimizer, loss scaler, position
in the run, metrics so far) and a list with each rank's own state (RNG streams, error-feedback
residuals of the gradient hook). Rank 0 gathers and writes it; it is written to a temporary file in
the same directory, flushed to disk and renamed over the old one, so a crash at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = "lepton_core.train/1"


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """torch.save(obj) to `path` via a temporary file + fsync + os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(path: str, mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint at `path` (tensors on the CPU; mmap: tensors read lazily, for a quick look)."""
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"lepton train: {path} is not a lepton_core.train checkpoint")
    return obj


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
