"""effdl.inference.paged and .serving: the paged KV allocator and the batching simulator."""

from __future__ import annotations

import random

import pytest

from effdl.inference.paged import (
    BlockAllocator,
    ContiguousAllocator,
    OutOfBlocks,
    PagedSequence,
)
from effdl.inference.serving import Request, make_trace, rows, run

# -------------------------------------------------------------------------------- allocator


def _live_blocks(seqs: list[PagedSequence]) -> list[int]:
    return [b for s in seqs for b in s.block_table]


def test_blocks_never_double_allocated_and_all_freed():
    """Random appends and frees: live block tables are disjoint, the counters agree with
    the tables, waste stays under one block per sequence, and everything comes back."""
    rng = random.Random(0)
    kv = BlockAllocator(num_blocks=40, block_size=7)
    seqs: list[PagedSequence] = []
    for _ in range(400):
        if seqs and rng.random() < 0.2:
            seqs.pop(rng.randrange(len(seqs))).free()
            continue
        s = seqs[rng.randrange(len(seqs))] if seqs and rng.random() < 0.7 else kv.sequence()
        if s not in seqs:
            seqs.append(s)
        before = list(s.block_table)
        try:
            s.append(rng.randint(0, 12))
        except OutOfBlocks:
            assert s.block_table == before  # all or nothing
        live = _live_blocks(seqs)
        assert len(live) == len(set(live)) == kv.num_blocks - kv.num_free
        assert kv.used_slots == sum(s.used_slots for s in seqs)
        assert kv.allocated_slots == len(live) * 7
        for s in seqs:
            assert 0 <= s.allocated_slots - s.used_slots < 7
    for s in seqs:
        s.free()
    assert kv.num_free == 40 and kv.allocated_slots == 0 and kv.used_slots == 0


def test_new_block_only_at_boundary_and_lookup():
    kv = BlockAllocator(num_blocks=4, block_size=4)
    s = kv.sequence()
    s.append(4)
    assert len(s.block_table) == 1  # exactly one full block: no new block yet
    s.append(1)
    assert len(s.block_table) == 2  # position 4 crosses the boundary
    b0, b1 = s.block_table
    assert s.logical_to_physical(0) == (b0, 0)
    assert s.logical_to_physical(3) == (b0, 3)
    assert s.logical_to_physical(4) == (b1, 0)
    assert s.allocated_slots == 8 and s.used_slots == 5
    assert kv.waste_fraction == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="position"):
        s.logical_to_physical(5)  # not stored yet


def test_out_of_blocks_is_its_own_exception():
    kv = BlockAllocator(num_blocks=2, block_size=4)
    s = kv.sequence()
    s.append(8)
    with pytest.raises(OutOfBlocks):
        kv.sequence().append(1)
    assert not issubclass(OutOfBlocks, ValueError)
    s.free()
    with pytest.raises(ValueError, match="freed twice"):
        kv.release([0])


def test_contiguous_waste_is_one_minus_used_over_max_len():
    kv = ContiguousAllocator(max_len=100)
    a, b = kv.sequence(), kv.sequence()
    a.append(30)
    b.append(10)
    assert kv.allocated_slots == 200 and kv.used_slots == 40
    assert kv.waste_fraction == pytest.approx(1 - 40 / 200)
    with pytest.raises(ValueError, match="max_len"):
        a.append(71)
    a.free()
    assert kv.waste_fraction == pytest.approx(1 - 10 / 100)
    limited = ContiguousAllocator(max_len=100, num_slots=150)
    limited.sequence()
    with pytest.raises(OutOfBlocks):
        limited.sequence()


@pytest.mark.parametrize("bad", [dict(num_blocks=0, block_size=4),
                                 dict(num_blocks=4, block_size=0)])
def test_allocator_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        BlockAllocator(**bad)


def test_negative_append():
    with pytest.raises(ValueError, match="n_tokens"):
        BlockAllocator(4, 4).sequence().append(-1)
    with pytest.raises(ValueError, match="n_tokens"):
        ContiguousAllocator(8).sequence().append(-1)


# ------------------------------------------------------------------------------------ trace


def test_trace_deterministic_and_clipped():
    a, b = make_trace(50, seed=3), make_trace(50, seed=3)
    assert a == b and a != make_trace(50, seed=4)
    assert a[0].arrival == 0 and all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    assert all(8 <= r.prompt_len <= 1024 and 4 <= r.output_len <= 1024 for r in a)
    u = make_trace(200, prompt_len_dist=("uniform", 5, 9), output_len_dist=("uniform", 1, 1))
    assert {r.prompt_len for r in u} == set(range(5, 10))
    assert {r.output_len for r in u} == {1}


# ------------------------------------------------------------------------- hand timelines

# Three requests, t_fixed = 1 s and t_per_token = 0.1 s: every number below is worked out
# by hand in the comments.
_TINY = [Request(0, 0.0, 2, 3), Request(1, 0.5, 4, 1), Request(2, 1.0, 1, 2)]
_COST = dict(t_fixed=1.0, t_per_token=0.1, max_len=8)


def test_static_tiny_timeline():
    r = run("static", _TINY, batch=2, **_COST)
    # Batch {0, 1} starts when 1 arrives (0.5).  Prefill padded to 2 x 4 tokens: 1.8 s ->
    # 2.3 (request 1 done); two decode steps of 2 rows: 1.2 s each -> 3.5, 4.7 (0 done).
    # Batch {2} at 4.7: prefill 1 token 1.1 s -> 5.8; decode 1 row -> 6.9.
    assert r["finish"] == pytest.approx({0: 4.7, 1: 2.3, 2: 6.9})
    assert r["iterations"] == 5 and r["peak_kv_slots"] == 16
    assert r["tokens_per_s"] == pytest.approx(6 / 6.9)
    # Allocated 16 slots for 4.2 s, then 8 for 2.2 s; used 8, 9, 10, then 2, 3.
    used = 8 * 1.8 + 9 * 1.2 + 10 * 1.2 + 2 * 1.1 + 3 * 1.1
    assert r["kv_waste"] == pytest.approx(1 - used / (16 * 4.2 + 8 * 2.2))


def test_continuous_tiny_timeline():
    r = run("continuous", _TINY, batch=4, block_size=2, num_blocks=8, **_COST)
    # t=0: prefill 0 (2 tokens) 1.2 s -> 1.2.  Then 0 decodes while 1 and 2 prefill
    # (1 + 4 + 1 tokens) 1.6 s -> 2.8: 1 done.  Then 0 and 2 decode, 1.2 s -> 4.0: both done.
    assert r["finish"] == pytest.approx({0: 4.0, 1: 2.8, 2: 4.0})
    assert r["iterations"] == 3
    assert r["tokens_per_s"] == pytest.approx(6 / 4.0)
    assert r["ttft_p50_ms"] == pytest.approx(1800.0)  # TTFTs 1.2, 2.3, 1.8 s
    assert r["p50_ms"] == pytest.approx(3000.0)       # latencies 4.0, 2.3, 3.0 s


def test_continuous_respects_max_batch():
    """batch=2: at 1.2 s request 2 must wait for a place although blocks are free."""
    r = run("continuous", _TINY, batch=2, block_size=2, num_blocks=8, **_COST)
    assert r["peak_running"] == 2
    # 1.2 s: 0 decodes, 1 prefills (1 + 4 tokens) 1.5 s -> 2.7, 1 done.  Then 0 decodes
    # and 2 prefills (1 + 1) 1.2 s -> 3.9, 0 done.  Then 2 decodes 1.1 s -> 5.0.
    assert r["finish"] == pytest.approx({0: 3.9, 1: 2.7, 2: 5.0})


def test_continuous_preempts_most_recent_and_recomputes():
    """Five one-token blocks, two requests of 1 + 3 tokens each (8 slots in all)."""
    trace = [Request(0, 0.0, 1, 3), Request(1, 0.0, 1, 3)]
    r = run("continuous", trace, batch=4, block_size=1, num_blocks=5, max_len=4,
            t_fixed=1.0, t_per_token=0.1)
    # 1: both prefill (2 tokens) -> 1.2.  2: 0 grows to 3 slots, 1 finds none, is
    # preempted; 0 decodes -> 2.3.  3: 1 (needs 3 slots) still doesn't fit; -> 3.4, 0 done.
    # 4: 1 recomputes prompt + its 1 token (2 tokens) -> 4.6.  5: decodes -> 5.7, done.
    assert r["finish"] == pytest.approx({0: 3.4, 1: 5.7})
    assert r["generated"] == {0: 3, 1: 3}
    assert r["iterations"] == 5


# ---------------------------------------------------------------------- the default trace


@pytest.fixture(scope="module")
def default_runs():
    trace = make_trace()
    return trace, {r["method"]: r for r in (run("static", trace, batch=8),
                                            run("continuous", trace, batch=64))}


def test_every_request_finishes_once_with_its_output(default_runs):
    trace, runs = default_runs
    want = {r.rid: r.output_len for r in trace}
    for r in runs.values():
        assert r["generated"] == want
        assert set(r["finish"]) == set(want)


def test_continuous_beats_static(default_runs):
    _, runs = default_runs
    s, c = runs["static"], runs["continuous"]
    assert c["tokens_per_s"] >= 1.5 * s["tokens_per_s"]
    assert c["p95_ms"] <= s["p95_ms"]
    assert c["kv_waste"] <= 0.10 and s["kv_waste"] >= 0.40
    assert c["peak_running"] <= 64 and s["peak_running"] <= 8


def test_rows_table():
    t = make_trace(20, seed=1)
    table = rows(t, runs=(("static", 4), ("continuous", 16)))
    assert [r["method"] for r in table] == ["static", "continuous"]
    assert {"method", "batch", "tokens_per_s", "p50_ms", "p95_ms", "kv_waste",
            "ttft_p50_ms", "peak_kv_slots", "iterations"} <= set(table[0])
    assert "finish" not in table[0]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("trace, kw, match", [
    ([], {}, "empty"),
    (_TINY, dict(max_len=8, block_size=3), "divide"),
    (_TINY, dict(max_len=8, block_size=0), "block_size"),
    (_TINY, dict(max_len=8, batch=0), "batch"),
    (_TINY, dict(max_len=4, block_size=2), "needs 5 slots"),
    ([Request(0, 0.0, -1, 3)], dict(max_len=16), "negative"),
    ([Request(0, -1.0, 1, 3)], dict(max_len=16), "negative"),
    ([Request(0, 0.0, 2, 3)], dict(max_len=8, block_size=2, num_blocks=3), "num_blocks"),
])
def test_run_bad_input(trace, kw, match):
    with pytest.raises(ValueError, match=match):
        run("continuous", trace, **kw)


def test_bad_scheduler_and_trace_args():
    with pytest.raises(ValueError, match="scheduler"):
        run("dynamic", _TINY)
    with pytest.raises(ValueError, match="n_requests"):
        make_trace(0)
    with pytest.raises(ValueError, match="rate"):
        make_trace(5, rate=0)
    with pytest.raises(ValueError, match="length distribution"):
        make_trace(5, output_len_dist=("gamma", 2, 3))
