"""lepton_core: mixed-precision GEMM, quantization and ring all-reduce kernels for training.

    import lepton_core as lc
    c = lc.gemm(a, b)                               # bf16/fp16/fp32 with fp32 accumulation, int8 -> int32
    q = lc.quantize(x, "int8", block_size=256)      # int8 / uint8 / int4 / fp8, tensor/channel/block
    x_hat = lc.dequantize(q)

See API.md for the contract. Importing never needs a GPU.
"""
from ._runtime import get_num_threads, info, set_num_threads
from ._version import __version__
from .qtensor import QTensor
from .gemm import gemm, scaled_gemm
from .quant import dequantize, quantize
from . import nn  # noqa: E402  (lc.nn.Linear, lc.nn.convert)

__all__ = [
    "QTensor",
    "dequantize",
    "gemm",
    "get_num_threads",
    "info",
    "nn",
    "quantize",
    "scaled_gemm",
    "set_num_threads",
]
