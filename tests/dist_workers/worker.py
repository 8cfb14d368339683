"""One rank of a multi-process test job (started by launch.py):

    python worker.py <job> <rank> <world> <store file> <out dir> <pg timeout s> <json args>

Runs JOBS[job](ctx) after torch.distributed.init_process_group("gloo") through a FileStore, and
writes <out dir>/rank<r>.json: {"ok": bool, "error": traceback, **whatever the job recorded}.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Ctx:
    def __init__(self, rank, world, out, pg_timeout_s, args):
        self.rank, self.world, self.out, self.pg_timeout_s, self.args = rank, world, out, pg_timeout_s, args
        self.record = {}

    def save(self) -> None:
        """Writes what was recorded so far (for a rank that may not live to the end of the job)."""
        with open(os.path.join(self.out, f"rank{self.rank}.json"), "w") as f:
            json.dump({"rank": self.rank, "pid": os.getpid(), "ok": None, **self.record}, f)


def main() -> None:
    job, rank, world, store, out, pg_timeout_s, args = sys.argv[1:8]
    dump_s = float(os.environ.get("LEPTON_TEST_DUMP_S", "0"))
    if dump_s > 0:  # a hung rank shows where it hangs in its log before the launcher kills it
        import faulthandler

        faulthandler.dump_traceback_later(dump_s, exit=False)
    rank, world, pg_timeout_s = int(rank), int(world), float(pg_timeout_s)
    import torch.distributed as dist

    import collective_jobs
    import jobs

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    ctx = Ctx(rank, world, out, pg_timeout_s, json.loads(args))
    result = {"rank": rank, "pid": os.getpid()}
    try:
        getattr(jobs if hasattr(jobs, job) else collective_jobs, job)(ctx)
        result["ok"] = True
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result["ok"] = False
        result["error"] = traceback.format_exc()
    result.update(ctx.record)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    if ctx.record.get("skip_destroy"):
        os._exit(0 if result["ok"] else 1)
    dist.destroy_process_group()
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
