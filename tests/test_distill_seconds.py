"""Tests of the equal-cost comparison: effdl.distill.experiments.run_for_seconds, equal_seconds,
summarize_seconds and plots.plot_equal_seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effdl.distill import experiments as dx
from effdl.distill.plots import plot_equal_seconds
from effdl.measure import torch_threads
from effdl.profile import sizes


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ClockStepper:
    """Each step takes ``dt`` seconds of the fake clock and adds 1 to every pixel."""

    def __init__(self, clock, dt):
        self.clock, self.dt = clock, dt
        self.x_syn = torch.zeros(2, 1, 4, 4)

    def step(self):
        self.clock.now += self.dt
        self.x_syn += 1


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(dx.time, "perf_counter", c)
    return c


def test_run_for_seconds_snapshots_at_each_fraction(clock):
    st = ClockStepper(clock, 0.125)                         # exact in binary
    snaps = dx.run_for_seconds(st, 1.0, (0.25, 0.5, 1.0))
    assert [(s, it) for s, it, _ in snaps] == [(0.25, 2), (0.5, 4), (1.0, 8)]
    # copies, not views of the images that kept moving
    assert [float(x.mean()) for _, _, x in snaps] == [2.0, 4.0, 8.0]


def test_a_long_step_fills_every_checkpoint_it_crosses(clock):
    snaps = dx.run_for_seconds(ClockStepper(clock, 3.0), 2.0, (0.25, 0.5, 1.0))
    assert [(s, it) for s, it, _ in snaps] == [(3.0, 1)] * 3


@pytest.mark.parametrize("budget,checkpoints,match", [
    (0.0, (1.0,), "budget_s must be a number of seconds > 0"),
    (-1, (1.0,), "budget_s must be"),
    (True, (1.0,), "budget_s must be"),
    (1.0, (), "increasing fractions"),
    (1.0, (0.5, 0.25), "increasing fractions"),
    (1.0, (0.0, 1.0), "increasing fractions"),
    (1.0, (0.5, 1.5), "increasing fractions"),
    (1.0, (0.5, 0.5), "increasing fractions"),
])
def test_run_for_seconds_rejects_bad_budgets(clock, budget, checkpoints, match):
    with pytest.raises(ValueError, match=match):
        dx.run_for_seconds(ClockStepper(clock, 0.1), budget, checkpoints)


def tiny():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(12)
    x = (torch.rand(36, 1, 8, 8, generator=g) + y[:, None, None, None] * 0.3).clamp(0, 1)
    S = dataclasses.replace(sizes("distill", "smoke"), ipcs=(1, 2), seeds=(0, 1), width=4,
                            pool_size=2, real_per_class=4, n_freq=8, eval_epochs=(2, 2),
                            budget_s=0.02, checkpoints=(0.5, 1.0))
    return S, x, y


def test_equal_seconds_rows():
    S, x, y = tiny()
    rows, gallery = dx.equal_seconds(S, x, y, x, y, methods=("dm", "ncfm", "dc"), progress=False)
    keys = {"method", "ipc", "seed", "seconds", "iterations", "accuracy", "peak_mem_bytes", "setup_s"}
    assert all(set(r) == keys for r in rows)
    for ipc in S.ipcs:
        for seed in S.seeds:
            run = [r for r in rows if (r["ipc"], r["seed"]) == (ipc, seed)]
            start = [r for r in run if r["method"] == "random"]
            assert len(start) == 1 and start[0]["seconds"] == 0 and start[0]["iterations"] == 0
            for m in ("dm", "ncfm", "dc"):
                pts = [r for r in run if r["method"] == m]
                assert len(pts) == len(S.checkpoints)
                for r, f in zip(pts, S.checkpoints):
                    assert r["seconds"] >= f * S.budget_s and r["iterations"] >= 1
                    assert 0 <= r["accuracy"] <= 100 and r["peak_mem_bytes"] > 0
                assert pts[0]["iterations"] <= pts[1]["iterations"]
                assert (r["setup_s"] == 0) == (m == "dc")
    assert set(gallery) == {(m, i) for m in ("dm", "ncfm", "dc") for i in S.ipcs}
    assert gallery["dm", 2].shape == (6, 1, 8, 8)


def test_equal_seconds_applies_overrides():
    """With DM's pixel learning rate overridden to 0 its images never move: every snapshot is
    judged exactly like the random start (same images, same evaluation seed)."""
    S, x, y = tiny()
    rows, gallery = dx.equal_seconds(S, x, y, x, y, methods=("dm",), progress=False,
                                     overrides={"dm": {"lr": 0.0}})
    for r in rows:
        start = next(s for s in rows if s["method"] == "random"
                     and (s["ipc"], s["seed"]) == (r["ipc"], r["seed"]))
        assert r["accuracy"] == start["accuracy"]
    x0, _ = dx.random_subset(x, y, 2, 0)
    assert torch.equal(gallery["dm", 2], x0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(methods=("random", "dm")), "random is every run's start"),
    (dict(methods=("herding",)), "runs dc, dm, cfd, ncfm"),
    (dict(methods=("dm",), overrides={"ncfm": {"sampler_lr": 0.1}}), "not among the methods"),
    (dict(budget_s=0), "budget_s must be"),
    (dict(checkpoints=(1.0, 0.5)), "increasing fractions"),
])
def test_equal_seconds_rejects_bad_input(kwargs, match):
    S, x, y = tiny()
    with pytest.raises(ValueError, match=match):
        dx.equal_seconds(S, x, y, x, y, progress=False, **kwargs)


def rows_for(method, ipc, accs, seconds, iterations, mem=None):
    return [{"method": method, "ipc": ipc, "seed": s, "seconds": sec, "iterations": it,
             "accuracy": a, "peak_mem_bytes": mem, "setup_s": 0.0}
            for s, (a, sec, it) in enumerate(zip(accs, seconds, iterations))]


def test_summarize_seconds_per_checkpoint():
    rows = rows_for("random", 10, [20.0, 22.0], [0.0, 0.0], [0, 0])
    for seed, (a1, a2) in enumerate([(30.0, 40.0), (34.0, 44.0)]):    # two checkpoints per run
        rows += [{"method": "dm", "ipc": 10, "seed": seed, "seconds": s, "iterations": it,
                  "accuracy": a, "peak_mem_bytes": 2**20, "setup_s": 1.0}
                 for a, s, it in [(a1, 1.0, 10), (a2, 2.0, 20)]]
    rnd, dm1, dm2 = dx.summarize_seconds(rows)
    assert rnd["acc_mean"] == 21.0 and rnd["ms_per_iter"] is None and rnd["peak_mem_MiB"] is None
    assert (dm1["acc_mean"], dm2["acc_mean"]) == (32.0, 42.0)
    assert dm1["acc_std"] == pytest.approx(2 ** 0.5 * 2) and dm1["seeds"] == 2
    assert dm2["ms_per_iter"] == pytest.approx(100.0) and dm2["peak_mem_MiB"] == 1.0


def test_plot_equal_seconds_one_panel_per_ipc():
    rows = []
    for ipc in (1, 10):
        rows += rows_for("random", ipc, [20.0, 22.0], [0.0, 0.0], [0, 0])
        rows += rows_for("ncfm", ipc, [30.0, 32.0], [1.0, 1.1], [50, 60], mem=2**20)
    fig = plot_equal_seconds(rows)
    assert [ax.get_title() for ax in fig.axes] == ["IPC 1", "IPC 10"]
    assert any(t.get_text() == "55 it" for t in fig.axes[1].texts)
