"""A two-level memory simulator: count the element reads and writes of attention's loop structures.

The machine model of FlashAttention and of Saha & Ye: a slow memory (HBM) holding Q, K, V (N x d each)
and the output, and a fast memory (SRAM) of ``M`` elements where all arithmetic happens.  Moving one
element between them costs one I/O.  Each algorithm below *runs its loops* against a
:class:`FastMemory` that refuses to hold more than ``M`` elements, and counts every element read
from and written to slow memory.  :func:`closed_form` gives the same counts as formulas of the block
sizes; the tests check the two agree.

Algorithms (``io_count(algorithm, N, d, M)``):

- ``"standard"``  — S = QKᵀ written out, softmax read and written, O = PV: Θ(Nd + N²) when M ≥ d².
- ``"fa1"``       — FlashAttention-1 order (K/V outer, Q inner; O, m, ℓ go back to slow memory each step).
- ``"fa2"``       — FlashAttention-2 order (Q outer, K/V inner; O kept in fast memory): Θ(N²d²/M).
- ``"small_cache"`` — Saha & Ye's regime M < d²: S materialized, both products tiled in square
  B x B tiles with B ≈ √(M/3) along d too: Θ(N²d/√M), better than FlashAttention's N²d²/M there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALGORITHMS = ("standard", "fa1", "fa2", "small_cache")


@dataclass(frozen=True)
class IOCount:
    """Element I/Os of one run: ``reads`` + ``writes`` = ``total``; ``peak`` fast-memory use."""

    algorithm: str
    N: int
    d: int
    M: int
    reads: int
    writes: int
    peak: int = 0
    blocks: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def bytes(self, bytes_per_element: int = 2) -> int:
        """Traffic in bytes (fp16: 2 bytes per element)."""
        return self.total * bytes_per_element


class FastMemory:
    """The fast memory of the model: loads and stores count I/Os; holding more than M
    raises."""

    def __init__(self, M: int):
        self.M, self.used, self.peak, self.reads, self.writes = M, 0, 0, 0, 0

    def alloc(self, n: int) -> None:
        """Make room for n elements computed on chip (no I/O)."""
        self.used += n
        if self.used > self.M:
            raise ValueError(
                f"working set {self.used} elements exceeds the fast memory M={self.M}"
            )
        self.peak = max(self.peak, self.used)

    def load(self, n: int) -> None:
        """Read n elements from slow memory."""
        self.reads += n
        self.alloc(n)

    def store(self, n: int) -> None:
        """Write n elements (already on chip) to slow memory."""
        self.writes += n

    def free(self, n: int) -> None:
        self.used -= n


def _check(N, d, M):
    for name, x in (("N", N), ("d", d), ("M", M)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")


def _tiles(n: int, b: int):
    """(start, size) of each tile of b along n; the last one may be short."""
    return [(s, min(b, n - s)) for s in range(0, n, b)]


def block_sizes(algorithm: str, N: int, d: int, M: int) -> dict:
    """The tile sizes each algorithm uses for fast memory M (largest that fit; see the module doc)."""
    _check(N, d, M)
    if algorithm == "standard":
        # Q_i (B x d) + K_j (B x d) + S_ij (B x B) <= M  ->  B = floor(√(d² + M) − d)
        b = math.isqrt(d * d + M) - d
        if b < 1:
            raise ValueError(f"standard attention needs M >= 2d+1 = {2 * d + 1}, got M={M}")
        return {"B": min(b, N)}
    if algorithm == "small_cache":
        b = math.isqrt(M // 3)                                           # three B x B tiles on chip
        if b < 1:
            raise ValueError(f"small_cache needs M >= 3, got M={M}")
        return {"B": min(b, N)}
    if algorithm == "fa1":
        # the paper: B_c = ⌈M/4d⌉, B_r = min(⌈M/4d⌉, d); its working set 2B_c·d + 2B_r·d + B_r·B_c + 2B_r
        # can exceed M by ~25%, so shrink (B_r first) until it fits
        bc = -(-M // (4 * d))
        br = min(bc, d)
        ws = lambda r, c: 2 * c * d + 2 * r * d + r * c + 2 * r         # noqa: E731
        while br > 1 and ws(br, bc) > M:
            br -= 1
        while bc > 1 and ws(br, bc) > M:
            bc -= 1
        if ws(br, bc) > M:
            raise ValueError(f"fa1 needs M >= 4d+3 = {4 * d + 3}, got M={M}; use 'small_cache' for tiny M")
        return {"Br": min(br, N), "Bc": min(bc, N)}
    if algorithm == "fa2":
        # Q_i and O_i take half of M: B_r = ⌊M/4d⌋; K_j, V_j and S_ij share the rest: B_c <= min(d, M/8d)
        br = max(1, M // (4 * d))
        bc = max(1, min(d, M // (8 * d)))
        ws = lambda r, c: 2 * r * d + 2 * r + 2 * c * d + r * c         # noqa: E731
        while br > 1 and ws(br, bc) > M:
            br -= 1
        if ws(br, bc) > M:
            raise ValueError(f"fa2 needs M >= 4d+3 = {4 * d + 3}, got M={M}; use 'small_cache' for tiny M")
        return {"Br": min(br, N), "Bc": min(bc, N)}
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")


# --- the loop structures, run against the fast memory -----------------------------------------

def _softmax_rows(mem: FastMemory, N: int, B: int) -> None:
    """Row-wise softmax of S (N x N) in tiles: pass 1 finds (m, ℓ), pass 2 writes P."""
    for _, br in _tiles(N, B):
        mem.alloc(2 * br)                                                # m, ℓ of these rows
        for _, bc in _tiles(N, B):                                       # pass 1 (online max and sum)
            mem.load(br * bc); mem.free(br * bc)
        for _, bc in _tiles(N, B):                                       # pass 2: P = exp(S − m)/ℓ
            mem.load(br * bc); mem.store(br * bc); mem.free(br * bc)
        mem.free(2 * br)


def _run_standard(mem: FastMemory, N: int, d: int, B: int) -> None:
    for _, br in _tiles(N, B):                                           # S = Q Kᵀ, row tile by row tile
        mem.load(br * d)                                                 # Q_i
        for _, bc in _tiles(N, B):
            mem.load(bc * d)                                             # K_j
            mem.alloc(br * bc); mem.store(br * bc); mem.free(br * bc)    # S_ij written out
            mem.free(bc * d)
        mem.free(br * d)
    _softmax_rows(mem, N, B)
    for _, br in _tiles(N, B):                                           # O = P V
        mem.alloc(br * d)                                                # O_i accumulates on chip
        for _, bc in _tiles(N, B):
            mem.load(br * bc); mem.load(bc * d)                          # P_ij, V_j
            mem.free(br * bc + bc * d)
        mem.store(br * d); mem.free(br * d)


def _run_small_cache(mem: FastMemory, N: int, d: int, B: int) -> None:
    for _, br in _tiles(N, B):                                           # S = Q Kᵀ in B x B x B steps
        for _, bc in _tiles(N, B):
            mem.alloc(br * bc)
            for _, bt in _tiles(d, B):
                mem.load(br * bt); mem.load(bc * bt)                     # Q_i,t and K_j,t
                mem.free(br * bt + bc * bt)
            mem.store(br * bc); mem.free(br * bc)
    _softmax_rows(mem, N, B)
    for _, br in _tiles(N, B):                                           # O = P V, output tile (i, t)
        for _, bt in _tiles(d, B):
            mem.alloc(br * bt)
            for _, bc in _tiles(N, B):
                mem.load(br * bc); mem.load(bc * bt)                     # P_ij and V_j,t
                mem.free(br * bc + bc * bt)
            mem.store(br * bt); mem.free(br * bt)


def _visible(i0, br, j0, causal):
    """Does the query tile [i0, i0+br) see any key of the tile starting at j0? (square, top-left)"""
    return (not causal) or j0 <= i0 + br - 1


def _run_fa1(mem: FastMemory, N: int, d: int, Br: int, Bc: int, causal: bool) -> None:
    started = set()                                                      # row tiles with O, m, ℓ in HBM
    for j0, bc in _tiles(N, Bc):
        mem.load(2 * bc * d)                                             # K_j, V_j: read once
        for i0, br in _tiles(N, Br):
            if not _visible(i0, br, j0, causal):
                continue
            mem.load(br * d)                                             # Q_i
            if i0 in started:
                mem.load(br * d + 2 * br)                                # O_i, m_i, ℓ_i read back
            else:
                mem.alloc(br * d + 2 * br)                               # first visit: start at 0
            mem.alloc(br * bc)                                           # S_ij = P_ij on chip
            mem.free(br * bc)
            mem.store(br * d + 2 * br)                                   # O_i, m_i, ℓ_i written back
            started.add(i0)
            mem.free(2 * br * d + 2 * br)
        mem.free(2 * bc * d)


def _run_fa2(mem: FastMemory, N: int, d: int, Br: int, Bc: int, causal: bool) -> None:
    for i0, br in _tiles(N, Br):
        mem.load(br * d)                               # Q_i
        mem.alloc(br * d + 2 * br)                     # O_i, m_i, ℓ_i stay on chip
        for j0, bc in _tiles(N, Bc):
            if not _visible(i0, br, j0, causal):       # causal: skip masked tiles
                break
            mem.load(2 * bc * d)                       # K_j, V_j
            mem.alloc(br * bc); mem.free(br * bc)
            mem.free(2 * bc * d)
        mem.store(br * d + br)                         # O_i and L_i = m_i + log ℓ_i
        mem.free(2 * br * d + 2 * br)


def io_count(algorithm: str, N: int, d: int, M: int, causal: bool = False, **blocks) -> IOCount:
    """Run ``algorithm`` on the two-level machine; return its element reads and writes.

    ``blocks`` overrides the tile sizes (``B`` for standard/small_cache, ``Br``/``Bc`` for fa1/fa2).
    ``causal`` (fa1/fa2 only) skips tiles above the diagonal.
    """
    _check(N, d, M)
    bs = {**block_sizes(algorithm, N, d, M), **blocks}
    mem = FastMemory(M)
    if algorithm == "standard":
        _run_standard(mem, N, d, bs["B"])
    elif algorithm == "small_cache":
        _run_small_cache(mem, N, d, bs["B"])
    elif algorithm in ("fa1", "fa2"):
        (_run_fa1 if algorithm == "fa1" else _run_fa2)(mem, N, d, bs["Br"], bs["Bc"], causal)
    if causal and algorithm in ("standard", "small_cache"):
        raise ValueError("causal tile skipping is modelled for 'fa1' and 'fa2' only")
    return IOCount(algorithm, N, d, M, mem.reads, mem.writes, mem.peak, bs)


def closed_form(algorithm: str, N: int, d: int, M: int, **blocks) -> IOCount:
    """The same counts as :func:`io_count` (non-causal) as formulas of the tile sizes; T = ⌈N/B⌉."""
    bs = {**block_sizes(algorithm, N, d, M), **blocks}
    c = lambda n, b: -(-n // b)                                          # noqa: E731  ceil division
    if algorithm == "standard":
        T = c(N, bs["B"])
        reads = (N * d            # Q
                 + T * N * d      # K, once per row tile
                 + 2 * N * N      # S, twice
                 + N * N          # P
                 + T * N * d)     # V, once per row tile
        writes = N * N + N * N + N * d                                      # S, P, O
    elif algorithm == "small_cache":
        B = bs["B"]
        Tn, Td = c(N, B), c(d, B)
        reads = 2 * Tn * N * d + 2 * N * N + Td * N * N + Tn * N * d       # QKᵀ, softmax, P per d-tile, V per row tile
        writes = 2 * N * N + N * d
    elif algorithm == "fa1":
        Tc = c(N, bs["Bc"])
        reads = 2 * N * d + Tc * N * d + (Tc - 1) * (N * d + 2 * N)
        writes = Tc * (N * d + 2 * N)
    elif algorithm == "fa2":
        Tr = c(N, bs["Br"])
        reads = N * d + Tr * 2 * N * d
        writes = N * d + N
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    return IOCount(algorithm, N, d, M, reads, writes, 0, bs)


def asymptotic(algorithm: str, N: int, d: int, M: int) -> float:
    """The Θ(·) expression of an algorithm (no constants): what the plots draw next to the counts."""
    if algorithm == "standard":
        return N * d + N * N
    if algorithm in ("fa1", "fa2"):
        return N * N * d * d / M
    if algorithm == "small_cache":
        return N * N * d / math.sqrt(M)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")


def lower_bound(N: int, d: int, M: int) -> float:
    """Saha & Ye's lower bound, up to a constant factor: Ω(N²d²/M) for M ≥ d², Ω(N²d/√M) below.

    The two meet at M = d² (both N²).  The trivial term — read Q, K, V and write O, 4Nd — is
    included, so the bound never drops below what any algorithm must move.
    """
    _check(N, d, M)
    quad = N * N * d * d / M if M >= d * d else N * N * d / math.sqrt(M)
    return float(max(quad, 4 * N * d))
