"""QTensor round trips, NumPy inputs with odd strides, and the host-pool controls."""
import io
import pickle

import numpy as np
import pytest
import torch

import lepton_core as lc
from lepton_core._codes import FORMATS

FMTS = list(FORMATS)
GRANULARITIES = [{}, {"axis": 1}, {"axis": -1}, {"block_size": 32}]


def _fields(q):
    """Every field of a QTensor as comparable values: (kind, dtype, shape, bytes) per array."""
    def arr(a):
        if a is None:
            return None
        if isinstance(a, torch.Tensor):
            return ("torch", str(a.dtype), tuple(a.shape), a.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return ("numpy", str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())

    return (arr(q.data), arr(q.scale), arr(q.zero_point), q.dtype, tuple(q.shape), q.axis, q.block_size, q.nbytes)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=["tensor", "channel", "channel_neg", "block"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_round_trip_keeps_every_field(fmt, gran, kind):
    # A per-tensor NumPy scale is 0-d; it used to come back from torch.load as shape (1,).
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    q = lc.quantize(x if kind == "numpy" else torch.from_numpy(x), fmt, **gran)
    want = _fields(q)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert _fields(torch.load(buf, weights_only=True)) == want
    assert _fields(pickle.loads(pickle.dumps(q))) == want


def test_numpy_per_tensor_scale_is_0d():
    q = lc.quantize(np.ones((3, 4), np.float32))
    assert isinstance(q.scale, np.ndarray) and q.scale.shape == ()


@pytest.mark.parametrize("isa_free", [None])
def test_numpy_negative_stride_on_size_one_dims(isa_free):
    # np.ones((1, 5))[::-1] has a negative stride on its size-1 dimension: valid, and it addresses
    # nothing. It used to reach torch.from_numpy's raw error.
    x = np.arange(5, dtype=np.float32).reshape(1, 5)[::-1]
    assert x.strides[0] < 0
    q = lc.quantize(x, "int8")
    assert np.array_equal(q.dequantize(), lc.quantize(x.copy(), "int8").dequantize())
    w = np.arange(10, dtype=np.float32).reshape(5, 2)
    np.testing.assert_allclose(lc.gemm(x, w), x.astype(np.float64) @ w, rtol=1e-6)
    col = np.arange(5, dtype=np.float32).reshape(5, 1)[:, ::-1]  # negative stride on the size-1 column
    np.testing.assert_allclose(lc.gemm(x, col), x.astype(np.float64) @ col, rtol=1e-6)
    # a real negative stride (size > 1) is copied, never misread
    y = np.arange(12, dtype=np.float32).reshape(3, 4)[::-1, ::-1]
    np.testing.assert_allclose(lc.gemm(y, w[:4]), y.astype(np.float64) @ w[:4], rtol=1e-6)


def test_mixed_kinds_follow_the_first_input():
    a = np.ones((2, 3), np.float32)
    b = torch.ones(3, 4)
    assert isinstance(lc.gemm(a, b), np.ndarray) and isinstance(lc.gemm(torch.from_numpy(a), b.numpy()), torch.Tensor)
    with pytest.raises(TypeError, match="lc.gemm: b is bfloat16"):
        lc.gemm(a, b.bfloat16())


def test_empty_cache_frees_the_host_pool():
    if lc.info()["host_pool_limit_bytes"] == 0:
        pytest.skip("the host pool is off (LEPTON_HOST_POOL_MB=0)")
    x = torch.ones(4 << 20)  # 16 MiB of float32: the output comes from the pool
    q = lc.quantize(x, "int8", block_size=256)
    out = q.dequantize()
    del out
    assert lc.info()["host_pool_cached_bytes"] >= 16 << 20
    freed = lc.empty_cache()
    assert freed >= 16 << 20 and lc.info()["host_pool_cached_bytes"] == 0
    assert torch.equal(q.dequantize(), torch.ones(4 << 20))  # the pool refills transparently


def test_info_reports_what_a_bug_report_needs():
    info = lc.info()
    assert info["python"].count(".") == 2 and info["numpy"] == np.__version__
    assert info["torch"] == torch.__version__ and info["compiler"]
    assert info["git_revision"] is None or isinstance(info["git_revision"], str)
    assert info["cuda_archs"] is None or all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["cpu_kernels"].startswith(info["cpu_isa"])


@pytest.mark.parametrize("fmt", FMTS)
def test_tiny_groups_get_a_positive_scale(fmt):
    # [1e-45]: absmax / qmax underflows to 0; an all-zero scale would dequantize to 0, an error of
    # |x| > scale / 2 = 0. Only all-zero groups have scale 0 (API.md §2).
    tiny = np.array([1e-45, -3e-45, 0.0, 7e-45], np.float32)
    for x in (tiny, np.zeros(4, np.float32)):
        q = lc.quantize(x, fmt)
        back = q.dequantize()
        if x.any():
            assert float(q.scale) == 2.0**-149
            np.testing.assert_array_equal(back, x)  # x / 2^-149 are small integers: exact in every format
        else:
            assert float(q.scale) == 0.0 and not back.any()
