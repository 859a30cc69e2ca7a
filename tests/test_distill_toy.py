"""Tests of effdl.distill.toy: DM, CF and NCFM on 2-D points through the image pipeline's loop."""

from __future__ import annotations

import pytest
import torch

from effdl.distill import toy
from effdl.distill.dm import dm_loss
from effdl.measure import torch_threads

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the chapter runs the toy: the steps are microseconds of work."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runs():
    """The chapter's toy at its default sizes, on seeds 0, 1, 2 (about a second each)."""
    with torch_threads(1):
        return {s: toy.run_toy(s) for s in SEEDS}


def test_mixture_is_deterministic_and_has_the_stated_modes():
    x, centres = toy.gaussian_mixture(n=1000, modes=4, radius=3.0, spread=0.2, seed=7)
    x2, _ = toy.gaussian_mixture(n=1000, modes=4, radius=3.0, spread=0.2, seed=7)
    assert torch.equal(x, x2)
    assert not torch.equal(x, toy.gaussian_mixture(n=1000, modes=4, radius=3.0, spread=0.2,
                                                   seed=8)[0])
    assert x.shape == (1000, 2) and centres.shape == (4, 2)
    assert torch.allclose(centres.norm(dim=1), torch.full((4,), 3.0))
    nearest = torch.cdist(x, centres).argmin(1)              # well separated: no mix-ups
    assert torch.equal(nearest, torch.arange(1000) % 4)
    assert torch.bincount(nearest).tolist() == [250] * 4
    for c in range(4):                                       # each mode: its centre, its std
        pts = x[nearest == c]
        assert torch.allclose(pts.mean(0), centres[c], atol=0.05)
        assert torch.allclose(pts.std(0), torch.full((2,), 0.2), rtol=0.15)


@pytest.mark.parametrize("seed", SEEDS)
def test_dm_matches_the_mean_but_reaches_fewer_modes_than_cf_and_ncfm(runs, seed):
    run = runs[seed]
    rows = {r["method"]: r for r in run["rows"]}
    pts = run["points"]["dm"]
    assert float(dm_loss([run["real"]], [pts])) < 1e-4       # the DM loss near 0
    assert rows["dm"]["mean_gap"] < 1e-2
    # DM's gradient is the same for every point: the start's shape, translated
    torch.testing.assert_close(pts - pts.mean(0), run["start"] - run["start"].mean(0),
                               atol=1e-5, rtol=0)
    assert rows["dm"]["modes"] < rows["cfd"]["modes"]
    assert rows["dm"]["modes"] < rows["ncfm"]["modes"]
    assert rows["cfd"]["energy"] < rows["random"]["energy"] < rows["dm"]["energy"]


@pytest.mark.parametrize("seed", SEEDS)
def test_ncfm_sampler_moves_its_frequencies(runs, seed):
    """Same noise draw before and after: the learned scales change every frequency, and the
    final points differ from the real ones more at the new frequencies than at the old."""
    run = runs[seed]
    t0, t1 = run["t_before"], run["t_after"]
    assert t0.shape == t1.shape == (64, 2)
    assert float((t1.norm(dim=1) / t0.norm(dim=1)).median()) > 2
    assert float(run["gap_after"].mean()) > float(run["gap_before"].mean())


def test_energy_distance_zero_for_equal_sets_positive_otherwise():
    x, _ = toy.gaussian_mixture(n=200, seed=0)
    assert toy.energy_distance(x, x) == pytest.approx(0.0, abs=1e-5)
    assert toy.energy_distance(x, x + 1.0) > 0.5


def test_bad_input_names_the_fix():
    x, _ = toy.gaussian_mixture(n=100, seed=0)
    with pytest.raises(ValueError, match="pass n_synthetic ≥ 1"):
        toy.run_toy(0, n_synthetic=0)
    with pytest.raises(ValueError, match="at least one synthetic point"):
        toy.point_stepper(x, torch.zeros(0, 2), "cfd")
    with pytest.raises(ValueError, match="same number of columns"):
        toy.point_stepper(x, torch.zeros(10, 3), "dm")
    with pytest.raises(ValueError, match="n ≥ modes"):
        toy.gaussian_mixture(n=3, modes=5)
