"""Federated learning on torch.distributed (API.md §6): FedAvg / FedProx, secure aggregation with dropout
recovery (secagg.py), user-level DP (dp.py).

    from lepton_core.federated import FedConfig, run_federated
    history = run_federated(model_fn, client_datasets, test_set, FedConfig(rounds=200, clients=100,
                            clients_per_round=10, secure_aggregation=True))

`lepton federated` (lepton_core.federated.cli) runs the digits job; see its module docstring.
run_federated (which needs torch) is imported on first use, so building the `lepton` command line
stays cheap and works without torch.
"""
from .config import FedConfig
from .errors import FedError, SecAggAbort

__all__ = ["FedConfig", "FedError", "SecAggAbort", "run_federated"]


def __getattr__(name):
    if name == "run_federated":
        from .._arrays import require_torch

        require_torch("lepton_core.federated")
        from .core import run_federated

        return run_federated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
