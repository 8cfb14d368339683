"""The one table of element types and quantization formats on the Python side (torch-free).

Element types are named as torch names them ("float32", "bfloat16", "float8_e4m3fn"); every op
checks dtypes by these names, whichever kind of array (torch or NumPy) brought them, and passes the
native code the `lp_dtype` code. `Format` describes each quantization format once; the quantize
checks, the QTensor validation, the torch.library fakes and the tests all read it from here.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from . import _C

# lp_dtype codes, from the native module (csrc/common/codes.h).
DTYPE_CODES: Dict[str, int] = dict(_C.codes["dtype"])
FLOAT_NAMES = ("float32", "float16", "bfloat16")
FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
            "int64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantization format (API.md §2).

    name:        the format name users pass ("int8", ...)
    code:        its lp_qfmt code in the native kernels
    storage:     dtype name of QTensor.data for torch inputs (NumPy stores fp8 as "uint8" bit patterns)
    bits:        bits per element in storage (4: two elements per byte, low nibble first)
    qmax:        the largest code magnitude; scale = absmax / qmax (uint8: (hi - lo) / qmax)
    zero_point:  whether the format is asymmetric (an int32 zero point per group)
    stochastic:  whether rounding="stochastic" is allowed
    """

    name: str
    code: int
    storage: str
    bits: int
    qmax: float
    zero_point: bool
    stochastic: bool

    @property
    def numpy_storage(self) -> str:
        return "uint8" if self.storage in FP8_NAMES else self.storage

    def data_numel(self, n_elems: int) -> int:
        """Elements of QTensor.data for a tensor of n_elems values."""
        return (n_elems * self.bits + 7) // 8 if self.bits < 8 else n_elems


def _formats() -> Dict[str, Format]:
    table = {}
    for name, (code, storage, bits, qmax, zero_point, stochastic) in _C.codes["format"].items():
        table[name] = Format(name, code, storage, bits, float(qmax), bool(zero_point), bool(stochastic))
    return table


FORMATS: Dict[str, Format] = _formats()

# lp_reduce_op and lp_compression codes (csrc/common/codes.h).
REDUCE_OPS: Dict[str, int] = dict(_C.codes["reduce_op"])
COMPRESSIONS: Dict[Optional[str], int] = {None if k == "none" else k: v for k, v in _C.codes["compression"].items()}
# Block sizes of blockwise quantization and int8 compression: powers of two in this range.
MIN_BLOCK, MAX_BLOCK = _C.codes["block_limits"]
# int8 products are at most 128 * 128 = 2^14 in magnitude, so K * 2^14 < 2^31 keeps int32 exact.
INT8_MAX_K: int = _C.codes["int8_max_k"]
# Weight-quantized linear (csrc/cpu/qlinear/qlinear.h): scheme codes of the packed kernels, the width
# of the packed weight's column panels, and w4's group sizes (powers of two in this range).
QLINEAR_SCHEMES: Dict[str, int] = dict(_C.codes["qlinear_scheme"])
QLINEAR_PANEL: int = _C.codes["qlinear_panel"]
MIN_GROUP, MAX_GROUP = _C.codes["qlinear_group_limits"]


def format_by_code(code: int) -> Format:
    for f in FORMATS.values():
        if f.code == code:
            return f
    raise KeyError(code)
