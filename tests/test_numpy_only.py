"""With NumPy alone (torch not installed), `import lepton_core`, lc.info(), `lepton --help` /
`lepton info` and the NumPy API work; the torch-only parts raise an ImportError naming the extra to
install (API.md §0).

The child processes run in a real torch-free environment: `python -S -E` (no site-packages, no
PYTHONPATH) with a path holding only links to NumPy and to the lepton_core package under test, so
`import torch` genuinely fails there.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lepton_core as lc


@pytest.fixture(scope="module")
def numpy_only_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("numpy_only")
    for mod in (np, lc):
        pkg = os.path.dirname(os.path.abspath(mod.__file__))
        os.symlink(pkg, root / os.path.basename(pkg))
        libs = pkg + ".libs"  # manylinux wheels keep NumPy's shared libraries beside the package
        if os.path.isdir(libs):
            os.symlink(libs, root / os.path.basename(libs))
    return str(root)


def _run(path, code, *args):
    prelude = f"import sys; sys.path[:0] = [{path!r}]\n"
    with_cwd = str(os.path.dirname(path))
    return subprocess.run([sys.executable, "-S", "-E", "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120, cwd=with_cwd)


def test_torch_is_really_absent(numpy_only_path):
    r = _run(numpy_only_path, "import torch")
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_import_info_and_numpy_api_without_torch(numpy_only_path):
    r = _run(numpy_only_path, """
        import json, pickle
        import numpy as np
        import lepton_core as lc
        info = lc.info()
        assert info["torch"] is None and info["backends"] == ["cpu"], info
        rng = np.random.default_rng(0)
        a = rng.standard_normal((33, 257)).astype(np.float32)
        b = rng.standard_normal((257, 7)).astype(np.float32)
        out = lc.gemm(a, b.T.copy().T, bias=np.ones(7, np.float64))
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        ref = a.astype(np.float64) @ b.astype(np.float64) + 1
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
        ai = rng.integers(-128, 128, (7, 33), dtype=np.int8)
        bi = rng.integers(-128, 128, (33, 5), dtype=np.int8)
        assert (lc.gemm(ai, bi) == ai.astype(np.int64) @ bi.astype(np.int64)).all()
        for fmt in ("int8", "uint8", "int4", "fp8_e4m3", "fp8_e5m2"):
            q = lc.quantize(a, fmt, axis=1)
            back = pickle.loads(pickle.dumps(q))
            assert type(back.data) is np.ndarray and back.scale.shape == q.scale.shape
            assert np.array_equal(lc.dequantize(back), q.dequantize())
        q = lc.quantize(a, "int8", rounding="stochastic", seed=5, block_size=64)
        assert q.scale.shape == (-(-a.size // 64),)
        z = lc.scaled_gemm(lc.quantize(a, "int8", axis=0), lc.quantize(b, "int8", axis=1))
        assert z.shape == (33, 7) and z.dtype == np.float32
        print(json.dumps({"ok": True, "isa": info["cpu_isa"]}))
    """)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"]


@pytest.mark.parametrize("module", ["lepton_core.nn", "lepton_core.distributed"])
def test_torch_parts_name_the_extra(numpy_only_path, module):
    r = _run(numpy_only_path, f"import {module}")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "needs PyTorch" in r.stderr and "pip install 'lepton_core[torch]'" in r.stderr


def test_lc_nn_attribute_names_the_extra(numpy_only_path):
    r = _run(numpy_only_path, "import lepton_core as lc; lc.nn.Linear")
    assert r.returncode != 0 and "needs PyTorch" in r.stderr


def test_cli_info_without_torch(numpy_only_path):
    r = _run(numpy_only_path, "import sys; from lepton_core.cli import main; sys.exit(main(sys.argv[1:]))",
             "info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["torch"] is None
