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
