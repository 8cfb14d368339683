"""API.md §0: lc.info, threads, CPU ISA selection, import without a GPU, the `lepton info` CLI."""
import json
import os

import numpy as np
import pytest
from subprocs import run_python

import lepton_core as lc
from lepton_core import _runtime

ISA_NAMES = ["scalar", "avx2", "avx512", "amx"]
_run = run_python


def _py(code: str, **env):
    return _run(["-W", "always", "-c", code], **env)


def test_info_keys_and_types():
    info = lc.info()
    assert isinstance(info["version"], str) and info["version"] == lc.__version__
    assert isinstance(info["backends"], list) and "cpu" in info["backends"]
    assert info["cpu_isa"] in ISA_NAMES
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    if "cuda" in info["backends"]:
        assert isinstance(info["cuda_device"], str) and info["cuda_unavailable_reason"] is None
    else:
        assert info["cuda_device"] is None
        assert isinstance(info["cuda_unavailable_reason"], str) and len(info["cuda_unavailable_reason"]) > 10


def test_info_reports_detected_isa_consistently():
    info = lc.info()
    order = ISA_NAMES.index
    assert order(info["cpu_isa"]) <= order(info["cpu_isa_detected"])
    feats = info["cpu_features"]
    if info["cpu_isa_detected"] in ("avx2", "avx512", "amx"):
        assert feats.get("avx2") and feats.get("fma") and feats.get("f16c")
    if info["cpu_isa_detected"] in ("avx512", "amx"):
        assert feats.get("avx512f") and feats.get("avx512_bf16") and feats.get("avx512_vnni")
    if info["cpu_isa_detected"] == "amx":
        assert feats.get("amx_tile") and feats.get("amx_bf16") and feats.get("amx_int8")


def test_info_says_how_the_avx512_level_multiplies_bf16():
    """cpu_kernels at the avx512 level names the bf16 GEMM table this CPU picked (vdpbf16ps, or widened to
    float32 where its vdpbf16ps is the slower): the same table the GEMM calls run."""
    if ISA_NAMES.index(lc.info()["cpu_isa_detected"]) < ISA_NAMES.index("avx512"):
        pytest.skip("no AVX-512 level on this CPU")
    code = ("import lepton_core as lc; from lepton_core.backends.cpu import _C; "
            "print(_C.gemm_kernels_name()); print(lc.info()['cpu_kernels'])")
    r = run_python(["-c", code], LEPTON_CPU_ISA="avx512")
    assert r.returncode == 0, r.stderr
    table, words = r.stdout.splitlines()
    assert table in ("avx512-bf16dot", "avx512-bf16fma")
    assert words.startswith("avx512 (bfloat16 GEMM ")
    assert ("widened to float32" in words) == (table == "avx512-bf16fma")
    assert ("by vdpbf16ps" in words) == (table == "avx512-bf16dot")


@pytest.fixture
def restore_threads():
    before = lc.get_num_threads()
    yield
    lc.set_num_threads(before)


def test_set_num_threads_roundtrip(restore_threads):
    for n in (1, 2, 3, 1000):  # above the core count is stored as given, as torch does
        lc.set_num_threads(n)
        assert lc.get_num_threads() == n
        assert lc.info()["num_threads"] == n
    lc.set_num_threads(np.int64(2))
    assert lc.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_set_num_threads_rejects_small(restore_threads, bad):
    lc.set_num_threads(3)
    with pytest.raises(ValueError, match=r"set_num_threads.*>= 1.*" + str(bad)):
        lc.set_num_threads(bad)
    assert lc.get_num_threads() == 3  # a rejected call leaves the setting unchanged


@pytest.mark.parametrize("bad", [2.0, "2", None, True, [2]])
def test_set_num_threads_rejects_non_int(restore_threads, bad):
    lc.set_num_threads(3)
    with pytest.raises(TypeError, match="set_num_threads"):
        lc.set_num_threads(bad)
    assert lc.get_num_threads() == 3


def test_isa_switch_hook_covers_every_available_level():
    before = _runtime.cpu_isa()
    try:
        for name in _runtime.available_isas():
            _runtime._set_cpu_isa(name)
            assert lc.info()["cpu_isa"] == name
    finally:
        _runtime._set_cpu_isa(before)


@pytest.mark.parametrize("cap", ISA_NAMES)
def test_env_cap(cap):
    r = _py("import lepton_core as lc; print(lc.info()['cpu_isa'])", LEPTON_CPU_ISA=cap)
    assert r.returncode == 0, r.stderr
    best = _runtime.available_isas()[-1]
    expect = cap if ISA_NAMES.index(cap) <= ISA_NAMES.index(best) else best  # a cap above: the best
    assert r.stdout.strip() == expect
    assert "RuntimeWarning" not in r.stderr


def _automatic_isa():
    """The automatic choice: the best level available, amx included."""
    return _runtime.available_isas()[-1]


def test_env_cap_unknown_warns_and_uses_automatic_choice():
    r = _py("import lepton_core as lc; print(lc.info()['cpu_isa'])", LEPTON_CPU_ISA="avx9000")
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" in r.stderr and "avx9000" in r.stderr
    assert r.stdout.strip() == _automatic_isa()


def test_automatic_choice_is_the_best_level():
    r = _py("import lepton_core as lc; i = lc.info(); print(i['cpu_isa'], i['cpu_isa_detected'], i['cpu_isa_compiled'])",
            LEPTON_CPU_ISA="")
    assert r.returncode == 0, r.stderr
    active, detected, compiled = r.stdout.split()
    assert active == _automatic_isa()
    assert active == min(detected, compiled, key=ISA_NAMES.index)
    assert detected == ISA_NAMES[_runtime._C.cpu_isa_detected()]


@pytest.mark.parametrize("omp, expect", [("1", 1), ("3", 3), ("2,1", 2), (" 4 ", 4)])
def test_default_threads_follow_omp_num_threads(omp, expect):
    # torchrun sets OMP_NUM_THREADS=1 per worker: lc must not then use every core (API.md §0).
    r = _py("import lepton_core as lc; print(lc.get_num_threads())", OMP_NUM_THREADS=omp)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == expect


@pytest.mark.parametrize("omp", ["", "0", "-2", "abc"])
def test_default_threads_without_a_valid_omp_num_threads_are_the_available_cpus(omp):
    r = _py("import lepton_core as lc; print(lc.get_num_threads())", OMP_NUM_THREADS=omp)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == _runtime.available_cpus()
    assert 1 <= _runtime.available_cpus() <= len(os.sched_getaffinity(0))


def test_default_threads_respect_the_cgroup_quota(monkeypatch, tmp_path):
    # A quota of 1.5 CPUs gives 2 threads; "max" means no quota.
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/sys/fs/cgroup/cpu.max":
            f = tmp_path / "cpu.max"
            f.write_text(quota)
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    quota = "150000 100000\n"
    assert _runtime.default_num_threads() == 2
    quota = "max 100000\n"
    assert _runtime.default_num_threads() == 8


def test_import_without_gpu():
    # Hiding every GPU must never break the import; info() then says why CUDA is unavailable.
    r = _py("import lepton_core as lc, json; print(json.dumps(lc.info()))", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backends"] == ["cpu"] and info["cuda_unavailable_reason"]


def test_cli_info():
    r = _run(["-m", "lepton_core.cli", "info", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpu_isa"] == lc.info()["cpu_isa"]
    r = _run(["-m", "lepton_core.cli", "info"])
    assert r.returncode == 0 and "cpu isa" in r.stdout


def test_cli_bad_command_exits_nonzero_without_traceback():
    r = _run(["-m", "lepton_core.cli", "frobnicate"])
    assert r.returncode != 0 and "Traceback" not in r.stderr and "invalid choice" in r.stderr


def test_host_pool_reuses_released_outputs_and_never_aliases_live_ones(rng):
    """Large CPU outputs (>= host_pool_min_bytes) come from the host pool: a released block is
    handed to the next output of its size, while outputs (or views of them) that are alive never
    share memory."""
    import gc

    import torch

    from lepton_core import _C

    if _C.host_pool_limit_bytes() == 0:
        pytest.skip("LEPTON_HOST_POOL_MB=0: the pool is off")
    n = _C.host_pool_min_bytes // 4 + 12345          # a float32 output just over the threshold
    x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    q = lc.quantize(x, "int8", block_size=256)
    want = (q.data.view(-1)[: n // 256 * 256].float().view(-1, 256) * q.scale[: n // 256, None]).view(-1)
    a, b = lc.dequantize(q), lc.dequantize(q)
    assert a.data_ptr() != b.data_ptr()
    freed = a.data_ptr()
    del a
    gc.collect()
    c = lc.dequantize(q)
    assert c.data_ptr() == freed                      # the released block, pages already touched
    view = c[::3]
    del c
    gc.collect()
    d = lc.dequantize(q)
    assert d.data_ptr() != freed                      # a live view keeps its block out of the pool
    for out in (b, d):
        assert torch.equal(out[: want.numel()], want)
    assert torch.equal(view, lc.dequantize(q)[::3])
    assert _C.host_pool_cached_bytes() <= _C.host_pool_limit_bytes()


def test_host_pool_off():
    """LEPTON_HOST_POOL_MB=0: large outputs come from torch's allocator."""
    code = ("import torch, lepton_core as lc; from lepton_core import _C, _arrays;"
            "assert _C.host_pool_limit_bytes() == 0 and _arrays._POOL_MIN_BYTES == float('inf');"
            "q = lc.quantize(torch.ones(3 << 20), 'int8', block_size=256);"
            "assert torch.equal(lc.dequantize(q), torch.ones(3 << 20))")
    r = _py(code, LEPTON_HOST_POOL_MB="0")
    assert r.returncode == 0, r.stderr
