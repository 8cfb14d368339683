"""Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"), semi-honest variant with dropout recovery.

Threat model. The aggregator (server) is honest-but-curious: it follows the protocol but tries to learn
individual updates from what it sees. Up to t - 1 clients may collude with it. Protected: any single
client's update (and any sum over fewer than all survivors that the protocol does not reveal); the
aggregator learns only the sum of the surviving clients' encoded updates, the set of survivors and the
clients' public keys and ciphertexts. Not protected: the sum itself (use DP for that), which clients
took part, the number of examples behind the sum (it is one of the summed elements), an actively
malicious server (no signatures, no consistency round: it could lie about who dropped out), and
collusions of t or more clients. In lepton's simulation every party (clients and the aggregator role)
runs inside the processes of one job: a process hosting several clients holds all their secrets, so
those clients are effectively one party; ciphertexts of the share exchange travel to every process
(an all-gather stands in for the server's routing), protected by their pairwise keys; the aggregator
role is replicated on every rank (each computes the same unmasked sum). Key material comes from the OS
CSPRNG; only the simulation's choices (sampling, dropouts, DP noise) are seeded.

Protocol (one round, n sampled clients, threshold t):
  0. AdvertiseKeys: client u makes two X25519 key pairs, (c_u) for encrypting shares and (s_u) for masks,
     and publishes both public keys.
  1. ShareKeys: u draws a self-mask seed b_u, splits b_u and the private key s_u^SK into t-of-n Shamir
     shares (shamir.py) and sends share j to client j encrypted with ChaCha20-Poly1305 under
     HKDF(X25519(c_u^SK, c_j^PK)).
  2. MaskedInputCollection: u sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)
     (mod 2^32), s_uv = HKDF(X25519(s_u^SK, s_v^PK)), PRG = ChaCha20 keystream read as little-endian
     uint32. Pairwise masks cancel in the sum; the self mask keeps y_u uniform even when a dropped
     peer's s key is later revealed.
  3. Unmasking: the server announces the survivors U2 (needs |U2| >= t, else the round aborts). Each
     survivor reveals, for every u, either its share of b_u (u survived) or of s_u^SK (u dropped), never
     both. The server rebuilds b_u (removes PRG(b_u)) and s_u^SK (re-derives and removes u's pairwise
     masks with every survivor).

Sparse variant (SecAgg+, Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"): with a neighbour count k < n - 1 each client masks with, and shares its secrets (threshold t
among its k neighbours and itself) to, only its k neighbours in a Harary graph on a random relabelling
(harary_graph), so a client's cost is O(k) instead of O(n). Correctness needs t surviving holders for
every secret; privacy against the server with colluding clients holds with high probability over the
graph when k is large enough relative to log n and to the fractions of dropped and corrupt clients
(Bell et al., Theorems 3.5 and 3.6 give the bounds); k = n - 1 is exactly the protocol above.

Fixed point: an update x (float) is clipped to [-clip_range, clip_range] per coordinate and truncated
toward zero at `bits` fraction bits: q = trunc(x * 2^bits), an integer mod 2^32 (two's complement).
Truncation error is below 2^-bits per coordinate and never increases |x| (so an L2 clip survives it).
`fixed_point_bits` picks bits so that a sum of weighted values stays inside int32.
"""
from __future__ import annotations

import functools
import hmac
import math
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import shamir
from .errors import SecAggAbort

_INFO_PAIR = b"lepton secagg pairwise mask"
_INFO_SELF = b"lepton secagg self mask"
_INFO_SHARE = b"lepton secagg share encryption"
_ZERO_NONCE16 = bytes(16)
_ZERO_SALT = bytes(32)  # RFC 5869: no salt = HashLen zero bytes
_SHARE_FMT = "<II32s32s"  # sender, receiver, share of s_u^SK, share of b_u


# ---------------------------------------------------------------------------------------------------
# Fixed point mod 2^32
# ---------------------------------------------------------------------------------------------------
def fixed_point_bits(weight_bound: float, clip_range: float) -> int:
    """Fraction bits such that sum of weights * clip_range * 2^bits < 2^31 (no int32 overflow)."""
    if weight_bound <= 0 or clip_range <= 0:
        raise ValueError(f"fixed_point_bits: weight_bound and clip_range must be positive, got "
                         f"{weight_bound} and {clip_range}")
    bits = math.floor(math.log2((2**31 - 1) / (weight_bound * clip_range)))
    if bits < 8:
        raise ValueError(f"fixed_point_bits: a sum of weight {weight_bound:g} x range {clip_range:g} leaves "
                         f"only {bits} fraction bits in int32")
    return min(bits, 30)


def encode(x: np.ndarray, bits: int, clip_range: float, weight: int = 1) -> np.ndarray:
    """weight * trunc(clip(x) * 2^bits) as uint32 (mod 2^32)."""
    q = np.trunc(np.clip(np.asarray(x, dtype=np.float64), -clip_range, clip_range) * float(2**bits))
    return (q.astype(np.int64) * int(weight)).astype(np.uint32)  # int64 -> uint32 wraps (two's complement)


def decode(total: np.ndarray, bits: int) -> np.ndarray:
    """A sum of encode()d vectors (uint32 mod 2^32) back to float64 (weights still applied)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / float(2**bits)


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------
def _hkdf(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt and 32 bytes of output, on the standard library's HMAC: the
    same bytes as cryptography's HKDF (tests check) at a tenth of its per-call cost."""
    prk = hmac.digest(_ZERO_SALT, secret, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def prg_uint32(seed: bytes, n: int, info: bytes = _INFO_PAIR) -> np.ndarray:
    """n uniform uint32 from the ChaCha20 keystream keyed by HKDF-SHA256(seed, info)."""
    enc = Cipher(algorithms.ChaCha20(_hkdf(seed, info), _ZERO_NONCE16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4")


@functools.lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> X25519PublicKey:
    """A roster key parsed once per process, not once per client that uses it (7 us a parse)."""
    return X25519PublicKey.from_public_bytes(raw)


def _raw(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _share_nonce(sender: int, receiver: int) -> bytes:
    return struct.pack("<IIxxxx", sender, receiver)  # both directions share a key, never a nonce


# ---------------------------------------------------------------------------------------------------
# Parties
# ---------------------------------------------------------------------------------------------------
Roster = Dict[int, Tuple[bytes, bytes]]  # client id -> (c public key, s public key), raw 32 bytes each


Graph = Dict[int, List[int]]  # client id -> its neighbours (sorted, without itself)


def share_points(roster: Iterable[int]) -> Dict[int, int]:
    """Client id -> its Shamir x coordinate (1..n, by id)."""
    return {cid: i + 1 for i, cid in enumerate(sorted(roster))}


def complete_graph(ids: Iterable[int]) -> Graph:
    ids = sorted(ids)
    return {u: [v for v in ids if v != u] for u in ids}


def harary_graph(ids: Iterable[int], k: Optional[int], rng: np.random.Generator) -> Graph:
    """SecAgg+ (Bell et al. 2020): the Harary graph H(k, n) (a ring where each node links to its k/2
    nearest on either side; k rounded up to even) on a random relabelling of the clients. k None or
    >= n - 1: the complete graph (Bonawitz et al.)."""
    ids = sorted(ids)
    n = len(ids)
    if k is None or k >= n - 1:
        return complete_graph(ids)
    half = (k + 1) // 2
    ring = [ids[i] for i in rng.permutation(n)]
    graph = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for j in range(1, half + 1):
            graph[u].update((ring[(i + j) % n], ring[(i - j) % n]))
    return {u: sorted(vs) for u, vs in graph.items()}


def holders(graph: Graph, u: int) -> List[int]:
    """The clients holding shares of u's secrets: its neighbours and itself."""
    return sorted(graph[u] + [u])


class Client:
    """One sampled client's side of the protocol for one round."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self._c_sk = X25519PrivateKey.generate()
        self._s_secret = shamir.random_secret()
        self._s_sk = X25519PrivateKey.from_private_bytes(shamir.to_bytes(self._s_secret))
        self._b = shamir.random_secret()
        self._held: Dict[int, Tuple[int, int]] = {}  # sender -> (share of s_sender^SK, share of b_sender)
        self._revealed: Dict[int, str] = {}
        self._ciphers: Dict[int, ChaCha20Poly1305] = {}  # peer -> share cipher (one key agreement per pair)

    def public_keys(self) -> Tuple[bytes, bytes]:
        return _raw(self._c_sk.public_key()), _raw(self._s_sk.public_key())

    def _share_cipher(self, peer: int, peer_c_pk: bytes) -> ChaCha20Poly1305:
        cipher = self._ciphers.get(peer)
        if cipher is None:
            shared = self._c_sk.exchange(_public_key(peer_c_pk))
            cipher = self._ciphers[peer] = ChaCha20Poly1305(_hkdf(shared, _INFO_SHARE))
        return cipher

    def share_keys(self, roster: Roster, t: int, peers: Optional[Sequence[int]] = None) -> Dict[int, bytes]:
        """Encrypted shares of (s_u^SK, b_u) for each peer (default: every other client of the roster):
        {receiver: ciphertext}."""
        peers = [v for v in roster if v != self.cid] if peers is None else list(peers)
        xs = share_points(peers + [self.cid])
        s_shares = shamir.split(self._s_secret, t, list(xs.values()))
        b_shares = shamir.split(self._b, t, list(xs.values()))
        out = {}
        for v, x in xs.items():
            if v == self.cid:
                self._held[v] = (s_shares[x], b_shares[x])
                continue
            plain = struct.pack(_SHARE_FMT, self.cid, v, shamir.to_bytes(s_shares[x]), shamir.to_bytes(b_shares[x]))
            out[v] = self._share_cipher(v, roster[v][0]).encrypt(_share_nonce(self.cid, v), plain, None)
        return out

    def receive_shares(self, roster: Roster, ciphertexts: Dict[int, bytes]) -> None:
        """Decrypts {sender: ciphertext} addressed to this client (authenticated: a forged one raises)."""
        for u, ct in ciphertexts.items():
            plain = self._share_cipher(u, roster[u][0]).decrypt(_share_nonce(u, self.cid), ct, None)
            sender, receiver, s_share, b_share = struct.unpack(_SHARE_FMT, plain)
            if (sender, receiver) != (u, self.cid):
                raise SecAggAbort(f"secure aggregation: client {self.cid} got a share labelled {sender}->{receiver} "
                                  f"in the slot of {u}->{self.cid}")
            self._held[u] = (int.from_bytes(s_share, "little"), int.from_bytes(b_share, "little"))

    def masked_input(self, x: np.ndarray, roster: Roster, peers: Optional[Sequence[int]] = None) -> np.ndarray:
        """y_u = x + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) over the peers (default: every
        other client of the roster), all mod 2^32."""
        x = np.asarray(x, dtype=np.uint32)
        y = x + prg_uint32(shamir.to_bytes(self._b), x.size, _INFO_SELF)
        for v in (roster if peers is None else peers):
            if v == self.cid:
                continue
            s_pk = roster[v][1]
            m = prg_uint32(self._s_sk.exchange(_public_key(s_pk)), x.size)
            if self.cid < v:
                y += m
            else:
                y -= m
        return y

    def unmask_shares(self, survivors: Sequence[int], dropped: Sequence[int]) -> Dict[int, Tuple[str, int]]:
        """{u: ("b", share of b_u)} for survivors, {u: ("s", share of s_u^SK)} for dropped clients. A client
        never reveals both secrets of one peer (that would unmask its input)."""
        out: Dict[int, Tuple[str, int]] = {}
        for kind, group in (("b", survivors), ("s", dropped)):
            for u in group:
                if self._revealed.setdefault(u, kind) != kind:
                    raise SecAggAbort(f"secure aggregation: client {self.cid} refuses to reveal both secrets of "
                                      f"client {u}")
                if u not in self._held:
                    raise SecAggAbort(f"secure aggregation: client {self.cid} holds no share from client {u}")
                s_share, b_share = self._held[u]
                out[u] = (kind, b_share if kind == "b" else s_share)
        return out


def unmask(masked_sum: np.ndarray, roster: Roster, survivors: Sequence[int], dropped: Sequence[int],
           shares: Dict[int, Dict[int, Tuple[str, int]]], t: int, graph: Optional[Graph] = None) -> np.ndarray:
    """The server's last step: sum of the survivors' inputs mod 2^32 from the sum of their masked inputs
    and the survivors' unmasking shares {survivor: {u: (kind, share)}}. `graph`: who masked with and
    shared to whom (default: everyone). Raises SecAggAbort when fewer than t clients answered, or fewer
    than t holders of some secret survived."""
    survivors, dropped = sorted(survivors), sorted(dropped)
    graph = complete_graph(roster) if graph is None else graph
    responders = sorted(v for v in survivors if v in shares)
    if len(responders) < t:
        raise SecAggAbort(f"secure aggregation: {len(responders)} of {len(roster)} clients survived, below the "
                          f"threshold t = {t}; the round is aborted")
    n = masked_sum.size
    total = np.array(masked_sum, dtype=np.uint32)
    lag_cache: Dict[Tuple[int, ...], Dict[int, int]] = {}  # one set of coefficients per set of points

    def secret_of(u: int, kind: str) -> int:
        xs = share_points(holders(graph, u))
        use = [v for v in responders if v in xs and u in shares[v]][:t]
        if len(use) < t:
            raise SecAggAbort(f"secure aggregation: only {len(use)} holders of client {u}'s shares answered, "
                              f"below the threshold t = {t}; the round is aborted")
        key = tuple(xs[v] for v in use)
        lag = lag_cache.get(key)
        if lag is None:
            lag = lag_cache[key] = shamir.lagrange_at_zero(key)
        pts = {}
        for v in use:
            k, share = shares[v][u]
            if k != kind:
                raise SecAggAbort(f"secure aggregation: client {v} sent a share of kind {k!r} for client {u}, "
                                  f"expected {kind!r}")
            pts[xs[v]] = share
        return shamir.combine_with(lag, pts)

    for u in survivors:
        total -= prg_uint32(shamir.to_bytes(secret_of(u, "b")), n, _INFO_SELF)
    for u in dropped:
        s_sk = X25519PrivateKey.from_private_bytes(shamir.to_bytes(secret_of(u, "s")))
        if _raw(s_sk.public_key()) != roster[u][1]:
            raise SecAggAbort(f"secure aggregation: the shares of dropped client {u}'s key do not match its "
                              "public key")
        for v in survivors:
            if v not in graph[u]:
                continue
            m = prg_uint32(s_sk.exchange(_public_key(roster[v][1])), n)
            if v < u:
                total -= m  # v added +PRG(s_vu)
            else:
                total += m
    return total


def simulate(inputs: Dict[int, np.ndarray], t: int, drop: Iterable[int] = (),
             masked_out: Optional[Dict[int, np.ndarray]] = None, graph: Optional[Graph] = None) -> np.ndarray:
    """The whole protocol in one process: the sum mod 2^32 of the inputs of clients not in `drop` (those
    drop after the share exchange, before sending their masked input). `masked_out` receives each
    survivor's masked vector (what the server sees); `graph` as in unmask()."""
    clients = {cid: Client(cid) for cid in sorted(inputs)}
    roster = {cid: c.public_keys() for cid, c in clients.items()}
    graph = complete_graph(roster) if graph is None else graph
    mail: Dict[int, Dict[int, bytes]] = {cid: {} for cid in clients}
    for u, c in clients.items():
        for v, ct in c.share_keys(roster, t, graph[u]).items():
            mail[v][u] = ct
    for v, c in clients.items():
        c.receive_shares(roster, mail[v])
    dropped = sorted(set(drop))
    survivors = [cid for cid in clients if cid not in set(dropped)]
    total = np.zeros(next(iter(inputs.values())).size, dtype=np.uint32)
    for u in survivors:
        y = clients[u].masked_input(inputs[u], roster, graph[u])
        if masked_out is not None:
            masked_out[u] = y
        total += y
    shares = {v: clients[v].unmask_shares([u for u in survivors if u in clients[v]._held],
                                          [u for u in dropped if u in clients[v]._held]) for v in survivors}
    return unmask(total, roster, survivors, dropped, shares, t, graph)


CIPHERTEXT_BYTES = struct.calcsize(_SHARE_FMT) + 16  # + the Poly1305 tag
SHARE_BYTES = 33  # a field element and its kind


def upload_bytes(peers: int, length: int) -> int:
    """What one surviving client with `peers` neighbours sends in a round, vectors of `length` uint32:
    two public keys, an encrypted share pair per neighbour, the masked vector, peers + 1 unmasking shares."""
    return 64 + peers * CIPHERTEXT_BYTES + 4 * length + SHARE_BYTES * (peers + 1)


def default_threshold(n: int) -> int:
    """t = floor(n / 2) + 1: a majority of the sampled clients must survive."""
    return n // 2 + 1


__all__ = ["Client", "Graph", "Roster", "complete_graph", "decode", "default_threshold", "encode",
           "fixed_point_bits", "harary_graph", "holders", "prg_uint32", "share_points", "simulate", "unmask",
           "upload_bytes"]
