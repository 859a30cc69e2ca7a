"""Exercise checks of the attention chapter: each compares the student's function with the library's."""

from __future__ import annotations

import math

import torch

from effdl.checks import assert_close, exercise_check, require

__all__ = [
    "check_online_softmax",
    "check_merge_states",
    "check_causal_tile_plan",
    "check_fa2_io_count",
    "check_tile_sizes",
    "check_split_kv_merge",
]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@exercise_check(student="my_online_softmax")
def check_online_softmax(online_softmax):
    """``online_softmax(x, block)``: softmax over the last dim, max and sum found in one blocked pass."""
    g = _gen(1)
    for shape, block, scale in [((3, 77), 16, 1.0), ((2, 5, 130), 32, 30.0), ((1, 1), 4, 1.0), ((4, 513), 100, 1000.0)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        got = online_softmax(x, block)
        assert_close(got, torch.softmax(x, dim=-1), what=f"online_softmax on shape {shape}, block {block}, "
                     f"scores of size ~{scale:g}" + (" (large scores: subtract the running max)" if scale > 50 else ""),
                     rtol=1e-9, atol=1e-12)


@exercise_check(student="my_merge")
def check_merge_states(merge):
    """``merge(m1, l1, acc1, m2, l2, acc2) -> (m, l, acc)`` for two online-softmax states of the same rows."""
    from effdl.attention.softmax import SoftmaxState, merge_states

    g = _gen(2)
    for rows, dv in [(5, 3), (17, 40)]:
        st = []
        for _ in range(2):
            m = torch.randn(rows, generator=g, dtype=torch.float64) * 5
            l = torch.rand(rows, generator=g, dtype=torch.float64) * 10 + 0.5
            acc = torch.randn(rows, dv, generator=g, dtype=torch.float64)
            st.append((m, l, acc))
        ref = merge_states(SoftmaxState(*st[0]), SoftmaxState(*st[1]))
        got = merge(*st[0], *st[1])
        require(isinstance(got, (tuple, list)) and len(got) == 3, "return a tuple (m, l, acc)")
        for name, a, b in zip(("m", "l", "acc"), got, (ref.m, ref.l, ref.acc)):
            assert_close(a, b, what=f"merged {name} ({rows} rows)", rtol=1e-9, atol=1e-12)
    # an empty state (no keys seen yet: m = -inf, l = 0, acc = 0) must be the identity of the merge
    m, l, acc = st[0]
    empty = (torch.full_like(m, -math.inf), torch.zeros_like(l), torch.zeros_like(acc))
    got = merge(*empty, m, l, acc)
    for name, a, b in zip(("m", "l", "acc"), got, (m, l, acc)):
        require(not torch.isnan(torch.as_tensor(a)).any(),
                f"merging with an empty state (m=-inf, l=0) gave NaN in {name}: exp(-inf - (-inf)) is NaN; "
                "shift by a finite value where the new max is -inf")
        assert_close(a, b, what=f"{name} after merging with an empty state", rtol=1e-9, atol=1e-12)
    # two empty states: still empty, and no NaN
    got = merge(*empty, *empty)
    for name, a in zip(("l", "acc"), got[1:]):
        require(not torch.isnan(torch.as_tensor(a)).any(),
                f"merging two empty states (m=-inf, l=0) gave NaN in {name}: exp(-inf - (-inf)) is NaN; "
                "shift by a finite value where the new max is -inf")
        require(bool((torch.as_tensor(a) == 0).all()), f"merging two empty states must leave {name} = 0")


@exercise_check(student="my_tile_plan")
def check_causal_tile_plan(plan_fn):
    """``plan_fn(nq, nk, block_q, block_k) -> {(i, j): "full" | "partial"}`` (bottom-right causal)."""
    from effdl.attention.tiled import causal_tile_plan

    cases = [
        (8, 8, 4, 4),
        (77, 77, 16, 32),
        (130, 130, 64, 16),
        (5, 70, 4, 8),
        (1, 513, 1, 128),
        (33, 20, 8, 8),
    ]
    for nq, nk, bq, bk in cases:
        got = plan_fn(nq, nk, bq, bk)
        ref = causal_tile_plan(nq, nk, bq, bk)
        require(isinstance(got, dict), f"return a dict {{(i, j): 'full' | 'partial'}}, got {type(got).__name__}")
        missing = sorted(set(ref) - set(got))
        extra = sorted(set(got) - set(ref))
        where = f"nq={nq}, nk={nk}, tiles {bq}x{bk}"
        require(not missing,
                f"{where}: tiles {missing[:4]} have visible keys but are missing")
        hint = " (queries align bottom-right: query i sees keys j <= i + nk - nq)"
        require(not extra,
                f"{where}: tiles {extra[:4]} are fully masked and should be skipped"
                + (hint if nq != nk else ""))
        wrong = sorted(t for t in ref if got[t] != ref[t])
        if wrong:
            t = wrong[0]
            raise AssertionError(f"nq={nq}, nk={nk}, tiles {bq}x{bk}: tile {t} should be {ref[t]!r}, got {got[t]!r} "
                                 "('full' when even the tile's first query sees its last key)")


@exercise_check(student="my_fa2_io")
def check_fa2_io_count(io_fn):
    """``io_fn(N, d, Br, Bc) -> (reads, writes)`` of FlashAttention-2's loop order (non-causal)."""
    from effdl.attention.iosim import io_count

    for N, d, br, bc in [(64, 8, 16, 8), (100, 16, 30, 7), (513, 32, 40, 32), (1, 4, 1, 1)]:
        ref = io_count("fa2", N, d, M=10 ** 9, Br=br, Bc=bc)
        got = io_fn(N, d, br, bc)
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (reads, writes)")
        require(int(got[0]) == ref.reads, f"N={N}, d={d}, Br={br}, Bc={bc}: reads {got[0]}, expected {ref.reads} "
                "(Q once; every K and V tile once per query tile; partial last tiles count what they hold)")
        require(int(got[1]) == ref.writes, f"N={N}, d={d}, Br={br}, Bc={bc}: writes {got[1]}, expected {ref.writes} "
                "(O once, plus one logsumexp per row)")


@exercise_check(student="my_tile_sizes")
def check_tile_sizes(choose):
    """``choose(M, d) -> (Br, Bc)`` for FA2: fits in M and moves at most 10% more than the library's choice."""
    from effdl.attention.iosim import block_sizes, closed_form

    N = 4096
    for M, d in [(4096, 16), (16384, 64), (65536, 64), (100_000, 128)]:
        got = choose(M, d)
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (Br, Bc) of ints")
        require(all(isinstance(t, int) and not isinstance(t, bool) for t in got),
                f"M={M}, d={d}: tiles are whole numbers of rows, got {got!r}; return ints")
        br, bc = got
        require(br >= 1 and bc >= 1, f"M={M}, d={d}: tiles must be at least 1 x 1, got {br} x {bc}")
        ws = 2 * br * d + 2 * br + 2 * bc * d + br * bc
        require(ws <= M, f"M={M}, d={d}: Br={br}, Bc={bc} need {ws} elements on chip "
                "(Q_i, O_i, m_i, l_i, K_j, V_j and S_ij) but only M fit")
        # why the closed form: the same count as simulating io_count, without stepping
        # through every tile (a 1 x 1 tiling of N = 4096 would take a minute)
        ours = closed_form("fa2", N, d, M, **block_sizes("fa2", N, d, M)).total
        theirs = closed_form("fa2", N, d, M, Br=br, Bc=bc).total
        require(theirs <= 1.1 * ours, f"M={M}, d={d}: your tiles move {theirs} elements, the library's {ours}: "
                "FA2 reads K and V once per query tile, so make Br as large as fits")


@exercise_check(student="my_split_merge")
def check_split_kv_merge(merge):
    """``merge(outs (S, ..., dv), lses (S, ...)) -> out (..., dv)``: combine per-split normalized outputs."""
    from effdl.attention.decode import split_kv_partials
    from effdl.reference import reference_attention

    g = _gen(3)
    for S, L, nq in [(1, 50, 1), (4, 513, 1), (7, 130, 3)]:
        q = torch.randn(2, 3, nq, 16, generator=g, dtype=torch.float64)
        k = torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64)
        outs, lses = split_kv_partials(q, k, v, S)
        got = merge(outs, lses)
        assert_close(
            got,
            reference_attention(q, k, v, causal=True),
            what=f"merged output of {S} splits, L={L}, Nq={nq}",
            rtol=1e-9,
            atol=1e-12,
        )
    # a split that saw no keys (lse = -inf, out = 0) must not poison the result
    lses = lses.clone()
    outs = outs.clone()
    lses[-1], outs[-1] = -math.inf, 0.0
    got = merge(outs, lses)
    require(not torch.isnan(torch.as_tensor(got)).any(), "a split with lse = -inf (no keys) must get weight 0, not NaN")
