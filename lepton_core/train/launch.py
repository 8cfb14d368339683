"""Starting N local worker processes through torch.distributed's launcher API (torchelastic).

The same machinery as `torchrun --standalone`: a c10d rendezvous on a free local port, workers
started with the spawn method and the usual RANK / WORLD_SIZE / MASTER_* variables, a monitor that
notices a dead worker within 0.1 s and then stops the others, no restarts. The launcher's own log
lines are silenced: callers turn its exceptions into one clear message.

Threads: unless the user set OMP_NUM_THREADS, the workers get OMP_NUM_THREADS = this process's CPUs
(affinity mask and cgroup quota) / nproc, so N workers never oversubscribe the machine; each worker
then uses lepton_core's default thread count (API.md §0: OMP_NUM_THREADS when set) for torch and lc.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from typing import Any, Callable, Dict, Iterator

from .._runtime import _omp_num_threads, available_cpus

_LOG_PREFIXES = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


def quiet_launcher_logs() -> None:
    """The agent logs every worker failure and signal with a long report. Its loggers set their own
    levels, so each one is silenced, not just the parent."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_LOG_PREFIXES):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in _LOG_PREFIXES:
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def worker_threads_env(nproc: int) -> Iterator[int]:
    """Sets OMP_NUM_THREADS for `nproc` local workers (who inherit the environment) unless the user
    set it; yields the threads each worker will use by default, and restores the environment after."""
    if _omp_num_threads() is not None:
        yield _omp_num_threads()
        return
    before = os.environ.get("OMP_NUM_THREADS")  # unset, or a value OpenMP ignores
    threads = max(1, available_cpus() // nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def launch_local(fn: Callable[[Any], Any], arg: Any, nproc: int, name: str = "lepton") -> Dict[int, Any]:
    """Runs fn(arg) in `nproc` fresh worker processes forming one process group; returns
    {rank: return value}. Raises torchelastic's ChildFailedError when a worker fails (the others are
    stopped first) and SignalException when the launcher is interrupted. `fn` must be importable
    (a module-level function) and `arg` picklable."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    quiet_launcher_logs()
    with worker_threads_env(nproc), tempfile.TemporaryDirectory(prefix=f"{name}-") as log_dir:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc,
            run_id=f"{name}-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port, like torchrun --standalone
            max_restarts=0,            # a failed worker ends the job
            monitor_interval=0.1,      # notice a dead worker within 0.1 s
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),  # error files go here and are removed after
        )
        return elastic_launch(config, fn)(arg)
