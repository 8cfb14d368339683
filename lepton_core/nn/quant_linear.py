"""lc.nn.QuantLinear and lc.nn.quantize_model (API.md §5): linear layers with int8 or 4-bit weights.

Schemes:
  "w8a8"  int8 weight, one scale per output channel; activations quantized to int8 per row at run
          time; lc.scaled_gemm's int32 GEMM and epilogue (both scales and the bias in one pass)
  "w8"    weight-only int8, one scale per output channel
  "w4"    weight-only asymmetric 4-bit, one float32 scale and zero point per group_size inputs
The weight is quantized (int8: per-row clip-searched scales) and packed once (lepton_core/_qpack.py,
layout in csrc/cpu/qlinear/qlinear.h); codes, scales, zero points and the bias are buffers, so
state_dict() round-trips through torch.save / torch.load(weights_only=True) into a layer built the same
way. No float weight is kept.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .. import _ops  # declares torch.ops.lepton.quant_linear
from .. import _gptq, _qpack
from .._arrays import name_of as dtype_name
from .._codes import MAX_GROUP, MIN_GROUP, QLINEAR_PANEL
from .._devices import backend_for
from .linear import hf_conv1d_type

SCHEMES = ("w8a8", "w8", "w4")
_OP = "lc.nn.QuantLinear"


def check_scheme(scheme, group_size, op: str):
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: scheme must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
            MIN_GROUP <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0):
        raise ValueError(f"{op}: group_size must be a power of two from {MIN_GROUP} to {MAX_GROUP}, "
                         f"got {group_size!r}")


def _checked_moment(h, k: int, op: str) -> torch.Tensor:
    if not isinstance(h, torch.Tensor) or not h.dtype.is_floating_point:
        got = dtype_name(h.dtype) if isinstance(h, torch.Tensor) else type(h).__name__
        raise TypeError(f"{op}: input_moment must be a floating-point tensor, got {got}")
    if tuple(h.shape) != (k, k):
        raise ValueError(f"{op}: input_moment must have shape (in_features, in_features) = ({k}, {k}), "
                         f"got {tuple(h.shape)}")
    h = h.detach().to("cpu", torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError(f"{op}: input_moment has non-finite values")
    return h


def linear_weight(m: nn.Module) -> Optional[torch.Tensor]:
    """The (out, in) weight of a convertible layer (nn.Linear, lc.nn.Linear, HF Conv1D), else None."""
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(m, conv1d):
        return m.weight.t()  # Conv1D computes x @ W + b with W (in, out)
    if isinstance(m, nn.Linear):
        return m.weight
    return None


class QuantLinear(nn.Module):
    """y = x W^T + b with W quantized (scheme "w8a8", "w8" or "w4"; see the module docstring).

    Input of any float dtype and leading dims (..., in_features); output in the input's dtype. The
    weight-only schemes equal F.linear(x.float(), dequantize_weight(), bias) rounded once to that dtype,
    within API.md §1's float32 tolerance. Inputs that require grad get gradients; weights are frozen.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "w8",
                 group_size: int = 128) -> None:
        super().__init__()
        check_scheme(scheme, group_size, _OP)
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{_OP}: {arg} must be a non-negative int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        n, k, p = out_features, in_features, QLINEAR_PANEL
        n_pad, g = -(-n // p) * p, math.ceil(in_features / group_size)
        if scheme == "w8a8":
            shapes = {"codes": ((n, k), torch.int8), "scale": ((n,), torch.float32)}
        elif scheme == "w8":
            shapes = {"codes": ((n_pad // p, k, p), torch.int8), "scale": ((n_pad,), torch.float32)}
        else:
            shapes = {"codes": ((n_pad // p, (k + 1) // 2, p), torch.uint8),
                      "scale": ((n_pad // p, g, p), torch.float32), "zero_point": ((n_pad // p, g, p), torch.uint8)}
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        if scheme != "w4":
            self.zero_point = None
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: str, group_size: int = 128, *,
                    input_moment: Optional[torch.Tensor] = None) -> "QuantLinear":
        """A QuantLinear holding `linear`'s weight quantized (nn.Linear, lc.nn.Linear or HF Conv1D).
        input_moment: E[x x^T] (in_features, in_features) of the inputs the layer sees; given, the codes
        are rounded to make the output error on such inputs small (lepton_core/_gptq.py) instead of
        nearest rounding. quantize_model(..., calibrate=...) collects it."""
        op = "lc.nn.QuantLinear.from_linear"
        check_scheme(scheme, group_size, op)
        w = linear_weight(linear) if isinstance(linear, nn.Module) else None
        if w is None:
            raise TypeError(f"{op}: linear must be a torch.nn.Linear, lc.nn.Linear or transformers Conv1D, "
                            f"got {type(linear).__name__}")
        if isinstance(w, nn.parameter.UninitializedParameter) or isinstance(linear.weight,
                                                                             nn.parameter.UninitializedParameter):
            raise ValueError(f"{op}: the layer's weight is not initialized yet (lazy); run one forward pass first")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{op}: the weight must be floating point, got {dtype_name(w.dtype)}")
        if w.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: the weight must be on the CPU or a CUDA device, got {w.device}")
        device = w.device
        n, k = w.shape
        b = getattr(linear, "bias", None)
        new = cls(k, n, bias=b is not None, scheme=scheme, group_size=group_size)
        # Quantized and packed on the CPU (one implementation of the formulas), then moved to the
        # weight's device: the CUDA kernels read the same packed buffers.
        w = w.detach().to("cpu", torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError(f"{op}: the weight has non-finite values")
        h = None if input_moment is None else _checked_moment(input_moment, k, op)
        with torch.no_grad():
            if scheme == "w4":
                q4 = _qpack.quantize_w4(w, group_size) if h is None else _gptq.quantize_w4(w, h, group_size)
                codes, scale, zero = _qpack.pack_w4(*q4)
                new.zero_point.copy_(zero)
            else:
                q, s = _qpack.quantize_w8(w) if h is None else _gptq.quantize_w8(w, h)
                codes, scale = (q, s) if scheme == "w8a8" else _qpack.pack_w8(q, s)
            new.codes.copy_(codes)
            new.scale.copy_(scale)
            if b is not None:
                new.bias.copy_(b.detach().to("cpu", torch.float32))
        new.train(linear.training)
        return new.to(device)

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 (out_features, in_features) weight the codes stand for: (code - zero) * scale."""
        return _qpack.unpack(self.scheme, self.codes, self.scale, self.zero_point, self.out_features,
                             self.in_features, self.group_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
        if not input.dtype.is_floating_point:
            raise TypeError(f"{_OP}: input must be a floating-point tensor, got {dtype_name(input.dtype)}")
        if input.layout is not torch.strided:
            raise ValueError(f"{_OP}: input must be a dense (strided) tensor, got layout {input.layout}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"{_OP}: input's last dimension must be in_features={self.in_features}, got shape "
                             f"{tuple(input.shape)}")
        bufs = self._buffers  # one lookup: each buffer through Module.__getattr__ costs ~0.4 us (decode calls)
        codes = bufs["codes"]
        if not (input.is_cpu and codes.is_cpu):  # both on the CPU: no torch.device objects to build
            if input.device.type not in ("cpu", "cuda", "meta"):
                raise ValueError(f"{_OP}: runs on the CPU and CUDA devices; input is on {input.device}")
            if input.device != codes.device:
                raise ValueError(f"{_OP}: input and weights must be on the same device; input is on "
                                 f"{input.device}, weights on {codes.device} (move one with .to())")
        x = input
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.to(torch.float32)  # float64 and others: x.float(), the result widened back exactly
        args = (x, codes, bufs["scale"], bufs.get("zero_point"), bufs.get("bias"))
        if _ops.needs_dispatcher(*args):  # autograd, tracing, meta, subclasses: through torch.ops.lepton
            y = torch.ops.lepton.quant_linear(*args, self.scheme, self.group_size, self.out_features)
        else:  # _ops's eager-bypass rule: a plain call skips the dispatcher's microseconds (decode shapes)
            y = backend_for(x).quant_linear(*args, self.scheme, self.group_size, self.out_features)
        return y if y.dtype == input.dtype else y.to(input.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "w4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}{g}")


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 128,
                   filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, inplace: bool = False,
                   calibrate: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
    """Replaces each nn.Linear, lc.nn.Linear and HF Conv1D for which filter_fn(module, name) is true
    (default: all) by a QuantLinear; returns the new model (a deep copy unless inplace=True).

    calibrate: a function that runs the (float) model on representative inputs, e.g.
    `lambda m: m.encode(texts)`. It is called once, under torch.no_grad, before any layer is replaced;
    each layer's codes are then rounded against the second moment of the inputs it saw
    (lepton_core/_gptq.py). A layer it never reached keeps nearest rounding, with a UserWarning."""
    op = "lc.nn.quantize_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_scheme(scheme, group_size, op)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{op}: filter_fn must be callable(module, name) or None, got {type(filter_fn).__name__}")
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"{op}: calibrate must be callable(model) or None, got {type(calibrate).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    def wanted(m: nn.Module, name: str) -> bool:
        return linear_weight(m) is not None and (filter_fn is None or bool(filter_fn(m, name)))

    if wanted(model, ""):
        targets = [("", None, "", model)]
    else:
        targets = []
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if wanted(child, full):
                    targets.append((full, parent, child_name, child))
    moments = None
    if calibrate is not None and targets:
        moments = _gptq.InputMoments({full: child for full, _, _, child in targets}, op)
        with moments, torch.no_grad():
            calibrate(model)
        missed = [full or "<model>" for full, _, _, _ in targets if moments.rows[full] == 0]
        if missed:
            warnings.warn(f"{op}: calibrate never ran {len(missed)} layer(s), which keep nearest rounding: "
                          f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''}", UserWarning, stacklevel=2)
    for full, parent, child_name, child in targets:
        h = None if moments is None else moments.second_moment(full)
        new = QuantLinear.from_linear(child, scheme, group_size, input_moment=h)
        if parent is None:
            return new
        setattr(parent, child_name, new)
    if not targets:
        found = sorted({type(m).__name__ for m in model.modules()})
        warnings.warn(f"{op}: nothing to convert (no nn.Linear, lc.nn.Linear or Conv1D passed filter_fn); "
                      f"the model has module types: {', '.join(found)}", UserWarning, stacklevel=2)
    return model
