"""lepton_core.train: the 2-worker `lepton train` job end to end, exact resume, failure and Ctrl-C
handling, CLI errors, and the Trainer's pieces in one process.

Multi-process runs go through `python -m lepton_core.train` (the same launcher as `lepton train`) in
a subprocess with a hard timeout, on a small model so each run is mostly process start-up.
"""
import contextlib
import dataclasses
import errno
import importlib.util
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lepton_core
import lepton_core.distributed as ld
import lepton_core.nn as lnn
from lepton_core.train import Callback, StepInfo, TrainConfig, Trainer, cli
from lepton_core.train import checkpoint as ckpt
from lepton_core.train import metrics, state
from lepton_core.train.comm import CommState, comm_hook

# The default job's data ships with scikit-learn (the `train` extra). Without it these tests cannot
# run the job at all; CI installs it (see the report / pyproject's test extra).
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn is not installed (the digits data of `lepton train`)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lepton_core.__file__)))
RUN_TIMEOUT_S = 240  # generous: start-up of 3 Python processes on a busy 2-core machine
FAILURE_BOUND_S = 60  # a failed or interrupted job must end within this (it takes ~1-5 s)

# A small, quick job: 12 steps per epoch, a 64-32-32-10 MLP.
SMALL = ["--hidden", "32", "--batch-size", "64", "--lr", "0.01", "--no-progress"]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _train(*args, cwd, timeout=RUN_TIMEOUT_S, env=None):
    return subprocess.run([sys.executable, "-m", "lepton_core.train", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_state(a, b):
    """Bitwise equality of nested state (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


_TIMING_KEYS = ("samples_per_s", "epoch_s")


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in records]


# ---------------------------------------------------------------------------------------------------
# Multi-process: a full run, stop + resume, a killed worker, Ctrl-C
# ---------------------------------------------------------------------------------------------------
EPOCHS = 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 workers, bf16, int8 compression, gradient accumulation 2, run straight through."""
    d = tmp_path_factory.mktemp("uninterrupted")
    r = _train("--epochs", str(EPOCHS), "--grad-accum", "2", "--checkpoint-dir", "ck", *SMALL, cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    return d, r


@needs_sklearn
@pytest.mark.distributed
def test_two_worker_run(uninterrupted):
    d, r = uninterrupted
    out = r.stdout
    assert "2 workers" in out and "bf16" in out and "compression int8" in out
    for e in range(1, EPOCHS + 1):
        assert f"epoch {e:>3}/{EPOCHS}" in out
    assert "done: 3 epochs" in out and "test accuracy" in out
    assert "Traceback" not in r.stderr
    recs = _metrics(d / "ck" / "metrics.jsonl")
    assert [rec["epoch"] for rec in recs] == [1, 2, 3]
    for rec in recs:
        for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "samples_per_s", "comm_bytes"):
            assert rec[key] is not None and rec[key] >= 0, key
    assert recs[-1]["eval_accuracy"] > 0.5  # far above chance (0.1) after 3 epochs
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    # Bytes: one bucket of all 3,466 parameters per optimizer step, ring traffic 2 (W-1)/W of it,
    # int8 costing 1 + 4/256 bytes per element: per epoch ceil(ceil(719/64)/2) = 6 steps.
    n_params = (64 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10)
    per_step = round(2 * (2 - 1) / 2 * n_params * (1 + 4 / 256))
    assert all(rec["comm_bytes"] == 6 * per_step for rec in recs)
    state = _load(d / "ck" / "checkpoint.pt")
    assert state["epoch"] == EPOCHS and state["step_in_epoch"] == 0 and state["global_step"] == 3 * 6
    assert len(state["ranks"]) == 2
    assert not [p for p in os.listdir(d / "ck") if p.startswith(".tmp")]


def _shape(line):
    """A line of `lepton train` output without its numbers, plurals and checkpoint directory."""
    line = re.sub(r"\S+/(checkpoint\.pt|metrics\.jsonl)", r"DIR/\1", line)
    line = re.sub(r"\d[\d,.]*", "N", line)
    line = re.sub(r"\b(N \w+?)s\b", r"\1", line)
    return re.sub(r"\s+", " ", line).strip()


@needs_sklearn
@pytest.mark.distributed
def test_readme_shows_what_the_job_prints(uninterrupted):
    """README's sample output has the lines, in the order and format, of a real run."""
    _, r = uninterrupted
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    sample = readme.split("What it prints", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    want = [_shape(line) for line in sample.splitlines() if line != "..."]
    got = [_shape(line) for line in r.stdout.splitlines()]
    assert len(want) == 6 and want[0].startswith("lepton train: digits")
    rest = iter(got)
    missing = [line for line in want if line not in rest]  # each README line, in README's order
    assert not missing, (missing, got)
    assert r.stdout.splitlines()[0].startswith("lepton train: digits")


@needs_sklearn
@pytest.mark.distributed
def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """Stopped in the middle of epoch 2 (step 8 of 18) and resumed: the same final parameters,
    optimizer state, loss scaler and error-feedback residuals, bit for bit, and the same metrics."""
    ref_dir, _ = uninterrupted
    common = ["--epochs", str(EPOCHS), "--grad-accum", "2", "--checkpoint-dir", "ck", *SMALL]
    r1 = _train(*common, "--max-steps", "8", cwd=tmp_path)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert "stopped after step 8" in r1.stdout
    mid = _load(tmp_path / "ck" / "checkpoint.pt")
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 2, 8)
    r2 = _train(*common, "--resume", cwd=tmp_path)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resumed from" in r2.stdout and "done: 3 epochs" in r2.stdout
    ref = _load(ref_dir / "ck" / "checkpoint.pt")
    got = _load(tmp_path / "ck" / "checkpoint.pt")
    for key in ("model", "optimizer", "scaler"):
        assert _same_state(got[key], ref[key]), key
    for rank in range(2):
        assert _same_state(got["ranks"][rank]["hook"], ref["ranks"][rank]["hook"])
    assert _strip_timing(_metrics(tmp_path / "ck" / "metrics.jsonl")) == \
        _strip_timing(_metrics(ref_dir / "ck" / "metrics.jsonl"))


@needs_sklearn
@pytest.mark.distributed
def test_workers_use_omp_num_threads(tmp_path):
    """API.md §0: OMP_NUM_THREADS, when the user sets it, is every worker's thread count (torch's
    and lc's), as under torchrun."""
    r = _train("--epochs", "1", *SMALL, cwd=tmp_path, env=_env(OMP_NUM_THREADS="3"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 workers x 3 threads" in r.stdout


def test_launcher_splits_the_cpus_between_its_workers(monkeypatch):
    """Unless the user set OMP_NUM_THREADS, the launcher sets it to the CPUs this process may use
    divided by the workers (torch and lc in each worker then read it), and restores it after."""
    from lepton_core.train import launch

    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with launch.worker_threads_env(3) as threads:
        assert threads == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        from lepton_core._runtime import default_num_threads

        assert default_num_threads() == 2  # what each worker uses
    assert "OMP_NUM_THREADS" not in os.environ
    with launch.worker_threads_env(16) as threads:
        assert threads == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    with launch.worker_threads_env(2) as threads:
        assert threads == 5 and os.environ["OMP_NUM_THREADS"] == "5"
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # ignored by OpenMP and torch: replaced, then restored
    with launch.worker_threads_env(2) as threads:
        assert threads == 4 and os.environ["OMP_NUM_THREADS"] == "4"
    assert os.environ["OMP_NUM_THREADS"] == "many"


def _children(pid):
    """(pid, command line) of the direct children of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        if ppid == pid:
            out.append((int(entry), cmd))
    return out


def _start_long_job(tmp_path):
    """A job that would run for minutes; returns it once its first checkpoint is written."""
    p = subprocess.Popen([sys.executable, "-m", "lepton_core.train", "--epochs", "1000", "--checkpoint-dir", "ck",
                          *SMALL], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line.startswith("epoch"):  # the checkpoint follows the epoch's line
            while time.monotonic() < deadline and not (tmp_path / "ck" / "checkpoint.pt").exists():
                time.sleep(0.05)
            return p
        if not line and p.poll() is not None:
            break
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail(f"the job did not start: {p.stderr.read()}")


@needs_sklearn
@pytest.mark.distributed
def test_killed_worker_ends_the_job_with_an_error(tmp_path):
    p = _start_long_job(tmp_path)
    try:
        workers = [pid for pid, cmd in _children(p.pid) if "spawn_main" in cmd]
        assert len(workers) == 2, _children(p.pid)
        os.kill(workers[1], signal.SIGKILL)
        # No hang: communicate raises TimeoutExpired (failing the test) if the job outlives the bound.
        out, err = p.communicate(timeout=FAILURE_BOUND_S)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, out + err
    assert "error: worker rank" in err and "killed by SIGKILL" in err and "--resume" in err
    assert "Traceback" not in err
    for pid in workers:  # the surviving worker was stopped too
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@needs_sklearn
@pytest.mark.distributed
def test_ctrl_c_shuts_down_cleanly(tmp_path):
    p = _start_long_job(tmp_path)
    try:
        os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the launcher and its workers all get it
        # No hang: communicate raises TimeoutExpired (failing the test) if the job outlives the bound.
        out, err = p.communicate(timeout=FAILURE_BOUND_S)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    # the last checkpoint is intact and loadable
    assert _load(tmp_path / "ck" / "checkpoint.pt")["epoch"] >= 1


# ---------------------------------------------------------------------------------------------------
# Command-line errors: a clear message and exit status 2, never a traceback
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--nproc", "two"], "argument --nproc: expected an integer, got 'two'"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--compression", "int4"], "argument --compression: invalid choice: 'int4'"),
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--lr", "nan"], "argument --lr: must be a positive number, got nan"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_parse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lepton train: error:" in err and message in err


@pytest.mark.parametrize("argv,message", [
    (["--block-size", "100"], "--block-size must be a power of two in 32..4096, got 100"),
    (["--resume", "--checkpoint-dir", "{tmp}/none"], "--resume: no checkpoint at {tmp}/none/checkpoint.pt"),
])
def test_cli_option_errors(capsys, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(cli.build_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert f"lepton train: error: {message.format(tmp=tmp_path)}" in err


def _fake_checkpoint(path, drop=()):
    """A checkpoint file as the default job's launcher sees it (2 workers, batch 32, seed 0, hidden 256),
    without the keys in `drop`."""
    state = {"format": ckpt.FORMAT, "world_size": 2, "config": dataclasses.asdict(TrainConfig()),
             "epoch": 1, "step_in_epoch": 0, "global_step": 23, "model": {"1.weight": torch.zeros(256, 64)},
             "optimizer": {}, "scaler": {}, "history_json": "[]", "ranks": [{}, {}]}
    ckpt.save_atomic({k: v for k, v in state.items() if k not in drop}, str(path))


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "3"], "was made with --nproc 2, not 3"),
    (["--batch-size", "16"], "was made with --batch-size 32, not 16"),
    (["--seed", "4"], "was made with --seed 0, not 4"),
    (["--hidden", "64"], "was made with --hidden 256, not 64"),
    (["--precision", "fp16", "--compression", "none"], "was made with --precision bf16, not fp16; --compression "
                                                       "int8, not none"),
    (["--nproc", "1", "--grad-accum", "2", "--block-size", "64", "--hidden", "8"],
     "was made with --nproc 2, not 1; --grad-accum 1, not 2; --block-size 256, not 64; --hidden 256, not 8"),
])
def test_cli_resume_mismatch_is_refused_before_starting(capsys, tmp_path, argv, message):
    _fake_checkpoint(tmp_path / "checkpoint.pt")
    args = cli.build_parser().parse_args(["--resume", "--checkpoint-dir", str(tmp_path), *argv])
    assert cli.main(args) == 2
    assert f"lepton train: error: --resume: {tmp_path}/checkpoint.pt {message}" in capsys.readouterr().err


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    r = _train("--batch-size", "0", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "lepton train: error: argument --batch-size: must be >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_add_arguments_on_a_subcommand_parser():
    """lepton_core/cli.py mounts the options on its `train` subcommand and calls main(args)."""
    import argparse

    top = argparse.ArgumentParser(prog="lepton")
    sub = top.add_subparsers(dest="command")
    cli.add_arguments(sub.add_parser("train"))
    args = top.parse_args(["train", "--precision", "fp16", "--compression", "none", "--epochs", "5", "--seed", "3"])
    cfg = cli._config_from_args(args)
    assert (cfg.precision, cfg.compression, cfg.epochs, cfg.seed) == ("fp16", "none", 5, 3)
    assert cfg.checkpoint_dir == cli.DEFAULT_CHECKPOINT_DIR and args.nproc == 2


# ---------------------------------------------------------------------------------------------------
# The Trainer in this process (a world of one worker)
# ---------------------------------------------------------------------------------------------------
def _blobs(n, seed):
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3  # the same classes
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g)
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return lnn.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)), dtype=None)


def _fit(cfg, augment=None, callbacks=()):
    with Trainer(_model(), _blobs(200, 1), _blobs(100, 2), cfg, augment=augment, callbacks=callbacks) as t:
        summary = t.fit()
        return summary, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _noise(x, generator):
    return x + 0.1 * torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("precision,compression", [("fp32", "none"), ("bf16", "int8"), ("fp16", "int8")])
def test_trainer_single_worker_resume_is_exact(tmp_path, caplog, precision, compression):
    common = dict(epochs=3, batch_size=16, grad_accum=2, lr=0.01, precision=precision, compression=compression,
                  progress=False)
    caplog.set_level(logging.INFO, logger="lepton_core.train")
    full, w_full = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "a"), **common), augment=_noise)
    assert full["eval_accuracy"] > 0.9 and full["steps"] == 3 * 7 and not full["stopped_early"]
    part, _ = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), max_steps=10, **common), augment=_noise)
    assert part["stopped_early"] and part["steps"] == 10
    rest, w_rest = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), resume=True, **common), augment=_noise)
    assert rest["steps"] == 21
    assert _same_state(w_rest, w_full)
    a, b = _load(tmp_path / "a" / "checkpoint.pt"), _load(tmp_path / "b" / "checkpoint.pt")
    assert _same_state(a["optimizer"], b["optimizer"]) and _same_state(a["scaler"], b["scaler"])
    if precision == "fp16":
        assert a["scaler"]["scale"] > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "lepton_core.train"]
    assert any(line.startswith("resumed from") for line in lines)
    assert any(line.startswith("epoch   3/3") for line in lines)


@contextlib.contextmanager
def _trainer_logger():
    """The `lepton_core.train` logger, restored afterwards (level, handlers, propagation)."""
    log = logging.getLogger("lepton_core.train")
    saved = (log.level, list(log.handlers), log.propagate)
    try:
        yield log
    finally:
        log.setLevel(saved[0])
        log.handlers[:] = saved[1]
        log.propagate = saved[2]


_ONE_EPOCH = dict(epochs=2, batch_size=50, precision="fp32", compression="none", progress=False)


def test_library_users_control_the_trainer_lines(capsys, caplog):
    """The Trainer prints nothing itself: its lines go to the lepton_core.train logger, which a
    program can leave alone (nothing shown), enable, redirect or silence."""
    with _trainer_logger() as log:
        _fit(TrainConfig(**_ONE_EPOCH))  # logging not configured: INFO lines are not shown
        assert capsys.readouterr() == ("", "")
        caplog.set_level(logging.INFO)  # e.g. logging.basicConfig(level=logging.INFO)
        _fit(TrainConfig(**_ONE_EPOCH))
        assert [r.getMessage()[:11] for r in caplog.records if r.name == log.name] == ["epoch   1/2", "epoch   2/2"]
        caplog.clear()
        log.setLevel(logging.WARNING)  # silenced, although the program logs INFO
        _fit(TrainConfig(**_ONE_EPOCH))
        assert not [r for r in caplog.records if r.name == log.name]
        log.setLevel(logging.NOTSET)
        buf = io.StringIO()  # redirected
        log.addHandler(logging.StreamHandler(buf))
        log.propagate = False
        _fit(TrainConfig(**_ONE_EPOCH))
        assert [line[:11] for line in buf.getvalue().splitlines()] == ["epoch   1/2", "epoch   2/2"]
        assert capsys.readouterr() == ("", "")


def test_cli_prints_the_trainer_lines_unchanged(capsys):
    """`lepton train` installs a handler that prints each line as it is, once, on stdout."""
    with _trainer_logger():
        root_handler = logging.StreamHandler(sys.stdout)  # a program's own logging: no line twice
        logging.getLogger().addHandler(root_handler)
        try:
            cli.print_trainer_lines()
            cli.print_trainer_lines()  # idempotent
            _fit(TrainConfig(**_ONE_EPOCH))
        finally:
            logging.getLogger().removeHandler(root_handler)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    for e, line in enumerate(out, 1):
        assert re.fullmatch(rf"epoch   {e}/2  loss \d\.\d{{4}}  acc \d+\.\d\d%  test loss \d\.\d{{4}}  test acc "
                            rf"\d+\.\d\d%  [\d,]+ samples/s  comm 0\.00 MB", line), line


def test_resuming_a_finished_run_trains_no_further(tmp_path):
    cfg = dict(epochs=1, batch_size=50, precision="fp32", compression="none", progress=False,
               checkpoint_dir=str(tmp_path))
    _, w1 = _fit(TrainConfig(**cfg))
    summary, w2 = _fit(TrainConfig(resume=True, **cfg))
    assert summary["steps"] == 4 and _same_state(w1, w2)


def test_resume_refuses_a_different_batch_size(tmp_path):
    cfg = dict(epochs=1, precision="fp32", compression="none", progress=False, checkpoint_dir=str(tmp_path))
    _fit(TrainConfig(batch_size=50, **cfg))
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint.pt: the checkpoint was made with "
                                         "batch_size=50; this run has batch_size=25"):
        _fit(TrainConfig(batch_size=25, resume=True, **cfg))


class _Bucket:
    """The two GradBucket methods the hook's overflow path uses."""

    def __init__(self, buf):
        self._buf = buf

    def buffer(self):
        return self._buf

    def index(self):
        return 0


def test_fp16_overflow_skips_compression(tmp_path):
    """An inf in an fp16-scaled gradient must not reach the int8 quantizer: the hook hands back an
    all-inf bucket (so the scaler skips the step) without touching the error-feedback state."""
    with Trainer(_model(), _blobs(20, 1), None, TrainConfig(precision="fp16", compression="int8", progress=False)) \
            as t:
        before = t.comm.hook_state.state_dict()
        buf = torch.ones(1000)
        buf[7] = float("inf")
        out = comm_hook(t.comm, _Bucket(buf)).wait()
        assert torch.isinf(out).all()
        assert _same_state(t.comm.hook_state.state_dict(), before)
        assert t.comm.payload_bytes == 4000 and t.comm.wire_bytes == 0  # world of 1: nothing sent


def test_comm_byte_accounting():
    s = CommState(ld.HookState(compression="int8"), world_size=4, compression="int8", block_size=256,
                  guard_nonfinite=False)
    s.count(torch.zeros(1024))
    assert s.payload_bytes == 4096 and s.wire_bytes == round(2 * 3 / 4 * 1024 * (1 + 4 / 256))
    s = CommState(ld.HookState(compression=None), world_size=2, compression="none", block_size=256,
                  guard_nonfinite=False)
    s.count(torch.zeros(1000))
    assert s.wire_bytes == 4000


def test_config_errors():
    with pytest.raises(ValueError, match="TrainConfig: precision must be one of fp32, bf16, fp16, got 'fp8'"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="TrainConfig: resume=True needs a checkpoint_dir"):
        TrainConfig(resume=True).validate()
    with pytest.raises(TypeError, match="TrainConfig: epochs must be an int, got 2.5"):
        TrainConfig(epochs=2.5).validate()
    with pytest.raises(ValueError, match="TrainConfig: grad_accum must be >= 1, got 0"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(TypeError, match="Trainer: model must be a torch.nn.Module, got str"):
        Trainer("model", _blobs(4, 0))


def test_checkpoint_write_is_atomic(tmp_path):
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic({"format": ckpt.FORMAT, "x": torch.arange(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_atomic({"format": ckpt.FORMAT, "x": Unpicklable()}, path)
    assert torch.equal(_load(path)["x"], torch.arange(3))  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == ["c.pt"]  # and no temporary file is left behind
    with pytest.raises(ValueError, match="is not a lepton_core.train checkpoint"):
        torch.save({"a": 1}, str(tmp_path / "other.pt"))
        ckpt.load(str(tmp_path / "other.pt"))


# ---------------------------------------------------------------------------------------------------
# Broken checkpoints and failed writes: a clear error naming the file and the cause
# ---------------------------------------------------------------------------------------------------
def test_resume_from_an_incomplete_checkpoint_names_what_is_missing(capsys, tmp_path):
    """Was `KeyError: 'world_size'`."""
    path = tmp_path / "checkpoint.pt"
    _fake_checkpoint(path, drop=("world_size", "ranks"))
    args = cli.build_parser().parse_args(["--resume", "--checkpoint-dir", str(tmp_path)])
    assert cli.main(args) == 2
    assert f"lepton train: error: --resume: checkpoint {path} is incomplete: it has no world_size, ranks" in \
        capsys.readouterr().err
    cfg = TrainConfig(epochs=1, precision="fp32", compression="none", progress=False, checkpoint_dir=str(tmp_path),
                      resume=True)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot resume: checkpoint .* is incomplete: it has no "
                                                   r"world_size, ranks"):
        _fit(cfg)


def test_resume_from_a_truncated_checkpoint(capsys, tmp_path):
    cfg = dict(epochs=1, batch_size=50, precision="fp32", compression="none", progress=False,
               checkpoint_dir=str(tmp_path))
    _fit(TrainConfig(**cfg))
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a copy cut off half way
    with pytest.raises(ckpt.CheckpointError, match=r"cannot resume: cannot read checkpoint .*checkpoint.pt "
                                                   r"\([0-9,]+ bytes\): it is truncated, damaged or not a torch.save"):
        _fit(TrainConfig(resume=True, **cfg))
    args = cli.build_parser().parse_args(["--resume", "--checkpoint-dir", str(tmp_path)])
    assert cli.main(args) == 2
    assert f"lepton train: error: --resume: cannot read checkpoint {path}" in capsys.readouterr().err


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    stale = tmp_path / (ckpt.TMP_PREFIX + "k3x9_q.pt")  # what a save killed half way leaves behind
    stale.write_bytes(b"\0" * 4096)
    other = tmp_path / "notes.pt"
    other.write_bytes(b"mine")
    ckpt.save_atomic({"format": ckpt.FORMAT, "x": torch.arange(3)}, str(tmp_path / "checkpoint.pt"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "notes.pt"]


def test_a_full_disk_is_reported_with_its_errno(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full disk does; torch.save alone reports it as
    "[enforce fail at inline_container.cc:...] unexpected pos"."""
    big = {"format": ckpt.FORMAT, "x": torch.zeros(1 << 16)}
    f = open("/dev/full", "wb")
    try:
        with pytest.raises(ckpt.CheckpointWriteError) as exc:
            ckpt.write(big, f, str(tmp_path / "checkpoint.pt"))
    finally:
        with contextlib.suppress(OSError):  # closing flushes what is still buffered: ENOSPC again
            f.close()
    e = exc.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    msg = str(e)
    assert msg.startswith(f"cannot write checkpoint {tmp_path}/checkpoint.pt: the disk is full: No space left "
                          f"on device (errno {errno.ENOSPC}, ENOSPC); ")
    assert "MB free on" in msg and "enforce fail" not in msg


def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    """The disk fills up part way through a save (the temporary file's write raises ENOSPC after 1000
    bytes, as a real one does): the error names the file and errno, the old checkpoint is intact."""
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic({"format": ckpt.FORMAT, "x": torch.arange(3)}, path)
    real_fdopen = os.fdopen

    class FillingFile:
        def __init__(self, f):
            self.f, self.n_bytes = f, 0

        def write(self, data):
            self.n_bytes += len(data)
            if self.n_bytes > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillingFile(real_fdopen(fd, mode)))
    with pytest.raises(ckpt.CheckpointWriteError, match=f"cannot write checkpoint {path}: the disk is full"):
        ckpt.save_atomic({"format": ckpt.FORMAT, "x": torch.zeros(1 << 16)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


@needs_sklearn
@pytest.mark.distributed
def test_a_write_error_ends_the_job_with_a_clear_message(tmp_path):
    """A real OS write error end to end: under a 1 MiB file-size limit (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so the write fails with EFBIG) the default model's ~1.7 MB checkpoint cannot be written."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "-m", "lepton_core.train", "--epochs", "1", "--batch-size", "64",
                        "--no-progress", "--checkpoint-dir", "ck"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=RUN_TIMEOUT_S, preexec_fn=limit_file_size)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"lepton train: error: worker rank 0 failed (exit code 1): CheckpointWriteError: cannot write checkpoint "
            f"ck/checkpoint.pt: File too large (errno {errno.EFBIG}, EFBIG)") in r.stderr
    assert "enforce fail" not in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in os.listdir(tmp_path / "ck") if p.startswith(ckpt.TMP_PREFIX)]


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: permissions, --keep, the run's config and what resume checks with it
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    """Like any file the user's programs write (mkstemp alone gives 0600: unreadable by the group)."""
    before = os.umask(umask)
    try:
        ckpt.save_atomic({"format": ckpt.FORMAT}, str(tmp_path / "checkpoint.pt"))
    finally:
        os.umask(before)
    assert os.stat(tmp_path / "checkpoint.pt").st_mode & 0o777 == mode


def test_keep_past_epochs_and_the_latest(tmp_path):
    cfg = TrainConfig(epochs=4, keep_checkpoints=2, checkpoint_dir=str(tmp_path), **{
        k: v for k, v in _ONE_EPOCH.items() if k != "epochs"})
    _fit(cfg)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt", "checkpoint.pt",
                                            "metrics.jsonl"]
    assert _load(tmp_path / "checkpoint-epoch0003.pt")["epoch"] == 3
    latest = _load(tmp_path / "checkpoint.pt")
    assert latest["epoch"] == 4 and _same_state(latest, _load(tmp_path / "checkpoint-epoch0004.pt"))
    # the run's whole configuration is in every checkpoint
    assert latest["config"] == dataclasses.asdict(cfg)


def test_keep_with_a_mid_epoch_stop_keeps_only_finished_epochs(tmp_path):
    common = dict(epochs=3, keep_checkpoints=5, checkpoint_dir=str(tmp_path), precision="fp32", compression="none",
                  batch_size=50, progress=False)
    _fit(TrainConfig(max_steps=6, **common))  # 4 steps per epoch: stops in epoch 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-epoch0001.pt", "checkpoint.pt", "metrics.jsonl"]
    _fit(TrainConfig(resume=True, **common))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt",
                                            "checkpoint-epoch0003.pt", "checkpoint.pt", "metrics.jsonl"]


def test_resume_names_every_mismatching_option(tmp_path, caplog):
    common = dict(progress=False, checkpoint_dir=str(tmp_path), compression="none")
    _fit(TrainConfig(epochs=1, batch_size=50, precision="fp32", **common))
    with pytest.raises(ValueError, match=r"cannot resume from .*: the checkpoint was made with batch_size=50, "
                                         r"seed=0, precision='fp32'; this run has batch_size=25, seed=3, "
                                         r"precision='fp16'"):
        _fit(TrainConfig(epochs=1, batch_size=25, seed=3, precision="fp16", resume=True, **common))
    # Options that may change (train longer, another rate) are accepted and reported.
    caplog.set_level(logging.INFO, logger="lepton_core.train")
    summary, _ = _fit(TrainConfig(epochs=2, lr=1e-3, batch_size=50, precision="fp32", resume=True, **common))
    assert summary["epochs_completed"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "lepton_core.train"]
    assert "resuming with epochs=2 (the checkpoint's run had epochs=1)" in lines
    assert "resuming with lr=0.001 (the checkpoint's run had lr=0.003)" in lines


def test_resume_reads_checkpoints_that_kept_only_a_few_options(capsys, tmp_path):
    """Checkpoints of lepton_core 0.1.0 kept batch_size, grad_accum, seed, ... under "run"."""
    state = {"format": ckpt.FORMAT, "world_size": 2, "run": {"batch_size": 32, "grad_accum": 1, "seed": 0},
             "epoch": 1, "step_in_epoch": 0, "global_step": 23, "model": {}, "optimizer": {}, "scaler": {},
             "history_json": "[]", "ranks": [{}, {}]}
    ckpt.save_atomic(state, str(tmp_path / "checkpoint.pt"))
    args = cli.build_parser().parse_args(["--resume", "--checkpoint-dir", str(tmp_path), "--seed", "2"])
    assert cli.main(args) == 2
    assert "was made with --seed 0, not 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Callbacks: order, what they receive, metrics they add, state they keep across a resume
# ---------------------------------------------------------------------------------------------------
class _Recorder:
    """Records every hook call (no base class: each hook is optional)."""

    def __init__(self, name, events):
        self.name, self.events = name, events

    def on_train_begin(self, trainer):
        self.events.append((self.name, "begin", trainer.global_step))

    def on_step_end(self, trainer, info):
        assert trainer.global_step == info.step  # the trainer's counters already count the step
        self.events.append((self.name, "step", info))

    def on_epoch_end(self, trainer, rec):
        assert trainer.global_step == rec["step"]
        self.events.append((self.name, "epoch", dict(rec)))

    def on_train_end(self, trainer, summary):
        self.events.append((self.name, "end", summary))


def test_callbacks_run_in_list_order_and_see_each_step_and_epoch():
    events = []
    cfg = TrainConfig(epochs=2, batch_size=50, lr=0.01, lr_schedule="constant", precision="fp32",
                      compression="none", progress=False)
    summary, _ = _fit(cfg, callbacks=[_Recorder("a", events), _Recorder("b", events)])
    # every hook: a, then b
    assert [e[0] for e in events] == ["a", "b"] * (len(events) // 2)
    kinds = [kind for name, kind, _ in events if name == "a"]
    assert kinds == ["begin"] + ["step"] * 4 + ["epoch"] + ["step"] * 4 + ["epoch"] + ["end"]
    steps = [info for name, kind, info in events if name == "a" and kind == "step"]
    assert steps[0] == StepInfo(epoch=1, step=1, step_in_epoch=1, steps_per_epoch=4, loss=steps[0].loss, lr=0.01,
                                samples=50)
    assert [(s.epoch, s.step, s.step_in_epoch) for s in steps] == \
        [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4), (2, 5, 1), (2, 6, 2), (2, 7, 3), (2, 8, 4)]
    assert sum(s.samples for s in steps) == 2 * 200 and all(s.loss > 0 for s in steps)
    epochs = [rec for name, kind, rec in events if name == "a" and kind == "epoch"]
    assert epochs == summary["history"]  # what they received is what was recorded
    assert events[-1] == ("b", "end", summary)


class _Epsilon(Callback):
    """Reports a made-up privacy budget per epoch, the way the DP feature reports epsilon."""

    def on_epoch_end(self, trainer, rec):
        rec["epsilon"] = 0.5 * rec["epoch"]


def test_a_callback_adds_an_epoch_metric_to_the_line_the_file_and_the_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lepton_core.train")
    cfg = TrainConfig(checkpoint_dir=str(tmp_path), **_ONE_EPOCH)
    summary, _ = _fit(cfg, callbacks=[_Epsilon()])
    lines = [r.getMessage() for r in caplog.records if r.name == "lepton_core.train"]
    assert len(lines) == 2 and lines[0].endswith(" MB  epsilon 0.5") and lines[1].endswith(" MB  epsilon 1")
    assert [r["epsilon"] for r in _metrics(tmp_path / "metrics.jsonl")] == [0.5, 1.0]
    assert [r["epsilon"] for r in summary["history"]] == [0.5, 1.0]
    assert [r["epsilon"] for r in state.history(_load(tmp_path / "checkpoint.pt"))] == [0.5, 1.0]


class _NoisyTotal(Callback):
    """State that resume must restore exactly: its own random stream and a running total."""

    state_key = "noisy_total"

    def __init__(self):
        self.gen = torch.Generator().manual_seed(7)
        self.total = 0.0

    def on_step_end(self, trainer, info):
        self.total += info.loss * float(torch.rand((), generator=self.gen))

    def on_epoch_end(self, trainer, rec):
        rec["noisy_total"] = self.total

    def state_dict(self):
        return {"gen": self.gen.get_state(), "total": self.total}

    def load_state_dict(self, saved):
        self.gen.set_state(saved["gen"])
        self.total = saved["total"]


def test_callback_state_is_checkpointed_and_resume_is_exact(tmp_path):
    common = dict(epochs=3, batch_size=16, grad_accum=2, lr=0.01, precision="bf16", compression="int8",
                  progress=False)
    full_cb = _NoisyTotal()
    _, w_full = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "a"), **common), callbacks=[full_cb])
    _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), max_steps=10, **common), callbacks=[_NoisyTotal()])
    mid = _load(tmp_path / "b" / "checkpoint.pt")
    assert set(mid["ranks"][0]["callbacks"]) == {"noisy_total"}
    rest_cb = _NoisyTotal()
    _, w_rest = _fit(TrainConfig(checkpoint_dir=str(tmp_path / "b"), resume=True, **common), callbacks=[rest_cb])
    assert _same_state(w_rest, w_full)
    assert rest_cb.total == full_cb.total and _same_state(rest_cb.gen.get_state(), full_cb.gen.get_state())
    assert _strip_timing(_metrics(tmp_path / "b" / "metrics.jsonl")) == \
        _strip_timing(_metrics(tmp_path / "a" / "metrics.jsonl"))


def test_resume_refuses_a_different_set_of_stateful_callbacks(tmp_path):
    cfg = dict(epochs=2, batch_size=50, precision="fp32", compression="none", progress=False,
               checkpoint_dir=str(tmp_path))
    _fit(TrainConfig(max_steps=2, **cfg), callbacks=[_NoisyTotal()])
    with pytest.raises(ValueError, match=r"cannot resume from .*: the checkpoint was made with callbacks with "
                                         r"state=\['noisy_total'\]; this run has callbacks with state=\[\]"):
        _fit(TrainConfig(resume=True, **cfg), callbacks=[_Epsilon()])  # no state: nothing to restore it into


def test_bad_callbacks_are_named():
    cases = [
        ([_Epsilon], TypeError, "callbacks takes instances, got the class _Epsilon"),
        ([object()], TypeError, "callback object has none of on_train_begin"),
        ([_NoisyTotal(), _NoisyTotal()], ValueError, "two callbacks save their state as 'noisy_total'"),
        (_Epsilon(), TypeError, "callbacks must be a list of callback objects"),
    ]

    class HalfState:
        def state_dict(self):
            return {}

    cases.append(([HalfState()], TypeError, "callback HalfState needs both state_dict"))
    for callbacks, err, message in cases:
        with pytest.raises(err, match=re.escape(message)):
            Trainer(_model(), _blobs(4, 0), None, TrainConfig(progress=False), callbacks=callbacks)


def test_a_callback_may_add_epoch_metrics_but_not_change_them():
    class Overwrite(Callback):
        def on_epoch_end(self, trainer, rec):
            rec["train_loss"] = 0.0

    class NotJson(Callback):
        def on_epoch_end(self, trainer, rec):
            rec["weights"] = torch.zeros(2)

    with pytest.raises(ValueError, match="callback Overwrite changed the epoch metrics train_loss"):
        _fit(TrainConfig(**_ONE_EPOCH), callbacks=[Overwrite()])
    with pytest.raises(TypeError, match="callback NotJson added epoch metric 'weights' = .* not a JSON value"):
        _fit(TrainConfig(**_ONE_EPOCH), callbacks=[NotJson()])


def test_the_epoch_line_shows_added_keys_after_the_trainers_own():
    rec = {"epoch": 2, "step": 8, "train_loss": 0.5, "train_accuracy": 0.75, "eval_loss": None, "eval_accuracy": None,
           "samples_per_s": 1234.5, "epoch_s": 0.1, "comm_bytes": 2_000_000, "lr": 0.1, "loss_scale": 1024.0,
           "epsilon": 1.23456, "note": "x"}
    assert metrics.epoch_line(rec, 40) == ("epoch   2/40  loss 0.5000  acc 75.00%  1,234 samples/s  comm 2.00 MB  "
                                           "epsilon 1.235  note x")


# ---------------------------------------------------------------------------------------------------
# One resume check; options generated from TrainConfig's field metadata
# ---------------------------------------------------------------------------------------------------
def test_the_cli_and_the_trainer_use_the_same_resume_check(tmp_path, monkeypatch):
    cfg = dict(epochs=1, batch_size=50, precision="fp32", compression="none", progress=False)
    _fit(TrainConfig(checkpoint_dir=str(tmp_path), **cfg))
    calls = []
    real = state.check_resume

    def spy(*args, **kwargs):
        calls.append(args[2])  # world_size
        return real(*args, **kwargs)

    monkeypatch.setattr(state, "check_resume", spy)
    _fit(TrainConfig(checkpoint_dir=str(tmp_path), resume=True, **cfg))
    args = cli.build_parser().parse_args(["--resume", "--checkpoint-dir", str(tmp_path), "--nproc", "1"])
    assert cli._resume_problem(cli._config_from_args(args), args.nproc, args.hidden) == \
        f"--resume: {tmp_path}/checkpoint.pt was made with --batch-size 50, not 32; --precision fp32, not bf16; " \
        f"--compression none, not int8"
    assert calls == [1, 1]


def test_every_config_option_reaches_the_config():
    """Each TrainConfig field made with option() is a `lepton train` option whose value lands in that
    field (the parser and _config_from_args are generated from the metadata, not kept by hand)."""
    from lepton_core.train.config import OPTION_GROUPS, option_fields, option_flag

    defaults = cli._config_from_args(cli.build_parser().parse_args([]))
    assert defaults == TrainConfig(checkpoint_dir=cli.DEFAULT_CHECKPOINT_DIR).validate()
    fields = option_fields(TrainConfig)
    assert len(fields) == 21 and all(f.metadata["group"] in OPTION_GROUPS for f in fields)
    for f in fields:
        flag, default = option_flag(f), getattr(defaults, f.name)
        if f.type == "bool":
            argv, want = [flag], not default
        elif "choices" in f.metadata:
            want = next(c for c in f.metadata["choices"] if c != default)
            argv = [flag, want]
        elif f.type in ("int", "Optional[int]"):
            want = (default or 1) * 2 if f.name != "block_size" else 512
            argv = [flag, str(want)]
        elif f.type in ("float", "Optional[float]"):
            want = 0.5
            argv = [flag, "0.5"]
            if f.name.startswith("dp_") and f.name != "dp_delta":  # DP-SGD: a clip and one noise option
                argv += ["--dp-noise", "1"] if f.name == "dp_clip" else ["--dp-clip", "1"]
        else:
            want = "somewhere"
            argv = [flag, want]
        if f.name == "resume":
            argv += ["--checkpoint-dir", "x"]
        cfg = cli._config_from_args(cli.build_parser().parse_args(argv))
        assert getattr(cfg, f.name) == want, (flag, getattr(cfg, f.name), want)
    # the options outside TrainConfig each have a place in --help
    names = {f.name for f in fields}
    assert all(f.metadata["before"] in names for f in option_fields(cli.JobOptions))
    order = [option_flag(f) for f in cli._options()]
    assert order[:4] == ["--nproc", "--threads", "--precision", "--compression"]
    assert order.index("--hidden") == order.index("--seed") - 1
