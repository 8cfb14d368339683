"""User-level DP for federated averaging (DP-FedAvg, McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models").

Each client's model delta is clipped to L2 norm C (`clip_l2`); the round's update is
(sum of clipped deltas + N(0, (z C)^2 I)) / (q N), q N = clients_per_round the expected number of
sampled clients (the fixed-denominator estimator, sensitivity C for adding or removing one user). With
Poisson sampling at rate q the privacy loss is that of the Poisson-subsampled Gaussian mechanism,
composed over the completed rounds (an aborted round releases nothing and is not counted); `Accountant`
asks dp-accounting's RDP accountant for epsilon at delta.

Who adds the noise: the aggregator, once per round, to the sum: after unmasking with secure
aggregation. The fixed-point encoding truncates toward zero, so each client's encoded (clipped) delta
still has L2 norm <= C and the exact integer sum keeps sensitivity C; the noise is added in float64 to
the decoded sum. The released model is DP; the aggregator itself sees the sum before the noise
(distributed noise added by the clients before masking would hide it from the aggregator too, but a
sum of rounded Gaussians is not Gaussian: the distributed discrete Gaussian of Kairouz et al. 2021 is
the correct form, not implemented). The noise generator is seeded by (seed, round) so runs are
reproducible; a deployment must draw it from a CSPRNG.
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
    multiplier z), from dp_accounting's RDP accountant. RDP composes additively, so the accountant is
    asked once for one round's RDP curve and later rounds only scale it."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"Accountant: sampling_rate must be in (0, 1], got {sampling_rate}")
        if not noise_multiplier > 0:
            raise ValueError(f"Accountant: noise_multiplier must be > 0, got {noise_multiplier}")
        self.z, self.q, self.delta = float(noise_multiplier), float(sampling_rate), float(delta)
        self._rdp_one = None

    def epsilon(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant

        if self._rdp_one is None:
            acc = RdpAccountant(orders=RDP_ORDERS)
            acc.compose(dp_accounting.PoissonSampledDpEvent(self.q, dp_accounting.GaussianDpEvent(self.z)))
            self._rdp_one = np.asarray(acc._rdp, dtype=np.float64)  # one round's RDP at each order
        eps, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, self._rdp_one * int(steps), self.delta)
        return float(eps) if math.isfinite(eps) else math.inf
