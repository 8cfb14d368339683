"""Checkpoint files: written atomically, loadable with torch.load(weights_only=True).

A checkpoint is one file holding the state every rank shares (model, optimizer, loss scaler, position
in the run, metrics so far) and a list with each rank's own state (RNG streams, error-feedback
residuals of the gradient hook). Rank 0 gathers and writes it; it is written to a temporary file in
the same directory, flushed to disk and renamed over the old one, so a crash at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import random
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

FORMAT = "lepton_core.train/1"
# What every checkpoint holds (the run's options are under "config", or "run" in older files).
REQUIRED_KEYS = ("world_size", "epoch", "step_in_epoch", "global_step", "model", "optimizer", "scaler",
                 "history_json", "ranks")
# Temporary files of a save in progress: a process killed while saving leaves one behind, and the
# next save in that directory removes it (a checkpoint directory belongs to one run: one writer).
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pt"
# On resume, these options must be those of the run that wrote the checkpoint: they fix the order of
# the samples and the position in it (world_size too), or the layout of saved state (precision: the
# fp16 loss scaler; compression, block_size, error_feedback: the gradient hook's residuals).
MUST_MATCH = ("batch_size", "grad_accum", "seed", "precision", "compression", "block_size", "error_feedback")
# These may change on resume (to train longer, or on with another rate), which changes the result.
MAY_CHANGE = ("epochs", "lr", "weight_decay", "lr_schedule")
KEPT_INFIX = "-epoch"  # checkpoint.pt -> checkpoint-epoch0003.pt (--keep)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, not ours, or incomplete."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed in the OS (a full disk, a quota, an I/O error); errno is the OS's."""

    def __init__(self, path: str, cause: OSError) -> None:
        code = cause.errno
        super().__init__(code, cause.strerror or str(cause), path)
        name = errno.errorcode.get(code, "?") if code is not None else "?"
        why = f"{cause.strerror or cause} (errno {code}, {name})"
        if code in (errno.ENOSPC, errno.EDQUOT):
            directory = os.path.dirname(os.path.abspath(path))
            try:
                free = f"; {shutil.disk_usage(directory).free / 1e6:,.1f} MB free on {directory}"
            except OSError:
                free = ""
            why = f"the disk is full: {why}{free}"
        self.message = f"cannot write checkpoint {path}: {why}; the previous checkpoint, if any, is intact"

    def __str__(self) -> str:
        return self.message


class _RecordingWriter:
    """A file object for torch.save that keeps the OSError of a failed write: torch replaces it by
    "[enforce fail at inline_container.cc] unexpected pos ..." (the bytes written fell short)."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def write(obj: Dict[str, Any], f, path: str) -> None:
    """torch.save(obj) into the open binary file `f`, flushed and fsync'ed; `path` names it in errors.
    An OS error while writing raises CheckpointWriteError (errno, what it means, free space)."""
    w = _RecordingWriter(f)
    try:
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        cause = w.error if w.error is not None else exc
        if not isinstance(cause, OSError):
            raise
        raise CheckpointWriteError(path, cause) from exc


def remove_stale_temporaries(directory: str) -> None:
    """Removes what killed saves left in `directory` (see TMP_PREFIX)."""
    for tmp in glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*" + TMP_SUFFIX)):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _umask() -> int:
    """This process's umask (from /proc: os.umask would change it for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """torch.save(obj) to `path` via a temporary file + fsync + os.replace; stale temporaries of
    earlier, killed saves in the same directory are removed first."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give (mkstemp's files are private: 0600)
        f = os.fdopen(fd, "wb")
        try:
            write(obj, f, path)
        finally:
            try:
                f.close()
            except OSError:  # only after a failed write, whose error is already on its way
                pass
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


def kept_path(path: str, epoch: int) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}{KEPT_INFIX}{epoch:04d}{ext}"


def keep_epoch_copy(path: str, epoch: int, keep: int) -> str:
    """Keeps the checkpoint just written at `path` also as kept_path(path, epoch) (a hard link: no
    extra space; a copy where links are unsupported), then deletes the oldest kept files beyond `keep`.
    Returns the kept file's path."""
    target = kept_path(path, epoch)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=directory)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    stem, ext = os.path.splitext(path)
    kept = glob.glob(glob.escape(stem + KEPT_INFIX) + "[0-9]*" + glob.escape(ext))
    kept.sort(key=lambda p: (os.path.getmtime(p), p))  # newest last (a new run may reuse old names)
    for old in kept[:-keep]:
        if old != target:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
    return target


def resume_differences(state: Dict[str, Any], cfg, world_size: int) -> Tuple[List[Tuple[str, Any, Any]],
                                                                              List[Tuple[str, Any, Any]]]:
    """(refused, changed): the (option, checkpoint's value, this run's value) of every option in
    MUST_MATCH (and world_size) and in MAY_CHANGE that differs between the checkpoint's run and `cfg`."""
    saved = state.get("config") or state["run"]  # "run": the few options files before "config" kept
    now = dict(vars(cfg), world_size=world_size)
    saved = dict(saved, world_size=state["world_size"])

    def differ(keys):
        return [(k, saved[k], now[k]) for k in keys if k in saved and saved[k] != now[k]]

    return differ(("world_size",) + MUST_MATCH), differ(MAY_CHANGE)


def load(path: str, mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint at `path` (tensors on the CPU; mmap: tensors read lazily, for a quick look).
    Raises FileNotFoundError, or CheckpointError naming the file and what is wrong with it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch's zip reader: RuntimeError; the unpickler: UnpicklingError, ...
        size = os.path.getsize(path) if os.path.exists(path) else 0
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({size:,} bytes): it is truncated, damaged or "
                              f"not a torch.save file ({first})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lepton_core.train checkpoint")
    absent = [k for k in REQUIRED_KEYS if k not in obj]
    if "config" not in obj and "run" not in obj:
        absent.append("config")
    if absent:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(absent)} (a file written "
                              f"by another program, or a cut-off copy)")
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
