"""lc.gemm / lc.scaled_gemm against float64 / exact integer references (API.md §1).

Inputs are created in (rounded to) the kernel dtype first and the reference is computed in float64
from those very values, so the comparison measures only the kernel's own error; bounds come from
tests/tolerances.py. Shapes are chosen to be non-multiples of the register tile (6 x 16), to span
several K blocks (kc) and A blocks (mc) of the packed kernels, and to hit 1-element edges.
"""
import math

import numpy as np
import pytest
import torch

import lepton_core as lc
from lepton_core import _C, _runtime
from lepton_core.gemm import INT8_MAX_K
from conftest import isa_fixture_with
from tolerances import SUBNORMAL_SPACING, gemm_rel_denominator, gemm_rel_norm_bound

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
BLK = _C.gemm_blocking(False)   # float path: mr, nr, kc, mc, nc
BLK8 = _C.gemm_blocking(True)   # int8 path (k counted in int8 elements)
# A tall product's float blocking: the AVX-512 kernels take deeper K blocks (and fewer rows per A block)
# from 256 rows on (kGemmDeepKcMinRows); the other tables block as above.
ROWS_DEEP = 300
BLK_DEEP = _C.gemm_blocking(False, rows=ROWS_DEEP)
BLK8_DEEP = _C.gemm_blocking(True, rows=ROWS_DEEP)  # int8 with B packed per call (not pre-packed)
# Kernel tables that are no ISA level: 'amx-model', the AMX kernels compiled against the software
# tile model (csrc/cpu/gemm/gemm_amx_model_avx2.cc), on every machine with AVX2; and on an AVX-512 CPU
# the avx512 level's table it does not pick ('avx512-bf16dot': bf16 by vdpbf16ps, 'avx512-bf16fma':
# bf16 widened to float32 and FMA; the level runs whichever this CPU runs faster).
MODEL_TABLES = _C.gemm_testing_tables()
AVX512_TABLES = ("avx512-bf16dot", "avx512-bf16fma")


# conftest's levels plus the testing tables: every GEMM test also runs the AMX kernels' logic, on the
# tile model, and both avx512 tables.
isa = isa_fixture_with(MODEL_TABLES, _C.gemm_testing_table, lambda: _C.gemm_kernels_name())


def rand(rng, shape, dtype):
    """Random values exactly representable in `dtype` (a torch tensor of that dtype)."""
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def rand_i8(rng, shape):
    return torch.from_numpy(rng.integers(-128, 128, size=shape, dtype=np.int8))


def t64(x):
    """float64 torch copy of a torch tensor or (possibly negative-strided) NumPy array."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.astype(np.float64))
    return x.double()


def ref(a, b, bias=None):
    """float64 product of the (already rounded) inputs, bias as the float32 the kernel adds."""
    r = t64(a) @ t64(b)
    if bias is not None:
        r = r + t64(bias).float().double()
    return r


def assert_close(out, a, b, bias=None, out_dtype=None):
    """The contract's normwise bound, ||out - ref|| / ||ref|| <= bound(out dtype, K), ||ref|| floored
    against cancellation (tolerances.gemm_rel_denominator)."""
    out_t = torch.as_tensor(out)
    r = ref(a, b, bias)
    assert tuple(out_t.shape) == tuple(r.shape)
    if out_dtype is not None:
        assert out_t.dtype == out_dtype
    k = a.shape[-1]
    bound = gemm_rel_norm_bound(NAME[out_t.dtype], k)
    assert torch.isfinite(out_t.double()).all(), "unwritten (poisoned) or non-finite output"
    terms = t64(a).abs() @ t64(b).abs()
    if bias is not None:
        terms = terms + t64(bias).abs()
    # the final rounding's absolute part in the output's subnormal range (tolerances.SUBNORMAL_SPACING)
    sub = 0.5 * SUBNORMAL_SPACING[NAME[out_t.dtype]] * math.sqrt(max(r.numel(), 1))
    diff = max(float(torch.linalg.vector_norm(out_t.double() - r)) - sub, 0.0)
    err = diff / gemm_rel_denominator(float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(terms)), k)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# Float path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype", FLOAT_DTYPES, ids=NAME.get)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=NAME.get)
def test_float_dtypes(isa, threads, rng, in_dtype, out_dtype):
    for m, k, n in [(1, 1, 1), (7, 33, 17), (33, 7, 257), (13, BLK["kc"] + 37, 40)]:
        a, b = rand(rng, (m, k), in_dtype), rand(rng, (k, n), in_dtype)
        assert_close(lc.gemm(a, b, out_dtype=out_dtype), a, b, out_dtype=out_dtype)


def rounding_probes(rng, n):
    """float32 values that stress rounding to 16 bits: exact ties (round half to even) for bfloat16
    and float16, float16 subnormals and overflow, float32 subnormals (bfloat16's own: AVX512-BF16's
    conversion flushes them, so the kernels must not use it on them) with their ties and the carry
    into the smallest normal, infinities and NaN."""
    ties_bf16 = (rng.integers(0, 2**15, size=n, dtype=np.uint32) << 16) | 0x8000   # exactly halfway
    ties_f16 = ((rng.integers(113, 142, size=n, dtype=np.uint32) << 23) |
                (rng.integers(0, 2**10, size=n, dtype=np.uint32) << 13) | 0x1000)    # halfway in float16
    sub_f32 = (rng.integers(1, 2**23, size=n, dtype=np.uint32) | (rng.integers(0, 2, size=n, dtype=np.uint32) << 31))
    sub_f32 = np.concatenate([sub_f32, np.array([0x00008000, 0x00018000, 0x007F8000, 0x007FFFFF, 0x807FFFFF, 1],
                                                np.uint32)])
    vals = np.concatenate([ties_bf16.view(np.float32), ties_f16.view(np.float32), sub_f32.view(np.float32),
                           rng.uniform(-6e-5, 6e-5, size=n).astype(np.float32),        # float16 subnormals
                           np.array([65519.0, 65520.0, -7e4, 3e38, np.inf, -np.inf, np.nan, 1.0], np.float32)])
    return torch.from_numpy(vals)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=NAME.get)
def test_output_rounding_bitwise(isa, rng, out_dtype):
    """Rounding to the output dtype is round-half-to-even, once, exactly like torch's conversion:
    with a = ones (K = 1) the result is b itself, with b = 0 it is the bias."""
    vals = rounding_probes(rng, 45)
    n = vals.numel()
    ones = torch.ones(13, 1)                      # two full row tiles and an edge
    want = vals.to(out_dtype).expand(13, n)
    for got in (lc.gemm(ones, vals.reshape(1, n), out_dtype=out_dtype),
                lc.gemm(ones, torch.zeros(1, n), bias=vals, out_dtype=out_dtype)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        keep = ~torch.isnan(want)
        assert torch.equal(got[keep], want[keep])


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=NAME.get)
def test_nan_output_bits_same_on_every_isa(isa, out_dtype):
    """NaN outputs carry the scalar conversion's bits on every ISA (float16: the canonical quiet NaN
    with its sign; bfloat16: the quieted top half), not whatever a vector conversion makes of the
    payload. Negative and payload-carrying NaNs arrive through the bias (K = 1, a = 0)."""
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7FA12345, 0xFF812345, 0x7F800001, 0x3F800000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32).repeat(7)  # 42: tiles + edge
    n = nans.numel()
    a, b = torch.zeros(13, 1), torch.zeros(1, n)
    got = lc.gemm(a, b, bias=nans, out_dtype=out_dtype).view(torch.int16)
    before = _runtime.cpu_isa()
    _C.gemm_testing_table("")
    _runtime._set_cpu_isa("scalar")
    try:
        want = lc.gemm(a, b, bias=nans, out_dtype=out_dtype).view(torch.int16)
    finally:
        _runtime._set_cpu_isa(before)
        if isa in MODEL_TABLES:
            _C.gemm_testing_table(isa)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: "none" if d is None else str(d).replace("torch.", ""))
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=NAME.get)
def test_bias(isa, rng, bias_dtype, out_dtype):
    m, k, n = 19, 45, 37
    a, b = rand(rng, (m, k), torch.bfloat16), rand(rng, (k, n), torch.bfloat16)
    bias = None if bias_dtype is None else rand(rng, (n,), bias_dtype) * 4
    out = lc.gemm(a, b, bias=bias, out_dtype=out_dtype)
    assert_close(out, a, b, bias, out_dtype)


def test_float64_bias_rounded_to_float32_first(isa):
    """bias is converted to float32 once, then added in float32: with a product of 2^-24 and a
    float64 bias of 1 + 2^-24 - 2^-40 (float32: 1.0), the float32 sum 1 + 2^-24 is a tie that rounds
    to 1.0; adding in float64 would give 1 + 2^-23."""
    for m in (1, 7):  # the matrix-vector path and the packed one
        a = torch.ones(m, 1)
        b = torch.full((1, 17), 2.0**-24)
        bias = torch.full((17,), 1 + 2.0**-24 - 2.0**-40, dtype=torch.float64)
        assert torch.equal(lc.gemm(a, b, bias=bias), torch.ones(m, 17))


# (M, K, N): edges of every block size, several K blocks, several A blocks, N beyond one B block.
SHAPES = [
    (1, 257, 1),
    (6, 16, 16),
    (7, 1, 33),
    (5, 2 * BLK["kc"] + 3, 23),                 # three K blocks, the last one short
    (BLK["mc"] + 13, 70, 3 * BLK["nr"] + 1),    # two A blocks, N tail of one column
    (257, 600, 33),
    (3, 40, BLK["nc"] + 21),                    # two B blocks
    (70, 1100, 50),
    (ROWS_DEEP, BLK_DEEP["kc"] + 9, 37),                # tall: two deep K blocks (float32 panels), short last
    (2 * BLK_DEEP["mc"] + 7, BLK_DEEP["kc"] + 5, 40),   # tall: several of its smaller A blocks
    (ROWS_DEEP, 37, BLK_DEEP["nc"] + 21),               # tall: two of its narrower B blocks
]


def test_bf16_deep_k_blocks(isa, threads, rng):
    """A tall bf16 product over several of its deep K blocks (bf16 packs k-pairs, so its kc is twice
    float32's): partial sums carried from block to block, the last block short; bf16 out, whose
    contract bound covers this K."""
    m, k, n = ROWS_DEEP, 4 * BLK_DEEP["kc"] + 9, 37
    a, b = rand(rng, (m, k), torch.bfloat16), rand(rng, (k, n), torch.bfloat16)
    bias = rand(rng, (n,), torch.float32)
    assert_close(lc.gemm(a, b, bias=bias), a, b, bias, torch.bfloat16)


def test_int8_deep_k_blocks(isa, threads, rng):
    """A tall int8 product over its deep K blocks (B packed per call): int32 sums exact across blocks,
    the last block short; and scaled_gemm, whose partial sums go through the workspace."""
    m, k, n = ROWS_DEEP, 2 * BLK8_DEEP["kc"] + 5, 37
    a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
    assert_int_exact(lc.gemm(a, b), a, b)
    assert_scaled_exact(rng, a, b, rand(rng, (n,), torch.float32), torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                                (torch.float16, torch.bfloat16)], ids=["f32", "bf16-f16", "f16-bf16"])
def test_float_shapes(isa, threads, rng, shape, in_dtype, out_dtype):
    m, k, n = shape
    a, b = rand(rng, (m, k), in_dtype), rand(rng, (k, n), in_dtype)
    bias = rand(rng, (n,), torch.float32)
    assert_close(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)


@pytest.mark.parametrize("k", [7, 55, 1100])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int8], ids=lambda d: str(d).replace("torch.", ""))
def test_row_major_b_block_packed_across_panels(isa, threads, rng, dtype, k):
    """A row-major B whose K block is packed whole (more rows per thread than one A block) goes row chunk by row
    chunk across its full panels, then each panel's rest (the 7 k past 16-row chunks, the partial last
    panel of 5 columns): K below one chunk, past a few, and past several K blocks."""
    m, n = 2 * 1020 + 13, 3 * BLK["nr"] + 5  # past two A blocks of the largest mc (gemm_blocking's cap)
    if dtype == torch.int8:
        a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
        assert_int_exact(lc.gemm(a, b), a, b)
    else:
        a, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype)
        assert_close(lc.gemm(a, b, out_dtype=torch.float32), a, b, None, torch.float32)


def test_amx_k_chunks(isa, rng):
    """Where K runs inside each B panel (the AMX tables, for units of several A blocks and K blocks), K past one
    chunk of an A block with a K block tail in the second chunk: the sums cross the chunks through the
    output (float32, int32) or the A block's workspace (bf16, scaled int8 into bf16), beside an edge A block
    and an edge panel; and a batched product in one chunk."""
    blk, blk8 = _C.gemm_blocking(False), _C.gemm_blocking(True)
    if not blk["kchunk"]:
        pytest.skip("this kernel table has no K-inside loop")
    m, n = 2 * blk["mc"] + 37, 3 * blk["nr"] + 5
    k = blk["kchunk"] + blk["kc"] + 7
    # Small integers: every float32 sum is exact (|sum| < 2^24) whatever the order, so the output is the
    # float64 product rounded once, bit for bit (K this deep is past the contract bound's useful range).
    small = lambda shape: torch.from_numpy(rng.integers(-3, 4, size=shape).astype(np.float32))
    a, b, bias = small((m, k)).bfloat16(), small((k, n)).bfloat16(), small((n,))
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), (ref(a, b, bias)).to(out_dtype))
    # Batched, A a permuted view (batches do not stack as rows): each batch its own units.
    a3 = small((m, 2, blk["kc"] + 9)).bfloat16().permute(1, 0, 2)
    b3 = small((2, blk["kc"] + 9, n)).bfloat16()
    assert torch.equal(lc.gemm(a3, b3, out_dtype=torch.bfloat16), (t64(a3) @ t64(b3)).to(torch.bfloat16))
    bias = rand(rng, (n,), torch.float32)
    k8 = blk8["kchunk"] + blk8["kc"] + 7
    a8, b8 = rand_i8(rng, (m, k8)), rand_i8(rng, (k8, n))
    assert_int_exact(lc.gemm(a8, b8), a8, b8)
    assert_scaled_exact(rng, a8, b8, bias, torch.bfloat16)


def test_very_deep_k(isa, rng):
    """K so deep that one unit's packed B of all K would not keep 32 columns under the AMX tables' cap (the
    K-blocks-outer loop runs it there); small integers, so every float32 sum is exact (|sum| <= K < 2^24)."""
    m, k, n = 40, 270_000, 3
    a = torch.from_numpy(rng.integers(-1, 2, size=(m, k)).astype(np.float32)).bfloat16()
    b = torch.from_numpy(rng.integers(-1, 2, size=(k, n)).astype(np.float32)).bfloat16()
    assert torch.equal(lc.gemm(a, b, out_dtype=torch.float32), ref(a, b).float())


def test_amx_streamed_output(isa, rng):
    """An output of more bytes than the cores' L2 together with 64-byte aligned rows, over two K blocks (K
    inside each B panel): the AMX tables' full tiles write it with non-temporal stores (float32 and bf16
    outputs with a bias, scaled int8 into float32), the edge rows in place; bf16's last K block deep
    enough (5 tile steps) that each tile's epilogue runs during the next tile's steps. One thread, so the
    output need pass only one L2."""
    blk, blk8 = _C.gemm_blocking(False), _C.gemm_blocking(True)
    if not blk["kchunk"]:
        pytest.skip("the streamed epilogue is the AMX tables'")
    l2 = lc.info()["cache_bytes"]["l2"]
    n = 512
    before = lc.get_num_threads()
    lc.set_num_threads(1)
    try:
        k = blk["kc"] + 4 * 32 + 16
        for out_dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            m = l2 // (n * size) + 5
            a, b = rand(rng, (m, k), torch.bfloat16), rand(rng, (k, n), torch.bfloat16)
            bias = rand(rng, (n,), torch.float32)
            assert_close(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)
        m, k8 = l2 // (n * 4) + 5, blk8["kc"] + 4 * 64 + 8
        a8, b8 = rand_i8(rng, (m, k8)), rand_i8(rng, (k8, n))
        assert_scaled_exact(rng, a8, b8, bias, torch.float32)
    finally:
        lc.set_num_threads(before)


def test_fma_streamed_output(isa, rng):
    """The FMA kernel sets write an output of at least 16 MiB (kGemmFmaStreamMinBytes) with non-temporal
    stores where their tile rows are whole lines (the AVX-512 tables): one K block into float32, bf16 and
    float16 with a bias, the last row tile short (ukernel_rows) and an edge panel of 16 columns; and a bf16
    output over two K blocks (sums in the workspace, the last block streamed)."""
    k = 33
    for out_dtype, size in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
        n = 1040 if size == 4 else 2080  # rows 4160 bytes: 64-byte aligned; 1040 = 32 x 32 + 16
        m = (16 << 20) // (n * size) + 7
        a, b = rand(rng, (m, k), torch.float32), rand(rng, (k, n), torch.float32)
        bias = rand(rng, (n,), torch.float32)
        assert_close(lc.gemm(a.t().contiguous().t(), b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)
    blk = _C.gemm_blocking(False, rows=4096)
    if blk["kchunk"] or blk["mr"] != 12:
        return  # the two-K-block case is the AVX-512 tables' (AMX's own: test_amx_streamed_output)
    m, k, n = (16 << 20) // (2048 * 2) + 5, blk["kc"] + 40, 2048
    a, b = rand(rng, (m, k), torch.bfloat16), rand(rng, (k, n), torch.bfloat16)
    assert_close(lc.gemm(a, b, out_dtype=torch.bfloat16), a, b, None, torch.bfloat16)


def test_amx_one_k_block_along_rows(isa, rng):
    """One K block, several A blocks, B block within half of L2: the AMX tables run each 32-row tile along all
    the panels (A in L1, B with the T1 hint), edge rows and an edge panel included; bf16 into each output
    dtype with a bias, int8 exact and scaled."""
    blk, blk8 = _C.gemm_blocking(False), _C.gemm_blocking(True)
    m, n = 2 * blk["mc"] + 37, 5 * blk["nr"] + 7
    for k in (1, 33, blk["kc"]):
        a, b = rand(rng, (m, k), torch.bfloat16), rand(rng, (k, n), torch.bfloat16)
        bias = rand(rng, (n,), torch.float32)
        for out_dtype in FLOAT_DTYPES:
            assert_close(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)
    k8 = blk8["kc"] - 3
    a8, b8 = rand_i8(rng, (m, k8)), rand_i8(rng, (k8, n))
    assert_int_exact(lc.gemm(a8, b8), a8, b8)
    assert_scaled_exact(rng, a8, b8, bias, torch.bfloat16)


def test_amx_a_read_in_place(isa, rng):
    """A whose rows run along k, K whole tile steps and an A block of whole 32-row tiles: the AMX tables load
    A's tiles from A itself (in the one-K-block row loop; in the K-inside loop where a unit has few panels),
    the last A block (rows past whole tiles) packed beside them. A a column slice of a wider matrix (its
    rows further apart than K), an edge panel, batched; bf16 into every output dtype with a bias; int8
    (whose A stays packed) from the same strided view, exact and scaled."""
    blk, blk8 = _C.gemm_blocking(False), _C.gemm_blocking(True)
    m, n = 2 * blk["mc"] + 37, 3 * blk["nr"] + 5
    bias = rand(rng, (n,), torch.float32)
    for k in (blk["kc"], 2 * blk["kc"] + 64):  # one K block (row loop); three (K inside each panel)
        a = rand(rng, (m, k + 96), torch.bfloat16)[:, 32 : 32 + k]
        b = rand(rng, (k, n), torch.bfloat16)
        for out_dtype in FLOAT_DTYPES:
            assert_close(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)
    k = 2 * blk["kc"]
    a3, b3 = rand(rng, (2, m, k), torch.bfloat16), rand(rng, (2, k, n), torch.bfloat16)
    assert_close(lc.gemm(a3, b3, out_dtype=torch.float32), a3, b3, None, torch.float32)
    a8, b8 = rand_i8(rng, (m, blk8["kc"] + 64))[:, 64:], rand_i8(rng, (blk8["kc"], n))
    assert_int_exact(lc.gemm(a8, b8), a8, b8)
    assert_scaled_exact(rng, a8, b8, bias, torch.bfloat16)


def test_amx_scaled_epilogue_deferred(isa, rng):
    """scaled_gemm whose last K block is 16 int8 tile steps deep or more, where the AMX tables write a final
    tile's epilogue between the next tile's steps: one K block with fewer rows than an A block (the driver's
    loop), and two K blocks over several A blocks (K inside each panel), edge rows and an edge panel, each
    output dtype with a bias, bit for bit."""
    blk8 = _C.gemm_blocking(True)
    n = 3 * blk8["nr"] + 5
    bias = rand(rng, (n,), torch.float32)
    for m, k in ((200, blk8["kc"]), (2 * blk8["mc"] + 37, 2 * blk8["kc"])):
        a8, b8 = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
        for out_dtype in FLOAT_DTYPES:
            assert_scaled_exact(rng, a8, b8, bias, out_dtype)


@pytest.mark.parametrize("rows_last", range(1, 12))
def test_last_row_tile_every_height(isa, rng, rows_last):
    """A last row tile of every height below the register tile's 12 rows (the AVX-512 kernels compute
    4, 8 or 12 rows of it in place when its columns are full), beside full tiles and a column edge,
    over two K blocks (partial sums carried), with a bias: float32 / bfloat16 / float16 inputs into
    each output dtype, int8 exact and scaled."""
    m, k, n = 12 + rows_last, 2 * BLK["kc"] + 5, 2 * BLK["nr"] + 3
    bias = rand(rng, (n,), torch.float32)
    for in_dtype in FLOAT_DTYPES:
        a, b = rand(rng, (m, k), in_dtype), rand(rng, (k, n), in_dtype)
        for out_dtype in FLOAT_DTYPES:
            assert_close(lc.gemm(a, b, bias=bias, out_dtype=out_dtype), a, b, bias, out_dtype)
    k8 = 2 * BLK8["kc"] + 5
    a8, b8 = rand_i8(rng, (m, k8)), rand_i8(rng, (k8, n))
    assert_int_exact(lc.gemm(a8, b8), a8, b8)
    sa = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=m).astype(np.float32))
    sb = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=n).astype(np.float32))
    for out_dtype in FLOAT_DTYPES:
        out = lc.scaled_gemm(qt(a8, sa, 0), qt(b8, sb, 1), bias=bias, out_dtype=out_dtype)
        assert torch.equal(out, scaled_reference(a8, b8, sa, sb, bias, out_dtype))


@pytest.mark.parametrize("shape", [(2 * BLK["mc"] + 5, BLK["kc"] + 9, 3 * BLK["nr"] + 7),   # tall: rows split
                                   (7, BLK["kc"] + 9, 9 * BLK["nr"] + 3),                  # wide: columns split
                                   (1, 1100, 3000), (3000, 1100, 1)],                      # matrix-vector
                         ids=["tall", "wide", "row", "column"])
def test_thread_count_bitwise(isa, rng, shape):
    """Tiles and K blocks do not depend on the thread count, so neither do the bits."""
    m, k, n = shape
    a, b = rand(rng, (m, k), torch.float32), rand(rng, (k, n), torch.float32)
    ai, bi = rand_i8(rng, (m, 2 * k)), rand_i8(rng, (2 * k, n))
    bias = rand(rng, (n,), torch.float32)
    sa = torch.from_numpy(rng.uniform(0.01, 0.1, size=m).astype(np.float32))
    sb = torch.from_numpy(rng.uniform(0.01, 0.1, size=n).astype(np.float32))
    before = lc.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            lc.set_num_threads(nt)
            outs.append((lc.gemm(a, b, bias=bias), lc.gemm(a.bfloat16(), b.bfloat16(), out_dtype=torch.bfloat16),
                         lc.gemm(ai, bi), lc.scaled_gemm(qt(ai, sa, 0), qt(bi, sb, 1), bias=bias,
                                                         out_dtype=torch.float16)))
    finally:
        lc.set_num_threads(before)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_threads_share_work(isa, rng):
    """A thread that falls behind (its core busy) leaves A blocks of its unit to the others
    (GemmUnitShare in gemm_driver.h), forced here: the first unit's thread sleeps before its first K
    block's blocks (_C.gemm_share_testing), which the other thread then runs, and the second K block's
    are run by both. Bits equal to one thread's, with the partial sums of two K blocks in the output
    (float32), in the owner's workspace (bfloat16 out), int32 sums and scaled_gemm's epilogue, and in
    one K block (the AMX row loop), with K inside each B panel (the AMX K-inside loop: B packed once,
    sums across K chunks in the running thread's workspace); products split by rows (every unit the
    same B) and by columns (each its own, which the others must read), and batches of two units a
    thread; and blocks were taken, wherever the table runs a packed macro-loop."""
    m = 2 * 1020 + 41  # every blocking's mc is at most 1020 rows: each thread's half is several A blocks
    blk, blk8 = _C.gemm_blocking(False, rows=m), _C.gemm_blocking(True, rows=m)
    k, k8, n = blk["kc"] + 9, blk8["kc"] + 5, 3 * blk["nr"] + 7  # two K blocks; rows > columns: rows split
    a, b = rand(rng, (m, k), torch.float32), rand(rng, (k, n), torch.float32)
    ai, bi = rand_i8(rng, (m, k8)), rand_i8(rng, (k8, n))
    bias = rand(rng, (n,), torch.float32)
    sa = torch.from_numpy(rng.uniform(0.01, 0.1, size=m).astype(np.float32))
    sb = torch.from_numpy(rng.uniform(0.01, 0.1, size=n).astype(np.float32))

    a16, b16 = a.bfloat16(), b.bfloat16()
    k1, k2 = blk["kc"] // 2, blk["kc"] - 7  # one K block (AMX: its row loop, A in place / packed)
    # No wider than tall, a product is split by rows and every unit holds the same B; split by columns,
    # the units' B differ, and the others must read the owner's.
    m3 = max(blk["mc"], 256) + 2 * blk["mr"] + 5
    n3 = m3 + 2 * blk["nr"] + 3
    a3, b3 = rand(rng, (m3, k), torch.float32), rand(rng, (k, n3), torch.float32)
    # Split by columns with K inside each B panel (AMX: B packed for all of K), over two K chunks where
    # the table has chunks (the sums between them in the running thread's workspace), and int8.
    kk = max(blk["kchunk"], blk["kc"]) + 9
    a3k, b3k = rand(rng, (m3, kk), torch.bfloat16), rand(rng, (kk, n3), torch.bfloat16)
    ai3, bi3 = rand_i8(rng, (m3, k8)), rand_i8(rng, (k8, n3))
    # Two units a thread (batches, each its own B): an owner waits for the blocks others took before
    # it packs its next unit's B.
    a4, b4 = rand(rng, (4, m3, k), torch.float32), rand(rng, (4, k, 2 * blk["nr"] + 3), torch.float32)
    a4k, b4k = rand(rng, (4, m3, kk), torch.bfloat16), rand(rng, (4, kk, blk["nr"] + 5), torch.bfloat16)

    def products():
        return (lc.gemm(a, b, bias=bias), lc.gemm(a16, b16, out_dtype=torch.bfloat16),
                lc.gemm(a.t().contiguous().t(), b.t().contiguous().t()), lc.gemm(ai, bi),
                lc.scaled_gemm(qt(ai, sa, 0), qt(bi, sb, 1), bias=bias, out_dtype=torch.float16),
                lc.gemm(a16[:, :k1], b16[:k1]), lc.gemm(a16[:, :k2], b16[:k2].t().contiguous().t()),
                lc.gemm(a3, b3), lc.gemm(a3[:, :k1].bfloat16(), b3[:k1].bfloat16()),
                lc.gemm(a3k, b3k, out_dtype=torch.bfloat16), lc.gemm(ai3, bi3), lc.gemm(a4, b4), lc.gemm(a4k, b4k))

    before = lc.get_num_threads()
    try:
        lc.set_num_threads(1)
        alone = products()
        lc.set_num_threads(2)
        _C.gemm_share_testing(20000)
        shared = products()
        taken = _C.gemm_share_testing(0)
    finally:
        _C.gemm_share_testing(0)
        lc.set_num_threads(before)
    for x, y in zip(alone, shared):
        assert torch.equal(x, y)
    assert taken > 0 or isa == "scalar", f"{isa}: no A block was taken by the other thread"


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float32)], ids=["f32", "bf16", "f16-f32"])
def test_matrix_vector(isa, threads, rng, in_dtype, out_dtype):
    """m == 1 and n == 1 (the unpacked matrix-vector path): B row-contiguous, column-contiguous
    (a transposed weight) and fully strided; K and N with tails of every vector width."""
    for k, n in [(1, 1), (7, 9), (37, 3 * 256 + 13), (1030, 40)]:
        x = rand(rng, (1, k), in_dtype)
        w = rand(rng, (n, k), in_dtype)
        bias = rand(rng, (n,), torch.float32)
        for b in (w.t().contiguous(), w.t(), rand(rng, (2 * k, 3 * n), in_dtype)[::2, ::3]):
            assert_close(lc.gemm(x, b, bias=bias, out_dtype=out_dtype), x, b, bias, out_dtype)
        # n == 1: A @ column, A row-major, transposed and strided
        col = rand(rng, (k, 1), in_dtype)
        b1 = rand(rng, (1,), torch.float64)
        for a in (w, w.t().contiguous().t(), rand(rng, (2 * n, 2 * k), in_dtype)[::2, 1::2]):
            assert_close(lc.gemm(a, col, bias=b1, out_dtype=out_dtype), a, col, b1, out_dtype)
    xb = rand(rng, (3, 1, 50), in_dtype)       # batched rows, each with its own matrix
    wb = rand(rng, (3, 300, 50), in_dtype).transpose(1, 2)
    assert_close(lc.gemm(xb, wb, out_dtype=out_dtype), xb, wb, out_dtype=out_dtype)
    ab, cb = rand(rng, (3, 70, 50), in_dtype), rand(rng, (3, 50, 1), in_dtype)
    assert_close(lc.gemm(ab, cb, out_dtype=out_dtype), ab, cb, out_dtype=out_dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=["f32", "f16-f32", "f32-bf16", "bf16"])
def test_few_rows_times_row_major_b(isa, threads, rng, in_dtype, out_dtype):
    """2-5 rows of A times a row-major B (the matrix-vector path takes float32 / float16 up to 4 rows,
    each row as its own matrix-vector product): K with a tail of the 4-row passes, N with tails of the
    8-column vectors and of the 64-column chunks, B a column slice of a wider matrix, A strided, bias,
    batches. Where the path takes the product its rows are the one-row products' bits."""
    taken = (in_dtype != torch.bfloat16 and isa != "scalar") or isa == "avx2"
    for m, k, n in [(2, 1, 9), (2, 7, 300), (3, 130, 65), (4, 37, 3 * 256 + 13), (4, 1030, 40), (5, 64, 70)]:
        bias = rand(rng, (n,), torch.float32)
        for a in (rand(rng, (m, k), in_dtype), rand(rng, (m, 2 * k), in_dtype)[:, ::2]):
            for b in (rand(rng, (k, n), in_dtype), rand(rng, (k, n + 5), in_dtype)[:, 2:n + 2]):
                out = lc.gemm(a, b, bias=bias, out_dtype=out_dtype)
                assert_close(out, a, b, bias, out_dtype)
                if taken and m <= 4:
                    rows = torch.cat([lc.gemm(a[i:i + 1], b, bias=bias, out_dtype=out_dtype) for i in range(m)])
                    assert torch.equal(out, rows)
    ab, bb = rand(rng, (3, 3, 90), in_dtype), rand(rng, (3, 90, 70), in_dtype)
    assert_close(lc.gemm(ab, bb, out_dtype=out_dtype), ab, bb, out_dtype=out_dtype)
    assert_close(lc.gemm(ab, bb[0], out_dtype=out_dtype), ab, bb[0], out_dtype=out_dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=["f32", "f16-f32", "f32-bf16", "bf16"])
def test_few_rows_times_w_t(isa, threads, rng, in_dtype, out_dtype):
    """2-9 rows of A times B = W^T (x @ W^T: B's columns contiguous). The AVX2 table takes up to 8 rows
    on the matrix-vector path in blocks of 1-4 rows x 4 / 3 / 2 / 1 columns, each output a dot product:
    K with a tail of the 8-element vectors, N with tails of every column block, W a slice of a wider
    matrix (its rows further apart), A strided, bias, batches. Where the path takes the product its
    rows are the one-row products' bits."""
    taken = isa == "avx2"
    for m, k, n in [(2, 1, 9), (2, 7, 6), (3, 130, 65), (4, 37, 3 * 64 + 3), (5, 300, 41), (6, 64, 7),
                    (7, 8, 33), (8, 1030, 18), (9, 129, 20)]:
        bias = rand(rng, (n,), torch.float32)
        for a in (rand(rng, (m, k), in_dtype), rand(rng, (m, 2 * k), in_dtype)[:, ::2]):
            for w in (rand(rng, (n, k), in_dtype), rand(rng, (n, k + 5), in_dtype)[:, 2:k + 2]):
                out = lc.gemm(a, w.t(), bias=bias, out_dtype=out_dtype)
                assert_close(out, a, w.t(), bias, out_dtype)
                if taken and m <= 8:
                    rows = torch.cat([lc.gemm(a[i:i + 1], w.t(), bias=bias, out_dtype=out_dtype) for i in range(m)])
                    assert torch.equal(out, rows)
    ab, wb = rand(rng, (3, 5, 90), in_dtype), rand(rng, (3, 70, 90), in_dtype)
    assert_close(lc.gemm(ab, wb.transpose(1, 2), out_dtype=out_dtype), ab, wb.transpose(1, 2), out_dtype=out_dtype)
    assert_close(lc.gemm(ab, wb[0].t(), out_dtype=out_dtype), ab, wb[0].t(), out_dtype=out_dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=["f32", "bf16", "bf16-f32", "f32-f16"])
def test_few_rows_times_transposed_weight(isa, threads, rng, in_dtype, out_dtype):
    """x @ W^T with few rows (nn.Linear's forward at a small batch; on AVX-512 the unpacked small-M
    path): rows around its 8-row and 48-row limits (on the AMX and avx512-bf16fma tables 16 for
    float32, and 32 for bf16 on the latter) and its blocks of 2 and 4 rows, K with tails of the 16- and
    32-element vectors, N not a multiple of a block's 12, 6 or 3 W rows, bias, batches; bits independent
    of the thread count, and on the AVX-512 tables of the block a row is in."""
    for m, k, n in [(2, 128, 3), (2, 300, 29), (3, 200, 13), (4, 161, 25), (5, 140, 8), (7, 129, 40), (9, 161, 37),
                    (16, 97, 11), (17, 150, 9), (31, 300, 5), (32, 161, 13), (33, 130, 10), (48, 1030, 64),
                    (49, 200, 7)]:
        x, w = rand(rng, (m, k), in_dtype), rand(rng, (n, k), in_dtype)
        bias = rand(rng, (n,), torch.float32)
        assert_close(lc.gemm(x, w.t(), bias=bias, out_dtype=out_dtype), x, w.t(), bias, out_dtype)
    for rows in (2, 3, 5, 13):   # batches of a 2- and a 4-row block, one row group, two (A packed from 9 rows)
        xb, wb = rand(rng, (3, rows, 256), in_dtype), rand(rng, (3, 20, 256), in_dtype).transpose(1, 2)
        assert_close(lc.gemm(xb, wb, out_dtype=out_dtype), xb, wb, out_dtype=out_dtype)
    # W of 5 and of 9 groups of 64 rows (the AMX in-place path takes W from 8), 11 rows, 6, 4 and 2 (the
    # AVX-512 few-rows kernel's 8-, 4- and 2-row blocks)
    for m, n in [(11, 301), (6, 301), (6, 520), (2, 301), (4, 301)]:
        x, w = rand(rng, (m, 700), in_dtype), rand(rng, (n, 700), in_dtype)
        before = lc.get_num_threads()
        try:
            outs = []
            for nt in (1, 2, 3):
                lc.set_num_threads(nt)
                outs.append(lc.gemm(x, w.t(), out_dtype=out_dtype))
        finally:
            lc.set_num_threads(before)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # The few-rows kernel's 2-, 4- and 8-row blocks (the last with A packed from 9 rows) do each output's
    # arithmetic alike: the rows of a product of 2 or 4 rows are those rows' bits in one of 8 and of 16.
    if _C.gemm_kernels_name() in AVX512_TABLES:
        x, w = rand(rng, (16, 333), in_dtype), rand(rng, (29, 333), in_dtype)
        full = lc.gemm(x, w.t(), out_dtype=out_dtype)
        for rows in (2, 4, 8):
            assert torch.equal(lc.gemm(x[:rows], w.t(), out_dtype=out_dtype), full[:rows])


def packed_path(x, b, **kw):
    """lc.gemm(x, b) on the AMX tables' packed path: b copied row-major, x given at least 17 rows (up to 16
    rows a row-major B is read in place, in another k order); an output row does not depend on the others."""
    xp = torch.cat([x, x[:1].expand(17 - x.shape[0], -1)]) if x.shape[0] < 17 else x
    return lc.gemm(xp, b.contiguous(), **kw)[: x.shape[0]]


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=NAME.get)
def test_few_rows_w_read_in_place(isa, threads, rng, in_dtype):
    """x @ W^T up to 64 rows, or 128 with a large W (the AMX tables: the product transposed, W's tiles
    loaded from W in place, x^T packed; groups of 64 W rows up to 16 rows of x, of 32 beyond, in blocks
    of 32 rows of x): rows around the 16-row B tile, the 32-row blocks and the 64-row limit, W rows with a group tail, K with a 32-element step tail, W a column slice of a
    wider matrix (rows further apart than K), x strided along k, batches with a broadcast W; every output
    dtype with a bias. On the AMX tables the bits are the packed path's (packed_path: the same products in
    the same k order)."""
    amx_table = isa in ("amx", "amx-model")
    for m, k, n in [(2, 64, 64), (16, 33, 130), (16, 33, 517), (17, 96, 31), (32, 1, 64), (32, 513, 97), (33, 64, 40),
                    (40, 70, 263), (64, 65, 33), (65, 64, 40)]:
        x, w = rand(rng, (m, k), in_dtype), rand(rng, (n, k + 5), in_dtype)[:, :k]
        bias = rand(rng, (n,), torch.float32)
        for out_dtype in FLOAT_DTYPES:
            out = lc.gemm(x, w.t(), bias=bias, out_dtype=out_dtype)
            assert_close(out, x, w.t(), bias, out_dtype)
            if amx_table:
                assert torch.equal(out, packed_path(x, w.t(), bias=bias, out_dtype=out_dtype))
    if in_dtype == torch.bfloat16:   # 65-128 rows where W is at least 4 L2 and x^T within half of L2
        l2 = lc.info()["cache_bytes"]["l2"]
        k = max(64, l2 // (4 * 128) // 32 * 32)
        n = 4 * l2 // (2 * k) + 31
        x, w = rand(rng, (100, k), in_dtype), rand(rng, (n, k), in_dtype)
        out = lc.gemm(x, w.t())
        assert_close(out, x, w.t())
        if amx_table:
            assert torch.equal(out, packed_path(x, w.t()))
    xt = rand(rng, (200, 12), in_dtype).t()   # x strided along k
    w = rand(rng, (70, 200), in_dtype)
    assert_close(lc.gemm(xt, w.t()), xt, w.t())
    xb, wb = rand(rng, (3, 20, 160), in_dtype), rand(rng, (3, 67, 160), in_dtype).transpose(1, 2)
    assert_close(lc.gemm(xb, wb), xb, wb)
    assert_close(lc.gemm(xb, wb[0]), xb, wb[0])   # W broadcast over the batch


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=NAME.get)
def test_few_rows_row_major_b_read_in_place(isa, threads, rng, in_dtype):
    """x @ W with W row-major (in, out) up to 16 rows (the AMX tables: B's rows loaded as the B tiles, x as
    even / odd zero-interleaved pairs, K in chunks of 64 rows of B): column groups with a tail, K with a
    16-row step tail, B a column slice (rows further apart than N), x strided along k, batches and a
    broadcast B, every output dtype with a bias; the narrow B of the last shape does not take it. A
    non-finite B value must not spill into its neighbour column (the path re-runs such a call)."""
    for m, k, n in [(2, 64, 600), (8, 33, 517), (16, 130, 640), (16, 1, 515), (5, 300, 70)]:
        x, w = rand(rng, (m, k), in_dtype), rand(rng, (k, n + 3), in_dtype)[:, :n]
        bias = rand(rng, (n,), torch.float32)
        for out_dtype in FLOAT_DTYPES:
            assert_close(lc.gemm(x, w, bias=bias, out_dtype=out_dtype), x, w, bias, out_dtype)
    xt, w = rand(rng, (200, 12), in_dtype).t(), rand(rng, (200, 520), in_dtype)   # x strided along k
    assert_close(lc.gemm(xt, w), xt, w)
    xb, wb = rand(rng, (3, 10, 96), in_dtype), rand(rng, (3, 96, 520), in_dtype)
    assert_close(lc.gemm(xb, wb), xb, wb)
    assert_close(lc.gemm(xb, wb[0]), xb, wb[0])   # B broadcast over the batch
    x, w = rand(rng, (8, 64), in_dtype), rand(rng, (64, 600), in_dtype)
    w[3, 5], w[7, 100] = float("inf"), float("nan")
    out, want = lc.gemm(x, w, out_dtype=torch.float32), t64(x) @ t64(w)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(out[finite].double(), want[finite], rtol=1e-2, atol=1e-2)


def test_few_rows_int8_w_read_in_place(isa, threads, rng):
    """The int8 GEMM and scaled_gemm with x @ W^T of few rows, W read in place (the AMX tables: W's tiles,
    x^T packed as k quads, up to 64 rows; the AVX2 / AVX-512 tables: the matrix-vector path's dot
    products, up to 8 rows, in blocks of 1-4 rows x 4 / 3 / 2 / 1 W rows), and A times one column:
    exact int32 sums and the scaled epilogue bit for bit, with row / K (16-element steps) / W-row tails,
    a W column slice, strided A, batches and the -128 extremes; on the AMX tables the int32 sums equal
    the packed path's."""
    amx_table = isa in ("amx", "amx-model")
    for m, k, n in [(1, 64, 64), (2, 15, 9), (3, 17, 7), (4, 33, 6), (5, 65, 517), (6, 257, 5), (8, 16, 11),
                    (9, 31, 13), (16, 130, 64), (17, 64, 263), (40, 200, 300), (64, 1, 257)]:
        a, w = rand_i8(rng, (m, k)), rand_i8(rng, (n, k + 3))[:, :k]
        out = lc.gemm(a, w.t())
        assert_int_exact(out, a, w.t())
        if amx_table:
            assert torch.equal(out, lc.gemm(a, w.t().contiguous()))
        bias = rand(rng, (n,), torch.float32)
        assert_scaled_exact(rng, a, w.t(), bias, torch.bfloat16)
        a_strided = rand_i8(rng, (m, 2 * k))[:, ::2]
        assert_int_exact(lc.gemm(a_strided, w.t()), a_strided, w.t())
        a_min, w_min = torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)
        assert_int_exact(lc.gemm(a_min, w_min.t()), a_min, w_min.t())
    for m, k in [(1, 1), (7, 16), (70, 33), (300, 1030)]:                 # A times one column
        a, col = rand_i8(rng, (m, k)), rand_i8(rng, (k, 1))
        assert_int_exact(lc.gemm(a, col), a, col)
        assert_scaled_exact(rng, a, col, rand(rng, (1,), torch.float32), torch.float32)
    a3, w3 = rand_i8(rng, (3, 2, 40)), rand_i8(rng, (3, 21, 40))            # batches of few rows
    assert_int_exact(lc.gemm(a3, w3.transpose(1, 2)), a3, w3.transpose(1, 2))
    assert_int_exact(lc.gemm(a3, w3[0].t()), a3, w3[0].t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_batched_and_broadcast(isa, threads, rng, dtype):
    def mk(shape):
        return rand_i8(rng, shape) if dtype == torch.int8 else rand(rng, shape, dtype)

    check = assert_int_exact if dtype == torch.int8 else assert_close
    a3, b3, b2 = mk((3, 9, 70)), mk((3, 70, 21)), mk((70, 21))
    check(lc.gemm(a3, b3), a3, b3)
    check(lc.gemm(a3, b2), a3, b2)                                     # broadcast b, merged rows
    a3p = mk((9, 3, 70)).permute(1, 0, 2)                              # batches do not stack as rows
    check(lc.gemm(a3p, b2), a3p, b2)
    b3e = b2.unsqueeze(0).expand(3, 70, 21)                            # stride-0 batch given directly
    check(lc.gemm(a3p, b3e), a3p, b3e)
    a1 = mk((4, 1, 70))                                                # M == 1 rows
    check(lc.gemm(a1, b2), a1, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8], ids=str)
def test_views(isa, threads, rng, dtype):
    """Transposed, sliced, expanded (stride 0) and permuted views, consumed without copies."""
    def mk(shape):
        return rand_i8(rng, shape) if dtype == torch.int8 else rand(rng, shape, dtype)

    check = assert_int_exact if dtype == torch.int8 else assert_close
    m, k, n = 29, 301, 35                          # k: odd, so pair and quad packing have tails
    at, bt = mk((k, m)).t(), mk((n, k)).t()
    check(lc.gemm(at, bt), at, bt)
    a_s, b_s = mk((2 * m, 3 * k + 1))[::2, 1::3], mk((2 * k, 3 * n))[::2, ::3]
    assert not a_s.is_contiguous() and not b_s.is_contiguous()
    check(lc.gemm(a_s, b_s), a_s, b_s)
    a_e = mk((1, k)).expand(m, k)                  # every row the same storage
    b_e = mk((k, 1)).expand(k, n)
    check(lc.gemm(a_e, b_e), a_e, b_e)
    a_p = mk((k, 3, m)).permute(1, 2, 0)           # (3, m, k), unit stride nowhere near k
    check(lc.gemm(a_p, bt), a_p, bt)


# ---------------------------------------------------------------------------------------------
# NumPy inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.int8], ids=lambda d: np.dtype(d).name)
def test_numpy(isa, rng, np_dtype):
    def mk(shape):
        if np_dtype == np.int8:
            return rng.integers(-128, 128, size=shape, dtype=np.int8)
        return rng.standard_normal(shape).astype(np_dtype)

    a, b = mk((40, 90)), mk((90, 30))
    for x, y in [(a, b), (a[::2, ::3], b[::3, 1::2]), (a[::-1], b[:, ::-1]), (np.asfortranarray(a), b.T.copy().T)]:
        out = lc.gemm(x, y)
        assert isinstance(out, np.ndarray)
        if np_dtype == np.int8:
            assert out.dtype == np.int32
            np.testing.assert_array_equal(out, x.astype(np.int64) @ y.astype(np.int64))
        else:
            assert out.dtype == np_dtype
            assert_close(out, x, y)
    if np_dtype != np.int8:
        out = lc.gemm(a, b, out_dtype=np.float32, bias=np.ones(30, np.float64))
        assert out.dtype == np.float32
        assert_close(out, a, b, np.ones(30))
        assert isinstance(lc.gemm(a, torch.from_numpy(b)), np.ndarray)      # the kind of the first input
        assert isinstance(lc.gemm(torch.from_numpy(a), b), torch.Tensor)


# ---------------------------------------------------------------------------------------------
# Integer path
# ---------------------------------------------------------------------------------------------

def assert_int_exact(out, a, b):
    out_t = torch.as_tensor(out)
    assert out_t.dtype == torch.int32
    exact = t64(a).long() @ t64(b).long()   # |values| < 2^53: exact in float64 and int64
    assert torch.equal(out_t.long(), exact)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 17), (33, 2 * BLK8["kc"] + 1, 19), (BLK8["mc"] + 1, 64, 48)],
                         ids=lambda s: "x".join(map(str, s)))
def test_int8_exact(isa, threads, rng, shape):
    m, k, n = shape
    a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n))
    assert_int_exact(lc.gemm(a, b), a, b)
    assert_int_exact(lc.gemm(a, b, out_dtype=torch.int32), a, b)
    # extremes: -128 * -128 products everywhere, and sign-mixed extremes
    a_min = torch.full((m, k), -128, dtype=torch.int8)
    assert_int_exact(lc.gemm(a_min, torch.full((k, n), -128, dtype=torch.int8)), a_min, torch.full((k, n), -128, dtype=torch.int8))
    b_max = torch.full((k, n), 127, dtype=torch.int8)
    assert_int_exact(lc.gemm(a_min, b_max), a_min, b_max)


def test_int8_k_limit(isa, threads):
    k = INT8_MAX_K  # the largest K: every sum of -128 * -128 products still fits int32
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((k, 3), -128, dtype=torch.int8)
    b[:, 1] = 127
    b[::2, 2] = 127
    out = lc.gemm(a, b)
    assert out[0, 0].item() == k * 16384 == 2147467264
    assert_int_exact(out, a, b)
    # the same sums with B = W^T (the few-rows paths) and one column at a time (A times a column)
    assert torch.equal(lc.gemm(a, b.t().contiguous().t()), out)
    for j in range(3):
        assert torch.equal(lc.gemm(a, b[:, j:j + 1].contiguous())[:, 0], out[:, j])


# ---------------------------------------------------------------------------------------------
# scaled_gemm
# ---------------------------------------------------------------------------------------------

def qt(data, scale, axis):
    return lc.QTensor(data, scale, None, "int8", tuple(data.shape), axis)


def scaled_reference(a, b, sa, sb, bias, out_dtype):
    """The contract's float32 epilogue, evaluated op by op in NumPy float32 (no FMA)."""
    acc = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
    v = acc.astype(np.float32)
    v = v * sa.numpy().reshape(-1, 1).astype(np.float32)
    v = v * sb.numpy().reshape(1, -1).astype(np.float32)
    if bias is not None:
        v = v + bias.float().numpy()
    return torch.from_numpy(v).to(out_dtype)


def assert_scaled_exact(rng, a, b, bias, out_dtype):
    """scaled_gemm of int8 a, b with random per-row / per-column scales equals the contract's epilogue bit
    for bit."""
    sa = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=a.shape[0]).astype(np.float32))
    sb = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=b.shape[1]).astype(np.float32))
    out = lc.scaled_gemm(qt(a, sa, 0), qt(b, sb, 1), bias=bias, out_dtype=out_dtype)
    assert torch.equal(out, scaled_reference(a, b, sa, sb, bias, out_dtype))


@pytest.mark.parametrize("granularity", ["tensor-tensor", "row-column", "row-tensor", "tensor-column"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=NAME.get)
def test_scaled_gemm_bitwise(isa, threads, rng, granularity, out_dtype):
    for m, k, n, with_bias in [(1, 1, 1, False), (13, BLK8["kc"] + 5, 37, True), (40, 65, 17, False)]:
        a, b = rand_i8(rng, (m, k)), rand_i8(rng, (k, n)).t().contiguous().t()   # b as a transposed view
        ga, gb = granularity.split("-")
        sa = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=(m,) if ga == "row" else ()).astype(np.float32))
        sb = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=(n,) if gb == "column" else ()).astype(np.float32))
        bias = rand(rng, (n,), torch.float64) if with_bias else None
        out = lc.scaled_gemm(qt(a, sa, 0 if ga == "row" else None), qt(b, sb, 1 if gb == "column" else None),
                             bias=bias, out_dtype=out_dtype)
        want = scaled_reference(a, b, sa, sb, bias, out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert torch.equal(out, want)


@pytest.mark.parametrize("m,k,n", [(1, 5, 1), (15, 300, 40), (16, 64, 32), (33, 1030, 65), (100, 2049, 33),
                                   (70, 2 * BLK8["kc"] + 70, 70)])
def test_scaled_gemm_prepacked_b_is_bitwise_the_per_call_packing(isa, threads, rng, m, k, n):
    """B pre-packed once by the active table (gemm_int8_pack_b: QuantLinear w8a8's weight) gives the
    per-call packing's result bit for bit: the AVX2 / AVX-512 kernels' deep K blocks; on AMX (and the
    amx-model table) the tiles reading the AVX-512 layout in place from 16 rows, K tails that are no
    multiple of the 64-deep tile step included."""
    from lepton_core.backends import cpu

    codes = rand_i8(rng, (n, k))  # a weight (N, K); B = codes.t()
    a = rand_i8(rng, (m, k))
    sa = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=(m,)).astype(np.float32))
    sb = torch.from_numpy(rng.uniform(1e-3, 1e-1, size=(n,)).astype(np.float32))
    bias = torch.randn(n)
    addr = cpu._packed_b(codes)
    if addr == 0:
        assert _C.gemm_int8_packed_b_bytes(k, n)[1] == 0  # this table packs B in every call
        return
    for out_dtype in ("float32", "bfloat16"):
        want = cpu.scaled_gemm(a, codes.t(), sa, sb, bias, out_dtype)
        assert torch.equal(cpu.scaled_gemm(a, codes.t(), sa, sb, bias, out_dtype, b_packed=addr), want)


def test_scaled_gemm_numpy_and_default(rng):
    a = rng.integers(-128, 128, size=(9, 50), dtype=np.int8)
    b = rng.integers(-128, 128, size=(50, 11), dtype=np.int8)
    sa, sb = np.float32(0.02), rng.uniform(0.01, 0.1, size=11).astype(np.float32)
    out = lc.scaled_gemm(qt(a, np.asarray(sa), None), qt(b, sb, 1))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    want = scaled_reference(torch.from_numpy(a), torch.from_numpy(b), torch.tensor(sa), torch.from_numpy(sb),
                            None, torch.float32)
    np.testing.assert_array_equal(out, want.numpy())
    out16 = lc.scaled_gemm(qt(a, np.asarray(sa), None), qt(b, sb, 1), out_dtype=np.float16)
    assert out16.dtype == np.float16
    assert lc.scaled_gemm(qt(a, np.asarray(sa), None), qt(b, sb, 1), out_dtype=None).dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Kernel tables (csrc/cpu/gemm/gemm.cc: one table per ISA, one picker)
# ---------------------------------------------------------------------------------------------

def _table_for(level):
    """The table an ISA level should run: capped at this build and CPU (every level has a table; the
    avx512 level's is the one of its two that is not a testing table)."""
    best = _runtime.ISA_NAMES.index(_runtime.available_isas()[-1])
    name = _runtime.ISA_NAMES[min(level, best)]
    if name == "avx512":
        (name,) = [t for t in AVX512_TABLES if t not in MODEL_TABLES]
    return name


def test_avx512_tables_are_the_level_and_a_testing_table():
    """Where the CPU has the avx512 level, one of its two tables runs it and the other is a testing
    table; the bf16 probe of the widening table is the FMA's."""
    if "avx512" not in _runtime.available_isas():
        assert not set(AVX512_TABLES) & set(MODEL_TABLES)
        return
    assert len(set(AVX512_TABLES) & set(MODEL_TABLES)) == 1
    assert _C.gemm_kernels_name(_runtime.ISA_NAMES.index("avx512")) in AVX512_TABLES
    before = _runtime.cpu_isa()
    if "avx512-bf16fma" in MODEL_TABLES:
        _C.gemm_testing_table("avx512-bf16fma")
    else:
        _runtime._set_cpu_isa("avx512")
    try:
        assert _C.gemm_kernels_name() == "avx512-bf16fma"
        assert _C.gemm_peak_probe(3, 1, "bf16") == _C.gemm_peak_probe(3, 1, "float")
    finally:
        _C.gemm_testing_table("")
        _runtime._set_cpu_isa(before)


def test_kernel_table_follows_the_active_isa(isa):
    want = isa if isa in MODEL_TABLES else _table_for(_runtime.ISA_NAMES.index(isa))
    assert _C.gemm_kernels_name() == want
    # Only the SIMD levels' tables have a peak probe (not the scalar one, nor the tile model); the
    # blocking reported is the active packed kernels' tile (the scalar kernels do not block and
    # report the AVX2 tile's; the AMX tables their bf16 tiles').
    probe = _C.gemm_peak_probe(1, 1, "int8")
    if want in ("scalar", "amx-model"):
        assert probe is None
    else:
        assert probe > 0
    blk = _C.gemm_blocking(False)
    tile = {"avx512-bf16dot": (12, 32), "avx512-bf16fma": (12, 32), "amx": (32, 32), "amx-model": (32, 32)}
    tile = tile.get(want, (6, 16))
    assert (blk["mr"], blk["nr"]) == tile


def test_kernel_table_for_every_level():
    for level in range(len(_runtime.ISA_NAMES)):
        assert _C.gemm_kernels_name(level) == _table_for(level)


# ---------------------------------------------------------------------------------------------
# Empty dimensions
# ---------------------------------------------------------------------------------------------

def test_empty_dims(rng):
    for m, k, n in [(0, 5, 3), (4, 5, 0), (0, 0, 0)]:
        out = lc.gemm(torch.zeros(m, k), torch.zeros(k, n))
        assert out.shape == (m, n)
        assert lc.gemm(torch.zeros(2, m, k, dtype=torch.int8), torch.zeros(k, n, dtype=torch.int8)).shape == (2, m, n)
    bias = rand(rng, (3,), torch.float64)
    out = lc.gemm(torch.zeros(4, 0, dtype=torch.bfloat16), torch.zeros(0, 3, dtype=torch.bfloat16), bias=bias,
                  out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out, bias.float().to(torch.float16).expand(4, 3))  # zeros + bias, rounded once
    assert torch.equal(lc.gemm(torch.zeros(2, 4, 0), torch.zeros(2, 0, 3)), torch.zeros(2, 4, 3))
    zi = lc.gemm(torch.zeros(4, 0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8))
    assert zi.dtype == torch.int32 and torch.equal(zi, torch.zeros(4, 3, dtype=torch.int32))
    out = lc.scaled_gemm(qt(torch.zeros(4, 0, dtype=torch.int8), torch.tensor(0.5), None),
                         qt(torch.zeros(0, 3, dtype=torch.int8), torch.tensor(0.5), None), bias=bias)
    assert torch.equal(out, bias.float().expand(4, 3))
    e = lc.gemm(np.zeros((0, 3), np.float32), np.zeros((3, 2), np.float32))
    assert isinstance(e, np.ndarray) and e.shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# Errors: one message per contract clause, naming the op, the argument and what was received
# ---------------------------------------------------------------------------------------------

F = torch.zeros(4, 3)
G = torch.zeros(3, 2)
I8 = torch.zeros(4, 3, dtype=torch.int8)
J8 = torch.zeros(3, 2, dtype=torch.int8)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: lc.gemm([[1.0]], G), TypeError, r"lc\.gemm: a must be a torch\.Tensor or numpy\.ndarray, got list"),
    (lambda: lc.gemm(F, 3.0), TypeError, r"lc\.gemm: b must be .* got float"),
    (lambda: lc.gemm(F.double(), G.double()), TypeError, r"lc\.gemm: a must be .* got float64"),
    (lambda: lc.gemm(F.int(), G.int()), TypeError, r"lc\.gemm: a must be .* got int32"),
    (lambda: lc.gemm(F, G.half()), TypeError, r"lc\.gemm: a and b must share one dtype, got a float32 and b float16"),
    (lambda: lc.gemm(I8, G), TypeError, r"share one dtype, got a int8 and b float32"),
    (lambda: lc.gemm(torch.zeros(3), G), ValueError, r"lc\.gemm: a must be 2-D or 3-D .* got shape \(3,\)"),
    (lambda: lc.gemm(F, torch.zeros(1, 1, 3, 2)), ValueError, r"lc\.gemm: b must be 2-D or 3-D .* \(1, 1, 3, 2\)"),
    (lambda: lc.gemm(F, torch.zeros(5, 2)), ValueError, r"lc\.gemm: inner dimensions differ: a \(4, 3\) .* b \(5, 2\)"),
    (lambda: lc.gemm(F, torch.zeros(2, 3, 2)), ValueError, r"lc\.gemm: a 2-D a with a 3-D b .* \(4, 3\) .* \(2, 3, 2\)"),
    (lambda: lc.gemm(torch.zeros(2, 4, 3), torch.zeros(3, 3, 2)), ValueError,
     r"lc\.gemm: batch sizes differ: a \(2, 4, 3\) and b \(3, 3, 2\)"),
    (lambda: lc.gemm(F, G, bias=torch.zeros(3)), ValueError, r"lc\.gemm: bias must have shape \(2,\) .* got \(3,\)"),
    (lambda: lc.gemm(F, G, bias=torch.zeros(1, 2)), ValueError, r"lc\.gemm: bias must have shape \(2,\) .* \(1, 2\)"),
    (lambda: lc.gemm(F, G, bias=torch.zeros(2, dtype=torch.int32)), TypeError, r"lc\.gemm: bias must be float.* int32"),
    (lambda: lc.gemm(F, G, bias="x"), TypeError, r"lc\.gemm: bias must be a torch\.Tensor or numpy\.ndarray, got str"),
    (lambda: lc.gemm(F, G, out_dtype="float16"), TypeError, r"lc\.gemm: out_dtype must be a torch or NumPy dtype, got 'float16'"),
    (lambda: lc.gemm(F, G, out_dtype=torch.float64), TypeError, r"lc\.gemm: out_dtype must be one of .* got float64"),
    (lambda: lc.gemm(F, G, out_dtype=torch.int32), TypeError, r"lc\.gemm: out_dtype must be one of .* got int32"),
    (lambda: lc.gemm(F.numpy(), G.numpy(), out_dtype=torch.bfloat16), TypeError, r"lc\.gemm: out_dtype bfloat16 .* NumPy"),
    (lambda: lc.gemm(I8, J8, bias=torch.zeros(2)), ValueError, r"lc\.gemm: bias is not supported for int8 .* \(2,\)"),
    (lambda: lc.gemm(I8, J8, out_dtype=torch.float32), TypeError, r"lc\.gemm: out_dtype must be one of int32 .* got float32"),
    (lambda: lc.gemm(torch.zeros(1, INT8_MAX_K + 1, dtype=torch.int8), torch.zeros(INT8_MAX_K + 1, 1, dtype=torch.int8)),
     ValueError, r"lc\.gemm: K=131072 exceeds 131071"),
    (lambda: lc.gemm(F.to("meta"), G), ValueError, r"lc\.gemm: all tensors must be on one device, got a on meta, b on cpu"),
    (lambda: lc.gemm(np.zeros((4, 3), np.float64), G.numpy()), TypeError, r"lc\.gemm: a must be .* got float64"),
    (lambda: lc.gemm(np.zeros((4, 3), np.complex64), G.numpy()), TypeError, r"lc\.gemm: a has NumPy dtype complex64"),
    (lambda: lc.gemm(F.to_sparse(), G), ValueError, r"lc\.gemm: a must be a dense \(strided\) tensor, got layout torch\.sparse_coo"),
    (lambda: lc.gemm(F, G.to_sparse()), ValueError, r"lc\.gemm: b must be a dense \(strided\) tensor"),
    (lambda: lc.gemm(F, G, bias=torch.zeros(2).to_sparse()), ValueError, r"lc\.gemm: bias must be a dense"),
])
def test_gemm_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


QA = qt(I8, torch.tensor(0.5), None)
QB = qt(J8, torch.ones(2), 1)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: lc.scaled_gemm(I8, QB), TypeError, r"lc\.scaled_gemm: qa must be a lepton_core\.QTensor .* got torch\.Tensor"),
    (lambda: lc.scaled_gemm(QA, lc.QTensor(J8.view(torch.uint8), torch.tensor(1.0), torch.tensor(0, dtype=torch.int32),
                                           "uint8", (3, 2))), TypeError, r"lc\.scaled_gemm: qb must be an int8 QTensor, got format 'uint8'"),
    (lambda: lc.scaled_gemm(qt(I8, torch.ones(3), 1), QB), ValueError,
     r"lc\.scaled_gemm: qa must be quantized per-tensor or per-row \(axis=0\), got axis=1"),
    (lambda: lc.scaled_gemm(QA, qt(J8, torch.ones(3), 0)), ValueError, r"qb must be quantized per-tensor or per-column"),
    (lambda: lc.scaled_gemm(QA, lc.QTensor(J8, torch.ones(1), None, "int8", (3, 2), None, 32)), ValueError,
     r"qb must be quantized .* got block_size=32"),
    (lambda: lc.scaled_gemm(QA, qt(torch.zeros(5, 2, dtype=torch.int8), torch.tensor(1.0), None)), ValueError,
     r"lc\.scaled_gemm: inner dimensions differ: qa \(4, 3\) .* qb \(5, 2\)"),
    (lambda: lc.scaled_gemm(qt(I8, torch.ones(3), 0), QB), ValueError, r"qa\.scale must have 4 element\(s\) .* got shape \(3,\)"),
    (lambda: lc.scaled_gemm(QA, QB, bias=torch.zeros(3)), ValueError, r"lc\.scaled_gemm: bias must have shape \(2,\)"),
    (lambda: lc.scaled_gemm(QA, QB, out_dtype=torch.int32), TypeError, r"lc\.scaled_gemm: out_dtype must be one of .* got int32"),
    (lambda: lc.scaled_gemm(QA, QB, out_dtype="f16"), TypeError, r"lc\.scaled_gemm: out_dtype must be a torch or NumPy dtype, got 'f16'"),
    (lambda: lc.scaled_gemm(qt(I8.numpy(), np.float32(1.0), None), qt(J8.numpy(), np.float32(1.0), None),
                            out_dtype=torch.bfloat16), TypeError, r"out_dtype bfloat16 .* NumPy"),
    (lambda: lc.scaled_gemm(qt(torch.zeros(1, INT8_MAX_K + 1, dtype=torch.int8), torch.tensor(1.0), None),
                            qt(torch.zeros(INT8_MAX_K + 1, 1, dtype=torch.int8), torch.tensor(1.0), None)),
     ValueError, r"lc\.scaled_gemm: K=131072 exceeds 131071"),
    (lambda: lc.scaled_gemm(QA, QB, bias=torch.zeros(2).to_sparse()), ValueError, r"lc\.scaled_gemm: bias must be a dense"),
])
def test_scaled_gemm_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, autograd, torch.compile, meta
# ---------------------------------------------------------------------------------------------

def test_opcheck(rng):
    a, b = rand(rng, (5, 7), torch.float32), rand(rng, (7, 3), torch.float32)
    torch.library.opcheck(torch.ops.lepton.gemm.default, (a, b, rand(rng, (3,), torch.float32), torch.float32))
    a3 = rand(rng, (2, 5, 7), torch.bfloat16).requires_grad_()
    b2 = rand(rng, (7, 3), torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.lepton.gemm.default, (a3, b2, None, torch.float32))
    ai, bi = rand_i8(rng, (5, 7)), rand_i8(rng, (7, 3))
    torch.library.opcheck(torch.ops.lepton.gemm.default, (ai, bi, None, torch.int32))
    torch.library.opcheck(torch.ops.lepton.scaled_gemm.default,
                          (ai, bi, torch.rand(5), torch.rand(1), torch.rand(3), torch.float16))


@pytest.mark.parametrize("case", ["2d-bias", "3d", "3d-broadcast-bias64"])
def test_autograd_matches_torch(rng, case):
    a_shape, b_shape = {"2d-bias": ((6, 9), (9, 5)), "3d": ((2, 6, 9), (2, 9, 5)),
                        "3d-broadcast-bias64": ((3, 6, 9), (9, 5))}[case]
    a = rand(rng, a_shape, torch.float32).requires_grad_()
    b = rand(rng, b_shape, torch.float32).requires_grad_()
    bias = None
    if "bias" in case:
        bias = rand(rng, (5,), torch.float64 if "64" in case else torch.float32).requires_grad_()
    out = lc.gemm(a, b, bias=bias)
    assert out.grad_fn is not None
    g = rand(rng, tuple(out.shape), torch.float32)
    grads = torch.autograd.grad(out, [t for t in (a, b, bias) if t is not None], g)
    want_out = a.double() @ b.double() + (0 if bias is None else bias.double())
    want = torch.autograd.grad(want_out, [t for t in (a, b, bias) if t is not None], g.double())
    for got, w, t in zip(grads, want, (a, b, bias)):
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.linalg.vector_norm(got.double() - w) <= 1e-5 * torch.linalg.vector_norm(w)


def test_autograd_bf16_grad_dtypes(rng):
    a = rand(rng, (4, 8, 16), torch.bfloat16).requires_grad_()
    b = rand(rng, (16, 8), torch.bfloat16).requires_grad_()
    out = lc.gemm(a, b, out_dtype=torch.float32)
    out.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
    want_b = a.detach().double().reshape(-1, 16).t() @ torch.ones(32, 8, dtype=torch.float64)
    assert torch.linalg.vector_norm(b.grad.double() - want_b) <= 1e-2 * torch.linalg.vector_norm(want_b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: NAME[d])
def test_plain_call_matches_general_path(isa, rng, dtype):
    """The plain CPU call (lepton_core.gemm._plain_cpu_gemm: 2-D tensors, no bias, default out_dtype)
    calls the kernel itself: the same bits as the general path (out_dtype given), for contiguous,
    transposed, sliced and broadcast (stride 0) operands; calls it must not take return None."""
    gm = __import__("lepton_core.gemm", fromlist=["_plain_cpu_gemm"])
    base_a, base_b = rand(rng, (40, 70), dtype), rand(rng, (70, 90), dtype)
    cases = [(base_a[:13, :29], base_b[:29, :35]),                      # row-major slices
             (base_b[:29, :13].t(), base_a[:29, :35]),                  # transposed a
             (base_a[:13, :29], base_a[:35, :29].t()),                  # transposed b (W^T)
             (base_a[::3, ::2][:7, :33], base_b[::2, 1::3][:33, :17]),  # strided both ways
             (base_a[:1, :29].expand(9, 29), base_b[:29, :1].expand(29, 5))]  # stride 0
    for a, b in cases:
        got = lc.gemm(a, b)
        assert gm._plain_cpu_gemm(a, b) is not None
        want = lc.gemm(a, b, out_dtype=dtype)
        assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)
        assert torch.allclose(got.double(), ref(a, b).to(dtype).double(), rtol=2e-2, atol=2e-2)
    # Calls it must leave to the general path: gradients, a 3-D a, a bias, int8, mixed dtypes.
    a, b = cases[0]
    assert gm._plain_cpu_gemm(a.clone().requires_grad_(), b) is None
    assert gm._plain_cpu_gemm(a[None], b) is None
    assert gm._plain_cpu_gemm(rand_i8(rng, (4, 5)), rand_i8(rng, (5, 6))) is None
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert gm._plain_cpu_gemm(a, b.to(other)) is None
    assert gm._plain_cpu_gemm(a[:, :0], b[:0]) is None  # K = 0: the general path's zeros


def test_torch_compile_fullgraph(rng):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, bias):
        return torch.relu(lc.gemm(x, w, bias=bias, out_dtype=torch.float32)) * 2

    x, w = rand(rng, (2, 8, 16), torch.bfloat16), rand(rng, (16, 12), torch.bfloat16)
    bias = rand(rng, (12,), torch.float32)
    got = f(x, w, bias)
    want = torch.relu(lc.gemm(x, w, bias=bias, out_dtype=torch.float32)) * 2
    assert torch.equal(got, want)
    xg = x.clone().requires_grad_()
    f(xg, w, bias).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape

    g = torch.compile(lambda p, q: lc.gemm(p, q), fullgraph=True, dynamic=True, backend="aot_eager")
    for m in (3, 5, 9):  # one graph for every M
        p, q = rand(rng, (m, 7), torch.float32), rand(rng, (7, 4), torch.float32)
        assert torch.equal(g(p, q), lc.gemm(p, q))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def h(qa, qb, bias):
        return lc.scaled_gemm(qa, qb, bias=bias, out_dtype=torch.bfloat16) * 2

    ai, bi = rand_i8(rng, (8, 32)), rand_i8(rng, (32, 16))
    qa, qb = qt(ai, torch.rand(8) + 0.1, 0), qt(bi, torch.tensor(0.05), None)
    bias16 = rand(rng, (16,), torch.float32)
    assert torch.equal(h(qa, qb, bias16), lc.scaled_gemm(qa, qb, bias=bias16, out_dtype=torch.bfloat16) * 2)


def test_meta_and_fake_shapes():
    out = lc.gemm(torch.empty(2, 5, 7, device="meta", dtype=torch.bfloat16),
                  torch.empty(7, 3, device="meta", dtype=torch.bfloat16), out_dtype=torch.float16)
    assert out.device.type == "meta" and out.shape == (2, 5, 3) and out.dtype == torch.float16
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fa, fb = torch.empty(5, 7, dtype=torch.int8), torch.empty(7, 3, dtype=torch.int8)
        assert isinstance(fa, torch._subclasses.fake_tensor.FakeTensor)
        out = lc.gemm(fa, fb)
        assert out.shape == (5, 3) and out.dtype == torch.int32


def test_eager_bypasses_dispatcher_only_when_safe(rng):
    a, b = rand(rng, (3, 4), torch.float32), rand(rng, (4, 2), torch.float32)
    assert lc.gemm(a, b).grad_fn is None
    assert lc.gemm(a.requires_grad_(), b).grad_fn is not None
    with torch.no_grad():
        assert lc.gemm(a, b).grad_fn is None


def test_matches_torch_exactly_sized(rng):
    """A sanity anchor independent of our own reference helper: torch's float64 matmul."""
    a, b = rand(rng, (64, 64), torch.float32), rand(rng, (64, 64), torch.float32)
    got = lc.gemm(a, b).double()
    want = a.double() @ b.double()
    assert math.isclose(float((got - want).norm()), 0.0, abs_tol=1e-5 * float(want.norm()))
