"""The weight-quantized linear kernels (csrc/cpu/qlinear, API.md §5) against a float64 product of the
dequantized weight, on every CPU ISA path, thread count, activation dtype and awkward shape.

Tolerance: the reference uses the exact dequantized weight and the activations already in their
dtype, so only the kernel's float32 accumulation and the final rounding are measured: API.md §1's
bound per output dtype (tests/tolerances.py). Outputs are poisoned (conftest.py).
"""
import pytest
import torch

from lepton_core import _C, _runtime
from lepton_core._qpack import pack_w4, pack_w8, quantize_w4, unpack
from lepton_core.backends import cpu
import lepton_core as lc
from conftest import isa_fixture_with
from tolerances import gemm_rel_norm_bound, rel_err as _rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel tables that are no ISA level: 'amx-model', the AMX bf16 kernels compiled against the software
# tile model (csrc/cpu/qlinear/qlinear_amx_model_avx2.cc), on every machine with AVX2; it sends bf16
# activations of every row count to the tile kernels.
MODEL_TABLES = _C.qlinear_testing_tables()


# conftest's levels plus the testing tables: every test here also runs the AMX kernels' logic.
isa = isa_fixture_with(MODEL_TABLES, _C.qlinear_testing_table, _C.qlinear_kernels_active_name)

# Row counts 1, 2, 3 and 12 + 3 reach the w8 kernels' two-chain form for few rows (odd and even K), the
# others the one-chain form and its remainders (with bf16 activations on AVX-512, 3 to 19 rows take the
# few-rows bf16 kernels: 8-row blocks and their remainders for w8); 300 rows of K 1030 span three of
# the float32 kernels' row chunks (half of L2 of float32 activations: 120 rows at this K on a 1 MiB L2).
SHAPES = [(1, 1, 1), (1, 7, 33), (2, 65, 40), (3, 64, 35), (7, 33, 257), (33, 257, 7), (13, 100, 70), (15, 129, 33),
          (257, 33, 33), (16, 1030, 65), (300, 1030, 40), (47, 65, 33), (48, 65, 33), (97, 129, 70)]
# 47 / 48 and 97 rows: either side of the float-GEMM path's row thresholds (w8 48, w4 96 on AVX-512)


def _name(dt):
    return str(dt).replace("torch.", "")


def _packed(scheme, w, group_size):
    """(codes, scale, zero) of w packed for the kernels."""
    if scheme == "w4":
        return pack_w4(*quantize_w4(w, group_size))
    q = lc.quantize(w, "int8", axis=0)
    return (*pack_w8(q.data, q.scale), None)


@pytest.mark.parametrize("scheme,group_size", [("w8", 0), ("w4", 32), ("w4", 64)])
@pytest.mark.parametrize("dt", DTYPES, ids=_name)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_dequantized_reference(rng, isa, threads, scheme, group_size, dt, m, k, n):
    w, x, bias = torch.randn(n, k), torch.randn(m, k).to(dt), torch.randn(n)
    codes, scale, zero = _packed(scheme, w, group_size)
    wd = unpack(scheme, codes, scale, zero, n, k, group_size).double()
    ref = x.double() @ wd.t() + bias.double()
    terms = x.double().abs() @ wd.abs().t()
    out = cpu.quant_linear(x, codes, scale, zero, bias, scheme, group_size, n)
    assert out.dtype == dt and out.shape == (m, n)
    assert _rel_err(out, ref, terms + bias.double().abs(), k) <= gemm_rel_norm_bound(_name(dt), k)
    # without bias, and the weight is the quantized one (nearest rounding: within half a step)
    out = cpu.quant_linear(x, codes, scale, zero, None, scheme, group_size, n)
    assert _rel_err(out, x.double() @ wd.t(), terms, k) <= gemm_rel_norm_bound(_name(dt), k)


@pytest.mark.parametrize("scheme,group_size", [("w8", 0), ("w4", 32), ("w4", 64), ("w4", 1024)])
@pytest.mark.parametrize("m,k,n", [(3, 64, 32), (7, 600, 33), (8, 2049, 31), (16, 96, 32), (17, 130, 40), (19, 601, 33),
                                   (20, 1030, 65), (31, 100, 33), (33, 1030, 65), (128, 257, 33), (257, 600, 7),
                                   (600, 2049, 7)])
def test_bf16_activations_many_rows(rng, isa, threads, scheme, group_size, m, k, n):
    """bf16 activations from 20 rows on take the bf16 k-pair kernels where the ISA has them (AVX-512):
    K odd, not a multiple of the group or of the 512-deep K block (group 1024 straddles blocks), odd
    N, row counts past multiples of the 12-row block, 600 rows of K 2049 past one 2 MiB row chunk
    (504 rows); 7, 8 and 19 rows take the few-rows bf16 kernels (w8 from 3 rows, in blocks of 8; w4 in
    blocks of 6; AVX-512), views and leading dims included. On AMX (and the amx-model table: every row
    count) the tile kernels from 3 rows: 32-row blocks and a last one of 16 or fewer (3, 16, 17, 31,
    33 rows), K that is no multiple of the 32-deep tile step (the zero tail), two row chunks at 600
    rows of K 2049 on a 2 MiB L2."""
    w, x, bias = torch.randn(n, k), torch.randn(m, k).to(torch.bfloat16), torch.randn(n)
    codes, scale, zero = _packed(scheme, w, group_size)
    wd = unpack(scheme, codes, scale, zero, n, k, group_size).double()
    for b in (bias, None):
        out = cpu.quant_linear(x, codes, scale, zero, b, scheme, group_size, n)
        ref = x.double() @ wd.t() + (b.double() if b is not None else 0.0)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert _rel_err(out, ref) <= gemm_rel_norm_bound("bfloat16", k)
    # a column-major view and leading dims are read through their strides (the copy into bf16 rows)
    for xv in (x.t().contiguous().t(), x.reshape(1, m, k)):
        out = cpu.quant_linear(xv, codes, scale, zero, bias, scheme, group_size, n)
        assert _rel_err(out.reshape(m, n), x.double() @ wd.t() + bias.double()) <= gemm_rel_norm_bound("bfloat16", k)


@pytest.mark.parametrize("scheme,group_size", [("w8", 0), ("w4", 32)])
def test_views_and_leading_dims(rng, isa, scheme, group_size):
    """Transposed and sliced activations and leading dims are read through their strides."""
    k, n = 70, 45
    w, bias = torch.randn(n, k), torch.randn(n)
    codes, scale, zero = _packed(scheme, w, group_size)
    wd = unpack(scheme, codes, scale, zero, n, k, group_size).double()
    base = torch.randn(3, k, 9)
    for x in (base[1].t(), torch.randn(9, 2 * k)[:, ::2], torch.randn(2, 3, 4, k)):
        out = cpu.quant_linear(x, codes, scale, zero, bias, scheme, group_size, n)
        ref = x.double() @ wd.t() + bias.double()
        assert out.shape == (*x.shape[:-1], n)
        assert _rel_err(out, ref) <= gemm_rel_norm_bound("float32", k)


# Where the float GEMM with a dequantizing B packer runs (QLinearKernels::float_gemm_min_rows_*).
FLOAT_GEMM_PATH = {"avx512": ("w8", "w4"), "amx": (), "avx2": ("w4",), "scalar": ()}


@pytest.mark.parametrize("scheme,group_size", [("w8", 0), ("w4", 32), ("w4", 64)])
def test_many_float32_rows_are_the_float_gemm_of_the_dequantized_weight(rng, isa, threads, scheme, group_size):
    """From the row threshold on, float32 activations run lc.gemm's float32 kernels with B dequantized
    while packed: bitwise lc.gemm(x, dequantize_weight().t()) (the same blocking and tiles), views and
    K past several K blocks included."""
    m, k, n = 300, 1100, 70
    w, bias = torch.randn(n, k), torch.randn(n)
    codes, scale, zero = _packed(scheme, w, group_size)
    wd = unpack(scheme, codes, scale, zero, n, k, group_size)
    for x in (torch.randn(m, k), torch.randn(k, m).t(), torch.randn(m, 2 * k)[:, ::2]):
        out = cpu.quant_linear(x, codes, scale, zero, bias, scheme, group_size, n)
        ref = x.double() @ wd.double().t() + bias.double()
        assert _rel_err(out, ref) <= gemm_rel_norm_bound("float32", k)
        if scheme in FLOAT_GEMM_PATH.get(isa, ()):
            assert torch.equal(out, lc.gemm(x, wd.t(), bias=bias))


@pytest.mark.parametrize("scheme", ["w8", "w4"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=_name)
@pytest.mark.parametrize("m", [1, 11, 12, 16, 33, 257])
def test_one_term_outputs_are_the_activation_exactly(rng, isa, threads, scheme, dt, m):
    """A weight with one code of 1 per output column (scale 1, zero point 0) makes each output one
    activation times 1: exact on every path, whatever the accumulation. On AMX (and the amx-model
    table) float32 / float16 activations from 16 (w8) / 12 (w4) rows take the bf16 tiles split into
    three / two bf16 pieces: any lost piece (the 16 low bits of a float32 significand) shows here. An
    inf or nan activation makes its row's outputs non-finite where the float64 reference's are (inf *
    0 is nan); w8 gives the same inf / nan, while w4 kernels that subtract the zero point times the
    group's activation sum after the products (all but the tiles) turn the row's inf into nan. (bf16
    activations are not exact here by design: AVX-512's few-rows w4 kernel multiplies by 128 + q and
    takes (128 + zero) times the group sum off, within the float32 bound but not one-term exact.)"""
    k, n = 70, 75
    x = (torch.randn(m, k) * torch.exp2(torch.randint(-20, 20, (m, k)).float())).to(dt)
    x[0, 3], x[-1, 5] = float("inf"), float("nan")
    q = torch.zeros(n, k, dtype=torch.int8)
    q[torch.arange(n), torch.arange(n) % k] = 1
    if scheme == "w8":
        codes, scale, zero = (*pack_w8(q, torch.ones(n)), None)
    else:
        codes, scale, zero = pack_w4(q.to(torch.uint8), torch.ones(n, 3), torch.zeros(n, 3, dtype=torch.uint8))
    out = cpu.quant_linear(x, codes, scale, zero, None, scheme, 32, n)
    ref = (x.double() @ q.double().t()).to(dt)
    assert torch.equal(out.isfinite(), ref.isfinite())
    fin = ref.isfinite() if scheme == "w4" else torch.ones_like(ref, dtype=torch.bool)
    torch.testing.assert_close(out[fin], ref[fin], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scheme,group_size", [("w8", 0), ("w4", 32)])
def test_thread_count_and_split_do_not_change_bits(rng, isa, scheme, group_size):
    """Threads take runs of 32-column panels from a counter (the row copy of the split path, runs of
    rows), so which thread runs a panel varies from call to call: every path's outputs are bitwise
    those of one thread at 2, 3 and 5 threads (1 and 7 rows: decode; 8 and 40 bf16 rows: the few-rows
    and many-rows bf16 kernels; 40 and 300 float32 rows: the float kernels, the split bf16 pieces or
    the float GEMM), on 37 panels, none left out (outputs poisoned)."""
    k, n = 300, 37 * 32 - 5
    w, bias = torch.randn(n, k), torch.randn(n)
    codes, scale, zero = _packed(scheme, w, group_size)
    wd = unpack(scheme, codes, scale, zero, n, k, group_size).double()
    before = lc.get_num_threads()
    try:
        for m, dt in ((1, torch.bfloat16), (7, torch.float32), (8, torch.bfloat16), (40, torch.bfloat16),
                      (40, torch.float32), (300, torch.float32)):
            x = torch.randn(m, k).to(dt)
            outs = []
            for nt in (1, 2, 3, 5):
                lc.set_num_threads(nt)
                outs.append(cpu.quant_linear(x, codes, scale, zero, bias, scheme, group_size, n))
            for nt, out in zip((2, 3, 5), outs[1:]):
                assert torch.equal(out, outs[0]), (m, dt, nt)
            assert _rel_err(outs[0], x.double() @ wd.t() + bias.double()) <= gemm_rel_norm_bound(_name(dt), k)
    finally:
        lc.set_num_threads(before)


def test_empty_k_and_empty_rows(rng, isa):
    """K == 0 is an empty sum (bias only); M == 0 an empty result."""
    bias = torch.randn(5)
    for scheme, g in (("w8", 0), ("w4", 32)):
        codes, scale, zero = _packed(scheme, torch.zeros(5, 0), 32)
        out = cpu.quant_linear(torch.randn(3, 0), codes, scale, zero, bias, scheme, g, 5)
        assert torch.equal(out, bias.expand(3, 5))
        assert cpu.quant_linear(torch.randn(0, 4), *_packed(scheme, torch.randn(5, 4), 32), None, scheme, g,
                                5).shape == (0, 5)


def test_kernel_table_follows_the_active_isa(isa):
    if isa in MODEL_TABLES:
        assert _C.qlinear_kernels_active_name() == isa
        return
    best = _runtime.ISA_NAMES.index(_runtime.available_isas()[-1])
    want = _runtime.ISA_NAMES[min(_runtime.ISA_NAMES.index(isa), best)]
    assert _C.qlinear_kernels_name() == want == _C.qlinear_kernels_active_name()
