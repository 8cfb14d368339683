"""`lepton bench`: side-by-side timings of lepton_core and the baseline a user would otherwise pick.

Each family module (gemm, quant, allreduce, train) exposes `run(quick: bool = False) -> list[dict]`
and `COLUMNS` (the row keys to print, in order). Timing helpers live in `common`.
"""
FAMILIES = ("gemm", "quant", "allreduce", "train", "federated", "dp", "infer")
