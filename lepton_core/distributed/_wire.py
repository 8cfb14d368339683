"""The int8 wire format of the collectives (a "q8 message", csrc/common/codes.h): the int8 codes of
n values cut into blocks, then one float32 scale per block from the next 64-byte boundary. The
torch.distributed and hierarchical transports send these messages; the kernels are the native ones
(csrc/cpu/reduce/reduce.h), so every transport quantizes to the same bits."""
from __future__ import annotations

import torch

from .. import _C
from ._checks import dtype_code

q8_message_bytes = _C.q8_message_bytes
_Q8_ALIGN = _C.codes["q8_scales_align"]


def q8_scales_offset(n: int) -> int:
    return -(-n // _Q8_ALIGN) * _Q8_ALIGN


def pack_q8(x: torch.Tensor, block: int) -> torch.Tensor:
    """The int8 message (uint8 bytes) of a contiguous CPU tensor."""
    n = x.numel()
    msg = torch.zeros(q8_message_bytes(n, block), dtype=torch.uint8)
    base = msg.data_ptr()
    _C.q8_quantize(isa=-1, q=base, s=base + q8_scales_offset(n), x=x.data_ptr(), n=n, dtype=dtype_code(x.dtype),
                   block=block)
    return msg


def gather_q8(y: torch.Tensor, msgs, block: int, divisor: int) -> None:
    """y = (sum of the messages' dequantized values, in order) / divisor, rounded once to y's dtype."""
    n = y.numel()
    off = q8_scales_offset(n)
    _C.q8_gather(isa=-1, y=y.data_ptr(), qs=[m.data_ptr() for m in msgs], ss=[m.data_ptr() + off for m in msgs], n=n,
                 dtype=dtype_code(y.dtype), block=block, divisor=divisor)
