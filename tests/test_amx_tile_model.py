"""The software AMX tile model (csrc/cpu/gemm/amx_tile_model.h) against the SDM's semantics, on small
hand-made cases, one instruction at a time through _C.gemm_amx_model_exec: configuration and its
faults, loads and stores with strides, the VNNI pair / quad layout of B, int8 signedness and
wrap-around, and the float32 order, DAZ and FTZ of tdpbf16ps / tdpfp16ps. The GEMM contract tests
run the AMX kernels on this model (the 'amx-model' table in tests/test_gemm.py)."""
import numpy as np
import pytest
import torch

from lepton_core import _C

pytestmark = pytest.mark.skipif("amx-model" not in _C.gemm_testing_tables(), reason="the tile model needs AVX2")


def config(shapes, palette=1, start_row=0):
    """The 64-byte ldtilecfg operand: shapes maps a tile number to (rows, colsb)."""
    c = np.zeros(64, np.uint8)
    c[0], c[1] = palette, start_row
    for t, (rows, colsb) in shapes.items():
        c[16 + 2 * t: 18 + 2 * t] = np.array([colsb], np.uint16).view(np.uint8)
        c[48 + t] = rows
    return c


def run(op, *args):
    """One instruction; returns the fault message ('' when none)."""
    return _C.gemm_amx_model_exec(op, [a.ctypes.data if isinstance(a, np.ndarray) else int(a) for a in args])


def ok(op, *args):
    fault = run(op, *args)
    assert fault == "", fault


@pytest.fixture(autouse=True)
def released():
    ok("tilerelease")
    yield
    ok("tilerelease")


def bf16(values):
    """bfloat16 bits (uint16) of exactly representable values."""
    return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def f32_bits(bits):
    return np.array(bits, np.uint32).view(np.float32)


def dot(op, a, b, c0, m, k_dw, n_dw):
    """Configures C = tmm0 (m x 4 n_dw bytes), A = tmm1 (m x 4 k_dw), B = tmm2 (k_dw x 4 n_dw), loads
    c0, a, b (contiguous rows), runs `op` tmm0, tmm1, tmm2 and returns C's bytes."""
    ok("ldtilecfg", config({0: (m, 4 * n_dw), 1: (m, 4 * k_dw), 2: (k_dw, 4 * n_dw)}))
    for t, x, row_bytes in ((0, c0, 4 * n_dw), (1, a, 4 * k_dw), (2, b, 4 * n_dw)):
        x = np.ascontiguousarray(x)
        assert x.nbytes == row_bytes * (m if t < 2 else k_dw)
        ok("tileloadd", t, x, row_bytes)
    ok(op, 0, 1, 2)
    out = np.zeros_like(np.ascontiguousarray(c0))
    ok("tilestored", 0, out, 4 * n_dw)
    return out


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def test_config_round_trip_and_release():
    cfg = config({0: (16, 64), 3: (5, 12), 7: (1, 4)}, start_row=0)
    ok("ldtilecfg", cfg)
    back = np.zeros(64, np.uint8)
    ok("sttilecfg", back)
    assert np.array_equal(back, cfg)
    ok("ldtilecfg", config({}, palette=0))  # palette 0: release
    ok("sttilecfg", back)
    assert not back.any()


@pytest.mark.parametrize("cfg,why", [
    (config({0: (16, 64)}, palette=2), "palette_id 2"),
    (config({0: (17, 64)}), "17 rows"),
    (config({1: (16, 68)}), "colsb 68"),
    (config({2: (0, 64)}), "both zero or both non-zero"),
    (config({2: (4, 0)}), "both zero or both non-zero"),
    (config({8: (16, 64)}), "beyond palette 1"),
], ids=["palette", "rows", "colsb", "rows-zero", "colsb-zero", "tile-8"])
def test_config_violations_raise_gp(cfg, why):
    fault = run("ldtilecfg", cfg)
    assert "ldtilecfg raises #GP" in fault and why in fault
    assert "not configured" in run("tilezero", 0)  # a faulting ldtilecfg configures nothing


def test_reserved_config_bytes_raise_gp():
    cfg = config({0: (16, 64)})
    cfg[5] = 1
    assert "reserved byte 5" in run("ldtilecfg", cfg)


@pytest.mark.parametrize("case", ["unconfigured", "tile-not-configured", "same-tiles", "k-mismatch", "n-mismatch",
                                  "m-mismatch", "colsb-not-dwords", "start-row"])
def test_instruction_faults_are_ud(case):
    buf = np.zeros(16 * 64, np.uint8)
    shapes = {0: (4, 16), 1: (4, 8), 2: (2, 16)}  # C 4 x 4 dwords, A 4 x 2, B 2 x 4: a valid chain
    if case == "unconfigured":
        fault = run("tileloadd", 0, buf, 64)
    else:
        if case == "tile-not-configured":
            shapes.pop(2)
        elif case == "k-mismatch":
            shapes[2] = (3, 16)
        elif case == "n-mismatch":
            shapes[2] = (2, 12)
        elif case == "m-mismatch":
            shapes[1] = (3, 8)
        elif case == "colsb-not-dwords":
            shapes[0] = (4, 15)
        elif case == "start-row":
            ok("ldtilecfg", config(shapes, start_row=4))
            assert "start_row 4 >= rows 4" in run("tileloadd", 0, buf, 64)
            return
        ok("ldtilecfg", config(shapes))
        fault = run("tdpbf16ps", 0, 1, 1 if case == "same-tiles" else 2)
    assert "#UD" in fault, (case, fault)


# ---------------------------------------------------------------------------------------------
# Data movement
# ---------------------------------------------------------------------------------------------

def test_load_store_strides_and_zeroing():
    src = np.arange(7 * 20, dtype=np.uint8)  # rows 20 bytes apart
    ok("ldtilecfg", config({3: (5, 12)}))
    ok("tileloadd", 3, src, 20)
    dst = np.full(5 * 16, 0xEE, np.uint8)    # stored 16 bytes apart: 4 untouched bytes per row
    ok("tilestored", 3, dst, 16)
    want = np.full((5, 16), 0xEE, np.uint8)
    want[:, :12] = src.reshape(7, 20)[:5, :12]
    assert np.array_equal(dst.reshape(5, 16), want)
    ok("tilezero", 3)
    ok("tilestored", 3, dst, 16)
    want[:, :12] = 0
    assert np.array_equal(dst.reshape(5, 16), want)


def test_start_row_resumes_a_load():
    src = np.arange(4 * 8, dtype=np.uint8) + 1
    ok("ldtilecfg", config({0: (4, 8)}, start_row=2))
    ok("tileloadd", 0, src, 8)              # rows 2, 3 only; rows 0, 1 zeroed; start_row back to 0
    out = np.full(4 * 8, 0xEE, np.uint8)
    ok("tilestored", 0, out, 8)
    assert np.array_equal(out.reshape(4, 8), np.vstack([np.zeros((2, 8), np.uint8), src.reshape(4, 8)[2:]]))


# ---------------------------------------------------------------------------------------------
# int8: quads, signedness, wrap-around
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,sa,sb", [("tdpbssd", True, True), ("tdpbsud", True, False), ("tdpbusd", False, True),
                                      ("tdpbuud", False, False)])
def test_int8_quads_layout_and_signedness(op, sa, sb):
    rng = np.random.default_rng(5)
    m, k, n = 3, 8, 5  # K = 8 bytes = 2 dwords per A row; B has k / 4 rows of n quads
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    a[0, :4] = [0x80, 0xFF, 0x7F, 0x01]
    b = rng.integers(0, 256, (k, n), dtype=np.uint8)
    b[:4, 0] = [0x80, 0xFF, 0x80, 0xFF]
    # B's VNNI layout: tile row r, dword n holds the bytes of k = 4r .. 4r + 3 of column n
    b_tile = b.reshape(k // 4, 4, n).transpose(0, 2, 1).copy()
    c0 = rng.integers(-1000, 1000, (m, n)).astype(np.int32)
    got = dot(op, a, b_tile, c0, m, k // 4, n)
    av = a.view(np.int8).astype(np.int64) if sa else a.astype(np.int64)
    bv = b.view(np.int8).astype(np.int64) if sb else b.astype(np.int64)
    want = c0 + av @ bv
    assert np.array_equal(got.astype(np.int64), want)


def test_int8_accumulation_wraps_mod_2_32():
    a = np.full((1, 4), 0xFF, np.uint8)  # unsigned 255
    b = np.full((4, 1), 0xFF, np.uint8)
    c0 = np.array([[2**31 - 1]], np.int32)
    got = dot("tdpbuud", a, b.reshape(1, 4), c0, 1, 1, 1)
    assert got[0, 0] == np.int32(np.int64(2**31 - 1 + 4 * 255 * 255 - 2**32))


# ---------------------------------------------------------------------------------------------
# bf16 / fp16: pairs, the two-lane order, DAZ and FTZ
# ---------------------------------------------------------------------------------------------

def pairs_b(b):
    """B (k x n, k even) in the VNNI pair layout: tile row r holds (b[2r, j], b[2r + 1, j]) per column."""
    k, n = b.shape
    return b.reshape(k // 2, 2, n).transpose(0, 2, 1).copy()


def test_bf16_pairs_layout():
    rng = np.random.default_rng(7)
    m, k, n = 3, 6, 4
    a = rng.integers(-8, 9, (m, k)).astype(np.float32)
    b = rng.integers(-8, 9, (k, n)).astype(np.float32)
    c0 = rng.integers(-8, 9, (m, n)).astype(np.float32)
    got = dot("tdpbf16ps", bf16(a), pairs_b(bf16(b)), c0, m, k // 2, n)
    assert np.array_equal(got, c0 + a @ b)  # small integers: exact in any order


def test_bf16_even_and_odd_lanes_sum_separately():
    # even elements: 2^24 then 1 (2^24 + 1 rounds to 2^24); odd: 1 then 1 (= 2); then 2^24 + 2.
    # Summing the four products in k order would give 2^24.
    a = bf16([[2.0**12, 1.0, 1.0, 1.0]])
    b = bf16([[2.0**12], [1.0], [1.0], [1.0]])
    got = dot("tdpbf16ps", a, pairs_b(b), np.zeros((1, 1), np.float32), 1, 2, 1)
    assert got[0, 0] == 2.0**24 + 2


def test_bf16_subnormal_inputs_and_accumulator_read_as_zero():
    a = np.array([[0x0001, 0]], np.uint16)             # the smallest bf16 subnormal (2^-133)
    b = pairs_b(bf16([[2.0**100], [0.0]]))
    assert dot("tdpbf16ps", a, b, np.zeros((1, 1), np.float32), 1, 1, 1)[0, 0] == 0.0
    c0 = f32_bits([[0x00400000]])                      # a subnormal accumulator (2^-127)
    assert dot("tdpbf16ps", bf16([[0.0, 0.0]]), pairs_b(bf16([[0.0], [0.0]])), c0, 1, 1, 1)[0, 0] == 0.0


def test_bf16_tiny_results_flush_to_zero_after_rounding():
    b = pairs_b(bf16([[2.0**-70], [0.0]]))
    out = dot("tdpbf16ps", bf16([[-(2.0**-70), 0.0]]), b, np.zeros((1, 1), np.float32), 1, 1, 1)
    assert out[0, 0] == 0.0   # -2^-140 (a float32 subnormal) is tiny: flushed
    # 2^-126 (2^-63 * 2^-63), then plus -3 * 2^-152: exactly 2^-126 - 1.5 * 2^-151. Rounded to 24
    # bits with unbounded exponent that is 2^-126 - 2^-150, tiny: flushed, although IEEE rounding
    # with subnormals gives 2^-126. With -2^-151 instead the 24-bit rounding ties to 2^-126: kept.
    for prod, want in ((-3 * 2.0**-152, 0.0), (-(2.0**-151), 2.0**-126)):
        a = bf16([[2.0**-63, 0.0, -prod * 2.0**52, 0.0]])
        b = pairs_b(bf16([[2.0**-63], [0.0], [-(2.0**-52)], [0.0]]))
        assert dot("tdpbf16ps", a, b, np.zeros((1, 1), np.float32), 1, 2, 1)[0, 0] == np.float32(want), prod


def test_fp16_subnormal_inputs_are_kept():
    a = np.array([[0x0001, 0]], np.uint16)             # the smallest fp16 subnormal, 2^-24
    b = pairs_b(np.array([[0x3C00], [0]], np.uint16))  # 1.0
    assert dot("tdpfp16ps", a, b, np.zeros((1, 1), np.float32), 1, 1, 1)[0, 0] == 2.0**-24
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 9, (2, 4)).astype(np.float16)
    y = rng.integers(-8, 9, (4, 3)).astype(np.float16)
    got = dot("tdpfp16ps", x.view(np.uint16), pairs_b(y.view(np.uint16)), np.ones((2, 3), np.float32), 2, 2, 3)
    assert np.array_equal(got, 1 + x.astype(np.float32) @ y.astype(np.float32))


def test_unknown_instruction_and_arity():
    with pytest.raises(ValueError, match="unknown instruction 'tdpxyz'"):
        run("tdpxyz", 0, 1, 2)
    with pytest.raises(ValueError, match="tileloadd takes 3 arguments"):
        run("tileloadd", 0)
