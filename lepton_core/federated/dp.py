"""User-level DP for federated averaging (DP-FedAvg, McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models").

Each client's model delta is clipped to L2 norm C (`clip_l2`); the round's update is
(sum of clipped deltas + N(0, (z C)^2 I)) / (q N), q N = clients_per_round the expected number of
sampled clients (the fixed-denominator estimator, sensitivity C for adding or removing one user). With
Poisson sampling at rate q the privacy loss is that of the Poisson-subsampled Gaussian mechanism,
composed over the completed rounds (an aborted round releases nothing and is not counted); `Accountant`
(lepton_core/privacy/accountant.py, shared with DP-SGD in the trainer) asks dp-accounting's RDP
accountant for epsilon at delta.

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

import numpy as np

from ..privacy.accountant import RDP_ORDERS, Accountant  # noqa: F401  (the shared accountant)


def clip_l2(delta: np.ndarray, clip: float) -> np.ndarray:
    """delta scaled down to L2 norm `clip` when it is longer."""
    norm = float(np.linalg.norm(delta))
    return delta * (clip / norm) if norm > clip else delta
