"""Token-compression chapter: every exercise check fails on its stub and passes on its solution;
the benchmark helpers produce the issue's rows."""

from __future__ import annotations

import json

import nbformat
import pytest
import torch

import effdl.checks
from effdl.checks import chapter_checks
from effdl.checks import ExerciseFailed

NOTEBOOK = "notebooks/tokens.ipynb"


def _cells(root, tag):
    nb = nbformat.read(root / NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _exercises(root):
    stubs, sols, checks = _cells(root, "exercise"), _cells(root, "solution"), _cells(root, "check")
    assert len(stubs) == len(sols) == len(checks) >= 5
    return list(zip(stubs, sols, checks))


def test_every_check_is_called(root):
    called = "\n".join(c for _, _, c in _exercises(root))
    for name in chapter_checks("tokens"):
        assert f"effdl.checks.{name}(" in called, f"{name} is in __all__ but the notebook never calls it"


@pytest.mark.parametrize("i", range(5))
def test_check_fails_on_stub_and_passes_on_solution(root, i):
    stub, sol, check = _exercises(root)[i]
    env = {"effdl": effdl}
    exec(stub, env)
    with pytest.raises(ExerciseFailed):
        exec(check, env)
    env = {"effdl": effdl}
    exec(sol, env)
    exec(check, env)


def test_checks_catch_plausible_mistakes():
    from effdl.tokens import reducers

    # top-k in score order instead of page order
    def unsorted(x, a, k):
        idx = a.topk(k, dim=1).indices
        kept = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return kept, reducers.topk_fuse(x, a, k)[1]

    with pytest.raises(ExerciseFailed, match="original order"):
        effdl.checks.check_topk_fuse(unsorted)
    # plain mean instead of size-weighted merge
    def unweighted(x, size, metric, r):
        return reducers.bipartite_merge(x, torch.ones_like(size), metric, r)[0], size[:, r:]

    with pytest.raises(ExerciseFailed):
        effdl.checks.check_tome_step(unweighted)
    # attention counted once instead of twice
    with pytest.raises(ExerciseFailed):
        effdl.checks.check_vit_flops(lambda n, d, depth, r: depth * (2 * n * d * 4 * d + 4 * n * d * r * d + 2 * n * n * d))
    # deltas against the original anchor instead of the reconstructed one
    from effdl.tokens import kvcache

    def original_anchor(x, bits, group):
        q, step, _ = kvcache.delta_quantize(x, bits, 1)
        out = x.clone()
        for t in range(x.shape[0]):
            ref = 0.0 if t % group == 0 else x[t - t % group]
            out[t] = ref + torch.round((x[t] - ref) / step[t]) * step[t]
        return out

    with pytest.raises(ExerciseFailed):
        effdl.checks.check_delta_quantize(original_anchor)


def test_bench_smoke(tmp_path):
    from effdl.bench.__main__ import main

    path = tmp_path / "tokens.json"
    assert main(["tokens", "--profile", "smoke", "--json", str(path), "--device", "cpu"]) == 0
    rows = json.loads(path.read_text())["results"]
    vit = [r for r in rows if r["method"] != "kv"]
    kv = [r for r in rows if r["method"] == "kv"]
    assert {r["method"] for r in vit} == {"keep_all", "random_drop", "pool", "evit", "tome", "lat", "tcc"}
    for r in vit:
        assert {"method", "mean_tokens_kept_frac", "accuracy", "ms_batch1", "ms_batch64", "gflops"} <= set(r)
    for r in kv:
        assert {"method", "bits", "ratio_vs_fp16", "attn_rel_err"} <= set(r)
    assert (tmp_path / "tokens.png").exists()


def test_targets_reading():
    from effdl.tokens.bench import targets

    rows = [
        {"method": "keep_all", "keep": 1.0, "mean_tokens_kept_frac": 1.0, "accuracy": 0.99, "ms_batch64": 100.0},
        {"method": "tcc", "keep": 0.5, "mean_tokens_kept_frac": 0.45, "accuracy": 0.985, "ms_batch64": 55.0},
        {"method": "evit", "keep": 0.5, "mean_tokens_kept_frac": 0.5, "accuracy": 0.99, "ms_batch64": 50.0},
        {"method": "evit", "keep": 0.25, "mean_tokens_kept_frac": 0.25, "accuracy": 0.995, "ms_batch64": 30.0},
        {"method": "kv", "bits": 5, "group": 8, "ratio_vs_fp16": 3.9, "attn_rel_err": 7e-3},
        {"method": "kv", "bits": 4, "group": 8, "ratio_vs_fp16": 5.0, "attn_rel_err": 2e-2},
    ]
    t = {r["target"]: r for r in targets(rows)}
    assert t["TCC within 1 point of keep-all"]["met"]
    # EViT interpolated at TCC's 45%: 0.995 + (0.99 - 0.995) * 0.8 = 0.991 > 0.985
    assert not t["TCC >= evit at the same budget"]["met"]
    assert t["TCC >= evit at the same budget"]["value"] == pytest.approx(100 * (0.985 - 0.991))
    assert t["TCC >= 1.6x faster than keep-all at batch 64"]["value"] == pytest.approx(100 / 55)
    assert t["KV >= 3.5x smaller than fp16 at error <= 1e-2"]["met"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_suite_runs():
    from effdl.tokens.bench import gpu_suite

    rows = gpu_suite(torch.device("cuda"))
    assert any(r["method"] == "tcc" for r in rows)
