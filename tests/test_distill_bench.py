"""The distill benchmark: row contract in the smoke profile, and the GPU suite's shape (CPU-only here)."""

from __future__ import annotations

import math

import torch

from effdl.distill import bench


def test_smoke_rows_have_the_contract():
    rows = bench.run("smoke", torch.device("cpu"))
    keys = {"method", "ipc", "seed", "accuracy", "sec_per_iter", "peak_mem_bytes"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {r["method"] for r in rows} == {"random", "herding", "dc", "dm", "cfd", "ncfm"}
    for r in rows:
        assert 0 <= r["accuracy"] <= 100
        if r["method"] in ("random", "herding"):
            assert r["sec_per_iter"] is None
        else:
            assert r["sec_per_iter"] > 0 and r["peak_mem_bytes"] > 0
    summ = bench.summarize(rows)
    assert {(s["method"], s["ipc"]) for s in summ} == {(r["method"], r["ipc"]) for r in rows}
    fig = bench.plot(rows)
    assert fig is not None


def test_cpu_threads_restores():
    n = torch.get_num_threads()
    with bench.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n


def test_gpu_suite_runs_at_toy_sizes(monkeypatch):
    """gpu_suite on the CPU with the gpu profile shrunk: rows for every (method, ipc), costs > 0."""
    import dataclasses

    from effdl.distill import sizes

    small = dataclasses.replace(sizes.SIZES["gpu"], width=4, real_per_class=4, n_freq=8, cost_repeat=1)
    monkeypatch.setitem(sizes.SIZES, "gpu", small)
    with bench.cpu_threads(1):
        rows = bench.gpu_suite(torch.device("cpu"))
    assert {(r["method"], r["ipc"]) for r in rows} == {(m, i) for m in ("dc", "dm", "cfd", "ncfm") for i in (1, 10, 50)}
    assert all(r["sec_per_iter"] > 0 and r["peak_mem_bytes"] > 0 for r in rows)
    assert not math.isnan(bench.PUBLISHED["ncfm", 10])
