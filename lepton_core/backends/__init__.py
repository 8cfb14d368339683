"""Backends: one module per device, each with the same kernel functions (arguments already checked).

    gemm(a, b, bias, out_dtype)                                   -> out
    scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)          -> out
    quantize(x, fmt, axis, block_size, stochastic, seed)          -> (data, scale, zero_point, first_bad)
    dequantize(data, scale, zero_point, fmt, shape, axis, block_size, dtype) -> out
    linear(x, weight, bias, compute_dtype, out_dtype)             -> out
    quant_linear(x, codes, scale, zero, bias, scheme, group_size, out_features) -> out (x's dtype)
    register()      registers these as the device's kernels of the torch.library ops (lepton_core._ops)

dtypes are names ("float32", ...), formats are lepton_core._codes.Format. `cpu` takes torch CPU tensors
and NumPy arrays (and needs no torch); `cuda` takes CUDA tensors and alone knows whether CUDA is usable
(`cuda.unavailable_reason()`).
"""
