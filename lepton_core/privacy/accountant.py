"""The privacy accountant of the Poisson-subsampled Gaussian mechanism, on dp-accounting's RDP
accountant: epsilon at delta after a number of steps (DP-SGD steps, DP-FedAvg rounds), and the noise
multiplier that makes a planned run spend a target epsilon.

Needs the `dp-accounting` package (the `federated` and `train` extras); it is imported on first use.
"""
from __future__ import annotations

import math

import numpy as np

RDP_ORDERS = tuple(range(2, 257)) + (512, 1024)  # integer orders: exact for the subsampled Gaussian


def _require_dp_accounting():
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ImportError("differential privacy accounting needs the dp-accounting package: "
                          "pip install 'lepton-core[train]' (or [federated])") from None


class Accountant:
    """Epsilon at delta after `steps` steps of the Poisson-subsampled Gaussian mechanism (rate q, noise
    multiplier z), from dp_accounting's RDP accountant. RDP composes additively, so the accountant is
    asked once for one step's RDP curve and later steps only scale it."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"Accountant: sampling_rate must be in (0, 1], got {sampling_rate}")
        if not noise_multiplier > 0:
            raise ValueError(f"Accountant: noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"Accountant: delta must be in (0, 1), got {delta}")
        self.z, self.q, self.delta = float(noise_multiplier), float(sampling_rate), float(delta)
        self._rdp_one = None

    def epsilon(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        _require_dp_accounting()
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant

        if self._rdp_one is None:
            acc = RdpAccountant(orders=RDP_ORDERS)
            acc.compose(dp_accounting.PoissonSampledDpEvent(self.q, dp_accounting.GaussianDpEvent(self.z)))
            self._rdp_one = np.asarray(acc._rdp, dtype=np.float64)  # one step's RDP at each order
        eps, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, self._rdp_one * int(steps), self.delta)
        return float(eps) if math.isfinite(eps) else math.inf


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                      *, rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier z (to `rel_tol`) for which `steps` steps at `sampling_rate` spend at
    most `target_epsilon` at `delta`: bisection on z (epsilon falls as z grows), each probe one call of
    the accountant above. ValueError when even z = 1000 cannot reach the target."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"noise_for_epsilon: target_epsilon must be a positive number, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"noise_for_epsilon: steps must be >= 1, got {steps}")

    def eps(z: float) -> float:
        return Accountant(z, sampling_rate, delta).epsilon(steps)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1000:
            raise ValueError(f"noise_for_epsilon: epsilon {target_epsilon} at delta {delta} is out of reach for "
                             f"{steps} steps at sampling rate {sampling_rate} (noise multiplier > 1000)")
    if eps(lo) <= target_epsilon:
        return lo
    while hi - lo > rel_tol * hi:  # invariant: eps(lo) > target >= eps(hi)
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
