"""t-of-n Shamir secret sharing over the prime field GF(2^255 - 19).

A secret is an integer below P. `split` draws a random polynomial f of degree t - 1 with f(0) = secret
(coefficients from the `secrets` module, a CSPRNG) and hands out (x, f(x)) for x = 1..n. Any t shares
give f(0) by Lagrange interpolation; t - 1 shares are consistent with every secret (for each candidate
there is exactly one polynomial through it and the t - 1 points), so they reveal nothing about it.
"""
from __future__ import annotations

import secrets as _secrets
from typing import Dict, Iterable, List, Sequence, Tuple

P = 2**255 - 19  # a 255-bit prime: secrets are 32-byte values drawn below it
SECRET_BYTES = 32

Share = Tuple[int, int]  # (x, f(x)), x in 1..n


def random_secret() -> int:
    """A uniformly random field element (used as key material: 32 little-endian bytes)."""
    return _secrets.randbelow(P)


def to_bytes(secret: int) -> bytes:
    return secret.to_bytes(SECRET_BYTES, "little")


def split(secret: int, t: int, xs: Sequence[int]) -> Dict[int, int]:
    """Shares {x: f(x)} of `secret` for the points `xs` (distinct, 1 <= x < P); any t of them recover it."""
    if not 0 <= secret < P:
        raise ValueError(f"shamir.split: secret must be in [0, P), got {secret}")
    if not 1 <= t <= len(xs):
        raise ValueError(f"shamir.split: threshold t must be in [1, {len(xs)}] for {len(xs)} shares, got {t}")
    coeffs = [secret] + [_secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner on exact integers: share points are small, so acc grows by a
            acc = acc * x + c       # few bits a step, and one reduction at the end is 3x cheaper than t
        out[x] = acc % P
    return out


def lagrange_at_zero(xs: Iterable[int]) -> Dict[int, int]:
    """Coefficients l_x with f(0) = sum_x l_x f(x) for any polynomial of degree < len(xs)."""
    xs = list(xs)
    if len(set(xs)) != len(xs):
        raise ValueError(f"shamir: share points must be distinct, got {xs}")
    coeffs = {}
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * j % P
                den = den * (j - i) % P
        coeffs[i] = num * pow(den, -1, P) % P
    return coeffs


def combine(shares: Dict[int, int], t: int) -> int:
    """The secret from at least t shares {x: y} (the first t by x are used)."""
    if len(shares) < t:
        raise ValueError(f"shamir.combine: need {t} shares, got {len(shares)}")
    xs = sorted(shares)[:t]
    lag = lagrange_at_zero(xs)
    return sum(lag[x] * shares[x] for x in xs) % P


def combine_with(lag: Dict[int, int], shares: Dict[int, int]) -> int:
    """combine() with precomputed Lagrange coefficients (one set reused for many secrets)."""
    return sum(c * shares[x] for x, c in lag.items()) % P


def interpolate(points: List[Share], x0: int) -> int:
    """The value at x0 of the polynomial of degree < len(points) through `points`."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x0 - xj) % P
                den = den * (xi - xj) % P
        total = (total + yi * num * pow(den, -1, P)) % P
    return total
