"""The `lepton` command line: parsing of every documented command line, the commands that must work
without torch (API.md §0), `lepton info`'s report, `--version`, `python -m lepton_core`, and the
`lepton bench` output plumbing. Nothing here runs a benchmark."""
import pytest
from subprocs import run_python

import lepton_core as lc
from lepton_core import cli

_run = run_python


def _parse(argv):
    return cli.build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# lepton bench: the family list (CPython gh-92445: nargs="*" with choices rejects an empty list)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,families", [
    (["bench"], []),
    (["bench", "--quick"], []),
    (["bench", "--threads", "2"], []),
    (["bench", "--quick", "--threads", "1", "--markdown", "t.md"], []),
    (["bench", "gemm"], ["gemm"]),
    (["bench", "gemm", "quant", "allreduce", "train", "--quick"], ["gemm", "quant", "allreduce", "train"]),
    (["bench", "all"], ["all"]),
])
def test_bench_family_parsing(argv, families):
    args = _parse(argv)
    assert args.command == "bench" and args.family == families


@pytest.mark.parametrize("line", [ln.split(None, 1)[1] for ln in cli.QUANTIZE_EXAMPLES.splitlines()
                                  if ln.strip().startswith("lepton quantize")])
def test_quantize_help_examples_parse(line):
    args = _parse(line.split())
    assert args.command == "quantize" and args.out and args.scheme in ("w8", "w8a8", "w4")


def test_bench_unknown_family_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["bench", "gemx"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lepton bench: error: argument family: invalid choice: 'gemx' (choose from gemm, quant, " \
           "allreduce, train, federated, dp, infer, all)" in err


# ---------------------------------------------------------------------------------------------------
# Without torch (API.md §0): --help, --version, info and every parser work; train / bench say what to
# install, exit non-zero, print no traceback
# ---------------------------------------------------------------------------------------------------
def _main_without_torch(*argv, module="lepton_core.cli"):
    """`main(argv)` of `module` in a child process where `import torch` raises ImportError."""
    code = (f"import sys; sys.modules['torch'] = None; from {module} import main; "
            f"sys.exit(main({list(argv)!r}))")
    return _run(["-c", code])


@pytest.mark.parametrize("argv,expect", [
    (["--help"], "{info,train,federated,bench,quantize}"),
    (["quantize", "--help"], "lc.nn.load_quantized"),
    (["info"], "cpu isa"),
    (["info", "--json"], '"cpu_isa"'),
    (["train", "--help"], "--precision"),
    (["bench", "--help"], "--quick"),
])
def test_commands_that_work_without_torch(argv, expect):
    r = _main_without_torch(*argv)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,extra", [
    (["train"], "train"),
    (["train", "--epochs", "1", "--nproc", "1"], "train"),
    (["bench"], "torch"),
    (["bench", "gemm", "--quick"], "torch"),
    (["quantize", "all-MiniLM-L6-v2", "--out", "q"], "infer"),
])
def test_train_and_bench_without_torch_name_the_extra(argv, extra):
    r = _main_without_torch(*argv)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"lepton {argv[0]}: error: lepton {argv[0]} needs PyTorch" in r.stderr
    assert f"pip install 'lepton_core[{extra}]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_python_m_lepton_core_train_without_torch():
    """`python -m lepton_core.train` (torchrun's entry) parses and reports the same way."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['lepton_core.train'] + sys.argv[1:]; "
            "runpy.run_module('lepton_core.train', run_name='__main__')")
    r = _run(["-c", code, "--help"])
    assert r.returncode == 0 and "--precision" in r.stdout, r.stderr
    r = _run(["-c", code, "--epochs", "1"])
    assert r.returncode == 1 and "pip install 'lepton_core[train]'" in r.stderr and "Traceback" not in r.stderr


def test_trainer_import_without_torch_names_the_extra():
    r = _run(["-c", "import sys; sys.modules['torch'] = None; from lepton_core.train import Trainer"])
    assert r.returncode != 0
    assert "ImportError: lepton_core.train.Trainer needs PyTorch" in r.stderr
    assert "pip install 'lepton_core[train]'" in r.stderr


# ---------------------------------------------------------------------------------------------------
# --version, python -m lepton_core, lepton info
# ---------------------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"lepton_core {lc.__version__}\n"


def test_python_m_lepton_core_is_lepton_info():
    r = _run(["-m", "lepton_core"])
    assert r.returncode == 0, r.stderr
    info = _run(["-m", "lepton_core.cli", "info"])
    assert r.stdout == info.stdout and r.stdout.startswith(f"lepton_core {lc.__version__}\n")
    r = _run(["-m", "lepton_core", "info", "--json"])  # with arguments: the whole command line
    assert r.returncode == 0 and '"cpu_isa"' in r.stdout


def _info_lines(capsys, monkeypatch, **changes):
    info = dict(lc.info(), **changes)
    monkeypatch.setattr(lc, "info", lambda: info)
    assert cli.main(["info"]) == 0
    return capsys.readouterr().out.splitlines()


def test_info_shows_the_newer_keys_when_present(capsys, monkeypatch):
    lines = _info_lines(capsys, monkeypatch, python="3.11.7", torch="2.13.0", compiler="GCC 13.2.0",
                        cuda_archs=["80", "90a"], git_revision="0123abcd", host_pool_cached_bytes=3 << 20)
    for expect in ["  python        : 3.11.7", "  torch         : 2.13.0", "  compiler      : GCC 13.2.0",
                   "  git revision  : 0123abcd", "  host pool     : 3.0 MiB cached (cap: LEPTON_HOST_POOL_MB)",
                   "  cuda archs    : 80, 90a"]:
        assert expect in lines
    lines = _info_lines(capsys, monkeypatch, python="3.11.7", torch=None, compiler="GCC 13.2.0", cuda_archs=None,
                        git_revision=None, host_pool_cached_bytes=0)
    assert any(line.startswith("  torch         : not installed") and "pip install 'lepton_core[train]'" in line
               for line in lines)
    assert not any("git revision" in line or "cuda archs" in line for line in lines)
    assert "  host pool     : 0 B cached (cap: LEPTON_HOST_POOL_MB)" in lines


def test_info_isa_wording_matches_the_shipped_kernels(capsys, monkeypatch):
    """The `cpu isa` row names the level; a `cpu kernels` row says what the level runs where that is more
    than its name (amx: AMX tiles for some GEMMs only; avx512: how it multiplies bf16 on this CPU), and is
    left out where it is not."""
    amx = "amx (AMX tiles for bfloat16 and int8 GEMM; float32 GEMM and the other kernels: AVX-512 / AVX2)"
    lines = _info_lines(capsys, monkeypatch, cpu_isa="amx", cpu_isa_detected="amx", cpu_isa_compiled="amx",
                        cpu_kernels=amx)
    assert "  cpu isa       : amx (detected amx; kernels compiled up to amx; cap with LEPTON_CPU_ISA)" in lines
    assert f"  cpu kernels   : {amx}" in lines
    lines = _info_lines(capsys, monkeypatch, cpu_isa="avx512", cpu_isa_detected="amx", cpu_isa_compiled="amx",
                        cpu_kernels="avx512 (bfloat16 GEMM by vdpbf16ps)")
    assert ("  cpu isa       : avx512 (detected amx; kernels compiled up to amx; cap with LEPTON_CPU_ISA)") in lines
    assert "  cpu kernels   : avx512 (bfloat16 GEMM by vdpbf16ps)" in lines
    lines = _info_lines(capsys, monkeypatch, cpu_isa="avx2", cpu_isa_detected="avx512", cpu_isa_compiled="avx2",
                        cpu_kernels="avx2")
    assert "  cpu isa       : avx2 (detected avx512; kernels compiled up to avx2; cap with LEPTON_CPU_ISA)" in lines
    assert not any(line.startswith("  cpu kernels") for line in lines)


def test_info_says_what_openmp_off_means(capsys, monkeypatch):
    lines = _info_lines(capsys, monkeypatch, openmp=False, num_threads=1)
    assert "  threads       : 1 (OpenMP off: this build runs every kernel on one thread)" in lines


# ---------------------------------------------------------------------------------------------------
# lepton train --help, misspelt options
# ---------------------------------------------------------------------------------------------------
def _help_examples(text):
    """The command lines of an `examples:` block (continuation lines joined, comments dropped)."""
    block = text.split("examples:\n", 1)[1]
    lines, cur = [], ""
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].strip()
        cur = f"{cur} {line}".strip()
        if cur.endswith("\\"):
            cur = cur[:-1].strip()
            continue
        if cur:
            lines.append(cur)
        cur = ""
    return lines


def test_train_help_has_a_description_and_examples_that_parse(capsys):
    from lepton_core.train import cli as train_cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "scikit-learn's bundled 8x8 digits" in out and "examples:" in out
    examples = _help_examples(out)
    assert len(examples) == 7
    for line in examples:
        words = line.split()
        if words[0] == "lepton":
            assert _parse(words[1:]).command == "train", line
        else:  # torchrun ... -m lepton_core.train OPTIONS
            assert words[0] == "torchrun"
            train_cli.build_parser().parse_args(words[words.index("lepton_core.train") + 1:])


@pytest.mark.parametrize("argv,suggestion", [
    (["train", "--epcohs", "3"], "lepton train: error: unrecognized arguments: --epcohs 3 (did you mean --epochs?)"),
    (["train", "--chekpoint-dir=x"], "(did you mean --checkpoint-dir?)"),
    (["train", "--presicion", "fp32"], "(did you mean --precision?)"),
    (["bench", "--quik"], "lepton bench: error: unrecognized arguments: --quik (did you mean --quick?)"),
])
def test_misspelt_options_get_a_suggestion(capsys, argv, suggestion):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert suggestion in capsys.readouterr().err


def test_python_m_lepton_core_train_suggests_too(capsys):
    from lepton_core.train import cli as train_cli

    with pytest.raises(SystemExit) as exc:
        train_cli.build_parser().parse_args(["--epcohs", "3"])
    assert exc.value.code == 2
    assert "lepton train: error: unrecognized arguments: --epcohs 3 (did you mean --epochs?)" in \
        capsys.readouterr().err


def test_counts_are_singular_for_one(capsys):
    from lepton_core.train import cli as train_cli
    from lepton_core.train.config import TrainConfig

    assert train_cli.plural(1, "epoch") == "1 epoch" and train_cli.plural(3, "epoch") == "3 epochs"
    summary = {"history": [{}], "eval_accuracy": 0.5, "stopped_early": False, "epochs_completed": 1, "steps": 1,
               "time_s": 1.0, "eval_loss": 1.0, "train_loss": 1.0, "samples_per_s": 10.0, "comm_bytes": 0}
    train_cli._print_summary(summary, TrainConfig(epochs=1))
    assert "lepton train: done: 1 epoch, 1 step in 1.0 s;" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# lepton bench: tables on stdout, a progress line per row on stderr, --json and --markdown files
# ---------------------------------------------------------------------------------------------------
def test_bench_rounds_alternate_and_ratios_pair_rounds(monkeypatch):
    """interleaved_samples reverses the order every other round (A B C, C B A), so neighbours in the
    dict stay neighbours and none always follows the same one; paired_ratio is the median of per-round
    ratios. A fake clock: each call advances it by its function's cost, three times as much in rounds
    2-4 (a slow phase of the host), which moves the samples but not the per-round ratio."""
    from lepton_core.benchmarks import common

    clock, order = [0.0], []
    cost = {"peak": 1.0, "ours": 2.0, "torch": 3.0}

    def timed(name):
        def call():
            r = (len(order) - 6) // 3  # two warm-up calls each, then rounds of three calls
            order.append(name)
            clock[0] += cost[name] * (3.0 if 2 <= r <= 4 else 1.0)
        return call

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(common, "_calibrate", lambda fn, min_sample_s: 1)
    samples = common.interleaved_samples({name: timed(name) for name in cost}, rounds=6)
    rounds = [order[6 + 3 * r:9 + 3 * r] for r in range(6)]
    assert rounds[0::2] == [["peak", "ours", "torch"]] * 3 and rounds[1::2] == [["torch", "ours", "peak"]] * 3
    assert samples["ours"] == [2.0, 2.0, 6.0, 6.0, 6.0, 2.0]
    assert common.paired_ratio(samples, "torch", "ours") == 1.5
    assert common.paired_ratio_spread(samples, "torch", "ours") == "1.50-1.50"
    samples["torch"][0] *= 10  # one stray round moves neither the median nor the spread
    assert common.paired_ratio(samples, "torch", "ours") == 1.5
    assert common.paired_ratio_spread(samples, "torch", "ours") == "1.50-1.50"
    samples["torch"][1] *= 2
    assert common.paired_ratio_spread(samples, "torch", "ours") == "1.50-3.00"


def test_bench_output_plumbing(tmp_path, capsys, monkeypatch):
    """A smoke run of `lepton bench quant --quick` with the timer replaced (every call "takes" 1 ms):
    the kernels and their checks run once each, nothing is timed."""
    import json

    from lepton_core.benchmarks import quant

    def one_call_each(fns, **kwargs):
        for fn in fns.values():
            fn()
        return {name: 1e-3 for name in fns}

    monkeypatch.setattr(quant, "interleaved", one_call_each)
    monkeypatch.setattr(quant, "copy_bandwidth_gbps", lambda: 10.0)
    js, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert cli.main(["bench", "quant", "--quick", "--json", str(js), "--markdown", str(md)]) == 0
    out, err = capsys.readouterr()
    table = out.split("### quant\n", 1)[1]
    assert table.startswith("| case ") and "lepton bench quant: row" not in out
    progress = err.splitlines()
    assert len(progress) == 9 and all(line.startswith(f"lepton bench quant: row {i} done (") for i, line in
                                      enumerate(progress, 1))
    assert "(quantize int8 block256, 21.04)" in progress[0]  # case, MB
    assert md.read_text() == "### quant\n" + table
    doc = json.loads(js.read_text())
    assert doc["lepton_core"] == lc.__version__ and doc["quick"] is True and doc["threads"] >= 1
    [t] = doc["tables"]
    assert t["title"] == "quant" and t["columns"] == quant.COLUMNS and len(t["rows"]) == 9
    assert t["rows"][0]["case"] == "quantize int8 block256" and t["rows"][0]["x_eager"] == 1.0


def test_bench_json_has_no_nan():
    doc = cli._bench_json({"version": "x", "cpu": "c", "cpu_isa": "scalar"}, 1, False,
                          [("gemm", ["shape", "peak_gflops"], [{"shape": "1x1x1", "peak_gflops": float("nan")}])])
    assert doc["tables"][0]["rows"] == [{"shape": "1x1x1", "peak_gflops": None}]
