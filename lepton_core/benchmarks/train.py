"""`lepton bench train`: data-parallel training step throughput, 2 local workers, bf16 autocast.

The model is an MLP whose gradients weigh ~50 MB in float32 (12.6 M parameters; quick: ~8 MB). Five
variants run in the same two processes, interleaved round by round (A B C D E A B C D E ...), each
with its own copy of the model, DDP wrapper and AdamW:
  baseline    torch.nn.Linear + DDP's built-in Gloo all-reduce (float32), bf16 autocast
  lc layers   lc.nn.Linear    + DDP's Gloo all-reduce, bf16 autocast
  int8 hook   torch.nn.Linear + ld.allreduce_hook (int8, error feedback), bf16 autocast
  ours        lc.nn.Linear    + ld.allreduce_hook (int8, error feedback), bf16 autocast
  torch fp32  torch.nn.Linear + DDP's Gloo all-reduce, no autocast (float32 throughout): a CPU
              without native bf16 (AVX2 only) runs torch's bf16 matmuls slower than its float32 ones,
              so this row shows the best plain-PyTorch option on such a machine too.
A step is forward + backward (with the gradient all-reduce) + optimizer step (fused AdamW, torch's
fastest on CPU, the same for every variant). Each sample times a
fixed number of steps on both workers after a barrier, and keeps the slower worker's time (the
step of a data-parallel job is as fast as its slowest worker); rows show medians over the rounds.

Columns: ms_per_step and samples_per_s (both workers together); GFLOP/s is the matmul work of one
worker (6 x parameters x batch per step) over the step time; wire_MB is what one worker sends per
step by the ring model (2 (W-1)/W of the gradients: 4 bytes per element in float32, 1 + 4/256 in
int8); speedup is the baseline's step time over the variant's.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Dict, List

COLUMNS = ["variant", "layers", "compute", "allreduce", "grad_MB", "batch", "ms_per_step", "samples_per_s", "GFLOP/s",
           "wire_MB", "speedup"]

WORLD_SIZE = 2
# torch's bf16 matmuls take seconds per step on an AVX2-only CPU, so the sample counts stay small
FULL = {"dims": [1024, 2048, 2048, 2048, 1024], "batch": 32, "rounds": 5, "steps": 2, "warmup": 1}
QUICK = {"dims": [512, 1024, 1024, 512], "batch": 32, "rounds": 3, "steps": 1, "warmup": 1}
VARIANTS = [  # name, lc.nn layers?, ld int8 hook?, bf16 autocast?
    ("baseline", False, False, True),
    ("lc layers", True, False, True),
    ("int8 hook", False, True, True),
    ("ours", True, True, True),
    ("torch fp32", False, False, False),
]


def _mlp(dims: List[int], use_lc: bool):
    import torch
    from torch import nn

    import lepton_core.nn as lnn

    torch.manual_seed(0)  # every variant and worker starts from the same weights
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    return lnn.convert(model, dtype=None) if use_lc else model  # dtype None: the autocast dtype


def _worker(spec: Dict[str, Any]):
    """One of the two benchmark processes; rank 0 returns the rows."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lepton_core as lc
    import lepton_core.distributed as ld

    from lepton_core._runtime import default_num_threads

    threads = default_num_threads()  # OMP_NUM_THREADS, which launch_local sets to the CPUs / WORLD_SIZE
    torch.set_num_threads(threads)
    lc.set_num_threads(threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    runs: Dict[str, Any] = {}
    try:
        dims, batch = spec["dims"], spec["batch"]
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(batch, dims[0], generator=g)
        target = torch.randn(batch, dims[-1], generator=g)
        autocast = {}
        for name, use_lc, use_hook, use_bf16 in VARIANTS:
            autocast[name] = use_bf16
            model = _mlp(dims, use_lc)
            ddp = DDP(model)
            if use_hook:
                ddp.register_comm_hook(ld.HookState(compression="int8", error_feedback=True, block_size=256),
                                       ld.allreduce_hook)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fast CPU AdamW, for all
            runs[name] = (model, ddp, opt)

        def step(name: str) -> float:
            model, ddp, opt = runs[name]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast[name]):
                out = ddp(x)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        for name in runs:
            for _ in range(spec["warmup"]):
                step(name)
        samples: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(spec["rounds"]):
            for name in runs:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(spec["steps"]):
                    step(name)
                samples[name].append((time.perf_counter() - t0) / spec["steps"])
        # the slower worker's time of each sample
        flat = torch.tensor([t for name in runs for t in samples[name]], dtype=torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        per = spec["rounds"]
        medians = {name: statistics.median(flat[i * per:(i + 1) * per].tolist()) for i, name in enumerate(runs)}

        # Check once, outside the timed part: every variant trained (finite loss) and its replicas agree.
        for name, (model, _, _) in runs.items():
            assert torch.isfinite(torch.tensor(step(name))), f"{name}: the loss is not finite"
            checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
            lo, hi = checksum.clone(), checksum.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            assert torch.equal(lo, hi), f"{name}: the workers' parameters diverged"

        if rank != 0:
            return None
        n_params = sum(p.numel() for p in runs["baseline"][0].parameters())
        ring = 2 * (world - 1) / world
        rows = []
        for name, use_lc, use_hook, use_bf16 in VARIANTS:
            t = medians[name]
            rows.append({
                "variant": name,
                "layers": "lc.nn.Linear" if use_lc else "nn.Linear",
                "allreduce": "ld int8+EF" if use_hook else "gloo fp32",
                "compute": "bf16" if use_bf16 else "fp32",
                "grad_MB": n_params * 4 / 1e6,
                "batch": f"{world}x{batch}",
                "ms_per_step": t * 1e3,
                "samples_per_s": world * batch / t,
                "GFLOP/s": 6 * n_params * batch / t / 1e9,
                "wire_MB": ring * n_params * ((1 + 4 / 256) if use_hook else 4) / 1e6,
                "speedup": medians["baseline"] / t,
            })
        return rows
    finally:
        # the DDP wrappers go before their process group (see lepton_core.train.trainer.release_ddp)
        runs.clear()
        gc.collect()
        dist.destroy_process_group()


def run(quick: bool = False) -> List[Dict[str, Any]]:
    """Starts 2 local workers, times the variants, returns rank 0's rows."""
    from lepton_core.train.launch import launch_local

    from .common import ProgressRows

    spec = QUICK if quick else FULL
    results = launch_local(_worker, spec, WORLD_SIZE, name="lepton-bench-train")
    rows = ProgressRows("train", COLUMNS)  # all rows arrive at the end: the variants are interleaved
    rows.extend(results[0])
    return rows
