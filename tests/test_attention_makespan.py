"""The decode makespan simulator: conservation, balance, the schedules' rules, bad input."""

from __future__ import annotations

import pytest

from effdl.attention import makespan
from effdl.attention.makespan import SCHEDULES, simulate

MIXED = [32768, 1024, 1536, 2048, 2560, 3072, 3584, 4096]    # one long request, seven short
BATCHES = {"uniform long": [131072], "uniform": [8192] * 8, "mixed": MIXED, "short": [512] * 64}
IRREGULAR = [1, 255, 256, 257, 1000, 70_000, 3]              # partial tiles, a one-token cache


def _tile_time_by_request(sim):
    out = {}
    for g in sim["gantt"]:
        for s, e, r in g:
            if r is not None:
                out[r] = out.get(r, 0) + (e - s)
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("contexts,heads_kv,sms", [(MIXED, 8, 132), (IRREGULAR, 3, 17), ([131072], 8, 132),
                                                   ([5], 1, 64), ([512] * 64, 8, 132)])
def test_every_tile_is_scheduled_once(schedule, contexts, heads_kv, sms):
    tile, t_tile = 256, 0.75
    sim = simulate(schedule, contexts, heads_kv, sms, tile=tile, t_tile=t_tile)
    tiles = [-(-L // tile) for L in contexts]
    assert sim["tiles"] == heads_kv * sum(tiles)
    assert sim["tile_work"] == pytest.approx(sim["tiles"] * t_tile)
    by_request = _tile_time_by_request(sim)
    assert by_request == pytest.approx({r: heads_kv * n * t_tile for r, n in enumerate(tiles)})
    assert sum(sim["loads"]) == pytest.approx(sim["tile_work"] + sim["overhead"])
    assert 0 < sim["utilization"] <= 1
    for g in sim["gantt"]:                                      # one program at a time per SM
        assert all(e0 <= s1 + 1e-9 for (_, e0, _), (s1, _, _) in zip(g, g[1:]))
    assert sim["makespan"] == pytest.approx(max(g[-1][1] for g in sim["gantt"] if g))


@pytest.mark.parametrize("contexts,heads_kv,sms", [(MIXED, 8, 132), (IRREGULAR, 3, 17), ([131072], 8, 132)])
def test_lean_workers_get_equal_shares(contexts, heads_kv, sms):
    t_launch, t_merge = 0.5, 0.1
    sim = simulate("lean", contexts, heads_kv, sms, t_launch=t_launch, t_merge=t_merge)
    work = [sum(e - s for s, e, r in g if r is not None) for g in sim["gantt"]]
    assert max(work) - min(work) <= 1.0                           # ±1 tile
    segments = max(sum(r is not None for _, _, r in g) for g in sim["gantt"])
    pieces = sim["tiles"]                                         # a crude bound on the merges
    assert max(sim["loads"]) - min(sim["loads"]) <= 1.0 + segments * t_launch + pieces * t_merge
    assert sim["programs"] == sms


def test_lean_with_more_sms_than_tiles_leaves_the_rest_idle():
    sim = simulate("lean", [300], 2, 10)                          # 2 tiles per head, 4 in all
    assert [len(g) > 0 for g in sim["gantt"]] == [True] * 4 + [False] * 6
    assert sim["makespan"] == pytest.approx(0.5 + 1.0 + 0.1)    # launch, a tile, one merge


def test_fixed_fills_the_gpu_when_programs_far_outnumber_sms():
    sim = simulate("fixed", [8192] * 250, 8, 132)                 # 2000 programs, ~15 per SM
    assert sim["utilization"] > 0.9
    assert simulate("fixed", [8192] * 2, 8, 132)["utilization"] < 0.15   # 16 programs, 132 SMs


def test_fixed_is_greedy_in_launch_order():
    """Hand-checked: 2 SMs, programs of 4, 1, 1, 1 tiles (+0.5 each) in that order."""
    sim = simulate("fixed", [4, 1, 1, 1], 1, 2, tile=1, t_launch=0.5)
    ends = [[e for _, e, r in g if r is not None] for g in sim["gantt"]]
    assert ends == [[4.5], [1.5, 3.0, 4.5]]
    assert sim["makespan"] == 4.5


def test_flash_decoding_split_rule():
    """flash-attn's num_splits_heuristic: one split when the programs nearly fill the SMs; else the
    fewest splits whose last wave is within 85% of the best fill; equal chunks per request."""
    n = [-(-L // 256) for L in MIXED]
    # 64 programs on 132 SMs: 2 splits fill 128/132 = 97% of one wave, the best any count does
    assert makespan.flash_decoding_splits(n, 8, 132) == 2
    assert makespan.flash_decoding_splits([512], 8, 132) == 14     # 112 programs: 85% of 132
    assert makespan.flash_decoding_splits([2], 1, 132) == 2       # capped by the tiles
    assert makespan.flash_decoding_splits([4] * 106, 1, 132) == 1  # >= 80% of the SMs: no split
    assert makespan.flash_decoding_splits([8] * 66, 1, 132) == 2   # half the SMs: two splits fill them
    sim = simulate("flash_decoding", MIXED, 8, 132)
    assert sim["splits"] == 2
    # the longest request's 128 tiles in two chunks of 64: its chunks set the makespan
    assert sim["makespan"] == pytest.approx(0.5 + 64 + 0.1)
    # chunks of ⌈k/2⌉ tiles: every request makes 2 chunks
    assert sim["programs"] == 8 * sum(-(-k // -(-k // 2)) for k in n) == 8 * 16
    forced = simulate("flash_decoding", MIXED, 8, 132, num_splits=1)
    assert forced["makespan"] == simulate("fixed", MIXED, 8, 132)["makespan"]


def test_merge_cost_goes_to_the_split_heads_only():
    one = simulate("flash_decoding", [1024], 1, 4, t_launch=0.0, t_merge=1.0)    # 4 chunks of 1 tile
    assert one["overhead"] == pytest.approx(3.0) and one["makespan"] == pytest.approx(4.0)
    whole = simulate("fixed", [1024], 1, 4, t_launch=0.0, t_merge=1.0)
    assert whole["overhead"] == 0 and whole["makespan"] == pytest.approx(4.0)


def test_lean_beats_fixed_splits_on_a_mixed_batch():
    rows = makespan.rows({"mixed": MIXED}, heads_kv=8, sms=132)
    util = {r["schedule"]: r["utilization"] for r in rows}
    assert util["lean"] >= 1.2 * util["flash_decoding"]
    assert util["lean"] >= 1.2 * util["fixed"]


def test_short_batch_gains_little_from_splitting():
    util = {r["schedule"]: r["utilization"] for r in makespan.rows({"short": [512] * 64}, 8, 132)}
    assert max(util.values()) - min(util.values()) < 0.1


def test_rows_cover_every_batch_and_schedule():
    rows = makespan.rows(BATCHES, heads_kv=8, sms=132)
    assert [(r["batch"], r["schedule"]) for r in rows] == [(b, s) for b in BATCHES for s in SCHEDULES]
    assert set(rows[0]) == {"batch", "schedule", "B", "L_max", "tiles", "programs", "splits", "makespan",
                            "utilization"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(contexts=[]), "contexts must be a non-empty list"),
    (dict(contexts=[128, 0]), r"contexts\[1\] must be a positive int"),
    (dict(contexts=[128, 2.5]), r"contexts\[1\] must be a positive int"),
    (dict(sms=0), "sms must be a positive int"),
    (dict(heads_kv=0), "heads_kv must be a positive int"),
    (dict(tile=0), "tile must be a positive int"),
    (dict(t_tile=0.0), "t_tile must be a positive time"),
    (dict(t_launch=-1.0), "t_launch must be a time >= 0"),
    (dict(t_merge=float("nan")), "t_merge must be a time >= 0"),
    (dict(schedule="stream-k"), "unknown schedule"),
    (dict(num_splits=0, schedule="flash_decoding"), "num_splits must be a positive int"),
    (dict(num_splits=4, schedule="lean"), "num_splits is flash_decoding's"),
])
def test_bad_input_says_what_is_wrong(kwargs, match):
    args = dict(schedule="fixed", contexts=[1024, 2048], heads_kv=2, sms=8) | kwargs
    with pytest.raises(ValueError, match=match):
        simulate(**args)


def test_rows_rejects_an_empty_batch_dict():
    with pytest.raises(ValueError, match="batches must be a non-empty dict"):
        makespan.rows({}, 8, 132)


def test_plots_draw_every_schedule():
    import matplotlib.pyplot as plt

    from effdl.attention import plots

    sims = [simulate(s, MIXED, 8, 132) for s in SCHEDULES]
    fig = plots.makespan_gantt(sims)
    assert len(fig.axes) == len(SCHEDULES) and all(ax.patches for ax in fig.axes)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == list(SCHEDULES)
    plt.close(fig)
    fig = plots.makespan_bars(makespan.rows(BATCHES, 8, 132))
    assert len(fig.axes[0].patches) == len(BATCHES) * len(SCHEDULES)
    plt.close(fig)
    with pytest.raises(ValueError, match="empty"):
        plots.makespan_gantt([])


def test_lean_matches_decode_lean_schedule_on_equal_contexts():
    """With equal contexts the general stream-K cut is decode.lean_schedule's, segment by segment."""
    from effdl.attention.decode import lean_schedule

    sim = simulate("lean", [2560] * 3, 4, 7, tile=256, t_tile=1.0)            # 12 heads of 10 tiles
    got = [[(r, e - s) for s, e, r in g if r is not None] for g in sim["gantt"]]
    want = [[(head // 4, t1 - t0) for head, t0, t1 in segs] for segs in lean_schedule(12, 10, 7)]
    assert got == want


def test_free_overheads_leave_pure_tile_work():
    """t_launch = t_merge = 0: every schedule is busy with tiles only, no zero-length gaps drawn."""
    for schedule in SCHEDULES:
        sim = simulate(schedule, MIXED, 8, 132, t_launch=0.0, t_merge=0.0)
        assert sim["overhead"] == 0 and all(r is not None for g in sim["gantt"] for _, _, r in g)
    assert simulate("lean", MIXED, 8, 132, t_launch=0.0, t_merge=0.0)["makespan"] == 12   # ⌈1584 / 132⌉
