"""All-reduce benchmark: ld.all_reduce next to Gloo and Open MPI, 2 and 4 ranks, 4 B .. 64 MiB,
plus DDP step time with ld.allreduce_hook vs DDP's default (see lepton_core/benchmarks/allreduce.py
for the method). Same as `lepton bench allreduce`.

    PYTHONPATH=$PWD python bench/bench_allreduce.py [--quick] [--markdown out.md]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lepton_core.benchmarks import allreduce  # noqa: E402
from lepton_core.benchmarks.common import print_table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 KiB, 1 MiB and 16 MiB only; no DDP rows")
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args()
    rows = allreduce.run(quick=a.quick)
    text = print_table(rows, allreduce.COLUMNS, title="allreduce")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
