"""Flower's simulation of the FedAvg job of `lepton bench federated`, for its side-by-side rows.

The same setting as ours: digits, 100 clients from the same Dirichlet split (digits_clients, same
seed), the same 64-128-10 MLP of lc.nn.Linear layers with the same initial weights, and the same local
trainer (core._Local: plain SGD, the same local epochs, lr, batch size and per-(round, client) shuffling
seed). Flower does the rest: it samples the clients (10% of the nodes, from its own generator, so not
our clients), ships the model to its virtual clients (ClientApps run by its Ray backend, one actor per
core), and averages the returned models weighted by their example counts.

Variants, each one run_simulation():
  * "flower fedavg": the message API as Flower's docs show it: a ClientApp with a @train function, a
    ServerApp running flwr.serverapp.strategy.FedAvg(...).start(..., evaluate_fn=...).
  * "flower secagg+": Flower's secure aggregation, which it offers through the legacy API only:
    ClientApp(client_fn=NumPyClient, mods=[secaggplus_mod]) and a ServerApp running
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares, reconstruction_threshold)) with
    flwr.server.strategy.FedAvg. num_shares = clients per round makes the graph complete (every client
    masks with every other: Bonawitz et al., like our default), threshold = a majority as ours.
    "flower fedavg (legacy)" is the same path without SecAggPlusWorkflow, its plain baseline.

Round time: between consecutive calls of the server's centralized evaluate_fn (one per round, after
aggregation), so training, transfers, aggregation and the test evaluation are inside, as in ours.
Flower and Ray run in the benchmark's main process (the ServerApp) and in Ray's worker processes.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Dict, List, Optional

NUM_CPUS = 2  # Ray actors: one per core, like our 2 processes
VARIANTS = ("flower fedavg", "flower fedavg (legacy)", "flower secagg+")


def unavailable() -> Optional[str]:
    """Why the Flower rows cannot run here (None: they can)."""
    try:
        import flwr  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401
    except ImportError as exc:
        return f"flwr is not installed ({exc}); pip install 'flwr[simulation]' to add these rows"
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"Flower's simulation engine needs Ray, which is not installed ({exc})"
    return None


# ---------------------------------------------------------------------------------------------------
# Client side (runs in Ray's worker processes; the job's settings come in the environment)
# ---------------------------------------------------------------------------------------------------
_ENV = "LEPTON_FLOWER_JOB"
_actor: Dict[str, Any] = {}


def _job() -> Dict[str, Any]:
    import json

    return json.loads(os.environ[_ENV])


def _setup() -> Dict[str, Any]:
    """This actor's data and trainer (built once per process)."""
    if not _actor:
        import torch

        from ..federated import FedConfig
        from ..federated.cli import DEFAULTS as d
        from ..federated.cli import digits_model
        from ..federated.core import _Local, _tensors
        from ..federated.data import digits_clients

        torch.set_num_threads(1)
        job = _job()
        clients, train, test = digits_clients(d["clients"], d["alpha"], d["seed"])
        pixels = train.tensors[0]
        cfg = FedConfig(rounds=job["rounds"], clients=d["clients"], clients_per_round=job["clients_per_round"],
                        local_epochs=d["local_epochs"], lr=d["lr"], local_batch_size=d["batch_size"],
                        seed=d["seed"]).validate()
        torch.manual_seed(cfg.seed)  # the same initial model as ours (run_federated seeds the same way)
        model = digits_model(d["hidden"], d["depth"], pixels.mean().item(), pixels.std().item(), test)
        _actor.update(cfg=cfg, local=_Local(model, cfg), clients=clients, test=_tensors(test))
    return _actor


def _train_client(cid: int, server_round: int, state: Dict[str, "Any"]) -> int:
    """Loads `state` (a state dict), trains client cid as run_federated would in that round (same seed
    for its shuffling) and leaves the trained weights in the model; returns its example count."""
    import numpy as np
    import torch

    from ..federated.core import _tensors

    a = _setup()
    cfg, local = a["cfg"], a["local"]
    local.model.load_state_dict(state)
    x, y = _tensors(a["clients"][cid])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, server_round - 1, 4, cid]).integers(2**62)))
    torch.manual_seed(gen.initial_seed())
    delta = local.train(local.vector(), x, y, gen)
    del delta  # the model now holds the trained weights, which is what Flower averages
    return int(x.shape[0])


def _message_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        n = _train_client(cid, int(msg.content["config"]["server-round"]), msg.content["arrays"].to_torch_state_dict())
        content = RecordDict({"arrays": ArrayRecord(_setup()["local"].model.state_dict()),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    return app


def _legacy_client_app(secure: bool):
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class DigitsClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters, config):
            import torch

            model = _setup()["local"].model
            keys = list(model.state_dict())
            n = _train_client(self.cid, int(config["server-round"]),
                              {k: torch.from_numpy(v) for k, v in zip(keys, parameters)})
            return [v.detach().numpy().copy() for v in model.state_dict().values()], n, {}

    def client_fn(context):
        return DigitsClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


# ---------------------------------------------------------------------------------------------------
# Server side (runs in the benchmark's process)
# ---------------------------------------------------------------------------------------------------
def _server_app(variant: str, times: List[float], accuracy: List[float]):
    import numpy as np
    import torch

    a = _setup()
    cfg, local = a["cfg"], a["local"]
    test_x, test_y = a["test"]
    initial = {k: v.detach().clone() for k, v in local.model.state_dict().items()}
    keys = list(initial)

    def evaluate(state) -> float:
        local.model.load_state_dict(state)
        times.append(time.perf_counter())
        accuracy.append(local.evaluate(test_x, test_y)[1])
        return accuracy[-1]

    if variant == "flower fedavg":
        from flwr.app import ArrayRecord, MetricRecord
        from flwr.serverapp import ServerApp
        from flwr.serverapp.strategy import FedAvg

        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:
            strategy = FedAvg(fraction_train=cfg.clients_per_round / cfg.clients, fraction_evaluate=0.0,
                              min_train_nodes=cfg.clients_per_round, min_available_nodes=cfg.clients)
            strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds,
                           evaluate_fn=lambda rnd, arrays: MetricRecord(
                               {"accuracy": evaluate(arrays.to_torch_state_dict())}))
        return app

    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    app = ServerApp()

    @app.main()
    def legacy_main(grid, context) -> None:
        strategy = LegacyFedAvg(
            fraction_fit=cfg.clients_per_round / cfg.clients, fraction_evaluate=0.0,
            min_fit_clients=cfg.clients_per_round, min_evaluate_clients=0, min_available_clients=cfg.clients,
            on_fit_config_fn=lambda rnd: {"server-round": rnd},
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            evaluate_fn=lambda rnd, arrays, conf: (0.0, {"accuracy": evaluate(
                {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, arrays)})}))
        context = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
        k = cfg.clients_per_round
        fit = SecAggPlusWorkflow(num_shares=k, reconstruction_threshold=k // 2 + 1) if variant == "flower secagg+" \
            else None
        DefaultWorkflow(fit_workflow=fit)(grid, context)
    return app


def run_variant(variant: str, rounds: int, clients_per_round: int) -> Dict[str, Any]:
    """One Flower simulation; its row (median round time without the first round, final test accuracy)."""
    import json
    import logging

    import torch
    from flwr.simulation import run_simulation

    from ..federated.cli import DEFAULTS

    os.environ[_ENV] = json.dumps({"rounds": rounds, "clients_per_round": clients_per_round})  # Ray's workers
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # inherit it; no network here: report no usage
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 would slow Flower's clients against
    # our processes (nice 0) whenever anything else runs on the machine
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: keep Ray's hands off
    _actor.clear()
    threads = torch.get_num_threads()  # _setup() sets 1 for the server's evaluation, as our workers use
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # a line per round and client otherwise
    times: List[float] = []
    accuracy: List[float] = []
    client_app = _message_client_app() if variant == "flower fedavg" else _legacy_client_app(variant == "flower secagg+")
    t0 = time.perf_counter()
    try:
        run_simulation(server_app=_server_app(variant, times, accuracy), client_app=client_app,
                       num_supernodes=DEFAULTS["clients"],
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": NUM_CPUS, "include_dashboard": False,
                                                     "log_to_driver": False, "logging_level": logging.ERROR}})
    finally:
        flwr_log.setLevel(level)
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    done = len(times) - 1  # evaluate_fn also runs once on the initial model
    if done != rounds:
        raise RuntimeError(f"flower simulation ({variant}) finished {done} of {rounds} rounds")
    steps = [b - a for a, b in zip(times, times[1:])]
    return {"framework": "flwr " + _version(), "variant": variant, "clients_per_round": clients_per_round,
            "rounds": rounds, "ms_per_round": 1e3 * statistics.median(steps[1:] or steps),
            "test_accuracy": accuracy[-1], "wall_s": wall}


def _version() -> str:
    import flwr

    return flwr.__version__


# ---------------------------------------------------------------------------------------------------
# The table: ours and Flower's, taking turns in one run
# ---------------------------------------------------------------------------------------------------
TITLE = "federated: lepton_core vs Flower"
COLUMNS = ["framework", "variant", "clients_per_round", "rounds", "ms_per_round", "vs_plain", "vs_lepton",
           "test_accuracy", "wall_s", "note"]
QUICK_ROUNDS = 3
PLAN = (  # in this order; (framework, variant, FedConfig overrides for ours)
    ("lepton_core", "fedavg", {}),
    ("flwr", "flower fedavg", None),
    ("flwr", "flower fedavg (legacy)", None),
    ("lepton_core", "secure agg", {"secure_aggregation": True}),
    ("flwr", "flower secagg+", None),
)
PLAIN_OF = {"secure agg": "fedavg", "flower secagg+": "flower fedavg (legacy)"}  # vs_plain: the same path unmasked
SECURE = ("secure agg", "flower secagg+")  # vs_lepton: against our row of the same kind


def run(quick: bool = False, rounds: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows for ours and Flower's FedAvg at `lepton federated`'s defaults (100 clients, 10 per round,
    5 local epochs, lr 0.05, batch 32), `rounds` rounds (default: its 100; quick: 3)."""
    from ..federated.cli import DEFAULTS
    from .federated import digits_job, run_variants

    rounds = rounds or (QUICK_ROUNDS if quick else DEFAULTS["rounds"])
    k = DEFAULTS["clients_per_round"]
    reason = unavailable()
    data = digits_job()
    rows = []
    for framework, variant, extra in PLAN:
        if framework == "lepton_core":
            t0 = time.perf_counter()
            r = run_variants({**data, "per_round": (k,), "rounds": rounds, "repeats": 1, "seed": DEFAULTS["seed"],
                              "variants": [(variant, extra)]})[0]
            rows.append({**r, "framework": framework, "rounds": rounds, "wall_s": time.perf_counter() - t0})
        elif reason:
            rows.append({"framework": framework, "variant": variant, "clients_per_round": k, "note": "skipped: " + reason})
        else:
            rows.append(run_variant(variant, rounds, k))
    ms = {r["variant"]: r["ms_per_round"] for r in rows if "ms_per_round" in r}
    for r in rows:
        if r["variant"] in ms:
            r["vs_plain"] = ms[r["variant"]] / ms[PLAIN_OF.get(r["variant"], r["variant"])]
            r["vs_lepton"] = ms[r["variant"]] / ms["secure agg" if r["variant"] in SECURE else "fedavg"]
    return rows


if __name__ == "__main__":
    import argparse

    from .common import print_table

    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every run (default: lepton federated's 100)")
    args = ap.parse_args()
    print_table(run(quick=args.quick, rounds=args.rounds), COLUMNS, title=TITLE)
