"""Unrolled bi-level matching (effdl.distill.unroll): its loss, its gradient, and a peak memory that
grows with the number of unrolled steps K while DM/CF/NCFM's one matching step does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effdl.distill import unroll
from effdl.distill.matching import FeaturePool
from effdl.measure import peak_memory, torch_threads
from effdl.profile import sizes


def _data(classes=3, per_class=6, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(classes * per_class, 1, side, side, generator=g)
    return x, torch.arange(classes).repeat_interleave(per_class)


def test_zero_steps_is_the_normalized_start_distance_and_k_steps_reach_the_pixels():
    """K = 0: θ_K = θ₀, so the normalized loss is exactly 1 and does not depend on the images; K = 2:
    a finite, nonzero gradient reaches every synthetic image (the create_graph chain is intact)."""
    x, y = _data()
    st = unroll.UnrollStepper(x, y, ipc=2, k=2, width=8, real_per_class=4)
    start = {n: p.clone() for n, p in st.start.items()}
    loss0 = unroll.unrolled_loss(st.net, st.x_syn, st.y_syn, start, st.expert, 0, st.lr_inner)
    assert float(loss0.detach()) == pytest.approx(1.0, rel=1e-6)
    start = {n: p.clone() for n, p in st.start.items()}
    loss = unroll.unrolled_loss(st.net, st.x_syn, st.y_syn, start, st.expert, 2, st.lr_inner)
    (g,) = torch.autograd.grad(loss, st.x_syn)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()


def test_gradient_matches_finite_differences_in_float64():
    """The outer gradient through two unrolled SGD steps is the derivative of the loss (central
    differences, float64, a few random pixels)."""
    x, y = _data(classes=2, per_class=3)
    st = unroll.UnrollStepper(x, y, ipc=1, k=2, width=4, real_per_class=3, lr_inner=0.1)
    st.net.double()
    st.start = {n: p.double() for n, p in st.start.items()}
    st.expert = {n: p.double() for n, p in st.expert.items()}
    xs = st.x_syn.detach().double().requires_grad_(True)

    def f(v):
        start = {n: p.clone() for n, p in st.start.items()}
        return unroll.unrolled_loss(st.net, v, st.y_syn, start, st.expert, 2, st.lr_inner)

    (g,) = torch.autograd.grad(f(xs), xs)
    gen = torch.Generator().manual_seed(1)
    for i in torch.randint(xs.numel(), (4,), generator=gen).tolist():
        e = torch.zeros_like(xs).flatten()
        e[i] = 1e-6
        e = e.view_as(xs)
        fd = (f(xs.detach() + e) - f(xs.detach() - e)) / 2e-6
        assert float(fd.detach()) == pytest.approx(float(g.flatten()[i]), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("width, classes, ipc, side", [(24, 2, 1, 8), (12, 3, 3, 12)])
def test_peak_grows_by_one_step_of_weights_and_saved_tensors(width, classes, ipc, side):
    """Peak(K) is affine in K and each step adds its new weights plus what autograd saved for it
    (``bytes_per_inner_step``), within 10%."""
    x, y = _data(classes, 6, side)
    peaks, st = {}, None
    with torch_threads(1):
        for k in (2, 4, 6):
            st = unroll.UnrollStepper(x, y, ipc, k, width=width, real_per_class=4)
            st.step()
            peaks[k] = peak_memory(st.step, "cpu")
    s1, s2 = (peaks[4] - peaks[2]) / 2, (peaks[6] - peaks[4]) / 2
    assert s1 > 0 and s2 == pytest.approx(s1, rel=0.05)          # linear in K
    model = unroll.bytes_per_inner_step(st.param_shapes, unroll.saved_elems_per_step(st))
    assert model == pytest.approx((s1 + s2) / 2, rel=0.10)


def test_sweep_rows_unroll_grows_matching_is_flat():
    """memory_sweep at smoke sizes: a row per (method, K); DM/CF/NCFM flat in K; unroll-K rising,
    and at the largest K at least 10x NCFM's peak (the chapter's comparison)."""
    S = sizes("distill", "smoke")
    x, y = _data(classes=10, per_class=20)
    pool = FeaturePool(x, y, 2, S.width, seed=0, cache_real=S.cache_real)
    ks = (1, 4, 8)
    with torch_threads(1):
        rows = unroll.memory_sweep(x, y, 1, ks, "cpu", pool=pool, S=S, width=S.width,
                                   real_per_class=S.real_per_class)
    assert {(r["method"], r["unroll"]) for r in rows} == {
        (m, k) for m in ("unroll", "dm", "cfd", "ncfm") for k in ks}
    peak = {(r["method"], r["unroll"]): r["peak_mem_bytes"] for r in rows}
    for m in ("dm", "cfd", "ncfm"):
        assert len({peak[m, k] for k in ks}) == 1
    assert peak["unroll", 1] < peak["unroll", 4] < peak["unroll", 8]
    assert peak["unroll", 8] >= 10 * peak["ncfm", 8]


def test_bench_unroll_rows_are_marked_and_complete():
    """bench.run's extra rows (the sweep at the first IPC), at smoke sizes shrunk further."""
    from effdl.distill import bench

    S = dataclasses.replace(sizes("distill", "smoke"), width=4, real_per_class=4, n_freq=8)
    with torch_threads(1):
        rows = bench._unroll_rows(S, torch.device("cpu"))
    assert rows and all(r["sweep"] == "unroll_memory" and r["peak_mem_bytes"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"unroll", "dm", "cfd", "ncfm"}


def test_bench_run_carries_the_unroll_sweep(smoke_bench_rows):
    """bench.run at smoke sizes: the DC rows of the first IPC carry the sweep; the other rows don't."""
    S = sizes("distill", "smoke")
    rows = smoke_bench_rows("distill")[0]
    carriers = [r for r in rows if "unroll_memory" in r]
    assert carriers and all(r["method"] == "dc" and r["ipc"] == S.ipcs[0] for r in carriers)
    sweep = carriers[0]["unroll_memory"]
    ks = sorted({r["unroll"] for r in sweep})
    peak = {(r["method"], r["unroll"]): r["peak_mem_bytes"] for r in sweep}
    assert {m for m, _ in peak} == {"unroll", "dm", "cfd", "ncfm"}
    assert peak["unroll", ks[-1]] > peak["unroll", ks[0]] > 0
