"""Shared fixtures: every CPU ISA path this machine offers, thread counts, fresh random data."""
import os
import secrets

import numpy as np
import pytest
import torch

import lepton_core as lc
from lepton_core import _runtime

ISAS = _runtime.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per CPU ISA path this machine can execute (scalar .. best)."""
    before = _runtime.cpu_isa()
    _runtime._set_cpu_isa(request.param)
    assert lc.info()["cpu_isa"] == request.param
    yield request.param
    _runtime._set_cpu_isa(before)


def isa_fixture_with(tables, route, active_name):
    """An `isa` fixture for a test module of a kernel family that has testing tables (kernel tables
    that are no ISA level, e.g. 'amx-model': the AMX kernels on the software tile model): conftest's
    levels, then each of `tables`, routed through with route(name) (route(""): back) and checked with
    active_name()."""

    @pytest.fixture(params=ISAS + list(tables))
    def isa(request):
        before = _runtime.cpu_isa()
        if request.param in tables:
            route(request.param)
            assert active_name() == request.param
        else:
            _runtime._set_cpu_isa(request.param)
            assert lc.info()["cpu_isa"] == request.param
        yield request.param
        route("")
        _runtime._set_cpu_isa(before)

    return isa


@pytest.fixture(params=[1, 2])
def threads(request):
    before = lc.get_num_threads()
    lc.set_num_threads(request.param)
    yield request.param
    lc.set_num_threads(before)


@pytest.fixture
def rng(request):
    """Fresh random data every run; the seed is printed so a failure can be replayed
    (LEPTON_TEST_SEED=<seed> pytest ...)."""
    seed = int(os.environ.get("LEPTON_TEST_SEED", secrets.randbits(32)))
    print(f"[{request.node.nodeid}] LEPTON_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every op output starts as NaN / a sentinel, so an unwritten element fails its test."""
    from lepton_core import _arrays

    _arrays.POISON_OUTPUTS = True
    yield
    _arrays.POISON_OUTPUTS = False
