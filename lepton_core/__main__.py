"""`python -m lepton_core`: `lepton info` (what to paste into a bug report); with arguments, the
`lepton` command line (`python -m lepton_core bench gemm`), for when its script is not on PATH."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["info"]))
