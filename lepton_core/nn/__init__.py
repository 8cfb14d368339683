"""lc.nn: layers whose matmuls run through lc.gemm (float32 master weights, low-precision compute).

    model = lc.nn.convert(model, dtype=torch.bfloat16)   # every nn.Linear -> lc.nn.Linear, in place
    layer = lc.nn.Linear(784, 256)                        # or build with it directly
    qmodel = lc.nn.quantize_model(model, "w4", group_size=64)   # int8 / 4-bit weights for inference
    lc.nn.save_quantized(qmodel, "out", source=src); lc.nn.load_quantized("out")   # deploy it
"""
from .._arrays import require_torch

require_torch("lepton_core.nn")

from .linear import Linear, convert  # noqa: E402
from .quant_linear import QuantLinear, quantize_model  # noqa: E402
from .serialize import load_quantized, save_quantized  # noqa: E402

__all__ = ["Linear", "convert", "QuantLinear", "quantize_model", "save_quantized", "load_quantized"]
