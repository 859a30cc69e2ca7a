"""Helpers the distillation chapter's notebook calls: data, per-method options, the whole results
table (:func:`experiment`) and its summary with the paper's published numbers beside it.

Rows: ``{"method", "ipc", "seed", "accuracy", "sec_per_iter", "peak_mem_bytes", "iterations"}``.
Accuracy is that of a fresh ConvNet-3 trained on the synthetic set (one row per seed); the cost
columns are measured once per (method, ipc) on seed 0 — one iteration of the real loop, timed by
:func:`effdl.measure.benchmark`, its peak memory by :func:`effdl.measure.peak_memory` — and repeated
in each seed's row.  ``random`` and ``herding`` have no iterations: their cost columns are ``None``.
"""

from __future__ import annotations

import statistics

import torch

from effdl.distill.api import METHODS, distill, evaluate
from effdl.distill.baselines import random_subset
from effdl.distill.dc import DCStepper
from effdl.distill.matching import FeaturePool, MatchingStepper
from effdl.measure import benchmark, peak_memory

__all__ = ["PUBLISHED", "load", "options_for", "stepper_for", "iteration_cost", "experiment",
           "summarize"]

#: NCFM paper, Table 1 (ConvNet, CIFAR-10, accuracy %): published numbers, shown beside ours.
PUBLISHED = {("random", 1): 14.4, ("random", 10): 26.0, ("dm", 1): 26.0, ("dm", 10): 48.9,
             ("ncfm", 1): 49.5, ("ncfm", 10): 71.8}


def load(S, device=None):
    """Train and test split of the profile's dataset, on ``device``."""
    from effdl.data import load_images

    tr, te = load_images(S.dataset, "train"), load_images(S.dataset, "test")
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


def stepper_for(method: str, x, y, ipc: int, seed: int, S, pool: FeaturePool):
    """An object whose ``step()`` is one iteration of ``method`` (``None`` for random/herding)."""
    if method in ("random", "herding"):
        return None
    x0, y0 = random_subset(x, y, ipc, seed)
    opts = options_for(S, method, ipc)
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
