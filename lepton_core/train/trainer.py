"""Trainer: data-parallel training on torch.distributed with lc.nn layers and ld.allreduce_hook.

One Trainer runs in every worker process (started by `lepton train`, torchrun, or any launcher that
sets the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables; without them it trains alone).
Each optimizer step:
  1. every worker draws its shard of the epoch (DistributedSampler: seeded, so the same run sees the
     same batches in the same order) and runs `grad_accum` micro-batches forward/backward under the
     configured precision (bf16/fp16 autocast; fp16 scales the loss, dynamically);
  2. DDP averages the gradients through our comm hook -> ld.allreduce_hook (int8 with error feedback,
     or uncompressed), counting the bytes;
  3. the optimizer (AdamW) steps with the learning rate of the schedule at this step.
With DP-SGD (config.dp_clip) a step is instead one Poisson-sampled batch whose per-example gradients
are clipped and noised (train/dp.py, Trainer._dp_step); DDP then only broadcasts the initial model.
At the end of each epoch the model is evaluated, the epoch's metrics go to the console and a JSONL
file, and a checkpoint is written. Resuming restores every piece of state a step depends on, so a run
stopped and resumed ends with the same parameters, bit for bit, as one that ran through.

This module is the loop; its parts live beside it: comm.py (the DDP comm hook), progress.py (the bar),
metrics.py (epoch records, their line, metrics.jsonl), state.py (what a checkpoint holds, the resume
check), checkpoint.py (checkpoint files), callbacks.py (user code at fixed points of the loop).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Optional

from ._deps import require

require(("torch",), "lepton_core.train.Trainer", "train")

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, DistributedSampler, TensorDataset, default_collate

import lepton_core.distributed as ld

from . import checkpoint as ckpt
from . import state as schema
from .callbacks import Callbacks, StepInfo
from .comm import CommState, comm_hook
from .config import TrainConfig
from .metrics import MetricsFile, epoch_line, run_summary
from .progress import Progress

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rank 0's lines (one per epoch; resumed; stopped by max_steps) go here at INFO, so a program using the
# Trainer decides whether and where they appear; `lepton train` prints them on stdout.
logger = logging.getLogger("lepton_core.train")


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------
def _fetch(dataset: Dataset, indices: List[int]):
    """A batch of `dataset` at `indices` (TensorDataset: one gather per tensor)."""
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in dataset.tensors)
    return default_collate([dataset[i] for i in indices])


def _to(batch, device: torch.device):
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def release_ddp(owner: Any, attr: str = "ddp") -> None:
    """Drops owner.<attr> (a DistributedDataParallel) while its process group is still registered.

    DDP's C++ Reducer holds the process group. If it held the last reference (the group already
    destroyed), the group's destructor would run inside the Reducer's, with the GIL held, and join
    Gloo's worker threads, which may need the GIL to free a finished work's tensors: a deadlock that
    no Python timeout can interrupt (pytorch/pytorch#56297; seen here as a hung test). Freed first,
    the Reducer only drops its reference, and the group dies in destroy_process_group, whose binding
    releases the GIL."""
    if getattr(owner, attr, None) is not None:
        setattr(owner, attr, None)
        gc.collect()  # the Reducer may sit in a reference cycle (hooks, autograd graph)


def _default_optimizer(params, cfg):
    """AdamW, fused where torch has the fused kernel for these parameters (one pass over each tensor
    instead of a dozen elementwise ops: ~5x faster on CPU, measured in bench/notes_train.md)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype / torch
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """Data-parallel training of `model` on `train_data` (map-style dataset of (input, target)).

    model:      built identically on every worker (e.g. after torch.manual_seed); DDP also broadcasts
                rank 0's parameters. Its nn.Linear layers can be lc.nn.Linear (lc.nn.convert).
    train_data / eval_data: datasets of (input, target) pairs; targets of integer dtype make the
                trainer report accuracy (argmax of the output) besides the loss.
    loss_fn:    (output, target) -> scalar loss; default cross-entropy. Outputs are cast to float32 first.
                With DP-SGD (config.dp_clip) it must be the mean over the batch of per-example losses
                (as the default is): per-example gradients are those of batch size x the loss.
    augment:    optional (inputs, generator) -> inputs, applied to training batches with a per-worker
                torch.Generator that is seeded from config.seed and saved in checkpoints.
    optimizer:  optional factory params -> torch.optim.Optimizer; default AdamW(lr, weight_decay), fused where available.
    callbacks:  objects called at the start and end of training, after each step and each epoch, whose
                state (state_dict / load_state_dict) goes into checkpoints: see train/callbacks.py.

    Rank 0 logs one line per epoch (and on resume / early stop) to the `lepton_core.train` logger at
    INFO: `logging.basicConfig(level=logging.INFO)` shows them, `logging.getLogger("lepton_core.train")
    .setLevel(logging.WARNING)` silences them, a handler on that logger redirects them. The progress
    bar (config.progress) is separate.

    Creates the process group when none exists (and destroys it in close()). Seeds torch's global
    RNG per worker (seed, rank) for dropout and the like. Before the first step, one backward pass in
    eval mode lets DDP settle its gradient buckets (see _settle_buckets).
    """

    def __init__(self, model: nn.Module, train_data: Dataset, eval_data: Optional[Dataset] = None,
                 config: Optional[TrainConfig] = None, *, loss_fn: Optional[Callable] = None,
                 augment: Optional[Callable] = None,
                 optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
                 callbacks: Iterable[Any] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = cfg = (config if config is not None else TrainConfig()).validate()
        self.train_data, self.eval_data = train_data, eval_data
        if len(train_data) == 0:
            raise ValueError("Trainer: train_data is empty")
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.augment = augment
        self.callbacks = Callbacks(callbacks)

        self._owns_group = self._init_process_group()
        try:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.is_main = self.rank == 0
            self.device = self._pick_device()

            self.model = model.to(self.device)
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            hook_state = ld.HookState(group=None, compression=None if cfg.compression == "none" else cfg.compression,
                                      error_feedback=cfg.error_feedback, block_size=cfg.block_size)
            self.comm = CommState(hook_state, self.world_size, cfg.compression, cfg.block_size,
                                  guard_nonfinite=cfg.precision == "fp16" and cfg.compression != "none")
            self.ddp.register_comm_hook(self.comm, comm_hook)

            self.dp = None
            if cfg.dp:
                from .dp import DPAccounting, DPSGD

                self.dp = DPSGD(self.model, cfg, len(train_data), self.world_size)
                self.callbacks = Callbacks(self.callbacks.items + [DPAccounting(self.dp)])
            params = list(self.model.parameters())
            self.optimizer = optimizer(params) if optimizer is not None else _default_optimizer(params, cfg)
            self.amp_dtype = _AMP_DTYPES[cfg.precision]
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

            # Independent, reproducible random streams per worker (dropout, augmentation).
            torch.manual_seed(cfg.seed * 1009 + 1 + self.rank)
            self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + 100_003 + self.rank)
            self.sampler = DistributedSampler(train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                              seed=cfg.seed, drop_last=False)
            n_micro = math.ceil(len(self.sampler) / cfg.batch_size)
            self.steps_per_epoch = math.ceil(n_micro / cfg.grad_accum) if self.dp is None else self.dp.steps_per_epoch
            self.total_steps = cfg.epochs * self.steps_per_epoch

            # Position in the run and what has been measured so far (all saved in checkpoints).
            self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
            self.history: List[Dict[str, Any]] = []
            self._sums = self._zero_sums()
            self._buckets_settled = False
            self._pending_rng: Optional[Dict[str, Any]] = None
            self.metrics_file = MetricsFile(cfg.resolved_metrics_path if self.is_main else None)
        except BaseException:
            self.close()  # do not leave a process group behind
            raise

    # -- setup ----------------------------------------------------------------------------------------
    def _init_process_group(self) -> bool:
        if dist.is_initialized():
            return False
        cfg = self.config
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if self._cuda_usable() else "gloo"
        timeout = timedelta(seconds=cfg.timeout_s)
        if _env_int("WORLD_SIZE") is not None and _env_int("RANK") is not None:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a single worker, no launcher
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return True

    @staticmethod
    def _cuda_usable() -> bool:
        if not torch.cuda.is_available():
            return False
        import lepton_core as lc

        return "cuda" in lc.info()["backends"]

    def _pick_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            local = _env_int("LOCAL_RANK") or 0
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def close(self) -> None:
        """Releases the DDP wrapper, then destroys the process group if this trainer created it."""
        release_ddp(self)
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _lr_at(self, step: int) -> float:
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))

    def _zero_sums(self) -> Dict[str, float]:
        return {"loss": 0.0, "correct": 0.0, "count": 0.0, "samples": 0.0, "time_s": 0.0, "comm_bytes": 0.0}

    def _loss_and_correct(self, out: torch.Tensor, target: torch.Tensor):
        if out.is_floating_point():
            out = out.float()
        loss = self.loss_fn(out, target)
        correct = None
        if out.dim() == 2 and isinstance(target, torch.Tensor) and not target.is_floating_point():
            correct = (out.argmax(1) == target).sum()
        return loss, correct

    def _all_sum(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _micro_batches(self, epoch: int) -> List[List[int]]:
        if self.dp is not None:  # one Poisson-sampled batch per step (grad_accum is 1)
            return self.dp.epoch_batches(epoch, self.rank, self.world_size)
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        b = self.config.batch_size
        return [indices[i:i + b] for i in range(0, len(indices), b)]

    def _settle_buckets(self, batch) -> None:
        """DDP re-buckets the gradients after its first synchronized backward (in the order gradients
        become ready), which changes which elements share an int8 block and a residual slot. A run and
        its resumption must see the same layout on every step, so both start with one backward pass
        that lets DDP rebuild its buckets without communicating (hook bypassed) and without touching
        parameters, optimizer, RNG streams or buffers (eval mode: no dropout draws, no BN updates)."""
        if self._buckets_settled or self.dp is not None:  # DP steps do not use DDP's backward
            return
        was_training = self.model.training
        self.model.eval()
        self.comm.bypass = True
        try:
            x, y = _to(batch, self.device)
            with self._autocast():
                loss, _ = self._loss_and_correct(self.ddp(x), y)
            loss.backward()
        finally:
            self.comm.bypass = False
            self.model.train(was_training)
        self.optimizer.zero_grad(set_to_none=True)
        self._buckets_settled = True

    # -- checkpoints ----------------------------------------------------------------------------------
    def _rank_state(self) -> Dict[str, Any]:
        mine = {"rng": schema.rng_state(self.device, self.generator), "hook": self.comm.hook_state.state_dict(),
                "sums": dict(self._sums)}
        if self.callbacks.stateful:  # optional: files without callbacks keep schema 1's original keys
            mine["callbacks"] = self.callbacks.state_dict()
        return mine

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Writes the run's complete state (collective: every rank must call it). Returns the path."""
        path = path or self.config.checkpoint_path
        if path is None:
            return None
        gathered: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(self._rank_state(), gathered, dst=0)
        if self.is_main:
            cfg = self.config
            state = schema.make(world_size=self.world_size, config=dataclasses.asdict(cfg), epoch=self.epoch,
                                step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                                model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                                scaler=self.scaler.state_dict(), history=self.history, ranks=gathered)
            ckpt.save_atomic(state, path)
            if cfg.keep_checkpoints and self.step_in_epoch == 0:
                ckpt.keep_epoch_copy(path, self.epoch, cfg.keep_checkpoints)
        dist.barrier()
        return path

    def load_checkpoint(self, path: Optional[str] = None) -> None:
        """Restores a checkpoint written by save_checkpoint (collective). Rank 0 reads the file and
        broadcasts it, so other hosts need not see the same file system."""
        path = path or self.config.checkpoint_path
        box: List[Any] = [None]
        if self.is_main:
            try:
                box[0] = ckpt.load_for_resume(path)
            except Exception as exc:  # every rank must learn about it, not only rank 0
                box[0] = {"error": str(exc)}
        dist.broadcast_object_list(box, src=0)
        state = box[0]
        if "error" in state:
            raise ckpt.CheckpointError(f"lepton train: cannot resume: {state['error']}")
        check = schema.check_resume(state, self.config, self.world_size, callbacks=self.callbacks.stateful)
        check.raise_if_refused(path)
        for key, then, now in check.changed:
            self._log(f"resuming with {key}={now!r} (the checkpoint's run had {key}={then!r})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = schema.history(state)
        mine = state["ranks"][self.rank]
        self.comm.hook_state.load_state_dict(mine["hook"])
        self._sums = dict(mine["sums"])
        self.callbacks.load_state_dict(mine.get("callbacks", {}))
        self._pending_rng = mine["rng"]  # applied after the bucket warm-up, right before training resumes

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Optional[Dataset] = None) -> Dict[str, Optional[float]]:
        """Loss (mean over samples) and accuracy of the model on `data` (default eval_data), each
        worker taking every world_size-th sample; exact sums are combined across workers."""
        data = data if data is not None else self.eval_data
        if data is None:
            return {"loss": None, "accuracy": None}
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, count, has_acc = 0.0, 0.0, 0.0, True
        mine = list(range(self.rank, len(data), self.world_size))
        b = self.config.eval_batch_size
        for i in range(0, len(mine), b):
            x, y = _to(_fetch(data, mine[i:i + b]), self.device)
            with self._autocast():
                out = self.model(x)
            loss, c = self._loss_and_correct(out, y)
            n = y.shape[0]
            loss_sum += float(loss) * n
            count += n
            if c is None:
                has_acc = False
            else:
                correct += float(c)
        self.model.train(was_training)
        loss_sum, correct, count = self._all_sum([loss_sum, correct, count])
        if count == 0:
            return {"loss": None, "accuracy": None}
        return {"loss": loss_sum / count, "accuracy": correct / count if has_acc else None}

    # -- training -------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.is_main:
            logger.info(msg)

    def fit(self) -> Dict[str, Any]:
        """Trains for config.epochs (from the checkpoint when config.resume), returns the summary."""
        cfg = self.config
        if cfg.resume:
            self.load_checkpoint()
            self._log(f"resumed from {cfg.checkpoint_path} at epoch {self.epoch + 1}, step {self.global_step}")
        self.metrics_file.rewrite(self.history)
        self.callbacks.call("on_train_begin", self)
        run_start = time.perf_counter()
        wire0, payload0 = self.comm.wire_bytes, self.comm.payload_bytes
        stopped = False
        self.model.train()
        while self.epoch < cfg.epochs and not stopped:
            stopped = self._train_epoch()
        summary = {
            "epochs_completed": self.epoch,
            "steps": self.global_step,
            "world_size": self.world_size,
            "stopped_early": stopped,
            "time_s": time.perf_counter() - run_start,
            "comm_bytes": self.comm.wire_bytes - wire0,
            "grad_bytes": self.comm.payload_bytes - payload0,
            **run_summary(self.history),
            "history": list(self.history),
        }
        self.callbacks.call("on_train_end", self, summary)
        return summary

    def _train_epoch(self) -> bool:
        """Runs the rest of the current epoch; True when max_steps stopped the run inside it."""
        cfg = self.config
        micro = self._micro_batches(self.epoch)
        groups = [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
        if not self._buckets_settled and self.dp is None:
            self._settle_buckets(_fetch(self.train_data, micro[0]))
        if self._pending_rng is not None:
            schema.set_rng_state(self._pending_rng, self.device, self.generator)
            self._pending_rng = None
        wire0 = self.comm.wire_bytes
        bar = Progress(cfg.progress and self.is_main, len(groups), f"epoch {self.epoch + 1}/{cfg.epochs}",
                        initial=self.step_in_epoch)
        t0 = time.perf_counter()
        try:
            for group in groups[self.step_in_epoch:]:
                lr = self._lr_at(self.global_step)
                loss_val = self._train_step(group, lr)
                self.global_step += 1
                self.step_in_epoch += 1
                bar.update(loss_val)
                self.callbacks.call("on_step_end", self, StepInfo(
                    epoch=self.epoch + 1, step=self.global_step, step_in_epoch=self.step_in_epoch,
                    steps_per_epoch=len(groups), loss=loss_val, lr=lr, samples=sum(len(idx) for idx in group)))
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps and \
                        self.step_in_epoch < len(groups):
                    self._sums["time_s"] += time.perf_counter() - t0
                    self._sums["comm_bytes"] += self.comm.wire_bytes - wire0
                    self.save_checkpoint()
                    self._log(f"stopped after step {self.global_step} (max_steps); checkpoint: "
                              f"{cfg.checkpoint_path or 'none (no checkpoint_dir)'}")
                    return True
        finally:
            bar.close()
        self._sums["time_s"] += time.perf_counter() - t0
        self._sums["comm_bytes"] += self.comm.wire_bytes - wire0
        self._end_epoch()
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps and self.epoch < cfg.epochs:
            self._log(f"stopped after step {self.global_step} (max_steps)")
            return True
        return False

    def _train_step(self, group: List[List[int]], lr: float) -> float:
        for pg in self.optimizer.param_groups:
            pg["lr"] = lr
        if self.dp is not None:
            return self._dp_step(group[0])
        step_loss = 0.0
        for i, idx in enumerate(group):
            x, y = _to(_fetch(self.train_data, idx), self.device)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            sync = i == len(group) - 1  # gradients are all-reduced on the group's last micro-batch only
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with self._autocast():
                    out = self.ddp(x)
                loss, correct = self._loss_and_correct(out, y)
                self.scaler.scale(loss / len(group)).backward()
            n = len(idx)
            lv = float(loss.detach())
            step_loss += lv / len(group)
            self._sums["loss"] += lv * n
            self._sums["count"] += n
            self._sums["samples"] += n
            if correct is not None:
                self._sums["correct"] += float(correct)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _dp_step(self, idx: List[int]) -> float:
        """One DP-SGD step (train/dp.py): this rank's clipped per-example gradients summed, all-reduced
        (int8-compressed or not), the shared noise draw added, divided by the expected batch size."""
        dp, cfg = self.dp, self.config
        # fp16: the loss scale (scaling a unit tensor also readies the scaler for step())
        scale = float(self.scaler.scale(torch.ones((), device=self.device))) if self.scaler.is_enabled() else 1.0
        lv, n = 0.0, len(idx)
        with dp.capture() as cap:
            loss_sum = None
            if n:
                x, y = _to(_fetch(self.train_data, idx), self.device)
                if self.augment is not None:
                    x = self.augment(x, self.generator)
                with self._autocast():
                    out = self.model(x)
                loss, correct = self._loss_and_correct(out, y)
                loss_sum = loss * (n * scale)  # loss_fn is a mean over the batch: per-example terms summed
                lv = float(loss.detach())
                self._sums["loss"] += lv * n
                self._sums["count"] += n
                self._sums["samples"] += n
                if correct is not None:
                    self._sums["correct"] += float(correct)
            flat = dp.clipped_grads(cap, loss_sum, scale)
        if self.scaler.is_enabled():  # fp16 overflow: every rank skips the step (the scaler lowers the scale)
            bad = torch.tensor([0 if bool(torch.isfinite(flat).all()) else 1], dtype=torch.int32, device=self.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if int(bad.item()):
                flat.fill_(float("inf"))
        if bool(torch.isfinite(flat[:1]).all()):
            self.comm.count(flat)
            ld.all_reduce(flat, "sum", compression=None if cfg.compression == "none" else cfg.compression,
                          block_size=cfg.block_size)
            dp.add_noise(flat, self.global_step)
            flat.mul_(scale / dp.expected_batch)
        offset = 0
        for p in dp.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)  # float32 masters (lc.nn.Linear)
            offset += p.numel()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lv

    def _end_epoch(self) -> None:
        cfg = self.config
        s = self._sums
        wire_bytes = int(s["comm_bytes"])
        loss_sum, correct, count, samples, secs = self._all_sum(
            [s["loss"], s["correct"], s["count"], s["samples"], s["time_s"]])
        secs /= self.world_size  # workers run in lockstep; their mean wall time is the epoch's
        ev = self.evaluate()
        rec = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "train_loss": loss_sum / max(count, 1),
            "train_accuracy": correct / count if count else None,
            "eval_loss": ev["loss"],
            "eval_accuracy": ev["accuracy"],
            "samples_per_s": samples / secs if secs > 0 else None,
            "epoch_s": secs,
            "comm_bytes": wire_bytes,  # what this worker (rank 0) sent for gradients in this epoch
            "lr": self._lr_at(self.global_step - 1),
        }
        if cfg.precision == "fp16":
            rec["loss_scale"] = self.scaler.get_scale()
        self.callbacks.epoch_end(self, rec)  # may add keys: they go into the line, history and metrics.jsonl
        self.history.append(rec)
        self.epoch += 1
        self.step_in_epoch = 0
        self._sums = self._zero_sums()
        self._log(epoch_line(rec, cfg.epochs))
        # checkpoint first: the metrics file is rebuilt from the checkpoint's history on resume
        stopping = cfg.max_steps is not None and self.global_step >= cfg.max_steps
        if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs or stopping:
            self.save_checkpoint()
        self.metrics_file.append(rec)
