"""Errors of lepton_core.federated."""
from __future__ import annotations


class FedError(RuntimeError):
    """A federated run cannot go on (a peer process died or stopped answering, a bad checkpoint)."""


class SecAggAbort(FedError):
    """A secure-aggregation round cannot complete (fewer than t survivors, inconsistent shares); the
    global model is left unchanged."""
