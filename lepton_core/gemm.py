"""Placeholder until the GEMM family lands (replaced in the same branch of work)."""


def gemm(a, b, *, bias=None, out_dtype=None):
    raise RuntimeError("lc.gemm is not built yet")


def scaled_gemm(qa, qb, *, bias=None, out_dtype=None):
    raise RuntimeError("lc.scaled_gemm is not built yet")
