"""`lepton train`: the default data-parallel job (digits + lc.nn MLP), started on --nproc local workers.
DESCRIPTION and EXAMPLES below are its --help text (tests parse every example).

lepton_core/cli.py calls add_arguments(parser) and main(args). `python -m lepton_core.train` is the
same command; under torchrun (RANK/WORLD_SIZE set) it runs as one worker of the job instead.
Exit codes: 0 done, 1 a worker failed or a dependency (torch, scikit-learn) is missing, 2 bad options,
130 interrupted (Ctrl-C). Building the parser imports neither torch nor the trainer.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from . import _deps
from .config import DEFAULT_CHECKPOINT_DIR  # noqa: F401  (re-exported: the command's default directory)
from .config import OPTION_GROUPS, TrainConfig, option, option_fields, option_flag

PROG = "lepton train"
DESCRIPTION = """\
Data-parallel training with lepton_core. The default job trains an MLP of lc.nn.Linear layers on
scikit-learn's bundled 8x8 digits (no download) on --nproc local worker processes: bf16 compute and
int8-compressed gradient all-reduce with error feedback. After every epoch a checkpoint and a line of
metrics go to --checkpoint-dir; --resume continues a stopped run exactly where it stopped."""
EXAMPLES = """\
examples:
  lepton train                                      # 2 workers, bf16, int8 gradient compression
  lepton train --precision fp32 --compression none --epochs 20
  lepton train --nproc 4 --threads 2 --batch-size 64
  lepton train --max-steps 100                      # stop after 100 steps, with a checkpoint
  lepton train --resume                             # continue from lepton-train/checkpoint.pt
  lepton train --dp-clip 1.0 --dp-epsilon 8          # DP-SGD, epsilon 8 at delta 1e-5
  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
      -m lepton_core.train --precision bf16         # several hosts: one command per host"""


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


@dataclass
class JobOptions:
    """The options of the default job that are not TrainConfig fields (the processes and the model)."""

    nproc: int = option(2, "local worker processes to start (default: %(default)s)", group="job", min=1,
                        before="precision")
    threads: Optional[int] = option(None, "CPU threads per worker, for torch and lepton_core (default: "
                                          "OMP_NUM_THREADS when set, else the CPUs this process may use / --nproc)",
                                    group="job", min=1, before="precision")
    hidden: int = option(256, "width of the MLP's two hidden layers (default: %(default)s)", group="job", min=1,
                         before="seed")


def _options() -> List[dataclasses.Field]:
    """Every `lepton train` option: TrainConfig's fields made with option(), in field order, each
    JobOptions field just before the TrainConfig field it names."""
    job = option_fields(JobOptions)
    out = []
    for f in option_fields(TrainConfig):
        out += [j for j in job if j.metadata["before"] == f.name]
        out.append(f)
    return out


def _add_option(group, f: dataclasses.Field) -> None:
    m = f.metadata
    flag = option_flag(f)
    kw: Dict[str, Any] = dict(dest=f.name, default=m.get("cli_default", f.default), help=m["help"])
    if f.type == "bool":
        kw["action"] = "store_false" if f.default else "store_true"
    elif "choices" in m:
        kw["choices"] = m["choices"]
    else:
        kw["metavar"] = m.get("metavar") or flag[2:].replace("-", "_").upper()
        if f.type in ("int", "Optional[int]"):
            kw["type"] = _int_at_least(m["min"])
        elif f.type in ("float", "Optional[float]"):
            kw["type"] = _positive_float
    group.add_argument(flag, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `lepton train` options to `parser` (a subcommand parser or a fresh one)."""
    groups = {name: parser.add_argument_group(name) for name in OPTION_GROUPS}
    for f in _options():
        _add_option(groups[f.metadata["group"]], f)
    return parser


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in option_fields(TrainConfig)}).validate()


def _option(field: str) -> str:
    """The `lepton train` option of a TrainConfig field (or of world_size, as resume checks name --nproc)."""
    if field == "world_size":
        return "--nproc"
    flags = {f.name: option_flag(f) for f in _options()}
    return flags.get(field, "--" + field.replace("_", "-"))


def _config_error(exc: Exception) -> str:
    """A TrainConfig message ("TrainConfig: block_size must be ...") in terms of the option."""
    msg = str(exc)
    prefix = "TrainConfig: "
    if msg.startswith(prefix):
        field = msg[len(prefix):].split(" ", 1)[0]
        msg = _option(field) + msg[len(prefix) + len(field):]
    return msg


def _error(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _missing_dependency() -> Optional[str]:
    """Why this machine cannot run the default job (torch, scikit-learn for its data), or None."""
    return _deps.missing(("torch", "sklearn"), PROG, "train")


def _job(args: argparse.Namespace, cfg: TrainConfig) -> Dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "hidden": args.hidden, "threads": args.threads}


# ---------------------------------------------------------------------------------------------------
# One worker (a process started by the launcher, or by torchrun)
# ---------------------------------------------------------------------------------------------------
def run_worker(job: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Trains the digits job as one worker of the process group described by the environment.
    Returns the summary on rank 0 (None elsewhere)."""
    import torch

    import lepton_core as lc
    from lepton_core._runtime import default_num_threads

    from . import digits
    from .trainer import Trainer

    _interrupt_once()
    print_trainer_lines()
    # API.md §0's default: OMP_NUM_THREADS (set per worker by torchrun and by our launcher) when set,
    # else this process's CPUs; the same count for torch and lc.
    threads = job["threads"] or default_num_threads()
    torch.set_num_threads(threads)
    lc.set_num_threads(threads)
    cfg = TrainConfig(**job["config"]).validate()

    # The launcher loads the data once and hands it over (scikit-learn is slow to import); under
    # torchrun each worker loads it itself.
    train, test = job.get("data") or digits.load()
    torch.manual_seed(cfg.seed)  # the same initial model on every worker
    model = digits.build_model(train, hidden=job["hidden"])
    # DP-SGD trains without the shift augmentation: under the clip and the noise it costs ~12 points of
    # test accuracy at epsilon 8 (82.8% with it, 95% without; bench/notes_dp.md)
    trainer = Trainer(model, train, test, cfg, augment=None if cfg.dp else digits.shift_augment)
    try:
        if trainer.is_main:
            print(f"{PROG}: digits ({len(train)} train / {len(test)} test images), MLP 64-{job['hidden']}-"
                  f"{job['hidden']}-10 of lc.nn.Linear; {plural(trainer.world_size, 'worker')} x "
                  f"{plural(threads, 'thread')}, {cfg.precision}, compression {cfg.compression}, "
                  f"{plural(cfg.epochs, 'epoch')}, batch {cfg.batch_size}/worker, lr {cfg.lr:g}, seed {cfg.seed}",
                  flush=True)
        try:
            summary = trainer.fit()
        except KeyboardInterrupt:
            # Ctrl-C: the launcher reports it; leave quietly with the conventional status.
            raise SystemExit(130) from None
        if trainer.is_main:
            _print_summary(summary, cfg)
            return summary
        return None
    finally:
        trainer.close()


def print_trainer_lines() -> None:
    """The Trainer logs its lines to the `lepton_core.train` logger; the command line prints them on
    stdout exactly as they are (installed once per process)."""
    log = logging.getLogger("lepton_core.train")
    if not any(getattr(h, "_lepton_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._lepton_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # printed once, whatever the root logger does


def _interrupt_once() -> None:
    """Ctrl-C reaches a worker twice (from the terminal, then forwarded by the launcher): the first
    one interrupts training, later ones are ignored so the worker's clean-up is not interrupted too."""
    import signal

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def _print_summary(s: Dict[str, Any], cfg: TrainConfig) -> None:
    if not s["history"]:
        print(f"{PROG}: nothing to do (the checkpoint had finished {plural(cfg.epochs, 'epoch')})", flush=True)
        return
    acc = s.get("eval_accuracy")
    acc_txt = "n/a" if acc is None else f"{100 * acc:.2f}%"
    state = "stopped early (max_steps)" if s["stopped_early"] else "done"
    print(f"{PROG}: {state}: {plural(s['epochs_completed'], 'epoch')}, {plural(s['steps'], 'step')} in "
          f"{s['time_s']:.1f} s; "
          f"test accuracy {acc_txt} (loss {s['eval_loss']:.4f}); train loss {s['train_loss']:.4f}; "
          f"{(s.get('samples_per_s') or 0):,.0f} samples/s; gradients sent {s['comm_bytes'] / 1e6:.1f} MB "
          f"per worker ({cfg.compression})", flush=True)
    if cfg.dp and s["history"][-1].get("epsilon") is not None:
        print(f"{PROG}: DP-SGD: epsilon {s['history'][-1]['epsilon']:.3f} at delta {cfg.dp_delta:g} (clip "
              f"{cfg.dp_clip:g})", flush=True)
    if cfg.checkpoint_path:
        print(f"{PROG}: checkpoint {cfg.checkpoint_path}, metrics {cfg.resolved_metrics_path}", flush=True)


def _config_or_exit_code(args: argparse.Namespace) -> Union[TrainConfig, int]:
    """The run's TrainConfig, or the exit code once the reason there is none (a missing dependency, a bad
    option) is printed."""
    problem = _missing_dependency()
    if problem:
        return _error(problem, code=1)
    try:
        return _config_from_args(args)
    except (TypeError, ValueError) as exc:
        return _error(_config_error(exc))


def worker_main(args: argparse.Namespace) -> int:
    """Entry of one worker under torchrun (python -m lepton_core.train)."""
    cfg = _config_or_exit_code(args)
    if isinstance(cfg, int):
        return cfg
    try:
        run_worker(_job(args, cfg))
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# The launcher (lepton train)
# ---------------------------------------------------------------------------------------------------
def _describe_failures(exc) -> str:
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        code = failure.exitcode
        if code is not None and code < 0:
            import signal

            try:
                why = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                why = f"killed by signal {-code}"
        else:
            why = f"exit code {code}"
        msg = failure.message if isinstance(failure.message, str) else ""
        if isinstance(failure.message, dict):
            msg = failure.message.get("message", "")
        msg = msg.strip().splitlines()[0] if msg and msg.strip() else ""
        if msg.startswith("Signal ") or msg.startswith("To enable traceback"):
            msg = ""
        lines.append(f"worker rank {rank} failed ({why})" + (f": {msg}" if msg else ""))
    return "; ".join(lines)


def _resume_hint(cfg: TrainConfig) -> str:
    path = cfg.checkpoint_path
    if path and os.path.isfile(path):
        return f" The last checkpoint is {path}: continue with --resume."
    return ""


def _resume_problem(cfg: TrainConfig, nproc: int, hidden: int) -> Optional[str]:
    """Why --resume cannot work with this checkpoint and these options (None when it can), checked
    before any worker starts. The workers check again (under torchrun they are on their own)."""
    path = cfg.checkpoint_path
    from . import checkpoint as ckpt
    from .state import check_resume

    try:
        state = ckpt.load_for_resume(path, mmap=True)
    except (OSError, ckpt.CheckpointError) as exc:
        return f"--resume: {exc}"
    refused = check_resume(state, cfg, nproc).refused
    mismatches = [f"{_option(field)} {then}, not {now}" for field, then, now in refused]
    first = state["model"].get("1.weight")  # the digits MLP's first lc.nn.Linear: (hidden, 64)
    if first is not None and first.shape[0] != hidden:
        mismatches.append(f"--hidden {first.shape[0]}, not {hidden}")
    if mismatches:
        return f"--resume: {path} was made with {'; '.join(mismatches)}"
    return None


def main(args: argparse.Namespace) -> int:
    """Runs `lepton train` with parsed `args`; returns the exit code."""
    cfg = _config_or_exit_code(args)
    if isinstance(cfg, int):
        return cfg
    if cfg.resume:
        problem = _resume_problem(cfg, args.nproc, args.hidden)
        if problem:
            return _error(problem)
    from . import digits

    data = digits.load()
    job = _job(args, cfg)
    job["data"] = data

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .launch import launch_local

    start = time.perf_counter()
    try:
        launch_local(run_worker, job, args.nproc, name="lepton-train")
    except ChildFailedError as exc:
        print(f"{PROG}: error: {_describe_failures(exc)}; the other workers were stopped.{_resume_hint(cfg)}",
              file=sys.stderr, flush=True)
        return 1
    except (SignalException, KeyboardInterrupt) as exc:
        sig = getattr(exc, "sigval", None)
        what = "interrupted" if sig is None or getattr(sig, "name", "") == "SIGINT" else f"stopped by {sig.name}"
        print(f"\n{PROG}: {what}; workers stopped.{_resume_hint(cfg)}", file=sys.stderr, flush=True)
        return 130
    print(f"{PROG}: finished in {time.perf_counter() - start:.1f} s wall time (start-up included)", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lepton_core.cli import SuggestingParser

    parser = SuggestingParser(prog=PROG, description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def cli(argv=None) -> int:
    """`python -m lepton_core.train`: a worker under torchrun, else the launcher."""
    args = build_parser().parse_args(argv)
    return worker_main(args) if in_torchrun() else main(args)
