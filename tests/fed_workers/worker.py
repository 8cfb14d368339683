"""One rank of a small federated job for tests/test_federated.py.

    python worker.py <mode> <rank> <world> <store file> <out dir> <timeout s>

Ranks rendezvous through a FileStore. Modes:
  equal  runs the same job with secure aggregation and with the plain fixed-point path and writes both
         final models (and an int32 wrap-around check of ld.all_reduce) to <out>/rank<r>.pt
  kill   rank 1 SIGKILLs itself during round 2; rank 0 must fail with a FedError (exit code 3)
"""
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset


def data(clients: int):
    g = torch.Generator().manual_seed(123)
    w = torch.randn(16, 4, generator=g)
    sets = []
    for c in range(clients):
        n = 5 + (c * 7) % 11
        x = torch.randn(n, 16, generator=g)
        sets.append(TensorDataset(x, (x @ w).argmax(1)))
    x = torch.randn(64, 16, generator=g)
    return sets, TensorDataset(x, (x @ w).argmax(1))


class Killer(nn.Module):
    """Passes x through; on rank 1, kills its own process at the `after`-th call."""

    def __init__(self, rank: int, after: int) -> None:
        super().__init__()
        self.rank, self.after, self.calls = rank, after, 0

    def forward(self, x):
        self.calls += 1
        if self.rank == 1 and self.calls == self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def main() -> int:
    mode, rank, world, store_path, out, timeout = sys.argv[1:7]
    rank, world, timeout = int(rank), int(world), float(timeout)
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    from lepton_core.federated import FedConfig, FedError, run_federated

    clients, test = data(12)
    try:
        if mode == "equal":
            import lepton_core.distributed as ld

            wrap = torch.tensor([2**31 - 1, -(2**31), 7], dtype=torch.int32)
            ld.all_reduce(wrap, "sum")
            result = {"wrap": wrap}
            for name, extra in (("secure", {"secure_aggregation": True, "dropout": 0.25, "secagg_threshold": 3}),
                                ("fixed", {"fixed_point": True, "dropout": 0.25})):
                models = []
                cfg = FedConfig(rounds=3, clients=12, clients_per_round=8, local_epochs=2, lr=0.1, seed=5,
                                timeout_s=timeout, **extra)
                history = run_federated(lambda: models.append(nn.Linear(16, 4)) or models[-1], clients, test, cfg)
                result[name] = torch.nn.utils.parameters_to_vector(models[-1].parameters()).detach().clone()
                result[name + "_history"] = [{k: v for k, v in h.items() if k not in ("seconds", "bytes_sent_per_client")}
                                              for h in history]
            torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        elif mode == "kill":
            cfg = FedConfig(rounds=4, clients=12, clients_per_round=8, local_epochs=1, lr=0.1, seed=5,
                            secure_aggregation=True, timeout_s=timeout)
            run_federated(lambda: nn.Sequential(Killer(rank, after=4), nn.Linear(16, 4)), clients, test, cfg)
    except FedError as exc:
        print(f"FedError: {exc}", flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
