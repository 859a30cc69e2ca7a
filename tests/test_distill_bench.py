"""The distill benchmark's rows (smoke sizes) and the GPU suite's rows (run on the CPU at toy sizes).

That ``run`` returns rows and ``plot_bench`` draws them is the chapter contract's test
(tests/test_chapter_contract.py); here: what this chapter's rows hold.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effdl.distill import bench
from effdl.distill.experiments import PUBLISHED, summarize
from effdl.measure import torch_threads
from effdl.profile import sizes

METHODS = {"random", "herding", "dc", "dm", "cfd", "ncfm"}


def test_smoke_rows_have_the_contract(smoke_bench_rows):
    S = sizes("distill", "smoke")
    rows, threads, threads_after = smoke_bench_rows("distill")
    assert threads_after == threads  # S.cpu_threads is used during the run only
    keys = {"method", "ipc", "seed", "accuracy", "sec_per_iter", "peak_mem_bytes", "iterations"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {(r["method"], r["ipc"], r["seed"]) for r in rows} == {
        (m, i, s) for m in METHODS for i in S.ipcs for s in S.seeds}
    for r in rows:
        assert 0 <= r["accuracy"] <= 100
        if r["method"] in ("random", "herding"):
            assert r["sec_per_iter"] is None and r["peak_mem_bytes"] is None and r["iterations"] == 0
        else:
            assert r["sec_per_iter"] > 0 and r["peak_mem_bytes"] > 0 and r["iterations"] > 0
    # the equal-cost points ride along: one at 0 s for random, one per checkpoint for the others
    for r in rows:
        pts = r["equal_seconds"]
        assert all({"method", "ipc", "seed", "seconds", "accuracy"} <= set(p) for p in pts)
        assert all((p["method"], p["ipc"], p["seed"]) == (r["method"], r["ipc"], r["seed"])
                   and p["dataset"] == S.results_dataset and 0 <= p["accuracy"] <= 100 for p in pts)
        n = {"herding": 0, "random": 1}.get(r["method"], len(S.checkpoints))
        assert len(pts) == n
        assert all(p["seconds"] >= f * S.budget_s for p, f in zip(pts, S.checkpoints) if n > 1)
    summ = summarize(rows)
    assert {(s["method"], s["ipc"]) for s in summ} == {(r["method"], r["ipc"]) for r in rows}
    assert all(s["seeds"] == len(S.seeds) for s in summ)


def test_summarize_means_over_seeds_and_shows_published_numbers():
    rows = [{"method": "dm", "ipc": 1, "seed": s, "accuracy": a, "sec_per_iter": 0.002, "peak_mem_bytes": 2**20,
             "iterations": 10} for s, a in [(0, 30.0), (1, 34.0)]]
    rows.append({"method": "random", "ipc": 7, "seed": 0, "accuracy": 20.0, "sec_per_iter": None,
                 "peak_mem_bytes": None, "iterations": 0})
    dm, rnd = summarize(rows)
    assert dm["acc_mean"] == 32.0 and dm["acc_std"] == pytest.approx(2 ** 0.5 * 2)
    assert dm["ms_per_iter"] == pytest.approx(2.0) and dm["peak_mem_MiB"] == 1.0
    assert dm["published_cifar10"] == PUBLISHED["dm", 1]
    assert rnd["acc_std"] == 0.0 and rnd["ms_per_iter"] is None and rnd["published_cifar10"] is None


def test_gpu_suite_runs_at_toy_sizes():
    """gpu_suite on the CPU with the gpu profile's sizes shrunk: rows for every (method, ipc), costs > 0."""
    small = dataclasses.replace(sizes("distill", "gpu"), width=4, real_per_class=4, n_freq=8, cost_repeat=1)
    with torch_threads(1):
        rows = bench.gpu_suite(torch.device("cpu"), small)
    assert {(r["method"], r["ipc"]) for r in rows} == {(m, i) for m in ("dc", "dm", "cfd", "ncfm") for i in (1, 10, 50)}
    assert all("error" not in r and r["sec_per_iter"] > 0 and r["peak_mem_bytes"] > 0 for r in rows)
    assert all((r["width"], r["real_per_class"], r["n_freq"]) == (4, 4, 8) for r in rows)
