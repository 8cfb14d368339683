"""`python -m lepton_core.train [options]`: one worker under torchrun, otherwise `lepton train`."""
import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
