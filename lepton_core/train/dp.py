"""DP-SGD in the Trainer (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Each step: a Poisson-sampled batch (every training example independently with rate q, from a
generator seeded by (seed, epoch) that every rank shares; rank r takes every W-th selected example),
every example's gradient clipped to L2 norm C, the clipped gradients summed over the step's examples
on all ranks, Gaussian noise N(0, (Z C)^2) added once to that sum, and the result divided by the
expected batch size q N (the fixed-denominator estimator: sensitivity C).

How the per-example work is done without per-example gradients (Li et al. 2021, "ghost clipping"):
  - the forward runs with the lc.nn.Linear parameters frozen and the input requiring grad, while a
    forward hook keeps each layer's input a (B, T, in) and output; one torch.autograd.grad call gives
    the output gradients g (B, T, out), and computes no weight gradient at all;
  - per-example squared norms of the weight gradient sum_t g_t^T a_t are, for T = 1,
    ||a||^2 ||g||^2; for sequences either the materialized (B, out, in) gradients (one batched lc.gemm,
    kept for the clipped sum) or, where they are larger than a (T, T) matrix (in * out > T^2), the
    Gram form sum_{s,t} (a_s . a_t)(g_s . g_t) (two batched lc.gemm of (B, T, T)); the bias gradient is sum_t g_t. All in float32, whatever the autocast dtype;
  - with the factors c_i = min(1, C / ||grad_i||) known, each layer's clipped weight gradient is one
    GEMM, (c * g)^T a, from the saved a and g, in the layer's compute dtype with float32 accumulation,
    as the non-private backward computes it (or a GEMV c^T G over the kept per-example gradients):
    no second backward through the network. Measurements: bench/notes_dp.md.
A layer called several times in one forward (shared weights) concatenates its calls along T.

Ranks stay bitwise identical: each adds nothing, the (optionally int8-compressed) all-reduce sums the
clipped gradients, identically on every rank (API.md §3), and every rank then adds the same noise
draw, from a generator seeded by (seed, step). With int8 compression, the noise is added after the
compressed all-reduce: the privacy guarantee concerns the released (noised) sum, and the compression
error is a deterministic function of the clipped sum, so it neither raises the sensitivity above C per
example in the exact sum nor depends on the noise. The noise seed is reproducible for resumable runs; a
deployment that must resist an adversary who knows the seed must draw it from a CSPRNG.

Only lc.nn.Linear layers can be clipped per example: any other trainable parameter is a ValueError
naming it. grad_accum > 1 is refused (a Poisson batch is one step).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import lepton_core as lc
from lepton_core.nn import Linear
from lepton_core.privacy import Accountant, noise_for_epsilon

_OP = "lepton_core.train (DP-SGD)"
_EPS = 1e-6  # in C / (norm + eps): an all-zero gradient gets factor 1 without dividing by zero


def clippable_layers(model: nn.Module) -> List[Linear]:
    """The lc.nn.Linear layers of `model` with trainable parameters; ValueError naming every trainable
    parameter that belongs to anything else (its per-example gradient norm cannot be computed)."""
    owned = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            for pname, p in mod.named_parameters(recurse=False):
                owned[id(p)] = mod
    bad = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if bad:
        raise ValueError(f"{_OP}: per-example gradient norms need every trainable parameter to be in an "
                         f"lc.nn.Linear (torch.nn.Linear: convert with lc.nn.convert); these are not: "
                         f"{', '.join(bad)} (freeze them with requires_grad_(False) or replace the layers)")
    seen, layers = set(), []
    for _, mod in model.named_modules():
        if isinstance(mod, Linear) and id(mod) not in seen and any(p.requires_grad for p in mod.parameters()):
            seen.add(id(mod))
            layers.append(mod)
    if not layers:
        raise ValueError(f"{_OP}: the model has no trainable lc.nn.Linear layer to train privately")
    return layers


def _as_btf(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) as (B, T, F): every row between the example and the feature dimension is a token."""
    if t.dim() == 1:
        raise ValueError(f"{_OP}: an lc.nn.Linear saw an input of shape {tuple(t.shape)}; DP-SGD needs a "
                         f"batch dimension first")
    return t.reshape(t.shape[0], -1, t.shape[-1])


def gram_is_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a sequence layer takes the Gram form: per example it holds a (T, T) pair of Gram
    matrices instead of the (out, in) gradient, so it wins where T^2 < in * out (the per-layer choice
    of the "mixed ghost clipping" papers). Materializing is less arithmetic (T in out multiply-adds,
    and the clipped sum is then a weighted sum of the kept gradients), the Gram form T^2 (in + out)
    plus the clipping GEMM; measured on `lepton bench dp`'s T = 128, width 256 case the two take the
    same time (bench/notes_dp.md), so memory decides."""
    return tokens * tokens < d_in * d_out


def per_example_sq_norms(a: torch.Tensor, g: torch.Tensor, with_bias: bool,
                         keep: bool = False) -> "torch.Tensor | Tuple[torch.Tensor, Optional[torch.Tensor]]":
    """Squared L2 norm of each example's gradient of an lc.nn.Linear (weight, and bias when
    `with_bias`) from its input a (B, T, in) and output gradient g (B, T, out), float32, shape (B,).
    keep: also return the materialized per-example weight gradients (B, out, in) when this layer's
    norms made them (sequences below the Gram threshold), else None."""
    a, g = a.float(), g.float()
    b, t = a.shape[0], a.shape[1]
    per = None
    if t == 1:  # ||a_i||^2 ||g_i||^2; with one row the bias gradient is g_i itself
        a2, g2 = a.reshape(b, -1), g.reshape(b, -1)
        gg = torch.linalg.vecdot(g2, g2)
        sq = torch.linalg.vecdot(a2, a2) * gg
        if with_bias:
            sq = sq + gg
        return (sq, None) if keep else sq
    elif gram_is_cheaper(t, a.shape[2], g.shape[2]):
        ga = lc.gemm(a, a.transpose(1, 2))                      # (B, T, T): a_s . a_t
        gg = lc.gemm(g, g.transpose(1, 2))                      # (B, T, T): g_s . g_t
        sq = torch.linalg.vecdot(ga.reshape(b, -1), gg.reshape(b, -1))
    else:
        per = lc.gemm(g.transpose(1, 2), a)                      # (B, out, in): each example's gradient
        flat = per.reshape(b, -1)
        sq = torch.linalg.vecdot(flat, flat)
    if with_bias:
        gb = g.sum(1)
        sq = sq + torch.linalg.vecdot(gb, gb)
    sq = sq.reshape(b)
    return (sq, per) if keep else sq


class _Capture:
    """The inputs and outputs of the clippable layers during one forward (forward hooks)."""

    def __init__(self, layers: List[Linear]) -> None:
        self.layers = layers
        self.calls: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in layers}

    def hook(self, module, inputs, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            # A layer whose input needs no gradient (the first one: its weights are frozen here): its
            # output becomes a leaf that requires grad, so the backward reaches it and stops there,
            # computing no input gradient for this layer (the hook's return value replaces the output).
            output = output.detach().requires_grad_(True)
            self.calls[id(module)].append((inputs[0].detach(), output))
            return output
        self.calls[id(module)].append((inputs[0].detach(), output))
        return None


class DPSGD:
    """The private step's pieces, used by Trainer._dp_step: batches, clipped sums, noise, accountant."""

    def __init__(self, model: nn.Module, cfg, n_examples: int, world_size: int) -> None:
        self.layers = clippable_layers(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = float(cfg.dp_clip)
        self.n = n_examples
        self.seed = cfg.seed
        # q: the expected global batch (batch_size per rank, on every rank) over the data set
        self.q = min(1.0, cfg.batch_size * world_size / n_examples)
        self.steps_per_epoch = max(1, round(1 / self.q))
        self.expected_batch = self.q * n_examples
        self.delta = cfg.dp_delta
        planned = cfg.epochs * self.steps_per_epoch
        self.noise_multiplier = (float(cfg.dp_noise_multiplier) if cfg.dp_noise_multiplier is not None
                                 else noise_for_epsilon(cfg.dp_target_epsilon, self.q, planned, self.delta))
        self.accountant = Accountant(self.noise_multiplier, self.q, self.delta)

    # -- sampling -------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> List[List[int]]:
        """This rank's examples of each step of `epoch`: Poisson sampling at rate q over the whole data
        set (the same draw on every rank), split round-robin over the ranks."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7919 + 17)
        out = []
        for _ in range(self.steps_per_epoch):
            chosen = torch.nonzero(torch.rand(self.n, generator=gen) < self.q).flatten()
            out.append(chosen[rank::world_size].tolist())
        return out

    # -- the per-example work -------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Within: the clippable parameters are frozen (autograd computes no weight gradient) and each
        layer's input and output are recorded."""
        cap = _Capture(self.layers)
        handles = [m.register_forward_hook(cap.hook) for m in self.layers]
        frozen = [p for p in self.params if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)

    def clipped_grads(self, cap: _Capture, loss_sum: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """Sum over this rank's examples of their clipped gradients: one flat float32 tensor, the
        parameters (self.params order) one after the other, ready for the all-reduce. loss_sum: the SUM over the examples of their losses (times `scale`, the
        fp16 loss scale; 1 otherwise), None for an empty batch."""
        dev = self.params[0].device
        if loss_sum is None:
            return torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=dev)
        flat = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32, device=dev)
        grads, off = {}, 0
        for p in self.params:  # views of `flat`: each is written once below
            grads[id(p)] = flat[off:off + p.numel()].view(p.shape)
            off += p.numel()
        layers = [m for m in self.layers if cap.calls[id(m)]]
        for m in self.layers:
            if not cap.calls[id(m)]:  # not called in this forward: zero gradient
                for p in m.parameters(recurse=False):
                    if id(p) in grads:
                        grads[id(p)].zero_()
        outputs = [o for m in layers for _, o in cap.calls[id(m)]]
        out_grads = torch.autograd.grad(loss_sum, outputs, allow_unused=True)
        saved, k, out_dtype = [], 0, {}
        for m in layers:
            acts, gs = [], []
            for a, o in cap.calls[id(m)]:
                g = out_grads[k] if out_grads[k] is not None else torch.zeros_like(o)
                k += 1
                acts.append(_as_btf(a))
                gs.append(_as_btf(g) if scale == 1.0 else _as_btf(g).float() / scale)  # fp16: unscaled
            a, g = (acts[0], gs[0]) if len(acts) == 1 else (torch.cat(acts, 1), torch.cat(gs, 1))
            saved.append((m, a, g))
            out_dtype[id(m)] = cap.calls[id(m)][0][1].dtype
        sq, kept = None, []
        for m, a, g in saved:
            with_bias = m.bias is not None and id(m.bias) in grads  # (frozen inside capture(): not requires_grad)
            s, per = per_example_sq_norms(a, g, with_bias, keep=True)
            kept.append(per)
            sq = s if sq is None else sq + s
        factors = (self.clip / (sq.sqrt() + _EPS)).clamp(max=1.0)
        for (m, a, g), per in zip(saved, kept):
            w = grads.get(id(m.weight))
            if w is not None and per is not None:  # sum_i c_i G_i of the kept gradients: one GEMV
                w.copy_(lc.gemm(factors[None, :], per.reshape(per.shape[0], -1)).view(w.shape))
            scaled = None
            if w is not None and per is None:  # (c * g)^T a: rows of g scaled, in the layer's compute dtype
                cd = out_dtype[id(m)]
                scaled = g.float() * factors[:, None, None]
                w.copy_(lc.gemm(scaled.reshape(-1, g.shape[2]).to(cd).t(), a.reshape(-1, a.shape[2]).to(cd),
                                out_dtype=torch.float32))
            if m.bias is not None and id(m.bias) in grads:  # sum_i c_i sum_t g_it
                if scaled is not None:
                    grads[id(m.bias)].copy_(scaled.sum((0, 1)))
                else:
                    grads[id(m.bias)].copy_(factors @ g.float().sum(1))
        return flat

    def add_noise(self, flat_sum: torch.Tensor, step: int) -> None:
        """Adds N(0, (Z C)^2) to every element of the all-reduced sum, the same draw on every rank."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 104_729 + 29)
        noise = torch.randn(flat_sum.numel(), generator=gen, dtype=torch.float32)
        flat_sum.add_(noise.to(flat_sum.device), alpha=self.noise_multiplier * self.clip)

    def epsilon(self, steps: int) -> float:
        return self.accountant.epsilon(steps)


class DPAccounting:
    """The Trainer's callback of a DP run: reports epsilon so far (key "epsilon") at the end of every
    epoch, and carries the accountant's state (noise multiplier, sampling rate, delta, steps) in
    checkpoints, so a resumed run keeps the noise it started with and reports the same epsilon."""

    state_key = "dp_sgd"

    def __init__(self, engine: DPSGD) -> None:
        self.engine = engine

    def on_epoch_end(self, trainer, rec: Dict[str, Any]) -> None:
        eps = self.engine.epsilon(trainer.global_step)
        rec["epsilon"] = eps if math.isfinite(eps) else None

    def state_dict(self) -> Dict[str, Any]:
        e = self.engine
        return {"noise_multiplier": e.noise_multiplier, "sampling_rate": e.q, "delta": e.delta}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        e = self.engine
        if state["sampling_rate"] != e.q:
            raise ValueError(f"{_OP}: the checkpoint's sampling rate {state['sampling_rate']} differs from this "
                             f"run's {e.q} (batch size, workers and data set must be those of the run)")
        e.noise_multiplier = float(state["noise_multiplier"])
        e.delta = float(state["delta"])
        e.accountant = Accountant(e.noise_multiplier, e.q, e.delta)
