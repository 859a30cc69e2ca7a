"""Tests of effdl.distill: CF discrepancy, the NCFM sampler, the methods' contracts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effdl.distill as dd
from effdl.distill.baselines import herding_indices
from effdl.distill.dc import gradient_distance
from effdl.distill.dm import dm_loss, mean_embedding_mmd
from effdl.measure import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test here runs with one torch thread, restored afterwards.  Why: on 8×8 digits every
    convolution is microseconds of work, so a second thread only waits at barriers; on a shared
    2-core machine that made one test of this file 110 s instead of about 10 (the chapter's own
    sizes use ``cpu_threads=1`` for the same reason)."""
    with torch_threads(1):
        yield


def feats(n, d, seed, shift=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) + shift


def plain_per_freq(fr, fs, t):
    """Reference: |Φ_r(t) − Φ_s(t)|² with complex exponentials (no amplitude/phase split)."""
    cr = torch.exp(1j * (fr @ t.T)).mean(0)
    cs = torch.exp(1j * (fs @ t.T)).mean(0)
    return (cr - cs).abs() ** 2


# ---------------------------------------------------------------- characteristic functions

@pytest.mark.parametrize("n,k,d,m", [(7, 1, 5, 3), (64, 10, 33, 17), (13, 4, 1, 129), (97, 3, 111, 59)])
def test_cf_self_zero_and_symmetric(n, k, d, m):
    fr, fs, t = feats(n, d, 0), feats(k, d, 1, 0.3), feats(m, d, 2) * 0.5
    assert float(dd.cf_discrepancy(fr, fr, t)) == pytest.approx(0.0, abs=1e-6)
    a, b = dd.cf_discrepancy(fr, fs, t), dd.cf_discrepancy(fs, fr, t)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_cf_larger_for_shifted_distributions():
    fr, t = feats(200, 16, 0), feats(256, 16, 5) * 0.5
    near, far = feats(200, 16, 1, 0.1), feats(200, 16, 1, 1.5)
    assert dd.cf_discrepancy(fr, far, t) > dd.cf_discrepancy(fr, near, t) > 0


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 12), d=st.integers(1, 20), m=st.integers(1, 30),
       scale=st.floats(0.01, 3.0), seed=st.integers(0, 1000))
def test_amplitude_plus_phase_is_squared_difference(n, k, d, m, scale, seed):
    """With α = β = ½ the per-frequency term equals ½|Φ_r − Φ_s|² (amp + phase = |Φ_r − Φ_s|²)."""
    fr, fs, t = feats(n, d, seed), feats(k, d, seed + 1, 0.2), feats(m, d, seed + 2) * scale
    amp, ph = dd.cf_terms(fr, fs, t)
    ref = plain_per_freq(fr, fs, t)
    assert torch.allclose(0.5 * amp + 0.5 * ph, 0.5 * ref, atol=1e-5)
    # the scalar discrepancy is the mean of sqrt of those terms
    expected = (0.5 * ref).sqrt().mean()
    assert float(dd.cf_discrepancy(fr, fs, t)) == pytest.approx(float(expected), abs=2e-4)


@pytest.mark.parametrize("n,k,d,m", [(64, 1, 128, 256), (33, 10, 59, 97)])
def test_cf_fp32_error_within_2x_of_plain_fp32(n, k, d, m):
    """flash-attention's rule: fp32 error vs an fp64 reference ≤ 2× the plain fp32 implementation's."""
    fr, fs, t = feats(n, d, 0), feats(k, d, 1, 0.3), feats(m, d, 2) / d ** 0.5
    ref = (0.5 * plain_per_freq(fr, fs, t)).sqrt().mean()
    ours = dd.cf_discrepancy(fr.float(), fs.float(), t.float()).double()
    cr = torch.exp(1j * (fr.float() @ t.float().T)).mean(0)
    cs = torch.exp(1j * (fs.float() @ t.float().T)).mean(0)
    plain = (0.5 * (cr - cs).abs() ** 2).sqrt().mean().double()
    assert abs(ours - ref) <= 2 * abs(plain - ref) + 1e-6


def test_batched_cf_is_sum_of_per_class():
    fr, fs, t = feats(30, 8, 0).reshape(3, 10, 8), feats(6, 8, 1).reshape(3, 2, 8), feats(20, 8, 2)
    per_class = sum(dd.cf_discrepancy(fr[c], fs[c], t) for c in range(3))
    assert torch.allclose(dd.cf_discrepancy(fr, fs, t), per_class)
    assert torch.allclose(dm_loss(fr, fs), sum(mean_embedding_mmd(fr[c], fs[c]) for c in range(3)))


@pytest.mark.parametrize("real,syn,m", [((7, 5), (1, 5), 3), ((3, 11, 4), (3, 2, 4), 6), ((2, 1, 3), (2, 5, 3), 1)])
def test_paired_cf_matches_two_empirical_cfs_values_and_gradients(real, syn, m):
    """The fused CF pair (one matmul, cos/sin reused by the backward) = two plain empirical_cf calls."""
    g = torch.Generator().manual_seed(sum(real) + m)
    fr = torch.randn(*real, generator=g, dtype=torch.float64, requires_grad=True)
    fs = torch.randn(*syn, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(m, real[-1], generator=g, dtype=torch.float64, requires_grad=True)
    fused = dd.paired_cf(fr, fs, t)
    plain = (*dd.empirical_cf(fr, t), *dd.empirical_cf(fs, t))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(dd.paired_cf, (fr, fs, t))
    w = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in plain]
    g_fused = torch.autograd.grad(sum((v * c).sum() for v, c in zip(fused, w)), (fr, fs, t))
    g_plain = torch.autograd.grad(sum((v * c).sum() for v, c in zip(plain, w)), (fr, fs, t))
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b)


def test_gaussian_frequencies_match_gaussian_mmd():
    fr, fs = feats(50, 6, 0), feats(40, 6, 1, 0.5)
    g = torch.Generator().manual_seed(0)
    t = dd.gaussian_frequencies(200_000, 6, 0.7, generator=g).double()
    amp, ph = dd.cf_terms(fr, fs, t)
    assert float((amp + ph).mean()) == pytest.approx(float(dd.gaussian_mmd2(fr, fs, 0.7)), rel=0.03)


def test_cf_bad_input():
    with pytest.raises(ValueError, match="feature dims"):
        dd.cf_discrepancy(feats(4, 3, 0), feats(2, 3, 1), feats(5, 4, 2))
    with pytest.raises(ValueError, match="3-D tensor"):
        dd.cf_discrepancy(feats(4, 3, 0)[0], feats(2, 3, 1), feats(5, 3, 2))
    with pytest.raises(ValueError, match="alpha"):
        dd.cf_discrepancy(feats(4, 3, 0), feats(2, 3, 1), feats(5, 3, 2), alpha=-1)


# ---------------------------------------------------------------- NCFM sampler

def test_sampler_shape_and_bad_input():
    s = dd.FrequencySampler(dim=13, n_freq=7)
    assert s().shape == (7, 13)
    noise = s.draw_noise(torch.Generator().manual_seed(0))
    assert torch.equal(s(noise), s(noise))
    with pytest.raises(ValueError):
        dd.FrequencySampler(dim=0, n_freq=4)


@pytest.mark.parametrize("d,m", [(5, 3), (33, 64), (128, 256)])
def test_sampler_ascent_increases_discrepancy_with_nonzero_gradient(d, m):
    """Regression test for the official code's bug: backward(loss) then backward(−loss) cancels the
    sampler's gradient, so the sampler never learns."""
    torch.manual_seed(0)
    fr, fs = feats(64, d, 0).float(), feats(3, d, 1, 0.4).float().requires_grad_(True)
    s = dd.FrequencySampler(d, m, sigma=1 / d ** 0.5)
    opt = torch.optim.Adam(s.parameters(), lr=0.02)
    before, after = dd.sampler_ascent_step(s, opt, fr, fs)
    assert dd.grad_norm(s) > 0
    assert after > before
    assert fs.grad is None                      # the sampler's step does not touch the images
    for _ in range(20):
        dd.sampler_ascent_step(s, opt, fr, fs)
    noise = s.draw_noise(torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    fresh = dd.FrequencySampler(d, m, sigma=1 / d ** 0.5)  # the initial sampler again
    assert dd.cf_discrepancy(fr, fs.detach(), s(noise)) > dd.cf_discrepancy(fr, fs.detach(), fresh(noise))


def test_cancelled_order_has_zero_gradient():
    torch.manual_seed(0)
    fr, fs = feats(32, 9, 0).float(), feats(2, 9, 1, 0.4).float().requires_grad_(True)
    s = dd.FrequencySampler(9, 16)
    params0 = [p.detach().clone() for p in s.parameters()]
    opt = torch.optim.Adam(s.parameters(), lr=0.1)
    before, after = dd.cancelled_sampler_step(s, opt, fr, fs)
    assert dd.grad_norm(s) == 0.0
    assert after == pytest.approx(before)
    assert all(torch.equal(a, b.detach()) for a, b in zip(params0, s.parameters()))


# ---------------------------------------------------------------- baselines, DC

def test_herding_tracks_the_mean_better_than_random():
    f = feats(200, 10, 0)
    idx = herding_indices(f, 5)
    assert len(set(idx.tolist())) == 5
    err_h = (f[idx].mean(0) - f.mean(0)).norm()
    g = torch.Generator().manual_seed(0)
    errs = [(f[torch.randperm(200, generator=g)[:5]].mean(0) - f.mean(0)).norm() for _ in range(50)]
    assert err_h < min(errs)


def test_gradient_distance_zero_for_equal_gradients():
    g = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(10, 7)]
    assert float(gradient_distance(g, g)) == pytest.approx(0.0, abs=1e-5)
    assert float(gradient_distance(g, [-v for v in g])) == pytest.approx(2 * (4 + 10), rel=1e-4)


# ---------------------------------------------------------------- distill / evaluate contracts

@pytest.fixture(scope="module")
def digits():
    from effdl.data import load_images

    tr, te = load_images("digits", "train"), load_images("digits", "test")
    return tr.x, tr.y, te.x, te.y


TINY = {"random": {}, "herding": {"width": 8}, "dc": {"width": 8, "real_per_class": 8},
        "dm": {"width": 8, "pool_size": 2, "real_per_class": 8},
        "cfd": {"width": 8, "pool_size": 2, "real_per_class": 8, "n_freq": 8},
        "ncfm": {"width": 8, "pool_size": 2, "real_per_class": 8, "n_freq": 8}}


@pytest.mark.parametrize("method", dd.METHODS)
@pytest.mark.parametrize("ipc", [1, 3])
def test_distill_shapes_labels_deterministic(digits, method, ipc):
    x, y, _, _ = digits
    xs, ys = dd.distill(x, y, method, ipc, iterations=2, seed=3, **TINY[method])
    assert xs.shape == (10 * ipc, 1, 8, 8) and ys.shape == (10 * ipc,)
    assert torch.equal(torch.bincount(ys), torch.full((10,), ipc))
    xs2, ys2 = dd.distill(x, y, method, ipc, iterations=2, seed=3, **TINY[method])
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    if method not in ("random", "herding"):
        x0, _ = dd.distill(x, y, "random", ipc, 0, seed=3)
        assert not torch.equal(xs, x0)          # the pixels were optimized


def test_distill_bad_input(digits):
    x, y, _, _ = digits
    with pytest.raises(ValueError, match="larger than a class"):
        dd.distill(x, y, "dm", ipc=10_000)
    with pytest.raises(ValueError, match="mismatch"):
        dd.distill(x, y[:-1], "random", ipc=1)
    with pytest.raises(ValueError, match="unknown method"):
        dd.distill(x, y, "mtt", ipc=1)
    with pytest.raises(TypeError, match="no option"):
        dd.distill(x, y, "dm", ipc=1, iterations=1, n_freq=3)
    with pytest.raises(ValueError, match="different shapes"):
        dd.evaluate(x[:10], y[:10], x[:5, :, :4, :4], y[:5])


def test_evaluate_is_deterministic_and_learns(digits):
    x, y, xt, yt = digits
    a = dd.evaluate(x[:200], y[:200], xt, yt, seed=1, epochs=20, width=32, batch_size=32, lr=0.05)
    assert a == dd.evaluate(x[:200], y[:200], xt, yt, seed=1, epochs=20, width=32, batch_size=32, lr=0.05)
    assert a > 30  # well above chance (10 %)


def test_dm_and_ncfm_beat_random_on_a_tiny_problem(digits):
    """IPC 1 on digits, 2 seeds, same iterations for DM and NCFM: both beat the random subset."""
    x, y, xt, yt = digits
    acc = {m: [] for m in ("random", "dm", "ncfm")}
    for seed in (0, 1):
        pool = dd.matching.FeaturePool(x, y, 8, 64, seed)
        for m in acc:
            opts = {} if m == "random" else {"pool": pool, "width": 64, "lr": 0.05, "real_per_class": 64}
            xs, ys = dd.distill(x, y, m, 1, iterations=150, seed=seed, **opts)
            acc[m].append(dd.evaluate(xs, ys, xt, yt, seed=seed, epochs=200, width=64))
    mean = {m: sum(v) / len(v) for m, v in acc.items()}
    assert mean["dm"] > mean["random"] + 3, acc
    assert mean["ncfm"] > mean["random"] + 3, acc

