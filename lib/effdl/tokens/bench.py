"""``python -m effdl.bench tokens``: every reducer at several budgets on one trained model, plus
the KV codec (rows: see :mod:`effdl.tokens.experiments`), and the GPU suite of the recorded results."""

from __future__ import annotations

import torch

from effdl.measure import benchmark, cpu_thread_policy
from effdl.tokens.documents import make_documents
from effdl.tokens.experiments import (
    build_model,
    count_datasets,
    count_latency,
    count_sweep,
    datasets,
    kv_rows,
    measure_methods,
    method_fn,
    token_cost,
)
from effdl.tokens.reducers import REDUCERS
from effdl.tokens.train import train

__all__ = ["run", "gpu_suite"]


def run(S, device: torch.device) -> list[dict]:
    """Train the model of sizes ``S``, then measure every method at every budget, then the KV codec."""
    # see Sizes.threads: steadier timings on a shared machine; restored afterwards
    with cpu_thread_policy(device, S.threads):
        (xtr, ytr), (xte, yte, _) = datasets(S)
        model = build_model(S)
        train(model, xtr, ytr, steps=S.train_steps, batch=S.train_batch, lr=S.lr, time_limit_s=S.train_time_limit_s,
              threads=S.train_threads)
        rows = measure_methods(model, xte, yte, keeps=S.keeps, batch=S.bench_batch, repeat=S.repeat, device=device)
        return rows + count_rows(S, device) + kv_rows(S)


def count_rows(S, device: torch.device) -> list[dict]:
    """The counting task (``"task": "count"``): train a keep-all model on it, then every one-shot
    and per-layer method at every budget: accuracy, FLOPs and batch-64 latency (interleaved)."""
    (xtr, ytr), (xte, yte, _) = count_datasets(S)
    model = build_model(S, seed=0).to(device)
    train(model, xtr, ytr, steps=S.count_steps, batch=S.train_batch, lr=S.lr,
          time_limit_s=S.train_time_limit_s, progress=False, threads=S.train_threads)
    rows = count_sweep(model, xte.to(device), yte.to(device), keeps=S.count_keeps)
    rows = count_latency(model, xte, rows, batch=S.bench_batch, repeat=S.repeat, device=device)
    for r in rows:
        r.pop("option", None)  # its value is in "setting"
    return rows


def gpu_suite(device: torch.device, S) -> list[dict]:
    """Token-compression latency at GPU-profile page sizes (random-init model: latency only).

    About a minute on an H100: every reducer at keep 1/0.5/0.25, batch 1 and 64, fp32, plus the
    token-count sweep of the blocks.  Accuracy is not measured (the model is untrained), and the
    adaptive TCC budget on an untrained model's keys is not the trained one's: read its latency at
    the kept fraction it reports.
    """
    images, labels = make_documents(S.bench_batch, 7, size=S.page, glyph_px=S.glyph_px, grid=S.patch)
    model = build_model(S).to(device).eval()
    images = images.to(device)
    rows = []
    for method in REDUCERS:
        for keep in ((1.0,) if method == "keep_all" else (0.5, 0.25)):
            fn = method_fn(method, keep)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                _, info = model(images, fn, generator=gen, return_info=True)
                r1 = benchmark(lambda: model(images[:1], fn, generator=gen),
                               warmup=3, repeat=S.repeat, device=device)
                r64 = benchmark(lambda: model(images, fn, buckets=4, generator=gen),
                                warmup=3, repeat=S.repeat, device=device)
            rows.append({"method": method, "keep": keep, "n_patches": model.n_patches,
                         "mean_tokens_kept_frac": float(info["n_kept"].float().mean()) / model.n_patches,
                         "ms_batch1": r1.median_ms, "ms_batch64": r64.median_ms,
                         "gflops": model.flops(float(info["n_kept"].float().mean())) / 1e9,
                         "batch": int(images.shape[0])})
    for r in token_cost(S.dim, S.heads, S.depth, S.cost_tokens, batch=S.bench_batch, repeat=S.repeat, device=device):
        rows.append({"method": "blocks", **r})
    return rows
