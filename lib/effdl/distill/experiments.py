"""Helpers the distillation chapter's notebook calls: data, per-method options, the whole results
table (:func:`experiment`) and its summary with the paper's published numbers beside it.

Rows of :func:`experiment` (a fixed number of iterations per method):
``{"method", "ipc", "seed", "accuracy", "sec_per_iter", "peak_mem_bytes", "iterations"}``.
Accuracy is that of a fresh ConvNet-3 trained on the synthetic set (one row per seed); the cost
columns are measured once per (method, ipc) on seed 0 — one iteration of the real loop, timed by
:func:`effdl.measure.benchmark`, its peak memory by :func:`effdl.measure.peak_memory` — and repeated
in each seed's row.  ``random`` and ``herding`` have no iterations: their cost columns are ``None``.

Rows of :func:`equal_seconds` (the same wall-clock budget per method):
``{"method", "ipc", "seed", "seconds", "iterations", "accuracy", "peak_mem_bytes", "setup_s"}``,
one per snapshot of the synthetic set.
"""

from __future__ import annotations

import statistics
import time

import torch

from effdl.distill.api import METHODS, distill, evaluate
from effdl.distill.baselines import random_subset
from effdl.distill.dc import DCStepper
from effdl.distill.matching import FeaturePool, MatchingStepper
from effdl.measure import benchmark, peak_memory

__all__ = ["PUBLISHED", "BUDGETED", "load", "options_for", "stepper_for", "iteration_cost", "experiment",
           "summarize", "run_for_seconds", "equal_seconds", "summarize_seconds"]

#: the methods :func:`equal_seconds` runs for a budget (``random`` is every run's start, at 0 s)
BUDGETED = ("dc", "dm", "cfd", "ncfm")

#: NCFM paper, Table 1 (ConvNet, CIFAR-10, accuracy %): published numbers, shown beside ours.
PUBLISHED = {("random", 1): 14.4, ("random", 10): 26.0, ("dm", 1): 26.0, ("dm", 10): 48.9,
             ("ncfm", 1): 49.5, ("ncfm", 10): 71.8}


def load(S, device=None, split: str = "test"):
    """Train split and the ``split`` split (test, or val where the dataset has one) of the profile's
    dataset, on ``device``."""
    from effdl.data import load_images

    tr, te = load_images(S.dataset, "train"), load_images(S.dataset, split)
    dev = torch.device(device or "cpu")
    return (tr.x.to(dev), tr.y.to(dev)), (te.x.to(dev), te.y.to(dev))


def options_for(S, method: str, ipc: int, pool: FeaturePool | None = None) -> dict:
    """The ``distill`` options a profile uses for ``method`` at ``ipc`` (identical tricks for all)."""
    i = S.ipcs.index(ipc) if ipc in S.ipcs else 0
    if method in ("random",):
        return {}
    if method == "herding":
        return {"width": S.width}
    if method == "dc":
        return {"width": S.width, "real_per_class": S.real_per_class, "lr": S.lr[i] / 5}
    opts = {"width": S.width, "real_per_class": S.real_per_class, "lr": S.lr[i], "pool_size": S.pool_size,
            "cache_real": S.cache_real}
    if pool is not None:
        opts["pool"] = pool
    if method in ("cfd", "ncfm"):
        opts.update(n_freq=S.n_freq, sigma=S.sigma)
    if method == "ncfm":
        opts["sampler_lr"] = S.sampler_lr
    return opts


def stepper_for(method: str, x, y, ipc: int, seed: int, S, pool: FeaturePool,
                overrides: dict | None = None):
    """An object whose ``step()`` is one iteration of ``method`` (``None`` for random/herding);
    ``overrides`` replace options of :func:`options_for` (``{"sampler_lr": 0.1}``)."""
    if method in ("random", "herding"):
        return None
    x0, y0 = random_subset(x, y, ipc, seed)
    opts = {**options_for(S, method, ipc), **(overrides or {})}
    if method == "dc":
        return DCStepper(x, y, x0, y0, seed, **opts)
    for k in ("width", "pool_size", "cache_real"):
        opts.pop(k)
    return MatchingStepper(pool, x0, y0, method, seed, **opts)


def iteration_cost(stepper, device, repeat: int = 3) -> tuple[float, int]:
    """(seconds per iteration (median), peak bytes of one iteration) of a stepper."""
    res = benchmark(stepper.step, warmup=1, repeat=repeat, device=device)
    return res.median_ms / 1e3, peak_memory(stepper.step, device=device)


def experiment(S, device=None, progress: bool = True, methods=METHODS,
               full_data: bool = False, cost: dict | None = None, pool0: FeaturePool | None = None):
    """The chapter's whole results table.  Returns ``(rows, gallery, full)``: the bench rows, seed 0's
    synthetic images per (method, ipc), and (if ``full_data``) the full-data reference accuracy per
    seed (else an empty list).  ``cost`` ({(method, ipc): (sec, bytes)}) and ``pool0`` (seed 0's
    feature pool) reuse what a caller has already measured or built."""
    from tqdm.auto import tqdm

    dev = torch.device(device or "cpu")
    (x, y), (xt, yt) = load(S, dev)
    cost = dict(cost or {})
    pool0 = pool0 or FeaturePool(x, y, S.pool_size, S.width, 0, cache_real=S.cache_real)
    for ipc in S.ipcs:
        for m in methods:
            if (m, ipc) not in cost:
                st = stepper_for(m, x, y, ipc, 0, S, pool0)
                cost[m, ipc] = (None, None) if st is None else iteration_cost(st, dev, S.cost_repeat)
    rows, gallery, full = [], {}, []
    jobs = [(seed, ipc, m) for seed in S.seeds for ipc in S.ipcs for m in methods]
    pools = {0: pool0}
    for seed, ipc, m in tqdm(jobs, desc="distill + evaluate", disable=not progress):
        if seed not in pools:
            pools = {seed: FeaturePool(x, y, S.pool_size, S.width, seed, cache_real=S.cache_real)}
        i = S.ipcs.index(ipc)
        iters = S.dc_iterations[i] if m == "dc" else S.iterations[i]
        xs, ys = distill(x, y, m, ipc, iters, seed, **options_for(S, m, ipc, pools[seed]))
        acc = evaluate(xs, ys, xt, yt, seed=seed, epochs=S.eval_epochs[i], width=S.width)
        sec, mem = cost[m, ipc]
        rows.append({"method": m, "ipc": ipc, "seed": seed, "accuracy": acc, "sec_per_iter": sec,
                     "peak_mem_bytes": mem, "iterations": 0 if m in ("random", "herding") else iters})
        if seed == S.seeds[0]:
            gallery[m, ipc] = xs.detach().cpu()
    for seed in S.seeds if full_data else ():
        full.append(evaluate(x, y, xt, yt, seed=seed, epochs=S.full_epochs, width=S.width, batch_size=64))
    return rows, gallery, full


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (method, ipc): accuracy mean ± std over seeds, cost (ms per iteration, peak MiB),
    the published CIFAR-10 number where the paper has one."""
    out = []
    for key in dict.fromkeys((r["method"], r["ipc"]) for r in rows):
        sub = [r for r in rows if (r["method"], r["ipc"]) == key]
        accs = [r["accuracy"] for r in sub]
        out.append({"method": key[0], "ipc": key[1], "seeds": len(sub),
                    "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "iterations": sub[0].get("iterations"),
                    "ms_per_iter": None if sub[0]["sec_per_iter"] is None else 1e3 * sub[0]["sec_per_iter"],
                    "peak_mem_MiB": None if sub[0]["peak_mem_bytes"] is None else sub[0]["peak_mem_bytes"] / 2**20,
                    "published_cifar10": PUBLISHED.get(key)})
    return out


def run_for_seconds(stepper, budget_s: float, checkpoints=(0.5, 1.0)) -> list[tuple]:
    """Step ``stepper`` until its steps have taken ``budget_s`` seconds of wall
    clock; at each fraction of ``checkpoints`` keep ``(seconds, iterations, copy of
    the synthetic images)``.

    Only the steps are timed (each ends in a ``float(loss)``, which waits for a GPU),
    not the copies; a step that crosses several checkpoints fills them all with the
    same snapshot."""
    _check_budget(budget_s, checkpoints)
    if not hasattr(stepper, "x_syn") or not callable(getattr(stepper, "step", None)):
        raise ValueError("stepper needs .step() and .x_syn (the synthetic images): "
                         "pass a MatchingStepper or DCStepper, e.g. stepper_for(...)")
    stops = [f * budget_s for f in checkpoints]
    elapsed, it, snaps = 0.0, 0, []
    while len(snaps) < len(stops):
        t0 = time.perf_counter()
        stepper.step()
        elapsed += time.perf_counter() - t0
        it += 1
        while len(snaps) < len(stops) and elapsed >= stops[len(snaps)]:
            snaps.append((elapsed, it, stepper.x_syn.detach().clone()))
    return snaps


def equal_seconds(S, x, y, x_eval, y_eval, *, methods=BUDGETED, budget_s: float | None = None,
                  checkpoints=None, overrides: dict | None = None, device=None,
                  progress: bool = True):
    """Every method of ``methods`` for the same wall-clock budget, at every IPC and seed of ``S``.

    Each run starts from the seed's random real subset (evaluated once, the ``random`` row at
    0 s), steps for ``budget_s`` seconds (default ``S.budget_s``) and is snapshotted at the
    ``checkpoints`` fractions of it (default ``S.checkpoints``); every snapshot is judged by a
    fresh ConvNet trained on it (``S.eval_epochs``, ``S.width``, ``S.results_eval_lr``) and
    tested on ``(x_eval, y_eval)``: the val split while choosing hyper-parameters, the test split to report.
    ``overrides`` ({method: {option: value}}) replace :func:`options_for`'s options.

    Returns ``(rows, gallery)``: rows ``{"method", "ipc", "seed", "seconds", "iterations",
    "accuracy", "peak_mem_bytes", "setup_s"}`` — ``peak_mem_bytes`` of one iteration (seed 0's
    run), ``setup_s`` the seconds of building the seed's pool of extractors and caching its real
    features, shared by DM, CF and NCFM and *not* in their budget — and the last snapshot of
    the first seed per (method, ipc)."""
    from tqdm.auto import tqdm

    bad = [m for m in methods if m not in BUDGETED]
    if bad:
        raise ValueError(f"equal_seconds runs {', '.join(BUDGETED)} (random is every run's "
                         f"start), not {bad}")
    overrides = overrides or {}
    if set(overrides) - set(methods):
        raise ValueError(f"overrides for {sorted(set(overrides) - set(methods))}, which are not "
                         f"among the methods {list(methods)}")
    budget_s = S.budget_s if budget_s is None else budget_s
    checkpoints = S.checkpoints if checkpoints is None else checkpoints
    _check_budget(budget_s, checkpoints)                                     # fail early
    dev = torch.device(device or "cpu")
    rows, gallery, peak = [], {}, {}
    jobs = [(seed, ipc) for seed in S.seeds for ipc in S.ipcs]
    pool, pool_seed, setup = None, None, 0.0
    for seed, ipc in tqdm(jobs, desc="equal seconds", disable=not progress):
        if pool_seed != seed and any(m != "dc" for m in methods):
            t0 = time.perf_counter()
            pool = FeaturePool(x, y, S.pool_size, S.width, seed, cache_real=S.cache_real)
            pool_seed, setup = seed, time.perf_counter() - t0
        epochs = S.eval_epochs[S.ipcs.index(ipc)]

        def judge(xs, ys):
            return evaluate(xs, ys, x_eval, y_eval, seed=seed, epochs=epochs, width=S.width,
                            lr=S.results_eval_lr)

        x0, y0 = random_subset(x, y, ipc, seed)
        rows.append({"method": "random", "ipc": ipc, "seed": seed, "seconds": 0.0, "iterations": 0,
                     "accuracy": judge(x0, y0), "peak_mem_bytes": None, "setup_s": 0.0})
        for m in methods:
            over = overrides.get(m)
            if (m, ipc) not in peak:       # one iteration of a spare stepper, outside the budget
                spare = stepper_for(m, x, y, ipc, seed, S, pool, over)
                peak[m, ipc] = peak_memory(spare.step, device=dev)
            st = stepper_for(m, x, y, ipc, seed, S, pool, over)
            snaps = run_for_seconds(st, budget_s, checkpoints)
            for sec, it, xs in snaps:
                rows.append({"method": m, "ipc": ipc, "seed": seed, "seconds": sec,
                             "iterations": it, "accuracy": judge(xs, y0),
                             "peak_mem_bytes": peak[m, ipc], "setup_s": 0.0 if m == "dc" else setup})
            if seed == S.seeds[0]:
                gallery[m, ipc] = snaps[-1][2].cpu()
    return rows, gallery


def _check_budget(budget_s, checkpoints) -> None:
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    fr = list(checkpoints)
    if not fr or any(not 0 < f <= 1 for f in fr) or fr != sorted(set(fr)):
        raise ValueError(f"checkpoints must be increasing fractions of the budget in (0, 1], "
                         f"got {checkpoints!r}; e.g. (0.25, 0.5, 1.0)")


def summarize_seconds(rows: list[dict]) -> list[dict]:
    """One row per (method, ipc, checkpoint) of :func:`equal_seconds`' rows: accuracy mean ± std
    over seeds, mean seconds and iterations, ms per iteration, peak MiB of one iteration."""
    out, seen = [], {}
    for r in rows:                                   # checkpoint index: order within its run
        run = (r["method"], r["ipc"], r["seed"])
        seen[run] = seen.get(run, -1) + 1
        r = {**r, "_k": seen[run]}
        out.append(r)
    table = []
    for key in dict.fromkeys((r["method"], r["ipc"], r["_k"]) for r in out):
        sub = [r for r in out if (r["method"], r["ipc"], r["_k"]) == key]
        accs = [r["accuracy"] for r in sub]
        sec = statistics.mean(r["seconds"] for r in sub)
        its = statistics.mean(r["iterations"] for r in sub)
        mem = sub[0]["peak_mem_bytes"]
        table.append({"method": key[0], "ipc": key[1], "seeds": len(sub), "seconds": sec,
                      "iterations": its, "ms_per_iter": 1e3 * sec / its if its else None,
                      "acc_mean": statistics.mean(accs),
                      "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "peak_mem_MiB": None if mem is None else mem / 2**20})
    return table
