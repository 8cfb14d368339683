"""lepton_core: mixed-precision GEMM, quantization and ring all-reduce kernels for training.

    import lepton_core as lc
    c = lc.gemm(a, b)                               # bf16/fp16/fp32 with fp32 accumulation, int8 -> int32
    q = lc.quantize(x, "int8", block_size=256)      # int8 / uint8 / int4 / fp8, tensor/channel/block
    x_hat = lc.dequantize(q)

Works on torch tensors and NumPy arrays; with NumPy alone (torch not installed) the NumPy API and
lc.info() work, and the torch-only parts (lc.nn, lepton_core.distributed, .train) raise an
ImportError naming the extra to install. See docs/api.md for the contract. Importing never needs a GPU.
"""
from ._runtime import empty_cache, get_num_threads, info, set_num_threads
from ._version import __version__
from ._arrays import torch as _torch
from .qtensor import QTensor
from .gemm import gemm, scaled_gemm
from .quant import dequantize, quantize

if _torch is not None:
    # The torch.library ops (torch.ops.lepton.*) and each device's kernels for them.
    from .backends import cpu as _cpu_backend, cuda as _cuda_backend

    _cpu_backend.register()
    _cuda_backend.register()

__all__ = [
    "QTensor",
    "dequantize",
    "empty_cache",
    "gemm",
    "get_num_threads",
    "info",
    "nn",
    "quantize",
    "scaled_gemm",
    "set_num_threads",
]


def __getattr__(name):
    # lc.nn needs torch: imported on first use, so that `import lepton_core` works with NumPy alone.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'lepton_core' has no attribute {name!r}")
