"""FedConfig: the settings of one federated run (API.md §6)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

ALGORITHMS = ("fedavg", "fedprox")


@dataclasses.dataclass
class FedConfig:
    """rounds of federated training over `clients` clients, `clients_per_round` sampled per round.

    Client sampling: a uniform subset of `clients_per_round` clients per round; with DP (dp_clip set) each
    client is instead picked independently with probability q = clients_per_round / clients (Poisson
    sampling, as DP-FedAvg and its accountant assume). `dropout`: the probability that a sampled client
    drops out after the key exchange (before sending its update), for testing recovery.
    `fixed_point`: aggregate fixed-point integers mod 2^32 (always with secure aggregation; None = only
    then); `secagg_threshold`: Shamir threshold t (None = a majority of the holders of each secret: the
    sampled clients, or a client's neighbours and itself); `secagg_neighbors`: k of the SecAgg+ graph
    (None = the complete graph of Bonawitz et al.).
    """
    rounds: int = 200
    clients: int = 100
    clients_per_round: int = 10
    local_epochs: int = 1
    local_batch_size: int = 32
    lr: float = 0.1
    algorithm: str = "fedavg"
    prox_mu: float = 0.0
    secure_aggregation: bool = False
    dropout: float = 0.0
    dp_clip: Optional[float] = None
    dp_noise_multiplier: Optional[float] = None
    dp_delta: float = 1e-5
    seed: int = 0
    fixed_point: Optional[bool] = None
    secagg_threshold: Optional[int] = None
    secagg_neighbors: Optional[int] = None  # SecAgg+ neighbour count k (None: all other sampled clients)
    clip_range: float = 1.0  # per-coordinate range of the fixed-point encoding (without DP)
    timeout_s: float = 60.0  # collectives: a peer silent this long is an error

    @property
    def dp(self) -> bool:
        return self.dp_clip is not None

    @property
    def uses_fixed_point(self) -> bool:
        return self.secure_aggregation or bool(self.fixed_point)

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.clients

    def validate(self) -> "FedConfig":
        def bad(field: str, why: str, exc=ValueError):
            return exc(f"FedConfig: {field} {why}, got {getattr(self, field)!r}")

        for f in ("rounds", "clients", "clients_per_round", "local_epochs", "local_batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f, "must be an int", TypeError)
            if v < 1:
                raise bad(f, "must be >= 1")
        if self.clients_per_round > self.clients:
            raise bad("clients_per_round", f"must be <= clients ({self.clients})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "must be an int >= 0")
        for f in ("lr", "clip_range", "timeout_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < math.inf):
                raise bad(f, "must be a positive number")
        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", f"must be one of {ALGORITHMS}")
        if not isinstance(self.prox_mu, (int, float)) or not (0 <= self.prox_mu < math.inf):
            raise bad("prox_mu", "must be a number >= 0")
        if not isinstance(self.dropout, (int, float)) or not (0 <= self.dropout < 1):
            raise bad("dropout", "must be in [0, 1)")
        if (self.dp_clip is None) != (self.dp_noise_multiplier is None):
            raise ValueError("FedConfig: dp_clip and dp_noise_multiplier go together (both set for DP, or "
                             f"neither), got dp_clip={self.dp_clip!r}, dp_noise_multiplier={self.dp_noise_multiplier!r}")
        if self.dp_clip is not None:
            if not isinstance(self.dp_clip, (int, float)) or not (0 < self.dp_clip < math.inf):
                raise bad("dp_clip", "must be a positive number")
            if not isinstance(self.dp_noise_multiplier, (int, float)) or not (0 < self.dp_noise_multiplier < math.inf):
                raise bad("dp_noise_multiplier", "must be a positive number")
            if not (0 < self.dp_delta < 1):
                raise bad("dp_delta", "must be in (0, 1)")
        if self.secure_aggregation and self.fixed_point is False:
            raise ValueError("FedConfig: secure_aggregation needs the fixed-point path; got fixed_point=False")
        if self.secagg_threshold is not None and (not isinstance(self.secagg_threshold, int)
                                                  or self.secagg_threshold < 1):
            raise bad("secagg_threshold", "must be an int >= 1 or None")
        if self.secagg_neighbors is not None and (isinstance(self.secagg_neighbors, bool)
                                                  or not isinstance(self.secagg_neighbors, int)
                                                  or self.secagg_neighbors < 2):
            raise bad("secagg_neighbors", "must be an int >= 2 or None")
        return self
