"""DM, CF and NCFM on 2-D points: the image pipeline, the identity as feature map.

The real "class" is a mixture of a few well-separated Gaussians in the plane; ten
synthetic points are fitted to it by the *same* loop that distills images
(:class:`effdl.distill.matching.MatchingStepper`: the same losses, frequencies,
sampler, minmax step and Adam), fed by :class:`PointPool`, a feature pool whose one
"network" is the identity.  In two dimensions everything can be drawn: the points,
the real data, and the frequencies NCFM's sampler learns.

Two numbers judge a fitted set, neither of them a loss any method trains on: the
modes it reaches (a mode counts when a point lies within ``3 · spread`` of its
centre) and the energy distance to the real points,
``2 E‖x − y‖ − E‖x − x'‖ − E‖y − y'‖``, an MMD whose kernel (the distance itself)
has no bandwidth to tune.
"""

from __future__ import annotations

import math
import time

import torch

from effdl.distill.cf import paired_cf
from effdl.distill.matching import MatchingStepper

__all__ = ["gaussian_mixture", "PointPool", "point_stepper", "fit_points",
           "modes_covered", "energy_distance", "cf_gap", "run_toy", "summarize_toy",
           "toy_table", "TOY_METHODS"]

#: the three matchers, in the order the figures show them
TOY_METHODS = ("dm", "cfd", "ncfm")


def gaussian_mixture(
    n: int = 2000, modes: int = 5, radius: float = 2.0, spread: float = 0.25,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points (n, 2) from ``modes`` equal-weight Gaussians of std ``spread``,
    centred on a circle of ``radius``; returns ``(x, centres)``, centres (modes, 2).

    The circle is centred at the origin, so the data mean is near 0 and lies in no
    mode: a set that matches only the mean can sit where there is no data at all.
    """
    if n < modes or modes < 1:
        raise ValueError(f"need n ≥ modes ≥ 1, got n={n}, modes={modes}")
    if radius <= 0 or spread <= 0:
        raise ValueError(f"need radius > 0 and spread > 0, got {radius}, {spread}")
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.arange(modes) / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)    # (modes, 2)
    which = torch.arange(n) % modes                                  # equal weights
    return centres[which] + spread * torch.randn(n, 2, generator=g), centres


class PointPool:
    """The interface of :class:`effdl.distill.matching.FeaturePool` for one class of
    points, whose one "network" is the identity: features are the coordinates."""

    def __init__(self, x: torch.Tensor):
        if x.ndim != 2 or len(x) < 1:
            raise ValueError("real points must be (n, d) with n ≥ 1, "
                             f"got {tuple(x.shape)}")
        self.classes, self.nets = [0], [None]        # one class, one (identity) network
        self.real_x, self.dim = [x], x.shape[1]

    def real_batch(self, k: int, ci: int, n: int, g: torch.Generator) -> torch.Tensor:
        return self.real_x[ci][torch.randperm(len(self.real_x[ci]), generator=g)[:n]]

    def syn_features(self, k: int, x_syn: torch.Tensor) -> torch.Tensor:
        return x_syn                                 # the identity feature map


def point_stepper(
    x: torch.Tensor, start: torch.Tensor, method: str, seed: int = 0, **options
) -> MatchingStepper:
    """The image pipeline's :class:`MatchingStepper` for the points ``start`` (k, d)
    against the real points ``x`` (n, d), all in one class; ``method`` is ``"dm"``,
    ``"cfd"`` or ``"ncfm"``, ``options`` go to the stepper (``real_per_class``, ``lr``,
    ``n_freq``, ``sigma``, ``sampler_lr``, ...)."""
    if start.ndim != 2 or len(start) < 1:
        raise ValueError(f"start has shape {tuple(start.shape)}: pass at least one "
                         "synthetic point, as an (n_synthetic, d) tensor")
    if x.ndim != 2 or x.shape[1] != start.shape[1]:
        raise ValueError(f"real points {tuple(x.shape)} and synthetic points "
                         f"{tuple(start.shape)} differ in dimension: give both the "
                         "same number of columns d")
    y_syn = torch.zeros(len(start), dtype=torch.long)          # one class
    return MatchingStepper(PointPool(x), start, y_syn, method, seed, **options)


def fit_points(
    x: torch.Tensor, start: torch.Tensor, method: str, iterations: int = 150,
    seed: int = 0, **options,
) -> tuple[torch.Tensor, MatchingStepper]:
    """``iterations`` steps of :func:`point_stepper`; returns ``(points, stepper)``."""
    stepper = point_stepper(x, start, method, seed, **options)
    for _ in range(iterations):
        stepper.step()
    return stepper.x_syn.detach(), stepper


def modes_covered(points: torch.Tensor, centres: torch.Tensor, radius: float) -> int:
    """How many centres (modes, d) have at least one of ``points`` (k, d) within
    ``radius``."""
    return int((torch.cdist(centres, points).min(1).values <= radius).sum())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``2 E‖x − y‖ − E‖x − x'‖ − E‖y − y'‖`` (V-statistic): 0 only for equal
    distributions, and no bandwidth, so no method is fitted to it."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean()
                 - torch.cdist(y, y).mean())


def cf_gap(x: torch.Tensor, points: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``|Φ_x(t) − Φ_points(t)|`` per frequency, (m,): how far apart the two sets look
    at each frequency of ``t`` (m, d)."""
    with torch.no_grad():
        re_r, im_r, re_s, im_s = paired_cf(x, points, t)
    return ((re_r - re_s) ** 2 + (im_r - im_s) ** 2).sqrt()


def run_toy(
    seed: int = 0, *, n_synthetic: int = 10, n_real: int = 2000, modes: int = 5,
    radius: float = 2.0, spread: float = 0.25, init_std: float = 0.3,
    iterations: int = 150, lr: float = 0.05, n_freq: int = 64, sigma: float = 1.0,
    sampler_lr: float = 0.01,
) -> dict:
    """DM, CF and NCFM from one start, every real point in every step.

    Returns the real points and centres, the start, each method's ``points``, one row
    of scores per method (and for ``n_synthetic`` random real points), and NCFM's
    frequencies on one fixed noise draw before and after training (``t_before``,
    ``t_after``) with :func:`cf_gap` of its final points at each (``gap_*``).  The
    start is ``n_synthetic`` points near the data mean (std ``init_std``); ``sigma``
    sets the frequencies as in the image pipeline, ``t = sigma · z / √d``.
    """
    if n_synthetic < 1:
        raise ValueError(f"n_synthetic={n_synthetic}: pass n_synthetic ≥ 1 "
                         "(the number of points to fit)")
    x, centres = gaussian_mixture(n_real, modes, radius, spread, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    start = x.mean(0) + init_std * torch.randn(n_synthetic, 2, generator=g)
    subset = x[torch.randperm(n_real, generator=g)[:n_synthetic]]
    out = {"seed": seed, "real": x, "centres": centres, "start": start, "points": {},
           "rows": [_scores("random", seed, x, subset, centres, 3 * spread, 0.0)]}
    for method in TOY_METHODS:
        tic = time.perf_counter()
        options = {"real_per_class": n_real, "lr": lr}
        if method != "dm":
            options |= {"n_freq": n_freq, "sigma": sigma}
        if method == "ncfm":
            options["sampler_lr"] = sampler_lr
        stepper = point_stepper(x, start, method, seed, **options)
        if method == "ncfm":         # one noise draw: each frequency can be followed
            noise = stepper.sampler.draw_noise(torch.Generator().manual_seed(seed))
            out["t_before"] = stepper.sampler(noise).detach()
        for _ in range(iterations):
            stepper.step()
        pts = out["points"][method] = stepper.x_syn.detach()
        seconds = time.perf_counter() - tic
        out["rows"].append(_scores(method, seed, x, pts, centres, 3 * spread, seconds))
    out["t_after"] = stepper.sampler(noise).detach()
    out["gap_before"] = cf_gap(x, pts, out["t_before"])
    out["gap_after"] = cf_gap(x, pts, out["t_after"])
    return out


def _scores(method, seed, x, pts, centres, radius, seconds) -> dict:
    return {"method": method, "seed": seed,
            "modes": modes_covered(pts, centres, radius),
            "energy": energy_distance(x, pts),
            "mean_gap": float((x.mean(0) - pts.mean(0)).norm()), "seconds": seconds}


def summarize_toy(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds, per method, of the modes reached, the energy distance
    and the distance between the real and synthetic means (``*_mean``, ``*_std``)."""
    out = []
    for method in ("random", *TOY_METHODS):
        rows = [r for run in runs for r in run["rows"] if r["method"] == method]
        row = {"method": method, "seeds": len(rows)}
        for key in ("modes", "energy", "mean_gap"):
            v = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
            row[f"{key}_mean"] = float(v.mean())
            row[f"{key}_std"] = float(v.std()) if len(v) > 1 else 0.0
        out.append(row)
    return out


def toy_table(summary: list[dict], modes: int = 5) -> list[dict]:
    """:func:`summarize_toy`'s rows as text, ``mean ± std`` per column, for a page."""
    def pm(r, key, digits):
        return f"{r[key + '_mean']:.{digits}f} ± {r[key + '_std']:.{digits}f}"

    return [{"method": r["method"], "seeds": r["seeds"],
             f"modes reached (of {modes})": pm(r, "modes", 1),
             "energy distance": pm(r, "energy", 3),
             "‖mean real − mean synthetic‖": pm(r, "mean_gap", 3)} for r in summary]
