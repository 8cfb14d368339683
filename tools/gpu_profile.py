"""What tools/gpu_check.sh profiles with ncu: one bf16 GEMM at 4096^3 (the tensor-core kernel), one int8
GEMM, and one int8 blockwise quantize / dequantize of 64 Mi floats, each after a warm-up call."""
import torch

import lepton_core as lc

n = 4096
a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
b = torch.randn(n, n, device="cuda").to(torch.bfloat16).t()
ai = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda")
bi = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda").t()
x = torch.randn(64 << 20, device="cuda")
for _ in range(2):  # the second round is the one worth reading (caches and clocks warm)
    lc.gemm(a, b)
    lc.gemm(ai, bi)
    q = lc.quantize(x, "int8", block_size=256)
    lc.dequantize(q)
torch.cuda.synchronize()
