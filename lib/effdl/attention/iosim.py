"""A two-level memory simulator: count the element reads and writes of attention.

The machine model of FlashAttention and of Saha & Ye: a slow memory (HBM) holding Q, K,
V (N x d each) and the output, and a fast memory (SRAM) of ``M`` elements where all
arithmetic happens.  Moving one element between them costs one I/O.  Each algorithm
below *runs its loops* against a :class:`FastMemory` that refuses to hold more than
fits, and counts every element read from and written to slow memory.
:func:`closed_form` gives the same counts as formulas of the block sizes; the tests
check the two agree.

Algorithms (``io_count(algorithm, N, d, M)``):

- ``"standard"``  — S = QKᵀ written out, softmax read and written, O = PV:
  Θ(Nd + N²) when M ≥ d².
- ``"fa1"``       — FlashAttention-1 order (K/V outer, Q inner; O, m, ℓ go back to
  slow memory each step).
- ``"fa2"``       — FlashAttention-2 order (Q outer, K/V inner; O kept on chip):
  Θ(N²d²/M).
- ``"small_cache"`` — Saha & Ye's regime M < d²: S materialized, both products tiled
  in square B x B tiles with B ≈ √(M/3) along d too: Θ(N²d/√M), better than
  FlashAttention's N²d²/M there.

Hardware granularity (fa1 and fa2).  Two facts of a GPU decide which tiles are legal;
neither changes a single I/O, only what fits:

- ``mma`` (default 16): tensor-core instructions multiply tiles at least 16 rows
  wide, so a tile side is computed in whole blocks of ``mma`` rows.  A side that is
  not a multiple is *padded* in the working-set accounting — a 30-row tile takes the
  room of 32, a 1-row tile that of 16 — because the hardware computes the padded tile
  anyway; its I/O is what it holds.  Explicit tiles are accepted and padded, never
  rejected.  The library's own tiles (:func:`block_sizes`, :func:`best_tiles`) are
  multiples of ``mma`` unless clipped to N.  ``mma=1`` is the ungranular textbook
  model.  d is not padded (head dims are multiples of 16 in practice).
- ``registers`` (default None: one pool of M elements, the textbook model): the warps
  that own a query tile keep O_i (Br x d), m_i, ℓ_i and the score tile S_ij (Br x Bc)
  in their registers, while Q_i, K_j, V_j are staged through shared memory.  With
  ``registers`` given, Q_i, K_j, V_j must fit in M and O_i, m_i, ℓ_i, S_ij in
  ``registers`` (both in elements).

What the I/O count does not see: FA2's traffic depends on Br alone (K and V are read
once per query tile), so the I/O-optimal tile (:func:`best_tiles`) gives nearly all of
fast memory to Q_i and O_i and keeps Bc as narrow as it may be — a sliver of a few keys
when ``mma=1``, ``mma`` keys on tensor cores.  :func:`block_sizes` keeps the papers'
rules of thumb instead (fa2: Q_i and O_i take half of M, Bc ≈ min(d, M/8d)): every K/V
tile also costs a barrier and a rescale of O_i (N²d/Bc non-matmul operations in all),
work outside this model that makes real kernels use Bc = 64–128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALGORITHMS = ("standard", "fa1", "fa2", "small_cache")
FLASH = ("fa1", "fa2")
_BLOCK_KEYS = {"standard": ("B",), "small_cache": ("B",), "fa1": ("Br", "Bc"),
               "fa2": ("Br", "Bc")}


@dataclass(frozen=True)
class IOCount:
    """Element I/Os of one run: ``reads`` + ``writes`` = ``total``; ``peak`` fast-memory
    use (SRAM when ``registers`` is modelled; ``reg_peak`` the register file's)."""

    algorithm: str
    N: int
    d: int
    M: int
    reads: int
    writes: int
    peak: int = 0
    blocks: dict = field(default_factory=dict)
    reg_peak: int = 0

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def bytes(self, bytes_per_element: int = 2) -> int:
        """Traffic in bytes (fp16: 2 bytes per element)."""
        return self.total * bytes_per_element


class FastMemory:
    """The fast memory of the model: loads and stores count I/Os; holding more than
    fits raises.

    One pool of ``M`` elements, or with ``registers`` two: shared memory (M) for the
    tiles read from slow memory, and the register file for what the warps compute and
    keep (``reg=True``).  Tile sides count in whole ``mma`` blocks (:meth:`pad`).
    """

    def __init__(self, M: int, registers: int | None = None, mma: int = 1):
        self.M, self.registers, self.mma = M, registers, mma
        self.used, self.peak, self.reads, self.writes = 0, 0, 0, 0
        self.reg_used, self.reg_peak = 0, 0           # the register file, if modelled

    def pad(self, n: int) -> int:
        """A tile side as the tensor cores compute it: whole blocks of mma rows."""
        return -(-n // self.mma) * self.mma

    def alloc(self, n: int, reg: bool = False) -> None:
        """Make room for n elements computed on chip (no I/O); ``reg``: in registers."""
        if reg and self.registers is not None:
            self.reg_used += n
            if self.reg_used > self.registers:
                raise ValueError(
                    f"register working set {self.reg_used} elements exceeds "
                    f"registers={self.registers}: use a smaller Br or Bc"
                )
            self.reg_peak = max(self.reg_peak, self.reg_used)
            return
        self.used += n
        if self.used > self.M:
            raise ValueError(
                f"working set {self.used} elements exceeds the fast memory "
                f"M={self.M}: use smaller tiles or a larger M"
            )
        self.peak = max(self.peak, self.used)

    def load(self, n: int, room: int | None = None, reg: bool = False) -> None:
        """Read n elements from slow memory; they take ``room`` (default n) on chip."""
        self.reads += n
        self.alloc(n if room is None else room, reg)

    def store(self, n: int) -> None:
        """Write n elements (already on chip) to slow memory."""
        self.writes += n

    def free(self, n: int, reg: bool = False) -> None:
        if reg and self.registers is not None:
            self.reg_used -= n
        else:
            self.used -= n


def _check(N, d, M):
    for name, x in (("N", N), ("d", d), ("M", M)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")


def _check_hardware(mma, registers):
    if not isinstance(mma, int) or isinstance(mma, bool) or mma < 1:
        raise ValueError(f"mma must be a positive int (16 for tensor cores, 1 for the "
                         f"ungranular model), got {mma!r}")
    if registers is not None and (not isinstance(registers, int)
                                  or isinstance(registers, bool) or registers < 1):
        raise ValueError(f"registers must be a positive int (elements) or None for one "
                         f"fast-memory pool, got {registers!r}")


def _tiles(n: int, b: int):
    """(start, size) of each tile of b along n; the last one may be short."""
    return [(s, min(b, n - s)) for s in range(0, n, b)]


def working_set(Br: int, Bc: int, d: int, mma: int = 16,
                registers: int | None = None) -> tuple[int, int]:
    """(SRAM, register) elements of one fa1/fa2 step with Br x Bc tiles, sides padded
    to whole ``mma`` blocks.  Without ``registers`` everything counts in SRAM."""
    r, c = -(-Br // mma) * mma, -(-Bc // mma) * mma
    sram = r * d + 2 * c * d                           # Q_i, K_j, V_j
    reg = r * d + 2 * r + r * c                        # O_i, m_i, ℓ_i, S_ij
    return (sram, reg) if registers is not None else (sram + reg, 0)


def _fits(Br, Bc, d, M, mma, registers) -> bool:
    sram, reg = working_set(Br, Bc, d, mma, registers)
    return sram <= M and (registers is None or reg <= registers)


def _too_small(algorithm, d, M, mma, registers) -> ValueError:
    sram, reg = working_set(mma, mma, d, mma, registers)
    need, got = f"M >= {sram}", f"M={M}"
    if registers is not None:
        need, got = f"{need} and registers >= {reg}", f"{got}, registers={registers}"
    return ValueError(
        f"{algorithm} needs {need} for its smallest {mma} x {mma} tiles at d={d}, got "
        f"{got}; use 'small_cache' for tiny M (or mma=1 for the ungranular model)"
    )


def _flash_tiles(algorithm, d, M, mma, registers) -> tuple[int, int]:
    """The rule of thumb of :func:`block_sizes` for fa1/fa2, in whole ``mma`` blocks."""
    def down(x):                                       # a multiple of mma, at least mma
        return max(mma, x // mma * mma)

    def fits(t):
        return _fits(t["br"], t["bc"], d, M, mma, registers)

    if algorithm == "fa1":
        # the paper: B_c = ⌈M/4d⌉, B_r = min(⌈M/4d⌉, d)
        bc = down(-(-M // (4 * d)))
        br = down(min(bc, d))
    elif registers is None:
        # Q_i and O_i take half of M: B_r = ⌊M/4d⌋; K_j, V_j, S_ij share the rest:
        # B_c <= min(d, M/8d)
        br, bc = down(M // (4 * d)), down(min(d, M // (8 * d)))
    else:
        # SRAM: Q_i takes half, K_j and V_j the other half; O_i, S_ij in registers
        br, bc = down(M // (2 * d)), down(min(d, M // (4 * d)))
    # until it fits, shrink first the side the traffic does not depend on: fa1 re-reads
    # O_i once per key tile (keep Bc), fa2 re-reads K, V once per query tile (keep Br)
    tile = {"br": br, "bc": bc}
    for side in ("br", "bc") if algorithm == "fa1" else ("bc", "br"):
        while tile[side] > mma and not fits(tile):
            tile[side] -= mma
    if not fits(tile):
        raise _too_small(algorithm, d, M, mma, registers)
    return tile["br"], tile["bc"]


def block_sizes(algorithm: str, N: int, d: int, M: int, mma: int = 16,
                registers: int | None = None) -> dict:
    """The tile sizes each algorithm uses for fast memory M (see the module doc).

    fa1/fa2: the papers' rules of thumb in multiples of ``mma``, shrunk until they fit
    M (and ``registers``), clipped to N.  standard/small_cache ignore ``mma``.
    """
    _check(N, d, M)
    _check_hardware(mma, registers)
    if algorithm in FLASH:
        br, bc = _flash_tiles(algorithm, d, M, mma, registers)
        return {"Br": min(br, N), "Bc": min(bc, N)}
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if registers is not None:
        raise ValueError(f"registers are modelled for {FLASH} only; pass "
                         f"registers=None for {algorithm!r}")
    if algorithm == "standard":
        # Q_i (B x d) + K_j (B x d) + S_ij (B x B) <= M  ->  B = floor(√(d² + M) − d)
        b = math.isqrt(d * d + M) - d
        if b < 1:
            raise ValueError(
                f"standard attention needs M >= 2d+1 = {2 * d + 1}, got M={M}")
        return {"B": min(b, N)}
    b = math.isqrt(M // 3)                             # three B x B tiles on chip
    if b < 1:
        raise ValueError(f"small_cache needs M >= 3, got M={M}")
    return {"B": min(b, N)}


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
    started = set()                                    # row tiles with O, m, ℓ in HBM
    for j0, bc in _tiles(N, Bc):
        c = mem.pad(bc)                                # keys the tensor cores compute
        mem.load(2 * bc * d, room=2 * c * d)           # K_j, V_j: read once (SRAM)
        for i0, br in _tiles(N, Br):
            if not _visible(i0, br, j0, causal):
                continue
            r = mem.pad(br)
            mem.load(br * d, room=r * d)               # Q_i (SRAM)
            if i0 in started:                          # O_i, m_i, ℓ_i read back
                mem.load(br * d + 2 * br, room=r * d + 2 * r, reg=True)
            else:
                mem.alloc(r * d + 2 * r, reg=True)     # first visit: start at 0
            mem.alloc(r * c, reg=True)                 # S_ij = P_ij on chip
            mem.free(r * c, reg=True)
            mem.store(br * d + 2 * br)                 # O_i, m_i, ℓ_i written back
            started.add(i0)
            mem.free(r * d)
            mem.free(r * d + 2 * r, reg=True)
        mem.free(2 * c * d)


def _run_fa2(mem: FastMemory, N: int, d: int, Br: int, Bc: int, causal: bool) -> None:
    for i0, br in _tiles(N, Br):
        r = mem.pad(br)                                # rows the tensor cores compute
        mem.load(br * d, room=r * d)                   # Q_i (SRAM)
        mem.alloc(r * d + 2 * r, reg=True)             # O_i, m_i, ℓ_i stay on chip
        for j0, bc in _tiles(N, Bc):
            if not _visible(i0, br, j0, causal):       # causal: skip masked tiles
                break
            c = mem.pad(bc)
            mem.load(2 * bc * d, room=2 * c * d)       # K_j, V_j (SRAM)
            mem.alloc(r * c, reg=True)                 # S_ij = Q_i K_jᵀ
            mem.free(r * c, reg=True)
            mem.free(2 * c * d)
        mem.store(br * d + br)                         # O_i and L_i = m_i + log ℓ_i
        mem.free(r * d)
        mem.free(r * d + 2 * r, reg=True)


def _blocks(algorithm, N, d, M, mma, registers, blocks) -> dict:
    """The tiles of one run: ``blocks`` where given, :func:`block_sizes` elsewhere."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    keys = _BLOCK_KEYS[algorithm]
    for k, v in blocks.items():
        if k not in keys:
            raise ValueError(f"{algorithm!r} takes the tile sizes {keys}, "
                             f"got {k}={v!r}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"tile size {k} must be a positive int, got {v!r}")
    if all(k in blocks for k in keys):                 # the defaults need not fit then
        return dict(blocks)
    return {**block_sizes(algorithm, N, d, M, mma, registers), **blocks}


def io_count(algorithm: str, N: int, d: int, M: int, causal: bool = False,
             mma: int = 16, registers: int | None = None, **blocks) -> IOCount:
    """Run ``algorithm`` on the two-level machine; return its element reads and writes.

    ``blocks`` overrides the tile sizes (``B`` for standard/small_cache, ``Br``/``Bc``
    for fa1/fa2).  ``causal`` (fa1/fa2 only) skips tiles above the diagonal.  ``mma``
    and ``registers`` (fa1/fa2 only) are the hardware granularity of the module doc.
    """
    _check(N, d, M)
    _check_hardware(mma, registers)
    bs = _blocks(algorithm, N, d, M, mma, registers, blocks)
    if algorithm not in FLASH and (causal or registers is not None):
        raise ValueError(f"causal tile skipping and registers are modelled for {FLASH} "
                         f"only, not {algorithm!r}")
    if algorithm in FLASH:
        mem = FastMemory(M, registers, mma)
        run = _run_fa1 if algorithm == "fa1" else _run_fa2
        run(mem, N, d, bs["Br"], bs["Bc"], causal)
    else:
        mem = FastMemory(M)
        run = _run_standard if algorithm == "standard" else _run_small_cache
        run(mem, N, d, bs["B"])
    return IOCount(algorithm, N, d, M, mem.reads, mem.writes, mem.peak, bs,
                   mem.reg_peak)


def _flash_counts(algorithm, N, d, Br, Bc, causal=False) -> tuple[int, int]:
    """(reads, writes) of fa1/fa2 with Br x Bc tiles, T = ⌈N/B⌉ tiles along N.

    Causal: query tile i sees v_i = min(T_c, ⌊(i0 + br − 1)/Bc⌋ + 1) key tiles, so the
    counts become sums over the query tiles (v_i = T_c for all i when not causal).
    """
    Tr, Tc = -(-N // Br), -(-N // Bc)
    if not causal and algorithm == "fa1":
        # K, V once; Q per key tile; O, m, ℓ read back and written once per key tile
        reads = 2 * N * d + Tc * N * d + (Tc - 1) * (N * d + 2 * N)
        return reads, Tc * (N * d + 2 * N)
    if not causal:                                     # Q; K, V per query tile | O, L
        return N * d + Tr * 2 * N * d, N * d + N
    seen = [(br, min(Tc, (i0 + br - 1) // Bc + 1)) for i0, br in _tiles(N, Br)]
    if algorithm == "fa1":
        per_row = [v * br * d + (v - 1) * (br * d + 2 * br) for br, v in seen]
        return 2 * N * d + sum(per_row), sum(v * (br * d + 2 * br) for br, v in seen)
    reads = N * d + sum(2 * d * min(N, v * Bc) for _, v in seen)
    return reads, N * d + N


def closed_form(algorithm: str, N: int, d: int, M: int, causal: bool = False,
                mma: int = 16, registers: int | None = None, **blocks) -> IOCount:
    """The same counts as :func:`io_count` as formulas of the tile sizes; T = ⌈N/B⌉.

    ``causal`` (fa1/fa2) sums over the query tiles; ``mma`` and ``registers`` only
    choose the default tiles (they change what fits, never a count).
    """
    _check(N, d, M)
    _check_hardware(mma, registers)
    bs = _blocks(algorithm, N, d, M, mma, registers, blocks)
    c = lambda n, b: -(-n // b)                        # noqa: E731  ceil division
    if algorithm in FLASH:
        reads, writes = _flash_counts(algorithm, N, d, bs["Br"], bs["Bc"], causal)
    elif causal:
        raise ValueError(f"causal tile skipping is modelled for {FLASH} only, "
                         f"not {algorithm!r}")
    elif algorithm == "standard":
        T = c(N, bs["B"])
        reads = (N * d            # Q
                 + T * N * d      # K, once per row tile
                 + 2 * N * N      # S, twice
                 + N * N          # P
                 + T * N * d)     # V, once per row tile
        writes = N * N + N * N + N * d                # S, P, O
    else:
        B = bs["B"]
        Tn, Td = c(N, B), c(d, B)
        reads = (2 * Tn * N * d   # QKᵀ: Q and K tiles
                 + 2 * N * N      # softmax
                 + Td * N * N     # P, once per d-tile
                 + Tn * N * d)    # V, once per row tile
        writes = 2 * N * N + N * d
    return IOCount(algorithm, N, d, M, reads, writes, 0, bs)


def best_tiles(algorithm: str, N: int, d: int, M: int, mma: int = 16,
               registers: int | None = None, causal: bool = False) -> dict:
    """The legal fa1/fa2 tiles that move the fewest elements, and their traffic.

    Legal: both sides multiples of ``mma`` (or N itself) that fit M and ``registers``.
    Every pair is scored with :func:`closed_form`'s formulas; the winner is confirmed
    by running :func:`io_count`.  Returns ``{"Br", "Bc", "reads", "writes", "total"}``.
    """
    _check(N, d, M)
    _check_hardware(mma, registers)
    if algorithm not in FLASH:
        raise ValueError(f"best_tiles searches the tiles of {FLASH}, got {algorithm!r}")
    sides = sorted({*range(mma, N + 1, mma), N})
    best = None
    for br in sides:
        if not _fits(br, sides[0], d, M, mma, registers):
            break                                      # a taller Br fits no better
        for bc in sides:
            if not _fits(br, bc, d, M, mma, registers):
                break
            reads, writes = _flash_counts(algorithm, N, d, br, bc, causal)
            # ties (common: fa2's traffic depends on Br alone) go to the wider Bc, then
            # the taller Br: the same traffic in fewer, larger MMAs and loop steps
            key = (reads + writes, -bc, -br)
            if best is None or key < best:
                best = key
    if best is None:
        raise _too_small(algorithm, d, M, mma, registers)
    br, bc = -best[2], -best[1]
    run = io_count(algorithm, N, d, M, causal, mma, registers, Br=br, Bc=bc)
    if run.total != best[0]:                           # the formulas and loops agree
        raise RuntimeError(f"closed form {best[0]} != simulated {run.total}")
    return {"Br": br, "Bc": bc, "reads": run.reads, "writes": run.writes,
            "total": run.total}


def optimum_rows(N: int, d: int, Ms, mma: int = 16,
                 registers: int | None = None) -> list[dict]:
    """FA2's I/O-optimal tiles (:func:`best_tiles`) for each fast-memory size in ``Ms``:
    ``{"M", "Br", "Bc", "total", "over_lower_bound"}`` per M."""
    Ms = list(Ms)
    if not Ms:
        raise ValueError("Ms is empty: pass the fast-memory sizes to compare")
    rows = []
    for M in Ms:
        b = best_tiles("fa2", N, d, M, mma, registers)
        rows.append({"M": M, "Br": b["Br"], "Bc": b["Bc"], "total": b["total"],
                     "over_lower_bound": b["total"] / lower_bound(N, d, M)})
    return rows


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
