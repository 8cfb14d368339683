"""Checkpoint files: written atomically, loadable with torch.load(weights_only=True).

What a checkpoint holds, its validation and the resume check are in train/state.py; this module
moves the bytes. Rank 0 gathers and writes a checkpoint; it is written to a temporary file in the same
directory, flushed to disk and renamed over the old one, so a crash at any moment leaves either the
previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch

# FORMAT and CheckpointError are re-exported: callers that write or read files need only this module
from .state import FORMAT, CheckpointError, validate  # noqa: F401

# Temporary files of a save in progress: a process killed while saving leaves one behind, and the
# next save in that directory removes it (a checkpoint directory belongs to one run: one writer).
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pt"
KEPT_INFIX = "-epoch"  # checkpoint.pt -> checkpoint-epoch0003.pt (--keep)


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
    return validate(obj, path)


def load_for_resume(path: str, mmap: bool = False) -> Dict[str, Any]:
    """load(path), a missing file reported as a CheckpointError too ("no checkpoint at PATH")."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    return load(path, mmap=mmap)
