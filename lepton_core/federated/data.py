"""Client datasets: non-IID splits by a Dirichlet(alpha) label distribution, and the digits job."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 2) -> List[np.ndarray]:
    """Indices of each client's examples: for every class, its examples are divided among the clients in
    proportions drawn from Dirichlet(alpha) (small alpha: each client sees few classes). A client left
    with fewer than `min_size` examples then takes random ones from the largest client (so hundreds of
    clients can share a small dataset). Deterministic for a seed."""
    labels = np.asarray(labels)
    if clients < 1:
        raise ValueError(f"dirichlet_split: clients must be >= 1, got {clients}")
    if not alpha > 0:
        raise ValueError(f"dirichlet_split: alpha must be > 0, got {alpha}")
    if clients * min_size > len(labels):
        raise ValueError(f"dirichlet_split: {len(labels)} examples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng([seed, 0xD1])
    parts: List[List[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    for k in range(clients):
        while len(parts[k]) < min_size:
            donor = max(range(clients), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def digits_clients(clients: int, alpha: float, seed: int) -> Tuple[List[TensorDataset], TensorDataset, TensorDataset]:
    """(client datasets, the full training set, the test set) of the digits job (lepton_core.train.digits)."""
    from ..train import digits

    train, test = digits.load()
    x, y = train.tensors
    split = dirichlet_split(y.numpy(), clients, alpha, seed)
    return [TensorDataset(x[torch.as_tensor(i)], y[torch.as_tensor(i)]) for i in split], train, test
