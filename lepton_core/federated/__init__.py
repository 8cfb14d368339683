"""Federated learning on torch.distributed (API.md §6): FedAvg / FedProx, secure aggregation with dropout
recovery (secagg.py), user-level DP (dp.py).

    from lepton_core.federated import FedConfig, run_federated
    history = run_federated(model_fn, client_datasets, test_set, FedConfig(rounds=200, clients=100,
                            clients_per_round=10, secure_aggregation=True))
"""
from .._arrays import require_torch

require_torch("lepton_core.federated")

from .config import FedConfig  # noqa: E402
from .core import run_federated  # noqa: E402
from .errors import FedError, SecAggAbort  # noqa: E402

__all__ = ["FedConfig", "FedError", "SecAggAbort", "run_federated"]
