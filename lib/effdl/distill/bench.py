"""``python -m effdl.bench distill``: accuracy, seconds per iteration and peak memory per method.

Rows: ``{"method", "ipc", "seed", "accuracy", "sec_per_iter", "peak_mem_bytes"}``.  Accuracy is that
of a fresh ConvNet-3 trained on the synthetic set (one row per seed); the cost columns are measured
once per (method, ipc) on seed 0 — one iteration of the real loop, timed by
:func:`effdl.measure.benchmark`, its peak memory by :func:`effdl.measure.peak_memory` — and repeated in
each seed's row.  ``random`` and ``herding`` have no iterations: their cost columns are ``None``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from effdl.distill.api import METHODS, distill, evaluate
from effdl.distill.baselines import random_subset
from effdl.distill.dc import DCStepper
from effdl.distill.matching import FeaturePool, MatchingStepper
from effdl.measure import benchmark, peak_memory, torch_threads

__all__ = ["load", "options_for", "stepper_for", "iteration_cost", "experiment", "run", "plot", "summarize",
           "gpu_suite", "cpu_threads", "PUBLISHED"]

#: NCFM paper, Table 1 (ConvNet, CIFAR-10, accuracy %): published numbers, shown beside ours.
PUBLISHED = {("random", 1): 14.4, ("random", 10): 26.0, ("dm", 1): 26.0, ("dm", 10): 48.9,
             ("ncfm", 1): 49.5, ("ncfm", 10): 71.8}


#: the course's thread-count context (effdl.measure.torch_threads).  Why one thread for digits: on
#: 8×8 images every convolution is a few microseconds of work, less than waking and joining a second
#: thread costs (measured here: 1 thread several times faster than 2 on a shared machine).
cpu_threads = torch_threads


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


def experiment(profile: str | None = None, device=None, progress: bool = True, methods=METHODS,
               full_data: bool = False, cost: dict | None = None, pool0: FeaturePool | None = None):
    """The chapter's whole results table.  Returns ``(rows, gallery, full)``: the bench rows, seed 0's
    synthetic images per (method, ipc), and (if ``full_data``) the full-data reference accuracy per
    seed (else an empty list).  ``cost`` ({(method, ipc): (sec, bytes)}) and ``pool0`` (seed 0's
    feature pool) reuse what a caller has already measured or built."""
    from tqdm.auto import tqdm

    from effdl.profile import sizes

    S = sizes("distill", profile)
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


def run(profile: str, device: torch.device) -> list[dict]:
    from effdl.profile import sizes

    with cpu_threads(sizes("distill", profile).cpu_threads if torch.device(device).type == "cpu" else None):
        return experiment(profile, device, progress=False)[0]


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


def plot(rows: list[dict], path=None, published: bool = True):
    """Accuracy (mean ± std over seeds) per method, one panel per IPC; the paper's CIFAR-10 numbers as
    hollow markers on a second axis, labelled *published*."""
    import matplotlib.pyplot as plt

    summ = summarize(rows)
    ipcs = list(dict.fromkeys(r["ipc"] for r in summ))
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5.2 * len(ipcs), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        sub = [r for r in summ if r["ipc"] == ipc]
        names = [r["method"] for r in sub]
        ax.bar(names, [r["acc_mean"] for r in sub], yerr=[r["acc_std"] for r in sub], capsize=3,
               color="tab:blue", alpha=0.8, label="measured here (mean ± std)")
        lo = min(r["acc_mean"] - r["acc_std"] for r in sub)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"IPC {ipc}")
        ax.grid(axis="y", alpha=0.3)
        pub = [(n, PUBLISHED.get((n, ipc))) for n in names]
        if published and any(v is not None for _, v in pub):
            ax2 = ax.twinx()
            ax2.plot([n for n, v in pub if v is not None], [v for _, v in pub if v is not None], "o",
                     mfc="none", color="tab:red", label="published, CIFAR-10 (NCFM paper)")
            ax2.set_ylim(0, 100)
            ax2.set_ylabel("published accuracy, CIFAR-10 (%)", color="tab:red")
            ax2.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def gpu_suite(device: torch.device) -> list[dict]:
    """GPU-profile cost of one iteration — NCFM vs DM vs DC (and CF) at IPC 1, 10, 50 — on
    CIFAR-10-shaped random tensors (no download).  About a minute on an H100."""
    from effdl.profile import sizes

    S = sizes("distill", "gpu")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    per_class = max(S.real_per_class, 50) * 2
    x = torch.rand(10 * per_class, 3, 32, 32, generator=g).to(dev)
    y = torch.arange(10).repeat_interleave(per_class).to(dev)
    pool = FeaturePool(x, y, 4, S.width, 0, cache_real=False)      # real batches go through the net
    rows = []
    for ipc in (1, 10, 50):
        for m in ("dc", "dm", "cfd", "ncfm"):
            row = {"method": m, "ipc": ipc, "seed": 0, "accuracy": None, "impl": m,
                   "real_per_class": S.real_per_class, "n_freq": S.n_freq, "width": S.width}
            try:
                st = stepper_for(m, x, y, ipc, 0, S, pool)
                row["sec_per_iter"], row["peak_mem_bytes"] = iteration_cost(st, dev, repeat=5)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(run(sys.argv[1] if len(sys.argv) > 1 else "smoke", torch.device("cpu")))
