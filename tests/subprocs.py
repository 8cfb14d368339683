"""Running `python` in a child process for tests of the command line and of process-wide settings.

Child processes must import the same lepton_core as this process (the installed one in CI, the
in-tree build in a dev loop), never a source tree without its native module: PYTHONPATH points at
the imported package and the child runs in an empty temporary directory, outside the repo."""
import os
import subprocess
import sys
import tempfile

import lepton_core as lc

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lc.__file__)))


def run_python(args, **env) -> subprocess.CompletedProcess:
    """`python *args` with the extra environment variables `env`; output captured as text."""
    e = dict(os.environ)
    e["PYTHONPATH"] = PKG_PARENT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env)
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=120,
                              cwd=cwd)
