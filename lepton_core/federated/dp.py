"""User-level DP for federated averaging (DP-FedAvg, McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models").

Each client's model delta is clipped to L2 norm C (`clip_l2`); the round's update is
(sum of clipped deltas + N(0, (z C)^2 I)) / (q N), q N = clients_per_round the expected number of
sampled clients (the fixed-denominator estimator, sensitivity C for adding or removing one user). With
Poisson sampling at rate q the privacy loss is that of the Poisson-subsampled Gaussian mechanism,
composed over the completed rounds; `Accountant` asks dp-accounting's RDP accountant for epsilon at delta.
"""
from __future__ import annotations

import math

import numpy as np

RDP_ORDERS = tuple(range(2, 257)) + (512, 1024)  # integer orders: exact for the subsampled Gaussian


def clip_l2(delta: np.ndarray, clip: float) -> np.ndarray:
    """delta scaled down to L2 norm `clip` when it is longer."""
    norm = float(np.linalg.norm(delta))
    return delta * (clip / norm) if norm > clip else delta


class Accountant:
    """Epsilon at delta after `steps` rounds of the Poisson-subsampled Gaussian mechanism (rate q, noise
    multiplier z), from dp_accounting's RDP accountant."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"Accountant: sampling_rate must be in (0, 1], got {sampling_rate}")
        self.z, self.q, self.delta = float(noise_multiplier), float(sampling_rate), float(delta)

    def epsilon(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        acc = RdpAccountant(orders=RDP_ORDERS)
        event = dp_accounting.PoissonSampledDpEvent(self.q, dp_accounting.GaussianDpEvent(self.z))
        acc.compose(event, int(steps))
        eps = acc.get_epsilon(self.delta)
        return float(eps) if math.isfinite(eps) else math.inf
