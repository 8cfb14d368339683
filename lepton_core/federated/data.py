"""Client datasets: non-IID splits by a Dirichlet(alpha) label distribution, and the digits job."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 2) -> List[np.ndarray]:
    """Indices of each client's examples: for every class, its examples are divided among the clients in
    proportions drawn from Dirichlet(alpha) (small alpha: each client sees few classes). Redrawn (with
    the next seed stream) until every client has at least `min_size` examples; deterministic for a seed."""
    labels = np.asarray(labels)
    if clients < 1:
        raise ValueError(f"dirichlet_split: clients must be >= 1, got {clients}")
    if not alpha > 0:
        raise ValueError(f"dirichlet_split: alpha must be > 0, got {alpha}")
    if clients * min_size > len(labels):
        raise ValueError(f"dirichlet_split: {len(labels)} examples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng([seed, 0xD1])
    for _ in range(1000):
        parts: List[List[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet_split: no split with >= {min_size} examples per client for alpha={alpha}, "
                     f"{clients} clients; use a larger alpha or fewer clients")


def digits_clients(clients: int, alpha: float, seed: int) -> Tuple[List[TensorDataset], TensorDataset, TensorDataset]:
    """(client datasets, the full training set, the test set) of the digits job (lepton_core.train.digits)."""
    from ..train import digits

    train, test = digits.load()
    x, y = train.tensors
    split = dirichlet_split(y.numpy(), clients, alpha, seed)
    return [TensorDataset(x[torch.as_tensor(i)], y[torch.as_tensor(i)]) for i in split], train, test
