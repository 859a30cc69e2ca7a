"""The two-level memory simulator: counts by hand, closed forms, scaling laws, the lower bound."""

from __future__ import annotations

import math

import pytest

from effdl.attention import iosim
from effdl.attention.iosim import block_sizes, closed_form, io_count, lower_bound


def test_counts_by_hand():
    # FA2, N=8, d=2, Br=4, Bc=2: Q once (16), K and V once per query tile (2 tiles x 32), O (16) + L (8)
    c = io_count("fa2", 8, 2, M=10_000, Br=4, Bc=2)
    assert (c.reads, c.writes) == (16 + 2 * 32, 16 + 8)
    # standard, N=8, d=2, M=40 -> B = isqrt(4 + 40) - 2 = 4 (2 tiles):
    # reads Q 16 + K 2x16 + softmax 2x64 + P 64 + V 2x16; writes S 64 + P 64 + O 16
    c = io_count("standard", 8, 2, M=40)
    assert block_sizes("standard", 8, 2, 40) == {"B": 4}
    assert (c.reads, c.writes) == (16 + 32 + 128 + 64 + 32, 64 + 64 + 16)
    # FA1, N=4, d=1, Br=2, Bc=2: K,V 8; Q per K tile 2x4; O,m,l read back once 4+8; written twice 2x(4+8)
    c = io_count("fa1", 4, 1, M=10_000, Br=2, Bc=2)
    assert (c.reads, c.writes) == (8 + 8 + 12, 24)


@pytest.mark.parametrize("alg", iosim.ALGORITHMS)
@pytest.mark.parametrize("N,d,M", [(8, 2, 60), (100, 16, 2000), (513, 32, 5000), (257, 64, 1000),
                                   (1000, 64, 16384), (77, 8, 4096)])
@pytest.mark.parametrize("mma", [1, 16])  # 16 alone leaves the small M (tiles do not fit) untested
def test_simulation_matches_closed_form(alg, N, d, M, mma):
    try:
        sim = io_count(alg, N, d, M, mma=mma)
    except ValueError:
        pytest.skip(f"{alg} tiles do not fit M={M} at d={d}, mma={mma}")
    cf = closed_form(alg, N, d, M, mma=mma)
    assert (sim.reads, sim.writes) == (cf.reads, cf.writes)
    assert sim.peak <= M


@pytest.mark.parametrize("alg", ["fa1", "fa2"])
@pytest.mark.parametrize("N,Br,Bc", [(100, 16, 16), (100, 32, 48), (97, 48, 16), (130, 16, 64), (64, 64, 64),
                                     (50, 30, 7)])
def test_causal_closed_form_matches_simulation(alg, N, Br, Bc):
    sim = io_count(alg, N, 8, 10**6, causal=True, Br=Br, Bc=Bc)
    cf = closed_form(alg, N, 8, 10**6, causal=True, Br=Br, Bc=Bc)
    assert (sim.reads, sim.writes) == (cf.reads, cf.writes)
    assert sim.total < io_count(alg, N, 8, 10**6, Br=Br, Bc=Bc).total or N <= Br


@pytest.mark.parametrize("alg", ["fa1", "fa2"])
def test_tiled_counts_halve_when_M_doubles(alg):
    N, d = 8192, 32
    for M in (8192, 16384, 32768):
        ratio = io_count(alg, N, d, M).total / io_count(alg, N, d, 2 * M).total
        assert 1.8 <= ratio <= 2.1, (M, ratio)


def test_standard_at_least_N_squared_and_flat_in_M():
    for N, d, M in [(256, 32, 4096), (512, 64, 65536), (100, 8, 1000)]:
        c = io_count("standard", N, d, M)
        assert c.total >= N * N
    a, b = io_count("standard", 1024, 32, 2**14).total, io_count("standard", 1024, 32, 2**16).total
    assert a / b < 1.3                                                # N² terms do not shrink with M


def test_fa2_beats_fa1_and_stays_near_the_lower_bound():
    N, d = 2048, 64
    for M in (4096 * 4, 65536):
        fa1, fa2 = io_count("fa1", N, d, M).total, io_count("fa2", N, d, M).total
        assert fa2 < fa1
        assert fa2 / lower_bound(N, d, M) < 20


def test_small_cache_regime():
    N, d = 1024, 128
    M = 2048                                                          # M < d² = 16384
    # on tensor cores (mma=16) FA2 cannot run at all here: a 16 x 16 tile pair needs 8480 elements;
    # the ungranular model (mma=1) squeezes in tiny tiles, and small_cache still moves less
    with pytest.raises(ValueError, match="small_cache"):
        io_count("fa2", N, d, M)
    assert io_count("small_cache", N, d, M).total < closed_form("fa2", N, d, M, mma=1).total
    ratio = io_count("small_cache", N, d, M).total / lower_bound(N, d, M)
    assert ratio < 30
    # quadrupling M halves the √M term
    a, b = io_count("small_cache", 4096, 256, 1024), io_count("small_cache", 4096, 256, 4096)
    assert 1.6 <= (a.total - 3 * 4096**2) / (b.total - 3 * 4096**2) <= 2.3


def test_lower_bound_regimes_meet_at_d_squared():
    N, d = 1000, 32
    assert lower_bound(N, d, d * d) == pytest.approx(N * N)
    assert lower_bound(N, d, d * d - 1) == pytest.approx(N * N * d / math.sqrt(d * d - 1))
    assert lower_bound(N, d, 4 * d * d) == pytest.approx(N * N / 4)
    assert lower_bound(10, 64, 10**9) == 4 * 10 * 64


def test_causal_skips_about_half():
    full, causal = io_count("fa2", 4096, 64, 65536), io_count("fa2", 4096, 64, 65536, causal=True)
    assert 0.45 < causal.reads / full.reads < 0.6


def test_fast_memory_refuses_overflow_and_bad_input():
    mem = iosim.FastMemory(10)
    mem.load(6)
    with pytest.raises(ValueError, match="exceeds"):
        mem.load(5)
    with pytest.raises(ValueError, match="unknown algorithm"):
        io_count("fa3", 10, 2, 100)
    with pytest.raises(ValueError, match="positive int"):
        io_count("fa2", 0, 2, 100)
    with pytest.raises(ValueError, match="small_cache"):
        io_count("fa2", 100, 64, 200)


# ------------------------------------------------------------------ hardware granularity
def test_narrow_tiles_are_padded_to_mma_not_rejected():
    """A 30 x 7 tile takes the room of 32 x 16 on tensor cores; what it reads is unchanged."""
    N, d = 100, 16
    padded = iosim.working_set(30, 7, d, mma=16)[0]
    assert padded == iosim.working_set(32, 16, d, mma=1)[0] > iosim.working_set(30, 7, d, mma=1)[0]
    M = iosim.working_set(30, 7, d, mma=1)[0]                          # fits exactly, unpadded
    fine = io_count("fa2", N, d, M, mma=1, Br=30, Bc=7)
    assert fine.peak == M
    with pytest.raises(ValueError, match="exceeds the fast memory"):
        io_count("fa2", N, d, M, mma=16, Br=30, Bc=7)
    wide = io_count("fa2", N, d, padded, mma=16, Br=30, Bc=7)
    assert (wide.reads, wide.writes, wide.peak) == (fine.reads, fine.writes, padded)


def test_registers_hold_the_accumulators_and_scores():
    """With a register file, Q_i, K_j, V_j fill M and O_i, m_i, l_i, S_ij fill the registers."""
    N, d, Br, Bc = 256, 64, 64, 32
    sram, reg = iosim.working_set(Br, Bc, d, registers=1)
    assert (sram, reg) == (Br * d + 2 * Bc * d, Br * d + 2 * Br + Br * Bc)
    assert iosim.working_set(Br, Bc, d) == (sram + reg, 0)
    c = io_count("fa2", N, d, sram, registers=reg, Br=Br, Bc=Bc)      # fits both pools exactly
    assert (c.peak, c.reg_peak) == (sram, reg)
    assert c.total == io_count("fa2", N, d, 10**6, Br=Br, Bc=Bc).total  # the split moves nothing
    with pytest.raises(ValueError, match="register working set"):
        io_count("fa2", N, d, sram, registers=reg - 1, Br=Br, Bc=Bc)
    with pytest.raises(ValueError, match="exceeds the fast memory"):
        io_count("fa1", N, d, sram - 1, registers=reg, Br=Br, Bc=Bc)
    with pytest.raises(ValueError, match="exceeds the fast memory"):  # one pool: both must fit in M
        io_count("fa2", N, d, sram, Br=Br, Bc=Bc)
    mem = iosim.FastMemory(10, registers=4)
    mem.load(6)
    mem.alloc(4, reg=True)
    with pytest.raises(ValueError, match="register working set 5 elements exceeds registers=4"):
        mem.alloc(1, reg=True)


@pytest.mark.parametrize("alg", ["fa1", "fa2"])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("M", [16384, 65536, 100_000])
@pytest.mark.parametrize("registers", [None, "M"])
def test_library_tiles_are_whole_mma_blocks_that_fit(alg, d, M, registers):
    R = M if registers == "M" else None
    bs = block_sizes(alg, 4096, d, M, registers=R)
    assert bs["Br"] % 16 == 0 and bs["Bc"] % 16 == 0, bs
    sram, reg = iosim.working_set(bs["Br"], bs["Bc"], d, registers=R)
    assert sram <= M and (R is None or reg <= R)
    assert block_sizes(alg, 40, d, M, registers=R) == {k: min(v, 40) for k, v in bs.items()}  # clipped to N


def test_block_sizes_with_mma_1_is_the_textbook_rule():
    """mma=1 keeps the ungranular rule of thumb where its tiles fit: Br = M/4d, Bc = min(d, M/8d)."""
    for M, d in [(16384, 64), (65536, 64), (4096, 16), (100_000, 128)]:
        br, bc = M // (4 * d), min(d, M // (8 * d))
        assert block_sizes("fa2", 4096, d, M, mma=1) == {"Br": br, "Bc": bc}


def _brute_force(alg, N, d, M, mma, registers, causal):
    """Every legal pair, simulated: the least traffic, ties to the wider Bc, then the taller Br."""
    sides = sorted({*range(mma, N + 1, mma), N})
    runs = []
    for br in sides:
        for bc in sides:
            try:
                c = io_count(alg, N, d, M, causal, mma, registers, Br=br, Bc=bc)
            except ValueError:
                continue
            runs.append((c.total, -bc, -br))
    total, bc, br = min(runs)
    return {"Br": -br, "Bc": -bc, "total": total}


@pytest.mark.parametrize("alg", ["fa1", "fa2"])
@pytest.mark.parametrize("N,d,M,mma,registers,causal", [
    (160, 16, 2048, 16, None, False), (160, 16, 2048, 16, None, True), (100, 8, 1000, 16, 1500, False),
    (97, 8, 700, 16, 600, True), (40, 4, 200, 1, None, False), (33, 4, 160, 1, None, True),
    (40, 8, 10**5, 16, None, False)])                                  # Br = N = 40: clipped, not a multiple
def test_best_tiles_is_the_brute_force_optimum(alg, N, d, M, mma, registers, causal):
    got = iosim.best_tiles(alg, N, d, M, mma, registers, causal)
    want = _brute_force(alg, N, d, M, mma, registers, causal)
    assert {k: got[k] for k in want} == want
    assert got["reads"] + got["writes"] == got["total"]


@pytest.mark.parametrize("registers", [None, "M"])
def test_with_tensor_core_tiles_the_optimum_is_not_degenerate(registers):
    N, d = 4096, 64
    for M in (4096, 16384, 65536):
        if registers is None and M == 4096:      # one pool: not even a 16 x 16 pair fits in 4096
            with pytest.raises(ValueError, match="smallest 16 x 16 tiles"):
                iosim.best_tiles("fa2", N, d, M)
            continue
        b = iosim.best_tiles("fa2", N, d, M, registers=M if registers else None)
        assert b["Bc"] >= 16 and b["Br"] % 16 == 0 and b["Bc"] % 16 == 0, (M, b)


def test_without_granularity_the_optimum_is_a_sliver_of_keys():
    """mma=1, the textbook model: FA2's traffic depends on Br alone, so the optimum starves Bc —
    a tile no tensor core runs — and a 1-key-wide tile already reaches the optimal traffic."""
    N, d = 4096, 64
    for M in (4096, 16384, 65536):
        b = iosim.best_tiles("fa2", N, d, M, mma=1)
        assert b["Bc"] < 16, (M, b)
        tallest = (M - 2 * d) // (2 * d + 3)                        # the largest Br with Bc = 1
        assert iosim.working_set(tallest, 1, d, mma=1)[0] <= M < iosim.working_set(tallest + 1, 1, d, mma=1)[0]
        assert closed_form("fa2", N, d, M, Br=tallest, Bc=1).total == b["total"]
        lib = closed_form("fa2", N, d, M, mma=1).total
        assert b["total"] < 0.6 * lib                                   # the rule of thumb moves ~1.7x more


def test_optimum_rows_follow_M():
    N, d = 4096, 64
    rows = iosim.optimum_rows(N, d, [16384, 65536, 262144])
    assert [set(r) for r in rows] == [{"M", "Br", "Bc", "total", "over_lower_bound"}] * 3
    assert rows[0]["Br"] < rows[1]["Br"] < rows[2]["Br"]
    assert rows[0]["total"] > rows[1]["total"] > rows[2]["total"]
    for r in rows:
        assert r["total"] == iosim.best_tiles("fa2", N, d, r["M"])["total"]
        assert r["over_lower_bound"] == pytest.approx(r["total"] / lower_bound(N, d, r["M"]))
    with pytest.raises(ValueError, match="Ms is empty"):
        iosim.optimum_rows(N, d, [])


def test_tile_optimum_plot():
    import matplotlib.pyplot as plt

    from effdl.attention import plots

    fig = plots.tile_optimum(iosim.optimum_rows(1024, 64, [16384, 65536]))
    left, right = fig.axes
    assert len(left.lines) == 2 and len(right.lines) == 1
    assert "M" in left.get_xlabel() and right.get_ylabel()
    plt.close(fig)
    with pytest.raises(ValueError, match="rows is empty"):
        plots.tile_optimum([])


def test_hardware_parameters_are_checked():
    with pytest.raises(ValueError, match="mma must be a positive int"):
        io_count("fa2", 64, 16, 10**5, mma=0)
    with pytest.raises(ValueError, match="registers must be a positive int"):
        block_sizes("fa2", 64, 16, 10**5, registers=0)
    with pytest.raises(ValueError, match="registers are modelled for"):
        block_sizes("standard", 64, 16, 10**5, registers=1000)
    with pytest.raises(ValueError, match="modelled for"):
        io_count("standard", 64, 16, 10**5, causal=True)
    with pytest.raises(ValueError, match="takes the tile sizes"):
        io_count("fa2", 64, 16, 10**5, B=16)
    with pytest.raises(ValueError, match="tile size Br must be a positive int"):
        closed_form("fa2", 64, 16, 10**5, Br=0, Bc=16)
    with pytest.raises(ValueError, match="best_tiles searches"):
        iosim.best_tiles("standard", 64, 16, 10**5)


def test_explicit_tiles_do_not_need_the_default_ones_to_fit():
    """Regression: closed_form(..., Br=, Bc=) once computed block_sizes first and raised when the
    *default* tiles did not fit, although the caller's did."""
    N, d, M = 4096, 64, 4096                                            # 16 x 16 needs 4384
    with pytest.raises(ValueError):
        block_sizes("fa2", N, d, M)
    assert closed_form("fa2", N, d, M, Br=16, Bc=8).total == io_count("fa2", N, d, M, mma=1, Br=16, Bc=8).total
