"""The `lepton` command line: parsing of every documented command line, the commands that must work
without torch (API.md §0), `lepton info`'s report, `--version`, `python -m lepton_core`, and the
`lepton bench` output plumbing. Nothing here runs a benchmark."""
import os
import subprocess
import sys
import tempfile

import pytest

import lepton_core as lc
from lepton_core import cli

# Child processes must import the same lepton_core as this process (the installed one in CI, the
# in-tree build in a dev loop), never a source tree without its native module: point PYTHONPATH at
# the imported package and run them outside the repo (as tests/test_runtime.py does).
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lc.__file__)))


def _run(args, **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = _PKG_PARENT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env)
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=120,
                              cwd=cwd)


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


def test_bench_unknown_family_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["bench", "gemx"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lepton bench: error: argument family: invalid choice: 'gemx' (choose from gemm, quant, " \
           "allreduce, train, all)" in err


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
    (["--help"], "{info,train,bench}"),
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
