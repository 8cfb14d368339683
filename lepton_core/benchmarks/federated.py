"""`lepton bench federated` (run as `python -m lepton_core.benchmarks.federated`): the cost of secure
aggregation per federated round.

The digits job of `lepton federated` (100 clients, Dirichlet(0.5) split, the 64-128-10 MLP of
lc.nn.Linear layers, 5 local epochs, lr 0.05) on 2 local processes, at 10 and 50 clients per round.
Variants, run in the same processes one after the other: the float path (float32 sums), the plain
fixed-point path (int32 sums mod 2^32) and secure aggregation (the same fixed-point sums, masked; the
same model bit for bit). Rows show the median round time (rank 0, training + aggregation + test
evaluation) and the ratio to the plain fixed-point round; `kB_per_client` is what a surviving client
uploads (keys, encrypted shares, masked vector, unmasking shares).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List

COLUMNS = ["clients_per_round", "variant", "dropout", "rounds", "ms_per_round", "vs_fixed", "kB_per_client",
           "test_accuracy"]
WORLD_SIZE = 2
FULL = {"per_round": (10, 50), "rounds": 20}
QUICK = {"per_round": (10,), "rounds": 5}
VARIANTS = [  # name, FedConfig overrides
    ("float", {}),
    ("fixed point", {"fixed_point": True}),
    ("secure agg", {"secure_aggregation": True}),
    ("secure agg", {"secure_aggregation": True, "dropout": 0.1}),
]


def _worker(job: Dict[str, Any]):
    import os

    import torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from ..federated import FedConfig, run_federated
    from ..federated.cli import _Elsewhere, digits_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        shard = job["clients"]
        clients = [TensorDataset(*shard[c]) if c % world == rank else _Elsewhere(len(shard[c][1]))
                   for c in range(len(shard))]
        test = TensorDataset(*job["test"])
        sample = next(ds for ds in clients if not isinstance(ds, _Elsewhere))
        out = []
        for k in job["per_round"]:
            for name, extra in VARIANTS:
                cfg = FedConfig(rounds=job["rounds"], clients=len(clients), clients_per_round=k, local_epochs=5,
                                lr=0.05, seed=0, **extra)
                hist = run_federated(lambda: digits_model(128, 1, job["mean"], job["std"], sample), clients, test, cfg)
                done = [h for h in hist[1:] if "aborted" not in h]  # the first round warms up
                out.append({"clients_per_round": k, "variant": name, "dropout": cfg.dropout, "rounds": len(done),
                            "ms_per_round": 1e3 * statistics.median(h["seconds"] for h in done),
                            "kB_per_client": statistics.mean(h["bytes_sent_per_client"] for h in done) / 1e3,
                            "test_accuracy": hist[-1].get("test_accuracy")})
        return out if rank == 0 else None
    finally:
        dist.destroy_process_group()


def run(quick: bool = False) -> List[Dict[str, Any]]:
    from ..federated.data import digits_clients
    from ..train.launch import launch_local

    p = QUICK if quick else FULL
    clients, train, test = digits_clients(100, 0.5, 0)
    pixels = train.tensors[0]
    # the benchmark's own data is public digits: every process gets all of it, and uses its own clients'
    job = {"clients": [list(c.tensors) for c in clients], "test": list(test.tensors), "per_round": p["per_round"],
           "rounds": p["rounds"], "mean": pixels.mean().item(), "std": pixels.std().item()}
    rows = launch_local(_worker, job, WORLD_SIZE, name="lepton-bench-federated")[0]
    base = {r["clients_per_round"]: r["ms_per_round"] for r in rows if r["variant"] == "fixed point"}
    for r in rows:
        r["vs_fixed"] = r["ms_per_round"] / base[r["clients_per_round"]]
        acc = r["test_accuracy"]
        r["test_accuracy"] = None if acc is None else f"{100 * acc:.2f}%"
    return rows


if __name__ == "__main__":
    import argparse

    from .common import print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print_table(run(quick=ap.parse_args().quick), COLUMNS, title="federated")
