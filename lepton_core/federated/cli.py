"""`lepton federated`: federated training of the digits MLP over --nproc local processes (API.md §6).

    lepton federated --clients 100 --clients-per-round 10 --rounds 100            # FedAvg, Dirichlet(0.5)
    lepton federated --secure-agg --dropout 0.1                                    # Bonawitz et al. 2017
    lepton federated --clients-per-round 50 --secure-agg --secagg-neighbors 12     # SecAgg+ (Bell et al.)
    lepton federated --dp-clip 1.0 --dp-noise 1.2                                  # DP-FedAvg, epsilon reported
    lepton federated --resume                                                      # continue from --out
    torchrun --nproc-per-node 4 -m lepton_core.federated [same options]            # under torchrun

lepton_core/cli.py calls add_arguments(parser) and main(args). Client c lives in process c % nproc;
the launcher hands each process only its own clients' data (one file per process).
Exit codes: 0 done, 1 a worker failed or the run could not go on, 2 bad options, 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from ..train.cli import _int_at_least  # one parser type for both commands
from .config import ALGORITHMS, FedConfig

PROG = "lepton federated"
DEFAULT_OUT = "lepton-federated"
DEFAULTS = dict(clients=100, clients_per_round=10, rounds=100, alpha=0.5, local_epochs=5, batch_size=32, lr=0.05,
                hidden=128, depth=1, seed=0)




def _float_in(lo: float, hi: float, lo_open: bool = True, hi_open: bool = True):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                             f"{')' if hi_open else ']'}, got {text}")
        return v
    return parse


_positive = _float_in(0.0, float("inf"))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `lepton federated` options to `parser`."""
    d = DEFAULTS
    g = parser.add_argument_group("federation")
    g.add_argument("--clients", type=_int_at_least(1), default=d["clients"], help="(default: %(default)s)")
    g.add_argument("--clients-per-round", type=_int_at_least(1), default=d["clients_per_round"],
                   help="sampled per round (default: %(default)s)")
    g.add_argument("--rounds", type=_int_at_least(1), default=d["rounds"], help="(default: %(default)s)")
    g.add_argument("--alpha", type=_positive, default=d["alpha"],
                   help="Dirichlet concentration of the non-IID label split (default: %(default)s)")
    g.add_argument("--local-epochs", type=_int_at_least(1), default=d["local_epochs"], help="(default: %(default)s)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=d["batch_size"], help="local batch size (default: %(default)s)")
    g.add_argument("--lr", type=_positive, default=d["lr"], help="local SGD learning rate (default: %(default)s)")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg", help="(default: %(default)s)")
    g.add_argument("--prox-mu", type=_float_in(0.0, float("inf"), lo_open=False), default=0.01,
                   help="FedProx proximal weight (with --algorithm fedprox; default: %(default)s)")
    g.add_argument("--hidden", type=_int_at_least(1), default=d["hidden"], help="MLP width (default: %(default)s)")
    g.add_argument("--depth", type=_int_at_least(1), default=d["depth"], help="hidden layers (default: %(default)s)")
    g.add_argument("--seed", type=_int_at_least(0), default=d["seed"], help="(default: %(default)s)")
    s = parser.add_argument_group("privacy")
    s.add_argument("--secure-agg", action="store_true", help="secure aggregation (Bonawitz et al. 2017)")
    s.add_argument("--secagg-neighbors", type=_int_at_least(2), default=None, metavar="K",
                   help="SecAgg+ (Bell et al. 2020): mask with and share to K neighbours only (default: all)")
    s.add_argument("--fixed-point", action="store_true",
                   help="aggregate in fixed point mod 2^32 without masks (what --secure-agg sums)")
    s.add_argument("--dropout", type=_float_in(0.0, 1.0, lo_open=False), default=0.0,
                   help="probability that a sampled client drops out after the key exchange (default: %(default)s)")
    s.add_argument("--dp-clip", type=_positive, default=None, help="DP-FedAvg: L2 clip of each client's delta")
    s.add_argument("--dp-noise", type=_positive, default=None, help="DP-FedAvg: noise multiplier z (std z * clip)")
    s.add_argument("--dp-delta", type=_float_in(0.0, 1.0), default=1e-5, help="(default: %(default)s)")
    j = parser.add_argument_group("job")
    j.add_argument("--nproc", type=_int_at_least(1), default=2, help="local processes (default: %(default)s)")
    j.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads per process "
                   "(default: cores / processes)")
    j.add_argument("--out", default=DEFAULT_OUT, help="checkpoint.pt and metrics.jsonl go here (default: ./%(default)s)")
    j.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    j.add_argument("--timeout", type=_positive, default=60.0,
                   help="seconds before a silent peer process is an error (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> FedConfig:
    if (args.dp_clip is None) != (args.dp_noise is None):
        raise ValueError("--dp-clip and --dp-noise go together")
    return FedConfig(
        rounds=args.rounds, clients=args.clients, clients_per_round=args.clients_per_round,
        local_epochs=args.local_epochs, local_batch_size=args.batch_size, lr=args.lr, algorithm=args.algorithm,
        prox_mu=args.prox_mu if args.algorithm == "fedprox" else 0.0, secure_aggregation=args.secure_agg,
        dropout=args.dropout, dp_clip=args.dp_clip, dp_noise_multiplier=args.dp_noise, dp_delta=args.dp_delta,
        seed=args.seed, fixed_point=True if args.fixed_point else None, timeout_s=args.timeout,
        secagg_neighbors=args.secagg_neighbors,
    ).validate()


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return 2


# ---------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------
class _Elsewhere:
    """Stands in for a client hosted by another process: its size only (example weights are public)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def digits_model(hidden: int, depth: int, mean: float, std: float, sample):
    """The digits MLP (lepton_core.train.digits.build_model, no dropout) with fixed standardization
    constants (public hyperparameters computed once from the training images, so every process builds
    the same model; `sample` is any digits dataset, used only to build the layers)."""
    from ..train import digits

    model = digits.build_model(sample, hidden=hidden, depth=depth, dropout=0.0)
    model[0].mean, model[0].std = float(mean), float(std)
    return model


def _format_round(rec: Dict[str, Any], cfg: FedConfig) -> str:
    head = f"{PROG}: round {rec['round']}/{cfg.rounds}: {rec['clients']} clients"
    if rec["survivors"] != rec["clients"]:
        head += f" ({rec['survivors']} survived)"
    if "aborted" in rec:
        head += f"; ABORTED ({rec['aborted']})"
    else:
        head += f", {rec['bytes_sent_per_client'] / 1e3:.1f} kB sent per client"
    head += f"; test accuracy {100 * rec['test_accuracy']:.2f}% (loss {rec['test_loss']:.4f}); {rec['seconds']:.3f} s"
    if "epsilon" in rec:
        head += f"; epsilon {rec['epsilon']:.3f}"
    return head


def run_worker(job: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """One process of the job: loads its clients' shard and runs run_federated as its rank."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    import lepton_core as lc

    from ..train.cli import _interrupt_once
    from .core import run_federated

    _interrupt_once()
    from .._runtime import default_num_threads

    # API.md §0's default (OMP_NUM_THREADS, which torchrun and our launcher set per worker), as the trainer
    threads = job["threads"] or default_num_threads()
    torch.set_num_threads(threads)
    lc.set_num_threads(threads)
    cfg = FedConfig(**job["config"]).validate()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.timeout_s))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if "shards" in job:  # the launcher's per-process files
            shard = torch.load(os.path.join(job["shards"], f"rank{rank}.pt"), weights_only=True)
            clients = [TensorDataset(*shard[c]) if c in shard else _Elsewhere(n) for c, n in enumerate(job["sizes"])]
            test = TensorDataset(*job["test"])
        else:  # under torchrun: every process splits the data the same way and keeps its own clients
            from .data import digits_clients

            all_clients, _, test = digits_clients(cfg.clients, job["alpha"], cfg.seed)
            clients = [ds if c % world == rank else _Elsewhere(len(ds)) for c, ds in enumerate(all_clients)]
        m = job["model"]

        def model_fn():
            return digits_model(m["hidden"], m["depth"], m["mean"], m["std"], test)

        def on_round(rec):
            print(_format_round(rec, cfg), flush=True)

        try:
            history = run_federated(model_fn, clients, test, cfg, checkpoint_dir=job["out"], resume=job["resume"],
                                    on_round=on_round)
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        return history if rank == 0 else None
    finally:
        if own:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------------
def _job(args: argparse.Namespace, cfg: FedConfig, stats) -> Dict[str, Any]:
    mean, std = stats
    return {"config": dataclasses.asdict(cfg), "threads": args.threads, "out": args.out, "resume": args.resume,
            "alpha": args.alpha, "model": {"hidden": args.hidden, "depth": args.depth, "mean": mean, "std": std}}


def _summary(history: List[Dict[str, Any]], cfg: FedConfig, wall: float) -> str:
    last = history[-1]
    done = sum(1 for h in history if "aborted" not in h)
    line = (f"{PROG}: done: {len(history)} rounds ({done} completed) in {wall:.1f} s; "
            f"test accuracy {100 * last['test_accuracy']:.2f}% (loss {last['test_loss']:.4f})")
    if cfg.dp:
        line += f"; epsilon {last['epsilon']:.3f} at delta {cfg.dp_delta:g}"
    return line


def main(args: argparse.Namespace) -> int:
    """Runs `lepton federated` with parsed `args`; returns the exit code."""
    try:
        cfg = config_from_args(args)
    except (TypeError, ValueError) as exc:
        return _error(str(exc).replace("FedConfig: ", ""))
    from .._arrays import require_torch

    try:
        require_torch(PROG)
    except ImportError as exc:
        return _error(str(exc))
    if args.resume:
        from .core import load_checkpoint
        from .errors import FedError

        try:
            state = load_checkpoint(os.path.join(args.out, "checkpoint.pt"), cfg)
        except FedError as exc:
            return _error(str(exc))
        if state["rounds_done"] >= cfg.rounds:
            print(f"{PROG}: nothing to do (the checkpoint has {state['rounds_done']} of {cfg.rounds} rounds)")
            return 0
    import torch

    from .data import digits_clients

    try:
        clients, train, test = digits_clients(cfg.clients, args.alpha, cfg.seed)
    except (RuntimeError, ValueError) as exc:
        return _error(str(exc).replace("lepton train: ", ""))
    pixels = train.tensors[0]
    job = _job(args, cfg, (pixels.mean().item(), pixels.std().item()))
    job["sizes"], job["test"] = [len(c) for c in clients], list(test.tensors)
    mode = "secure aggregation" if cfg.secure_aggregation else ("fixed point" if cfg.uses_fixed_point else "plain")
    print(f"{PROG}: digits, {cfg.clients} clients (Dirichlet alpha {args.alpha:g}, {min(job['sizes'])}.."
          f"{max(job['sizes'])} examples each), {cfg.clients_per_round} per round, {cfg.rounds} rounds, "
          f"{cfg.algorithm}, {cfg.local_epochs} local epochs, lr {cfg.lr:g}, {mode}"
          f"{', dropout %g' % cfg.dropout if cfg.dropout else ''}"
          f"{', DP clip %g noise %g' % (cfg.dp_clip, cfg.dp_noise_multiplier) if cfg.dp else ''}; "
          f"{args.nproc} processes", flush=True)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..train.cli import _describe_failures
    from ..train.launch import launch_local

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lepton-federated-") as shards:
        for r in range(args.nproc):  # each process gets a file with only its own clients' data
            torch.save({c: list(ds.tensors) for c, ds in enumerate(clients) if c % args.nproc == r},
                       os.path.join(shards, f"rank{r}.pt"))
        job["shards"] = shards
        del clients
        try:
            results = launch_local(run_worker, job, args.nproc, name="lepton-federated")
        except ChildFailedError as exc:
            hint = " Continue from the last round with --resume." if os.path.isfile(
                os.path.join(args.out, "checkpoint.pt")) else ""
            print(f"{PROG}: error: {_describe_failures(exc)}; the other processes were stopped.{hint}",
                  file=sys.stderr, flush=True)
            return 1
        except (SignalException, KeyboardInterrupt):
            print(f"\n{PROG}: interrupted; processes stopped.", file=sys.stderr, flush=True)
            return 130
    history = results[0]
    print(_summary(history, cfg, time.perf_counter() - start), flush=True)
    print(f"{PROG}: checkpoint {os.path.join(args.out, 'checkpoint.pt')}, metrics "
          f"{os.path.join(args.out, 'metrics.jsonl')}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=PROG, description="Federated averaging on the digits data."))


def cli(argv=None) -> int:
    """`python -m lepton_core.federated`: one process under torchrun, else the launcher."""
    from ..train.cli import in_torchrun

    args = build_parser().parse_args(argv)
    if not in_torchrun():
        return main(args)
    try:
        cfg = config_from_args(args)
    except (TypeError, ValueError) as exc:
        return _error(str(exc))
    from ..train import digits

    train, _ = digits.load()
    pixels = train.tensors[0]
    history = run_worker(_job(args, cfg, (pixels.mean().item(), pixels.std().item())))
    if history:
        print(_summary(history, cfg, sum(h["seconds"] for h in history)), flush=True)
    return 0
