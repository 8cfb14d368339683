"""The `lepton` command line: `lepton info`, `lepton train ...`, `lepton bench [family ...]`,
`lepton quantize SOURCE --out DIR`.

`lepton --help`, `lepton info` and building every subcommand's parser import neither torch nor the
trainer nor the benchmarks (API.md §0: they work with NumPy alone); `train` and `bench` import them
when they run, and without torch they exit with one line naming the extra to install.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib
import os
import json
import math
import sys
from typing import List, Optional

from lepton_core._version import __version__
from lepton_core.benchmarks import FAMILIES
from lepton_core.train._deps import missing

BENCH_CHOICES = tuple(FAMILIES) + ("all",)
BENCH_DEFAULT = ("gemm", "quant")


def _isa_line(info: dict) -> str:
    return (f"{info['cpu_isa']} (detected {info['cpu_isa_detected']}; kernels compiled up to "
            f"{info['cpu_isa_compiled']}; cap with LEPTON_CPU_ISA)")


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _cmd_info(args) -> int:
    import lepton_core as lc

    info = lc.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = []  # (label, value); keys newer than some builds' lc.info() are shown when present
    if "python" in info:
        rows.append(("python", info["python"]))
    if "torch" in info:
        rows.append(("torch", info["torch"] or "not installed (the NumPy API works; the torch API, lc.nn, "
                                               "distributed and lepton train need it: pip install "
                                               "'lepton_core[train]')"))
    if info.get("compiler"):
        rows.append(("compiler", info["compiler"]))
    if info.get("git_revision"):
        rows.append(("git revision", info["git_revision"]))
    rows.append(("backends", ", ".join(info["backends"])))
    rows.append(("cpu", info["cpu"]))
    rows.append(("cpu isa", _isa_line(info)))
    # What the level runs where that is more than its name (amx: the tiles for some GEMMs only; avx512:
    # how it multiplies bf16 on this CPU).
    if info.get("cpu_kernels", info["cpu_isa"]) != info["cpu_isa"]:
        rows.append(("cpu kernels", info["cpu_kernels"]))
    rows.append(("cpu features", ", ".join(sorted(info["cpu_features"])) or "none beyond x86-64"))
    caches = info["cache_bytes"]
    rows.append(("caches", f"L1d {caches['l1d'] >> 10} KiB, L2 {caches['l2'] >> 10} KiB, L3 {caches['l3'] >> 20} MiB"))
    openmp = "OpenMP on" if info["openmp"] else "OpenMP off: this build runs every kernel on one thread"
    rows.append(("threads", f"{info['num_threads']} ({openmp})"))
    if "host_pool_cached_bytes" in info:
        rows.append(("host pool", f"{_bytes(info['host_pool_cached_bytes'])} cached (cap: LEPTON_HOST_POOL_MB)"))
    if info["cuda_device"]:
        rows.append(("cuda device", info["cuda_device"]))
    else:
        rows.append(("cuda", f"unavailable: {info['cuda_unavailable_reason']}"))
    if info.get("cuda_archs"):
        rows.append(("cuda archs", ", ".join(str(a) for a in info["cuda_archs"])))
    print(f"lepton_core {info['version']}")
    for label, value in rows:
        print(f"  {label:<14}: {value}")
    return 0


def _cmd_bench(args) -> int:
    problem = missing(("torch",), "lepton bench", "torch")
    if problem:
        print(f"lepton bench: error: {problem}", file=sys.stderr, flush=True)
        return 1
    import torch

    import lepton_core as lc
    from lepton_core.benchmarks.common import print_table

    if args.threads is not None:
        lc.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)  # the baseline gets the same threads
    families = args.family or list(BENCH_DEFAULT)
    if "all" in families:
        families = list(FAMILIES)
    info = lc.info()
    print(f"lepton bench: {info['cpu']} ({info['cpu_isa']}), {lc.get_num_threads()} threads; "
          f"ratio = baseline time / our time (> 1: we are faster)", flush=True)
    tables = []  # (title, columns, rows), each printed as soon as it is measured
    texts = []
    for fam in families:
        mod = importlib.import_module(f"lepton_core.benchmarks.{fam}")
        runs = [(fam, mod)]
        if fam == "gemm" and "cuda" in info["backends"]:  # the CUDA rows join the gemm table's run
            runs.append(("gemm and quant on CUDA", importlib.import_module("lepton_core.benchmarks.cuda")))
        for extra in getattr(mod, "MORE_TABLES", ()):  # a family's further tables (e.g. federated vs Flower)
            m = importlib.import_module(f"lepton_core.benchmarks.{extra}")
            runs.append((m.TITLE, m))
        for title, m in runs:
            rows = m.run(quick=args.quick)
            if rows:
                texts.append(print_table(rows, m.COLUMNS, title=title))
                tables.append((title, m.COLUMNS, rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(texts) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_bench_json(info, lc.get_num_threads(), args.quick, tables), f, indent=1, allow_nan=False)
            f.write("\n")
    return 0


def _json_value(v):
    """A table cell as JSON: non-finite floats (a probe that could not run) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _bench_json(info: dict, threads: int, quick: bool, tables) -> dict:
    return {
        "lepton_core": info["version"],
        "cpu": info["cpu"], "cpu_isa": info["cpu_isa"], "threads": threads, "quick": quick,
        "tables": [{"title": title, "columns": list(columns),
                    "rows": [{c: _json_value(row[c]) for c in columns if c in row} for row in rows]}
                   for title, columns, rows in tables],
    }


QUANTIZE_EXAMPLES = """examples:
  lepton quantize all-MiniLM-L6-v2 --out minilm-w8
  lepton quantize all-MiniLM-L6-v2 --out minilm-w4 --scheme w4 --group-size 64
  lepton quantize ./my-gpt2 --out gpt2-w8a8 --scheme w8a8 --skip lm_head
  lepton quantize all-MiniLM-L6-v2 --out minilm-w4c --scheme w4 --group-size 64 --calibration texts.txt

then, in Python:
  import lepton_core as lc
  model = lc.nn.load_quantized("minilm-w8")   # a SentenceTransformer: model.encode([...])
"""


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _cmd_quantize(args) -> int:
    problem = missing(("torch", "transformers", "sentence_transformers"), "lepton quantize", "infer")
    if problem:
        print(f"lepton quantize: error: {problem}", file=sys.stderr, flush=True)
        return 1
    import lepton_core as lc
    from lepton_core.nn import serialize
    from lepton_core.nn.quant_linear import check_scheme

    patterns = args.skip or []

    def keep_quantizing(module, name: str) -> bool:  # --skip: a glob on the full name or its last part
        return not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition(".")[2], p)
                       for p in patterns)

    try:
        check_scheme(args.scheme, args.group_size, "lepton quantize")
        model, kind, src = serialize.load_pretrained(args.source)
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out!r} exists and is not an empty directory")
        calibrate, texts = None, []
        if args.calibration is not None:
            texts = serialize.read_calibration_texts(args.calibration, "lepton quantize")
            calibrate = serialize.text_calibration(kind, src, texts, "lepton quantize")
        qmodel = lc.nn.quantize_model(model, args.scheme, group_size=args.group_size, filter_fn=keep_quantizing,
                                      inplace=True, calibrate=calibrate)
        manifest = lc.nn.save_quantized(qmodel, args.out, source=src)
    except ValueError as exc:
        msg = str(exc).removeprefix("lepton quantize: ")
        print(f"lepton quantize: error: {msg}", file=sys.stderr, flush=True)
        return 1
    n = len(manifest["quant_linear"])
    before = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(src) for f in files
                 if f.endswith(serialize.WEIGHT_SUFFIXES))
    print(f"lepton quantize: {kind} model {src}: {n} linear layers -> {args.scheme}"
          f"{f' (group {args.group_size})' if args.scheme == 'w4' else ''}"
          f"{f', calibrated on {len(texts)} texts' if texts else ''}; saved to {args.out} "
          f"({_bytes(_dir_bytes(args.out))}; float weight files {_bytes(before)}). "
          f"Load it with lc.nn.load_quantized({args.out!r}).")
    return 0


def _bench_family(name: str) -> str:
    if name not in BENCH_CHOICES:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(BENCH_CHOICES)})")
    return name


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser that reports unknown arguments itself, with the closest known option (a
    subcommand's unknown arguments would otherwise be reported by `lepton`, without a suggestion)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            msg = f"unrecognized arguments: {' '.join(extras)}"
            options = [s for action in self._actions for s in action.option_strings]
            for arg in extras:
                if arg.startswith("-"):
                    close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
                    if close:
                        msg += f" (did you mean {close[0]}?)"
                        break
            self.error(msg)
        return namespace, extras


def _train_module():
    return importlib.import_module("lepton_core.train.cli")


def build_parser() -> argparse.ArgumentParser:
    p = SuggestingParser(prog="lepton", description="lepton_core: kernels and trainer for cheaper training",
                         epilog="`python -m lepton_core` alone is `lepton info` (paste it into bug reports).")
    p.add_argument("--version", action="version", version=f"lepton_core {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,train,federated,bench,quantize}", parser_class=SuggestingParser)
    sub.required = True

    pi = sub.add_parser("info", help="what this build and machine offer (lc.info())")
    pi.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    pi.set_defaults(func=_cmd_info)

    train_cli = _train_module()
    pt = sub.add_parser("train", help="data-parallel training (default: digits MLP, 2 local workers)",
                        description=train_cli.DESCRIPTION, epilog=train_cli.EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    train_cli.add_arguments(pt)
    pt.set_defaults(func=train_cli.main)

    fed_cli = importlib.import_module("lepton_core.federated.cli")  # needs no torch to build its parser
    pf = fed_cli.add_arguments(sub.add_parser("federated", help="federated averaging on digits (secure aggregation, DP)"))
    pf.set_defaults(func=fed_cli.main)

    pb = sub.add_parser("bench", help="side-by-side benchmarks against the usual baselines",
                        description="Times lepton_core against the baseline a user would otherwise pick, "
                                    "interleaved in one process. The tables go to stdout, one progress line "
                                    "per row to stderr.")
    # Not choices=: with nargs="*", Python < 3.12 checks the empty default against the choices and
    # rejects `lepton bench` itself ("invalid choice: []", CPython gh-92445). Each name is checked here.
    pb.add_argument("family", nargs="*", type=_bench_family, metavar="family",
                    help=f"what to measure: {', '.join(BENCH_CHOICES)} (default: {' '.join(BENCH_DEFAULT)})")
    pb.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    pb.add_argument("--threads", type=int, default=None, help="threads for us and for torch")
    pb.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE (Markdown)")
    pb.add_argument("--json", metavar="FILE", help="also write the tables to FILE as JSON (one object per row)")
    pb.set_defaults(func=_cmd_bench)

    pq = sub.add_parser("quantize", help="quantize a Hugging Face / sentence-transformers model and save it",
                        description="Loads a sentence-transformers model (a directory with modules.json, or "
                                    "all-MiniLM-L6-v2: the one the [infer] extra packages) or a transformers "
                                    "model directory (config.json), replaces its linear layers by "
                                    "lc.nn.QuantLinear (lc.nn.quantize_model) and saves it to --out without "
                                    "their float weights. lc.nn.load_quantized(DIR) rebuilds it.",
                        epilog=QUANTIZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pq.add_argument("source", help="model directory, or all-MiniLM-L6-v2 (packaged, offline)")
    pq.add_argument("--out", required=True, metavar="DIR", help="where to save (must not exist or be empty)")
    pq.add_argument("--scheme", choices=("w8", "w8a8", "w4"), default="w8",
                    help="w8: int8 weights; w8a8: int8 weights and activations; w4: 4-bit weights (default: w8)")
    pq.add_argument("--group-size", type=int, default=128, metavar="N",
                    help="w4: inputs per scale and zero point, a power of two 32..1024 (default: 128)")
    pq.add_argument("--skip", action="append", metavar="PATTERN",
                    help="keep the linear layers whose name (or last name part) matches this glob in float, "
                         "e.g. lm_head or '*.attention.*' (repeatable)")
    pq.add_argument("--calibration", metavar="FILE",
                    help="a UTF-8 text file, one sample a line: run the float model on each line alone and round "
                         "each layer's codes against the inputs it saw (GPTQ; slower to convert, closer to the "
                         "float model). Use text like what the model will serve, not your evaluation set")
    pq.set_defaults(func=_cmd_quantize)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lepton: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
