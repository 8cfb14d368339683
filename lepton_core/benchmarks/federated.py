"""`lepton bench federated` (run as `python -m lepton_core.benchmarks.federated`): the cost of secure
aggregation per federated round.

The digits job of `lepton federated` (100 clients, Dirichlet(0.5) split, the 64-128-10 MLP of
lc.nn.Linear layers, 5 local epochs, lr 0.05) on 2 local processes, at 10 and 50 clients per round.
Variants, run in the same processes: the float path (float32 sums), the plain fixed-point path (int32
sums mod 2^32) and secure aggregation (the same fixed-point sums, masked; the same model bit for bit),
without and with 10% dropout. The variants take turns (short runs A B C D A B C D ...), so a change in
the machine's load hits all of them alike. Rows show the median round time on rank 0 (training +
aggregation + test evaluation; each short run's first round left out) and the ratio to the plain
fixed-point round; `kB_per_client` is what a surviving client uploads (keys, encrypted shares, masked
vector, unmasking shares). `secagg+ k=K`: the SecAgg+ graph (Bell et al. 2020), each client masking
with and sharing to K = 2 ceil(log2 n) neighbours.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List

MORE_TABLES = ("federated_flower",)  # `lepton bench federated` also runs this family module's table
COLUMNS = ["clients_per_round", "variant", "dropout", "rounds", "ms_per_round", "vs_fixed", "kB_per_client"]
WORLD_SIZE = 2
FULL = {"per_round": (10, 50), "rounds": 6, "repeats": 5}
QUICK = {"per_round": (10,), "rounds": 3, "repeats": 2}
VARIANTS = [  # name, FedConfig overrides ("k": SecAgg+ with k = 2 ceil(log2 n) neighbours)
    ("float", {}),
    ("fixed point", {"fixed_point": True}),
    ("secure agg", {"secure_aggregation": True}),
    ("secure agg", {"secure_aggregation": True, "dropout": 0.1}),
    ("secagg+ k", {"secure_aggregation": True, "secagg_neighbors": "k"}),
    ("secagg+ k", {"secure_aggregation": True, "secagg_neighbors": "k", "dropout": 0.1}),
]


def _neighbours(n: int) -> int:
    return 2 * math.ceil(math.log2(n))


def _worker(job: Dict[str, Any]):
    import torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from ..federated import FedConfig, run_federated
    from ..federated.cli import DEFAULTS as d
    from ..federated.cli import _Elsewhere, digits_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        shard = job["clients"]
        clients = [TensorDataset(*shard[c]) if c % world == rank else _Elsewhere(len(shard[c][1]))
                   for c in range(len(shard))]
        test = TensorDataset(*job["test"])
        out = []
        variants = job.get("variants", VARIANTS)
        for k in job["per_round"]:
            times: Dict[int, List[float]] = {i: [] for i in range(len(variants))}
            last: Dict[int, Any] = {}
            for rep in range(job["repeats"]):
                for i, (name, extra) in enumerate(variants):
                    if extra.get("secagg_neighbors") == "k":
                        extra = {**extra, "secagg_neighbors": _neighbours(k)}
                    cfg = FedConfig(rounds=job["rounds"], clients=len(clients), clients_per_round=k,
                                    local_epochs=d["local_epochs"], lr=d["lr"], local_batch_size=d["batch_size"],
                                    seed=job.get("seed", rep), **extra)
                    hist = run_federated(lambda: digits_model(d["hidden"], d["depth"], job["mean"], job["std"], test), clients,
                                         test, cfg)
                    times[i] += [h["seconds"] for h in hist[1:] if "aborted" not in h]
                    last[i] = hist
            for i, (name, extra) in enumerate(variants):
                done = [h for h in last[i] if "aborted" not in h]
                name = name.replace(" k", f" k={_neighbours(k)}")
                out.append({"clients_per_round": k, "variant": name, "dropout": extra.get("dropout", 0.0),
                            "rounds": len(times[i]), "ms_per_round": 1e3 * statistics.median(times[i]),
                            "kB_per_client": statistics.mean(h["bytes_sent_per_client"] for h in done) / 1e3,
                            "test_accuracy": last[i][-1]["test_accuracy"]})
        return out if rank == 0 else None
    finally:
        dist.destroy_process_group()


def digits_job() -> Dict[str, Any]:
    """The data part of a worker job: the split of `lepton federated`'s defaults (100 clients,
    Dirichlet(0.5), seed 0). The benchmark's data is public digits: every process gets all of it and
    uses its own clients'."""
    from ..federated.cli import DEFAULTS as d
    from ..federated.data import digits_clients

    clients, train, test = digits_clients(d["clients"], d["alpha"], d["seed"])
    pixels = train.tensors[0]
    return {"clients": [list(c.tensors) for c in clients], "test": list(test.tensors),
            "mean": pixels.mean().item(), "std": pixels.std().item()}


def run_variants(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    """_worker's rows for `job` on WORLD_SIZE fresh local processes."""
    from ..train.launch import launch_local

    return launch_local(_worker, job, WORLD_SIZE, name="lepton-bench-federated")[0]


def run(quick: bool = False) -> List[Dict[str, Any]]:
    p = QUICK if quick else FULL
    rows = run_variants({**digits_job(), "per_round": p["per_round"], "rounds": p["rounds"], "repeats": p["repeats"]})
    base = {r["clients_per_round"]: r["ms_per_round"] for r in rows if r["variant"] == "fixed point"}
    for r in rows:
        r["vs_fixed"] = r["ms_per_round"] / base[r["clients_per_round"]]
    return rows


if __name__ == "__main__":
    import argparse

    from .common import print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    # The Flower table (MORE_TABLES): `lepton bench federated`, or python -m ...benchmarks.federated_flower.
    print_table(run(quick=ap.parse_args().quick), COLUMNS, title="federated")
