"""Exercise checks of the chapter "Dataset distillation with characteristic functions"."""

from __future__ import annotations

import torch

from effdl.checks import assert_close, exercise_check, observe, require, same, when_solved  # noqa: F401

__all__ = ["check_empirical_cf", "check_amplitude_phase", "check_mean_embedding_mmd", "check_herding",
           "check_minmax_step"]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_empirical_cf": ["effdl.distill.cf.empirical_cf", "effdl.distill.cf.paired_cf"],
    "check_amplitude_phase": ["effdl.distill.cf.cf_terms"],
    "check_mean_embedding_mmd": ["effdl.distill.dm.mean_embedding_mmd", "effdl.distill.dm.dm_loss"],
    "check_herding": ["effdl.distill.baselines.herding_indices"],
    "check_minmax_step": ["effdl.distill.ncfm.sampler_ascent_step"],
}

# irregular shapes: (n_real, n_syn, dim, n_freq)
_SHAPES = [(7, 1, 5, 3), (64, 10, 33, 17), (13, 4, 1, 129), (100, 3, 128, 64)]


def _feats(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


@exercise_check(student="empirical_cf")
def check_empirical_cf(empirical_cf) -> None:
    """``empirical_cf(f, t) -> (real, imag)``, each (m,): the mean of exp(i⟨t, f_j⟩) over rows j."""
    from effdl.distill.cf import empirical_cf as ref

    for i, (n, _, d, m) in enumerate(_SHAPES):
        f, t = _feats(n, d, i), _feats(m, d, 100 + i) * 0.3
        out = empirical_cf(f, t)
        require(isinstance(out, (tuple, list)) and len(out) == 2,
                f"return a pair (real part, imaginary part), got {type(out).__name__}")
        re, im = ref(f, t)
        phase = t @ f.T

        def hint():
            known = [((im, re), "real and imaginary parts are swapped: (mean cos, mean sin)"),
                     ((re * n, im * n), "a sum over the rows: take the mean"),
                     ((re, -im), "the imaginary part has the wrong sign: e^{+i⟨t, f⟩} = cos + i·sin"),
                     ((phase.cos().mean(0), phase.sin().mean(0)),
                      "averaged over the frequencies: average over the feature rows, one value per frequency")]
            return next((h for wrong, h in known if same(tuple(out), wrong)), "")

        what = f"f {tuple(f.shape)}, t {tuple(t.shape)}"
        assert_close(out[0], re, what=f"real part (m,) = ({m},), {what}", rtol=1e-6, atol=1e-8, hint=hint)
        assert_close(out[1], im, what=f"imaginary part (m,) = ({m},), {what}", rtol=1e-6, atol=1e-8, hint=hint)


@exercise_check(student="amplitude_phase")
def check_amplitude_phase(amplitude_phase) -> None:
    """``amplitude_phase(f_real, f_syn, t) -> (amplitude, phase)``, each (m,); they sum to |Φ_r − Φ_s|²."""
    from effdl.distill.cf import cf_terms

    for i, (n, k, d, m) in enumerate(_SHAPES):
        fr, fs, t = _feats(n, d, i), _feats(k, d, 50 + i, shift=0.5), _feats(m, d, 100 + i) * 0.3
        out = amplitude_phase(fr, fs, t)
        require(isinstance(out, (tuple, list)) and len(out) == 2, "return a pair (amplitude, phase)")
        amp, ph = cf_terms(fr, fs, t)
        what = f"f_real {tuple(fr.shape)}, f_syn {tuple(fs.shape)}, t {tuple(t.shape)}"

        def hint():
            from effdl.distill.cf import empirical_cf

            (rr, ir), (rs, is_) = empirical_cf(fr, t), empirical_cf(fs, t)
            known = [((ph, amp), "the two terms are swapped: return (amplitude, phase)"),
                     ((amp, ph / 2), "the phase term needs the factor 2: 2|Φ_r||Φ_s|(1 - cos(θ_r - θ_s))"),
                     (((rr**2 + ir**2) - (rs**2 + is_**2)) ** 2,
                      "the amplitude term compares the moduli |Φ| (square roots), not |Φ|²")]
            for wrong, h in known:
                if same(tuple(out) if isinstance(wrong, tuple) else out[0], wrong, rtol=1e-5, atol=1e-7):
                    return h
            return ""

        assert_close(out[0], amp, what=f"amplitude term (m,), {what}", rtol=1e-5, atol=1e-7, hint=hint)
        assert_close(out[1], ph, what=f"phase term (m,), {what}", rtol=1e-5, atol=1e-7, hint=hint)


@exercise_check(student="mean_embedding_mmd")
def check_mean_embedding_mmd(mean_embedding_mmd) -> None:
    """``mean_embedding_mmd(f_real, f_syn) -> scalar``: ‖mean f_real − mean f_syn‖²."""
    from effdl.distill.dm import mean_embedding_mmd as ref

    for i, (n, k, d, _) in enumerate(_SHAPES):
        fr, fs = _feats(n, d, i), _feats(k, d, 50 + i, shift=0.3)
        got = mean_embedding_mmd(fr, fs)
        require(got is not None, "your function returned None (did you forget `return`?)")
        require(torch.as_tensor(got).numel() == 1,
                f"return a scalar, got shape {tuple(torch.as_tensor(got).shape)} (sum the squared differences)")
        diff = fr.mean(0) - fs.mean(0)
        known = [(diff.norm(), "that is the distance; DM's loss is its square"),
                 ((diff ** 2).mean(), "a mean over the features: sum the squared differences"),
                 (((fr.sum(0) - fs.sum(0)) ** 2).sum(), "sums of the rows: compare the mean rows"),
                 (((fr[:, None] - fs[None]) ** 2).sum(-1).mean(), "the mean distance of all pairs is not the "
                  "distance of the means")]
        assert_close(torch.as_tensor(got).reshape(()), ref(fr, fs),
                     what=f"MMD² of f_real {tuple(fr.shape)} and f_syn {tuple(fs.shape)} (a scalar)", rtol=1e-6,
                     hint=lambda: next((h for w, h in known if same(torch.as_tensor(got).reshape(()), w)), ""))
    f = _feats(9, 4, 7)
    assert_close(torch.as_tensor(mean_embedding_mmd(f, f)).reshape(()), torch.tensor(0.0, dtype=torch.float64),
                 what="MMD² of a set with itself", atol=1e-10)


@exercise_check(student="herding_indices")
def check_herding(herding_indices) -> None:
    """``herding_indices(features, k) -> (k,) long``: greedy picks whose running mean tracks the mean."""
    from effdl.distill.baselines import herding_indices as ref

    for i, (n, d, k) in enumerate([(10, 3, 1), (37, 5, 4), (120, 16, 10), (6, 2, 6)]):
        f = _feats(n, d, i)
        got = herding_indices(f, k)
        require(torch.is_tensor(got), f"return a tensor of indices (torch.long), got {type(got).__name__}")
        expected = ref(f, k)
        require(got.shape == expected.shape, f"n={n}, k={k}: expected {k} indices, got shape {tuple(got.shape)}")
        require(got.dtype == torch.long, f"return the indices as torch.long (int64), got {got.dtype}")
        hint = ""
        if len(set(got.tolist())) < k:
            hint = "; a row was picked twice: give the picked rows an infinite distance"
        elif torch.equal(got, ((f - f.mean(0)) ** 2).sum(1).argsort()[:k]):
            hint = ("; those are the rows nearest the mean one by one: herding picks the row that brings the "
                    "mean of the picked rows closest")
        require(torch.equal(got, expected),
                f"n={n}, d={d}, k={k}: picked {got.tolist()}, expected {expected.tolist()} "
                "(at step j choose the row that brings the mean of the j+1 picked rows closest to the "
                "mean of all rows; never pick a row twice)" + hint)


def _minmax_trial(minmax_step, config: dict, state: dict, f_real, f_syn, seed: int) -> dict:
    """Driver (runs where the student's code lives): a sampler built from ``config`` and ``state``,
    its SGD optimizer, one call of ``minmax_step`` after ``torch.manual_seed(seed)``.  Returns the
    answer and what the step did: the sampler's parameters and gradient norm, the features' gradient."""
    import torch

    from effdl.distill.ncfm import FrequencySampler, grad_norm

    sampler = FrequencySampler(**config)
    sampler.load_state_dict(state)
    opt = torch.optim.SGD(sampler.parameters(), lr=0.05)
    f_syn = f_syn.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = minmax_step(sampler, opt, f_real, f_syn)
    return {"out": out, "grad_norm": grad_norm(sampler), "syn_grad": f_syn.grad,
            "params": {name: p.detach() for name, p in sampler.named_parameters()}}


@exercise_check(student="minmax_step")
def check_minmax_step(minmax_step) -> None:
    """``minmax_step(sampler, optimizer, f_real, f_syn) -> (before, after)``: one correct ascent step."""
    from effdl.distill.ncfm import FrequencySampler, sampler_ascent_step

    for i, (n, k, d, m) in enumerate(_SHAPES[:3]):
        fr = _feats(n, d, i).float()
        fs = _feats(k, d, 50 + i, shift=0.5).float()
        torch.manual_seed(i)
        config = {"dim": d, "n_freq": m, "sigma": 1.0 / d ** 0.5}
        ref_sampler = FrequencySampler(**config)
        state = {name: t.detach().clone() for name, t in ref_sampler.state_dict().items()}
        seen = observe(minmax_step, _minmax_trial, config, state, fr, fs, 1000 + i)
        ref_opt = torch.optim.SGD(ref_sampler.parameters(), lr=0.05)
        torch.manual_seed(1000 + i)
        ref_before, ref_after = sampler_ascent_step(ref_sampler, ref_opt, fr, fs.requires_grad_(True))
        out = seen["out"]
        require(isinstance(out, (tuple, list)) and len(out) == 2 and all(
            isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1) for v in out),
                f"return (before, after) as two floats, got {out!r}")
        require(seen["grad_norm"] > 0, "the sampler's gradient is zero: did backward(loss) and "
                "backward(-loss) cancel? (the official code's bug)")
        syn_grad = seen["syn_grad"]
        require(syn_grad is None or float(torch.as_tensor(syn_grad).abs().sum()) == 0.0,
                "the sampler step wrote a gradient into the synthetic features: detach them first")
        params = seen["params"]
        down = ("; the discrepancy went down: a descent step? the sampler ascends (step on the gradient "
                "of -discrepancy)") if float(out[1]) < float(out[0]) else ""
        for name, q in ref_sampler.named_parameters():
            require(name in params, f"the sampler lost its parameter {name}")
            assert_close(params[name], q.detach(), what=f"sampler parameter {name} after your step "
                         "(ascent = minimize −discrepancy; use sampler(noise) with noise = sampler.draw_noise())",
                         rtol=1e-4, atol=1e-6, hint=down[2:])
        assert_close(float(out[0]), ref_before, what="'before' discrepancy", rtol=1e-4, atol=1e-6)
        assert_close(float(out[1]), ref_after, what="'after' discrepancy (same noise as before)", rtol=1e-4, atol=1e-6,
                     hint="evaluate 'after' with the same noise as 'before': draw it once")
        require(float(out[1]) > float(out[0]), f"the step did not increase the discrepancy: {tuple(out)}")
