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
def test_simulation_matches_closed_form(alg, N, d, M):
    try:
        sim = io_count(alg, N, d, M)
    except ValueError:
        pytest.skip(f"{alg} tiles do not fit M={M} at d={d}")
    cf = closed_form(alg, N, d, M)
    assert (sim.reads, sim.writes) == (cf.reads, cf.writes)
    assert sim.peak <= M


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
    assert io_count("small_cache", N, d, M).total < io_count("fa2", N, d, M).total
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
