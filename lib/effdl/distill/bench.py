"""``python -m effdl.bench distill``: accuracy, seconds per iteration and peak memory per method
(rows: see :mod:`effdl.distill.experiments`), accuracy against seconds at equal cost, and the GPU
suite of the recorded results."""

from __future__ import annotations

import torch

from effdl.bench.core import oom_guard
from effdl.distill.experiments import equal_seconds, experiment, iteration_cost, load, stepper_for
from effdl.distill.matching import FeaturePool
from effdl.measure import cpu_thread_policy

__all__ = ["run", "gpu_suite"]


def run(S, device: torch.device) -> list[dict]:
    """Every method at every IPC and seed of sizes ``S`` (``S.cpu_threads``: why one thread, there).

    The unroll sweep (:func:`effdl.distill.unroll.memory_sweep` at the first IPC: peak bytes of
    unroll-K matching and of one DM/CF/NCFM step, rows ``{"method", "unroll",
    "peak_mem_bytes", ...}``) rides along as the field ``"unroll_memory"`` of the DC rows at that
    IPC, the bi-level method it extends; the rows themselves stay one per (method, ipc, seed).

    The equal-cost comparison of the chapter's results section
    (:func:`effdl.distill.experiments.equal_seconds` on ``results_sizes(S)``'s dataset, test
    split) rides along the same way: each row's ``"equal_seconds"`` field holds that (method,
    ipc, seed)'s points ``{"method", "ipc", "seed", "seconds", "iterations", "accuracy",
    "dataset", ...}`` (herding, which takes no budget, has none)."""
    with cpu_thread_policy(device, S.cpu_threads):
        rows = experiment(S, device, progress=False)[0]
        sweep = _unroll_rows(S, device)
        points = _equal_seconds_rows(S, device)
    for r in rows:
        if r["method"] == "dc" and r["ipc"] == S.ipcs[0]:
            r["unroll_memory"] = sweep
        r["equal_seconds"] = [p for p in points
                              if (p["method"], p["ipc"], p["seed"]) == (r["method"], r["ipc"], r["seed"])]
    return rows


def _equal_seconds_rows(S, device) -> list[dict]:
    from effdl.distill.sizes import results_sizes

    R = results_sizes(S)
    (x, y), (xt, yt) = load(R, device)
    rows = equal_seconds(R, x, y, xt, yt, device=device, progress=False)[0]
    return [{**r, "sweep": "equal_seconds", "dataset": R.dataset} for r in rows]


def _unroll_rows(S, device) -> list[dict]:
    from effdl.distill.experiments import load
    from effdl.distill.unroll import default_unrolls, memory_sweep

    (x, y), _ = load(S, device)
    pool = FeaturePool(x, y, S.pool_size, S.width, seed=0, cache_real=S.cache_real)
    rows = memory_sweep(x, y, S.ipcs[0], default_unrolls(), device, pool=pool, S=S, width=S.width,
                        real_per_class=S.real_per_class)
    return [{**r, "sweep": "unroll_memory", "ipc": S.ipcs[0], "seed": 0} for r in rows]


def gpu_suite(device: torch.device, S) -> list[dict]:
    """Cost of one iteration at sizes ``S`` — NCFM vs DM vs DC (and CF) at each IPC of
    ``S.suite_ipcs`` (gpu profile: 1, 10, 50) — on CIFAR-10-shaped random tensors (no download),
    ``S.cost_repeat`` timed iterations each."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    per_class = max(S.real_per_class, *S.suite_ipcs) * 2
    side = S.suite_image
    x = torch.rand(10 * per_class, 3, side, side, generator=g).to(dev)
    y = torch.arange(10).repeat_interleave(per_class).to(dev)
    pool = FeaturePool(x, y, 4, S.width, 0, cache_real=False)      # real batches go through the net
    rows = []
    for ipc in S.suite_ipcs:
        for m in ("dc", "dm", "cfd", "ncfm"):
            row = {"method": m, "ipc": ipc, "seed": 0, "accuracy": None, "impl": m,
                   "real_per_class": S.real_per_class, "n_freq": S.n_freq, "width": S.width}
            with oom_guard(row, dev):
                st = stepper_for(m, x, y, ipc, 0, S, pool)
                row["sec_per_iter"], row["peak_mem_bytes"] = iteration_cost(st, dev, repeat=S.cost_repeat)
            rows.append(row)
    return rows
