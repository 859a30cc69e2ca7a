"""The attention benchmark: rows as the issue specifies, smoke profile, GPU suite present."""

from __future__ import annotations

import torch

from effdl.attention import bench


def test_run_smoke_rows():
    rows = bench.run("smoke", torch.device("cpu"))
    assert {r["name"] for r in rows} == {"prefill", "decode"}
    for r in rows:
        keys = {"name", "impl", "d", "batch", "heads", "causal", "dtype", "ms", "peak_mem_bytes"}
        assert keys <= set(r), r
        assert ("N" in r and "tflops" in r) if r["name"] == "prefill" else ("L" in r and "tbps" in r)
    assert {r["impl"] for r in rows if r["name"] == "prefill"} >= {"naive", "tiled", "sdpa"}
    assert {r["impl"] for r in rows if r["name"] == "decode"} >= {"naive", "sdpa", "torch_split_kv"}
    fig = bench.plot(rows)
    assert len(fig.axes) == 2


def test_flops_and_bytes():
    assert bench.prefill_flops(1, 1, 10, 4, False) == 4 * 100 * 4
    assert bench.prefill_flops(2, 3, 10, 4, True) == 2 * 3 * 4 * 100 * 4 / 2
    assert bench.decode_bytes(1, 1, 100, 8, torch.float16) == 2 * 100 * 8 * 2


def test_gpu_suite_is_defined():
    assert callable(bench.gpu_suite) and callable(bench.gpu_checks)


def test_sweep_helpers_small():
    rows = bench.tile_sweep(64, [(16, 16), (64, 64)], d=8, batch=1, heads=1, warmup=0, repeat=1, memory=False)
    assert [r["steps"] for r in rows] == [16, 1]
    mm = bench.matmul_sweep([8, 16], d=8, heads=1, total=256, warmup=0, repeat=1)
    assert all(r["matmul_gflops"] > 0 for r in mm)
    res = bench.interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0)
    assert set(res) == {"a", "b"} and len(res["a"]["times_ms"]) == 2
