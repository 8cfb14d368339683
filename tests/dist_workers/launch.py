"""Starts a multi-process job of tests/dist_workers/worker.py and collects each rank's result.

Every rank is a fresh `python worker.py <job> ...` process (no fork of the pytest process: torch and
OpenMP state do not survive fork well). Ranks rendezvous through a FileStore in a temporary
directory; each writes <out>/rank<r>.json. The job is bounded: after `timeout_s` every rank still
running is killed and the launch reports it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

WORKER = Path(__file__).with_name("worker.py")
# Ranks must import the same lepton_core as the test process (the installed package in CI, the
# in-tree build in a dev loop), never a source tree without its native module.
import lepton_core  # noqa: E402

PKG_PARENT = Path(lepton_core.__file__).resolve().parents[1]


class JobResult:
    def __init__(self, world: int, codes: List[Optional[int]], results: List[Optional[dict]], logs: List[str],
                 elapsed_s: float):
        self.world, self.codes, self.results, self.logs, self.elapsed_s = world, codes, results, logs, elapsed_s

    def describe(self) -> str:
        parts = []
        for r in range(self.world):
            parts.append(f"--- rank {r}: exit {self.codes[r]} result {self.results[r]}\n{self.logs[r][-4000:]}")
        return "\n".join(parts)


def launch(job: str, world: int, *, timeout_s: float = 90.0, pg_timeout_s: float = 20.0,
           env: Optional[Dict[int, Dict[str, str]]] = None, common_env: Optional[Dict[str, str]] = None,
           args: Optional[dict] = None) -> JobResult:
    """Runs `job` on `world` ranks; env[r] adds environment variables to rank r."""
    with tempfile.TemporaryDirectory(prefix="lepton-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = []
        logs = []
        t0 = time.monotonic()
        for r in range(world):
            e = dict(os.environ)
            e["PYTHONPATH"] = str(PKG_PARENT) + os.pathsep + e.get("PYTHONPATH", "")
            e["OMP_NUM_THREADS"] = "1"
            e["LEPTON_TEST_DUMP_S"] = str(max(1.0, timeout_s - 5))
            e.update(common_env or {})
            e.update((env or {}).get(r, {}))
            log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
            logs.append(log)
            cmd = [sys.executable, str(WORKER), job, str(r), str(world), store, tmp, str(pg_timeout_s),
                   json.dumps(args or {})]
            procs.append(subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, cwd=tmp))
        deadline = t0 + timeout_s
        codes: List[Optional[int]] = [None] * world
        for r, p in enumerate(procs):
            try:
                codes[r] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for r, p in enumerate(procs):
            if codes[r] is None:
                p.kill()
                p.wait()
        elapsed = time.monotonic() - t0
        results: List[Optional[dict]] = []
        texts = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                results.append(None)
            logs[r].seek(0)
            texts.append(logs[r].read())
            logs[r].close()
        return JobResult(world, codes, results, texts, elapsed)
