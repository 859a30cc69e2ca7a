"""The attention benchmark's rows (smoke sizes), its FLOP and byte formulas, and the tile studies.

That ``run`` returns rows and ``plot_bench`` draws them is the chapter contract's test
(tests/test_chapter_contract.py); here: what this chapter's rows hold.
"""

from __future__ import annotations

import pytest
import torch

from effdl.attention import bench, experiments
from effdl.profile import sizes


def test_run_smoke_rows(smoke_bench_rows):
    S = sizes("attention", "smoke")
    rows, _, _ = smoke_bench_rows("attention")
    assert {r["name"] for r in rows} == {"prefill", "decode", "interleaved", "makespan"}
    inter = [r for r in rows if r["name"] == "interleaved"]
    assert {r["impl"] for r in inter} == {"naive", "textbook_fa2", "tiled", "sdpa"}
    for r in inter:                                    # a median ratio inside its quartiles
        assert r["N"] == S.target_N and r["ratio_q1"] <= r["ratio_to_sdpa"] <= r["ratio_q3"]
        assert r["peak_mem_bytes"] > 0
    assert next(r for r in inter if r["impl"] == "sdpa")["ratio_to_sdpa"] == 1
    spans = [r for r in rows if r["name"] == "makespan"]
    assert {"schedule", "contexts", "sms", "makespan", "utilization"} <= set(spans[0])
    assert {r["schedule"] for r in spans} == {"fixed", "flash_decoding", "lean"}
    mixed = {r["schedule"]: r["utilization"] for r in spans if r["batch"] == "mixed"}
    assert mixed["lean"] >= 1.2 * mixed["fixed"] and mixed["lean"] >= 1.2 * mixed["flash_decoding"]
    rows = [r for r in rows if r["name"] in ("prefill", "decode")]
    for r in rows:
        keys = {"name", "impl", "d", "batch", "heads", "causal", "dtype", "ms", "peak_mem_bytes"}
        assert keys <= set(r), r
        assert ("N" in r and "tflops" in r) if r["name"] == "prefill" else ("L" in r and "tbps" in r)
        assert r["dtype"] == "float32" and r["d"] == S.head_dim  # the CPU runs fp32
    prefill = [r for r in rows if r["name"] == "prefill"]
    assert {r["impl"] for r in prefill} == {"naive", "tiled", "sdpa"}
    assert {r["N"] for r in prefill if not r["causal"]} == set(S.seq_lens) | {S.target_N}
    assert {r["N"] for r in prefill if r["causal"]} == {S.target_N}  # causal: the target point only
    decode = [r for r in rows if r["name"] == "decode"]
    assert {r["impl"] for r in decode} == {"naive", "sdpa", "torch_split_kv"}
    assert {r["L"] for r in decode} == set(S.decode_L)
    for r in prefill:  # the derived unit is the formula over the measured time
        flops = experiments.prefill_flops(r["batch"], r["heads"], r["N"], r["d"], r["causal"])
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)


def test_flops_and_bytes():
    assert experiments.prefill_flops(1, 1, 10, 4, False) == 4 * 100 * 4
    assert experiments.prefill_flops(2, 3, 10, 4, True) == 2 * 3 * 4 * 100 * 4 / 2
    assert experiments.decode_bytes(1, 1, 100, 8, torch.float16) == 2 * 100 * 8 * 2
    assert experiments.decode_bytes(2, 3, 100, 8, torch.float32) == 2 * 2 * 3 * 100 * 8 * 4


def test_unknown_implementations_are_rejected():
    with pytest.raises(ValueError, match="unknown prefill implementation"):
        experiments.prefill_impls("cpu", ["flash4"])
    with pytest.raises(ValueError, match="unknown decode implementation"):
        experiments.decode_impls("cpu", ["tiled"])


def test_sweep_helpers_small():
    rows = experiments.tile_sweep(64, [(16, 16), (64, 64)], d=8, batch=1, heads=1, warmup=0, repeat=1,
                                  memory=False)
    assert [r["steps"] for r in rows] == [16, 1]
    assert [r["tile_elems"] for r in rows] == [256, 4096]
    mm = experiments.matmul_sweep([8, 16], d=8, heads=1, total=256, warmup=0, repeat=1)
    assert [r["calls"] for r in mm] == [4, 1]  # the same total work, split into tiles
    assert all(r["matmul_gflops"] > 0 for r in mm)


def test_check_row_applies_the_accuracy_rule():
    """A GPU-suite ``check`` row says whether an output is within 2x the plain low-precision error."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 8, generator=g, dtype=torch.float64)
    plain = (ref + 1e-3 * torch.randn(4, 8, generator=g, dtype=torch.float64)).float()
    good = bench._check_row(plain, plain, ref, 2, impl="x", N=4)
    assert good["name"] == "check" and good["passed"] and good["err"] == pytest.approx(good["err_pt"])
    bad = bench._check_row(plain + 1.0, plain, ref, 2, impl="x", N=4)
    assert not bad["passed"] and bad["impl"] == "x" and bad["N"] == 4
