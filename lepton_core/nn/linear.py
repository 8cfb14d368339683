"""lc.nn.Linear: a drop-in torch.nn.Linear whose matmuls run through lc.gemm, and lc.nn.convert."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import nn

from .. import _ops  # noqa: F401  (declares torch.ops.lepton.nn_linear)
from .._arrays import name_of as dtype_name

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_OP = "lc.nn.Linear"


def _check_compute_dtype(dt, op: str, arg: str) -> Optional[torch.dtype]:
    if dt is None:
        return None
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"{op}: {arg} must be a torch dtype or None, got {dt!r}")
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be torch.float32, torch.float16 or torch.bfloat16 (what lc.gemm "
                        f"computes in), got {dtype_name(dt)}")
    return dt


class Linear(nn.Linear):
    """y = x W^T + b like torch.nn.Linear (same parameters, init and state_dict keys), computed by lc.gemm.

    Weights are float32 masters. Each call rounds x and W to a compute dtype, multiplies with float32
    accumulation, and rounds the result once. The compute dtype is, first match wins:
      1. the autocast dtype, while torch.autocast is enabled for the input's device (the output is then
         in that dtype, as nn.Linear's is under autocast);
      2. `compute_dtype` given here or by lc.nn.convert (the output keeps the input's dtype);
      3. the input's dtype (float32, float16 or bfloat16).
    The backward also runs through lc.gemm; the weight gradient is accumulated in float32 and rounded
    once to the weight's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        if dtype is not None and dtype != torch.float32:
            raise TypeError(f"{_OP}: dtype (of the master weights) must be torch.float32 or None, "
                            f"got {dtype_name(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=torch.float32)
        self.compute_dtype = _check_compute_dtype(compute_dtype, _OP, "compute_dtype")

    def _dtypes(self, x: torch.Tensor):
        """(compute dtype, output dtype) for input x; see the class docstring."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cd = torch.get_autocast_dtype(dev)
            return cd, cd
        if self.compute_dtype is not None:
            return self.compute_dtype, x.dtype
        return x.dtype, x.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_OP}: input has dtype {dtype_name(input.dtype)}; lc.gemm computes in float32, "
                            "float16 or bfloat16")
        if self.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_OP}: weight has dtype {dtype_name(self.weight.dtype)}; lc.gemm computes in "
                            "float32, float16 or bfloat16")
        if input.layout is not torch.strided:
            raise ValueError(f"{_OP}: input must be a dense (strided) tensor, got layout {input.layout}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"{_OP}: input's last dimension must be in_features={self.in_features}, got shape "
                             f"{tuple(input.shape)}")
        cd, od = self._dtypes(input)
        return _ops.linear(input, self.weight, self.bias, cd, od)

    def extra_repr(self) -> str:
        cd = "autocast/input" if self.compute_dtype is None else dtype_name(self.compute_dtype)
        return f"{super().extra_repr()}, compute_dtype={cd}"


def hf_conv1d_type():
    """transformers' Conv1D (GPT-2's transposed linear) when transformers is loaded, else None (a model
    holding one has imported it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def linear_from_conv1d(m: nn.Module, compute_dtype) -> Linear:
    """An lc.nn.Linear computing what an HF Conv1D computes (its weight transposed into a new Parameter)."""
    new = Linear.__new__(Linear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = m.weight.shape
    new.compute_dtype = compute_dtype
    new.weight = nn.Parameter(m.weight.detach().t().to(torch.float32).contiguous(), requires_grad=m.weight.requires_grad)
    b = m.bias
    new.bias = None if b is None else nn.Parameter(b.detach().to(torch.float32), requires_grad=b.requires_grad)
    new.train(m.training)
    return new


def convert(model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16, *,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swaps every torch.nn.Linear (and Hugging Face Conv1D, GPT-2's transposed linear) in `model` for
    which filter_fn(module, fully_qualified_name) is true (default: all) for an lc.nn.Linear computing
    in `dtype`, in place.

    The new layers take over the old ones' Parameter objects (an optimizer built before still works);
    non-float32 weights are first converted to float32 masters, and a Conv1D's weight is transposed into
    a new Parameter. lc.nn.Linear layers already there get `dtype` as their compute dtype. Returns
    `model` (or the replacement, when `model` is itself a layer). dtype=None computes in the autocast
    dtype or the input's dtype.
    """
    op = "lc.nn.convert"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = _check_compute_dtype(dtype, op, "dtype")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{op}: filter_fn must be callable(module, name) or None, got {type(filter_fn).__name__}")
    conv1d = hf_conv1d_type()

    def wanted(m: nn.Module, name: str) -> bool:
        is_layer = isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))
        return is_layer and (filter_fn is None or bool(filter_fn(m, name)))

    def swap(m: nn.Module, name: str) -> nn.Module:
        if not isinstance(m, nn.Linear):
            return linear_from_conv1d(m, dtype)
        if isinstance(m, Linear):
            m.compute_dtype = dtype
            return m
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{op}: {name or 'model'} is a lazy Linear whose weight is not initialized yet; "
                             "run one forward pass before converting")
        new = Linear.__new__(Linear)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.compute_dtype = dtype
        for pname in ("weight", "bias"):
            p = getattr(m, pname)
            if p is not None and p.dtype != torch.float32:
                p = nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad)
            new.register_parameter(pname, p)
        new.train(m.training)
        return new

    if wanted(model, ""):
        return swap(model, "")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if wanted(child, full):
                setattr(parent, child_name, swap(child, full))
    return model
