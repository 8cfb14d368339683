"""run_federated: FedAvg / FedProx rounds over torch.distributed (API.md §6).

Every process of the group runs the same loop. Client c lives on rank c % world_size: only that
process trains it and only it touches the client's data. One round:
  1. sample clients (a function of seed and round only, so every rank agrees without talking);
  2. each rank trains its sampled clients from the global model (local SGD, `local_epochs` passes in
     batches of `local_batch_size`; FedProx adds mu/2 ||w - w_global||^2) and takes their deltas;
  3. aggregation, one ld.all_reduce of the ranks' partial sums:
     float path: float32 sums of n_c * delta_c and n_c;
     fixed-point path: encode() of each delta (secagg.py) times n_c, summed as int32 mod 2^32;
     secure aggregation: the fixed-point vectors masked by the Bonawitz protocol (secagg.py), the key
     and share exchanges as all-gathers of fixed-size slots through the same ld.all_reduce (3 per round);
     DP: deltas clipped to L2 norm C, weight 1 each, Gaussian noise on the sum (dp.py);
  4. global += sum / (total weight) (DP: / clients_per_round), evaluated on the test set.
The aggregator role (unmasking, noise) is replicated: each rank computes the same result.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import dp as dpmod
from . import secagg, shamir
from .config import FedConfig
from .errors import FedError, SecAggAbort

CHECKPOINT_FORMAT = "lepton_core.federated/1"
_RESUME_FIELDS = ("clients", "clients_per_round", "seed", "algorithm", "secure_aggregation", "dp_clip",
                  "dp_noise_multiplier", "local_epochs", "local_batch_size", "lr", "prox_mu", "dropout",
                  "fixed_point", "clip_range", "secagg_threshold", "secagg_neighbors")


# ---------------------------------------------------------------------------------------------------
# Who takes part (functions of seed and round only)
# ---------------------------------------------------------------------------------------------------
def sample_clients(cfg: FedConfig, rnd: int) -> List[int]:
    rng = np.random.default_rng([cfg.seed, rnd, 1])
    if cfg.dp:  # Poisson sampling at rate q (what the accountant analyses)
        return np.flatnonzero(rng.random(cfg.clients) < cfg.sampling_rate).tolist()
    return sorted(rng.choice(cfg.clients, cfg.clients_per_round, replace=False).tolist())


def dropped_clients(cfg: FedConfig, rnd: int, sampled: Sequence[int]) -> List[int]:
    if cfg.dropout <= 0:
        return []
    rng = np.random.default_rng([cfg.seed, rnd, 2])
    return [c for c, u in zip(sampled, rng.random(len(sampled))) if u < cfg.dropout]


# ---------------------------------------------------------------------------------------------------
# Local training
# ---------------------------------------------------------------------------------------------------
def _tensors(ds) -> Tuple[torch.Tensor, torch.Tensor]:
    if hasattr(ds, "tensors") and len(ds.tensors) == 2:
        x, y = ds.tensors
    else:
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
    return x.float().contiguous(), y.long().contiguous()


class _Local:
    """The process's model copy and local trainer (plain SGD with torch._foreach ops, no optimizer state
    kept between rounds, no DataLoader)."""

    def __init__(self, model: torch.nn.Module, cfg: FedConfig) -> None:
        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)

    def vector(self) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.params).detach().clone()

    def load(self, vec: torch.Tensor) -> None:
        """Copies vec into the parameters (vector_to_parameters would make them views of vec, and local
        training would then write into the global model)."""
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(vec[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def train(self, global_vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        self.load(global_vec)
        anchor = [p.detach().clone() for p in self.params] if cfg.algorithm == "fedprox" and cfg.prox_mu > 0 else None
        self.model.train()
        n, bs = x.shape[0], cfg.local_batch_size
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                loss = F.cross_entropy(self.model(x[idx]), y[idx])
                grads = torch.autograd.grad(loss, self.params)
                with torch.no_grad():
                    if anchor is not None:  # FedProx: grad of mu/2 ||w - w_global||^2
                        grads = torch._foreach_add(grads, torch._foreach_sub(self.params, anchor), alpha=cfg.prox_mu)
                    torch._foreach_add_(self.params, grads, alpha=-cfg.lr)
        return self.vector() - global_vec

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
        self.model.eval()
        logits = self.model(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------------------
# Communication (errors of a lost peer become FedError)
# ---------------------------------------------------------------------------------------------------
class _Comm:
    def __init__(self) -> None:
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def _fail(self, rnd: int, what: str, exc: BaseException) -> FedError:
        return FedError(f"federated round {rnd}: {what} failed on rank {self.rank} of {self.world}: a peer process "
                        f"died or stopped answering ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def sum_(self, t: torch.Tensor, rnd: int) -> torch.Tensor:
        if self.world == 1:
            return t
        import lepton_core.distributed as ld

        try:
            return ld.all_reduce(t, "sum")
        except (RuntimeError, OSError) as exc:
            raise self._fail(rnd, "all_reduce", exc) from exc


    def sum_uint32(self, buf: np.ndarray, rnd: int, what: str) -> np.ndarray:
        """Sum mod 2^32 over the ranks of a uint32 vector (ld.all_reduce of its int32 view: integer sums
        wrap around in two's complement, which is addition mod 2^32)."""
        t = torch.from_numpy(buf.view(np.int32))
        if self.world > 1:
            import lepton_core.distributed as ld

            try:
                ld.all_reduce(t, "sum")
            except (RuntimeError, OSError) as exc:
                raise self._fail(rnd, f"all_reduce ({what})", exc) from exc
        return t.numpy().view(np.uint32)


def _slots(buf: np.ndarray, offset: int, count: int, nbytes: int) -> np.ndarray:
    """Rows of `nbytes` bytes in buf[offset:] (uint32 words): message slots of an all-gather done as a
    sum (each slot written by one rank, zero elsewhere)."""
    return buf[offset:offset + count * (nbytes // 4)].view(np.uint8).reshape(count, nbytes)


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------
def _fixed_point_setup(cfg: FedConfig, sizes: Sequence[int]) -> Tuple[int, float]:
    """(fraction bits, clip range): the bound on the summed weights is what any round could reach."""
    if cfg.dp:
        return secagg.fixed_point_bits(cfg.clients, cfg.dp_clip), float(cfg.dp_clip)
    bound = sum(sorted(sizes, reverse=True)[:cfg.clients_per_round])
    return secagg.fixed_point_bits(bound, cfg.clip_range), float(cfg.clip_range)


def _round_noise(cfg: FedConfig, rnd: int, numel: int) -> np.ndarray:
    """The aggregator's Gaussian noise N(0, (z C)^2) for this round (seeded: every rank draws the same)."""
    rng = np.random.default_rng([cfg.seed, rnd, 3])
    return rng.normal(0.0, cfg.dp_noise_multiplier * cfg.dp_clip, size=numel)


class _Round:
    """State and results of one round on this rank."""

    def __init__(self, rnd: int, sampled: List[int], dropped: List[int]) -> None:
        self.rnd, self.sampled, self.dropped = rnd, sampled, dropped
        self.survivors = [c for c in sampled if c not in set(dropped)]
        self.bytes_per_client = 0.0


def _aggregate(cfg: FedConfig, comm: _Comm, r: _Round, deltas: Dict[int, np.ndarray], weights: Dict[int, int],
               numel: int, fp: Optional[Tuple[int, float]]) -> Tuple[np.ndarray, float]:
    """(sum of weighted deltas as float64, total weight) over every rank's surviving clients."""
    if fp is None:
        buf = torch.zeros(numel + 1, dtype=torch.float32)
        for c, d in deltas.items():
            buf[:numel] += torch.from_numpy(d * weights[c]).float()
            buf[numel] += weights[c]
        comm.sum_(buf, r.rnd)
        r.bytes_per_client = 4.0 * (numel + 1)
        return buf[:numel].double().numpy(), float(buf[numel])
    bits, clip_range = fp
    enc = {c: np.append(secagg.encode(d, bits, clip_range, weights[c]), np.uint32(weights[c]))
           for c, d in deltas.items()}
    if not cfg.secure_aggregation:
        total = np.zeros(numel + 1, dtype=np.uint32)
        for v in enc.values():
            total += v
        summed = comm.sum_uint32(total, r.rnd, "fixed-point sum")
        r.bytes_per_client = 4.0 * (numel + 1)
    else:
        summed = _secure_sum(cfg, comm, r, enc, numel + 1)
    return secagg.decode(summed[:numel], bits), float(summed[numel])


def _secure_sum(cfg: FedConfig, comm: _Comm, r: _Round, enc: Dict[int, np.ndarray], length: int) -> np.ndarray:
    """Bonawitz et al.'s rounds over three ld.all_reduce calls. Messages the server would relay travel as
    all-gathers done by summing fixed-size slots (each written by its sender's rank, zero elsewhere):
      1. public keys (64 bytes per sampled client);
      2. the masked inputs' sum, who sent one (the server sees that anyway) and the encrypted shares
         (n x n slots). Masking needs only the public keys, so the ShareKeys messages ride in this
         collective: a dropped client's shares are delivered and its masked input is not, exactly as
         if it dropped between the two rounds;
      3. the survivors' unmasking shares (n_survivors x n slots; which secret each one is follows from
         the survivor set).
    """
    mine = [c for c in r.sampled if c % comm.world == comm.rank]
    n = len(r.sampled)
    graph = secagg.harary_graph(r.sampled, cfg.secagg_neighbors, np.random.default_rng([cfg.seed, r.rnd, 5]))
    peers = max((len(v) for v in graph.values()), default=0)
    t = cfg.secagg_threshold or secagg.default_threshold(peers + 1)
    if t > peers + 1:
        raise SecAggAbort(f"secure aggregation: threshold t = {t} exceeds the {peers + 1} holders of each secret; "
                          "the round is aborted")
    index = {c: i for i, c in enumerate(r.sampled)}
    clients = {c: secagg.Client(c) for c in mine}

    keys = np.zeros(16 * n, dtype=np.uint32)
    for c, cl in clients.items():
        c_pk, s_pk = cl.public_keys()
        _slots(keys, 0, n, 64)[index[c]] = np.frombuffer(c_pk + s_pk, dtype=np.uint8)
    key_rows = _slots(comm.sum_uint32(keys, r.rnd, "key advertisement"), 0, n, 64)
    roster = {c: (key_rows[i, :32].tobytes(), key_rows[i, 32:].tobytes()) for c, i in index.items()}

    ct_bytes = secagg.CIPHERTEXT_BYTES
    ct_at = length + n
    buf = np.zeros(ct_at + n * n * ct_bytes // 4, dtype=np.uint32)
    cts = _slots(buf, ct_at, n * n, ct_bytes)
    for u, cl in clients.items():
        for v, ct in cl.share_keys(roster, t, graph[u]).items():
            cts[index[u] * n + index[v]] = np.frombuffer(ct, dtype=np.uint8)
    for c, x in enc.items():  # this rank's survivors
        buf[:length] += clients[c].masked_input(x, roster, graph[c])
        buf[length + index[c]] = 1
    buf = comm.sum_uint32(buf, r.rnd, "masked inputs and shares")
    cts = _slots(buf, ct_at, n * n, ct_bytes)
    for v, cl in clients.items():
        cl.receive_shares(roster, {u: cts[index[u] * n + index[v]].tobytes() for u in graph[v]})
    survivors = [c for c in r.sampled if buf[length + index[c]]]
    dropped = [c for c in r.sampled if not buf[length + index[c]]]
    if len(survivors) < t:
        raise SecAggAbort(f"secure aggregation: {len(survivors)} of {n} sampled clients survived, below the "
                          f"threshold t = {t}; the round is aborted and the model is unchanged")

    m = len(survivors)
    pos = {c: i for i, c in enumerate(survivors)}
    sh = np.zeros(m * n * 8, dtype=np.uint32)
    rows = _slots(sh, 0, m * n, 32)
    for v in mine:
        if v in pos:
            held = set(graph[v]) | {v}
            for u, (_, share) in clients[v].unmask_shares([u for u in survivors if u in held],
                                                          [u for u in dropped if u in held]).items():
                rows[pos[v] * n + index[u]] = np.frombuffer(shamir.to_bytes(share), dtype=np.uint8)
    rows = _slots(comm.sum_uint32(sh, r.rnd, "unmasking"), 0, m * n, 32)
    kind = {u: "b" for u in survivors} | {u: "s" for u in dropped}
    shares = {v: {u: (kind[u], int.from_bytes(rows[pos[v] * n + index[u]].tobytes(), "little"))
                  for u in graph[v] + [v]} for v in survivors}
    total = secagg.unmask(buf[:length].copy(), roster, survivors, dropped, shares, t, graph)
    r.bytes_per_client = float(secagg.upload_bytes(peers, length))
    return total


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run_federated(model_fn: Callable[[], torch.nn.Module], client_datasets: Sequence, test_set, config: FedConfig,
                  *, checkpoint_dir: Optional[str] = None, resume: bool = False,
                  on_round: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Federated training (API.md §6); returns the history, one record per round.

    Runs as one rank of the initialized torch.distributed group (or alone without one). Every rank
    passes the same `client_datasets` list (length config.clients; entries of other ranks' clients are
    only measured, never read: pass them lazily or as stand-ins of the right length if wanted).
    checkpoint_dir: rank 0 writes checkpoint.pt (the global model after each round) and metrics.jsonl
    there; resume: continue from that checkpoint. on_round(record) is called on rank 0 after each round.
    """
    cfg = dataclasses.replace(config).validate()
    if len(client_datasets) != cfg.clients:
        raise ValueError(f"run_federated: {len(client_datasets)} client datasets for FedConfig.clients = {cfg.clients}")
    comm = _Comm()
    sizes = [len(ds) for ds in client_datasets]
    if min(sizes) < 1:
        raise ValueError(f"run_federated: client {sizes.index(min(sizes))} has no examples")
    local_data = {c: _tensors(client_datasets[c]) for c in range(cfg.clients) if c % comm.world == comm.rank}
    test_x, test_y = _tensors(test_set)

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    local = _Local(model_fn(), cfg)
    global_vec = local.vector()
    history: List[Dict[str, Any]] = []
    start = 0
    ckpt_path = os.path.join(checkpoint_dir, "checkpoint.pt") if checkpoint_dir else None
    if resume:
        state = load_checkpoint(ckpt_path, cfg)
        global_vec = state["model"].to(global_vec.dtype)
        if global_vec.numel() != local.numel:
            raise FedError(f"--resume: {ckpt_path} holds {global_vec.numel()} parameters, the model has {local.numel}")
        history, start = list(state["history"]), int(state["rounds_done"])
    elif ckpt_path and comm.rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        open(os.path.join(checkpoint_dir, "metrics.jsonl"), "w").close()  # a fresh run: fresh metrics
    accountant = dpmod.Accountant(cfg.dp_noise_multiplier, cfg.sampling_rate, cfg.dp_delta) if cfg.dp else None
    fp = _fixed_point_setup(cfg, sizes) if cfg.uses_fixed_point else None

    for rnd in range(start, cfg.rounds):
        t0 = time.perf_counter()
        sampled = sample_clients(cfg, rnd)
        r = _Round(rnd, sampled, dropped_clients(cfg, rnd, sampled))
        deltas, weights = {}, {}
        for c in r.survivors:
            if c % comm.world != comm.rank:
                continue
            x, y = local_data[c]
            gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rnd, 4, c]).integers(2**62)))
            torch.manual_seed(gen.initial_seed())  # dropout layers, if the model has any
            d = local.train(global_vec, x, y, gen).double().numpy()
            deltas[c] = dpmod.clip_l2(d, cfg.dp_clip) if cfg.dp else d
            weights[c] = 1 if cfg.dp else sizes[c]
        record: Dict[str, Any] = {"round": rnd + 1, "clients": len(r.sampled), "survivors": len(r.survivors)}
        try:
            summed, weight = _aggregate(cfg, comm, r, deltas, weights, local.numel, fp)
        except SecAggAbort as exc:
            record["aborted"] = str(exc)
            summed = None
        if summed is not None:
            if cfg.dp:
                summed = summed + _round_noise(cfg, rnd, local.numel)
                update = summed / cfg.clients_per_round
            else:
                update = summed / weight if weight > 0 else np.zeros_like(summed)
                if weight == 0:
                    record["aborted"] = "no client survived; the model is unchanged"
            global_vec = global_vec + torch.from_numpy(update).to(global_vec.dtype)
        if "aborted" not in record:
            record["bytes_sent_per_client"] = r.bytes_per_client
        local.load(global_vec)  # every rank evaluates (cheap), so every rank returns the same history
        record["test_loss"], record["test_accuracy"] = local.evaluate(test_x, test_y)
        if accountant is not None:
            done = sum(1 for h in history if "aborted" not in h) + ("aborted" not in record)
            record["epsilon"] = accountant.epsilon(done)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if comm.rank == 0:
            if ckpt_path:
                _save(ckpt_path, checkpoint_dir, cfg, global_vec, history, record)
            if on_round is not None:
                on_round(record)
    local.load(global_vec)
    return history


def _save(path: str, directory: str, cfg: FedConfig, vec: torch.Tensor, history, record) -> None:
    import json

    from ..train.checkpoint import save_atomic

    save_atomic({"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "model": vec.clone(),
                 "history": history, "rounds_done": record["round"]}, path)
    with open(os.path.join(directory, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def load_checkpoint(path: Optional[str], cfg: FedConfig) -> Dict[str, Any]:
    """The checkpoint at `path`, checked against the run's settings."""
    if not path or not os.path.isfile(path):
        raise FedError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FedError(f"--resume: cannot read {path}: {exc}") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FedError(f"--resume: {path} is not a federated checkpoint")
    for f in _RESUME_FIELDS:
        if state["config"].get(f) != getattr(cfg, f):
            raise FedError(f"--resume: {path} was made with {f}={state['config'].get(f)!r}, not {getattr(cfg, f)!r}")
    return state


