"""Exercise checks of the chapter "Dataset distillation with characteristic functions"."""

from __future__ import annotations

import functools

import torch

from effdl.checks import assert_close, exercise_check, observe, require, same, when_solved  # noqa: F401

__all__ = ["check_amplitude_phase", "check_paired_cf_loss", "check_herding", "check_minmax_step",
           "check_unroll_bytes_per_step"]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_amplitude_phase": ["effdl.distill.cf.cf_terms"],
    "check_paired_cf_loss": ["effdl.distill.cf.cf_discrepancy", "effdl.distill.cf.paired_cf",
                             "effdl.distill.cf.cf_terms", "effdl.distill.cf.empirical_cf",
                             "effdl.distill.cf._PairedCF"],
    "check_herding": ["effdl.distill.baselines.herding_indices"],
    "check_minmax_step": ["effdl.distill.ncfm.sampler_ascent_step"],
    "check_unroll_bytes_per_step": ["effdl.distill.unroll.bytes_per_inner_step"],
}

# irregular shapes: (n_real, n_syn, dim, n_freq)
_SHAPES = [(7, 1, 5, 3), (64, 10, 33, 17), (13, 4, 1, 129), (100, 3, 128, 64)]


def _feats(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


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


_MATMULS = {"matmul", "mm", "bmm", "mv", "einsum", "linear", "inner", "tensordot", "addmm", "baddbmm",
            "__matmul__", "__rmatmul__"}


def _paired_trial(paired_cf_loss, f_real, f_syn, t) -> dict:
    """Driver (runs where the student's code lives): one call of ``paired_cf_loss`` on a fresh leaf
    ``f_syn``, the torch calls it made counted (matrix products, cos, sin, complex exp), then the
    gradient of the answer w.r.t. ``f_syn``.  Returns the answer, that gradient and the counts."""
    import torch
    from torch.overrides import TorchFunctionMode

    counts = {"matmul": 0, "cos": 0, "sin": 0, "exp": 0}

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "").rstrip("_") or getattr(func, "__name__", "")
            if name in _MATMULS or getattr(func, "__name__", "") in _MATMULS:
                counts["matmul"] += 1
            elif name in ("cos", "sin"):
                counts[name] += 1
            elif name == "exp" and any(torch.is_tensor(a) and a.is_complex() for a in args):
                counts["exp"] += 1
            return func(*args, **(kwargs or {}))

    f_syn = f_syn.detach().clone().requires_grad_(True)
    with Count():
        out = paired_cf_loss(f_real, f_syn, t)
    grad = None
    if torch.is_tensor(out) and out.requires_grad:
        grad = torch.autograd.grad(out.sum(), f_syn, allow_unused=True)[0]
    return {"out": out.detach() if torch.is_tensor(out) else out, "grad": grad, "counts": counts}


def _cf_parts(fr, fs, t, conj=False):
    """(re_r, im_r, re_s, im_s) of the two empirical CFs; ``conj``: the synthetic one conjugated."""
    p_r, p_s = fr @ t.T, fs @ t.T
    sign = -1.0 if conj else 1.0
    return p_r.cos().mean(0), p_r.sin().mean(0), p_s.cos().mean(0), sign * p_s.sin().mean(0)


@exercise_check(student="paired_cf_loss")
def check_paired_cf_loss(paired_cf_loss) -> None:
    """``paired_cf_loss(f_real, f_syn, t) -> scalar``: NCFM's loss (α = β = ½) from one matmul and one
    cos/sin pass; values and gradients w.r.t. ``f_syn`` as ``cf_discrepancy``'s."""
    from effdl.distill.cf import cf_discrepancy

    for i, (n, k, d, m) in enumerate(_SHAPES):
        fr, fs, t = _feats(n, d, i), _feats(k, d, 50 + i, shift=0.5), _feats(m, d, 100 + i) * 0.3
        what = f"f_real {tuple(fr.shape)}, f_syn {tuple(fs.shape)}, t {tuple(t.shape)}"
        seen = observe(paired_cf_loss, _paired_trial, fr, fs, t)
        out, counts = seen["out"], seen["counts"]
        require(out is not None, "your function returned None (did you forget `return`?)")
        require(torch.is_tensor(out) and out.numel() == 1,
                f"{what}: return the loss as a scalar tensor, got "
                f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
        fs_ref = fs.clone().requires_grad_(True)
        ref = cf_discrepancy(fr, fs_ref, t)
        (g_ref,) = torch.autograd.grad(ref, fs_ref)

        def hint():
            rr, ir, rs, is_ = _cf_parts(fr, fs, t)
            d2 = (rr - rs) ** 2 + (ir - is_) ** 2             # |Φ_r − Φ_s|² per frequency
            c = _cf_parts(fr, fs, t, conj=True)
            known = [(((c[0] - c[2]) ** 2 + (c[1] - c[3]) ** 2).div(2).sqrt().mean(),
                      "the synthetic CF is conjugated: both are mean(cos) + i·mean(sin), the same sign"),
                     ((d2 / 2).mean(), "no square root: the loss is the mean over frequencies of "
                      "sqrt(½·amplitude + ½·phase), one root per frequency"),
                     ((d2 / 2).mean().sqrt(), "the root of the mean: take one root per frequency, "
                      "then the mean"),
                     ((d2 / 2).sqrt().sum(), "a sum over the frequencies: take the mean"),
                     (d2.sqrt().mean(), "amplitude + phase without the weights α = β = ½")]
            return next((h for w, h in known if same(out.reshape(()), w, rtol=1e-6, atol=1e-9)), "")

        assert_close(out.reshape(()), ref.detach(), what=f"the loss, {what}", rtol=1e-6, atol=1e-9,
                     hint=hint)
        require(counts["matmul"] == 1,
                f"{what}: your function made {counts['matmul']} matrix products; compute every phase "
                "⟨t_k, f_j⟩ of the real AND the synthetic rows with one (stack the rows first)")
        require(counts["cos"] <= 1 and counts["sin"] <= 1 and counts["cos"] + counts["exp"] >= 1,
                f"{what}: cos called {counts['cos']}×, sin {counts['sin']}×: call each once, on the "
                "stacked phases (or one complex exp)")
        grad = seen["grad"]
        require(grad is not None and float(grad.abs().sum()) > 0,
                f"{what}: no gradient reached f_syn — was it detached (or the loss built with "
                ".item()/no_grad)? The images learn through this loss")
        assert_close(grad, g_ref, what=f"gradient w.r.t. f_syn {tuple(fs.shape)}, {what}", rtol=1e-5,
                     atol=1e-9)


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


# configs of the unroll check: (width, classes, images per class, image side); the first has
# more weights than saved activations, the second the reverse
_UNROLL_CONFIGS = [(64, 2, 1, 8), (40, 3, 2, 12)]


@functools.cache
def _unroll_measured(config: tuple) -> dict:
    """Measured: peak bytes of one outer iteration at K = 2 and K = 6, their slope per inner
    step, the parameter shapes and the saved elements of one inner step (CPU, float32)."""
    from effdl.distill.unroll import UnrollStepper, saved_elems_per_step
    from effdl.measure import peak_memory

    width, classes, ipc, side = config
    g = torch.Generator().manual_seed(0)
    x = torch.rand(classes * 4, 1, side, side, generator=g)
    y = torch.arange(classes).repeat_interleave(4)
    peaks = {}
    for k in (2, 6):
        st = UnrollStepper(x, y, ipc, k, width=width, real_per_class=4)
        st.step()
        peaks[k] = peak_memory(st.step, "cpu")
    return {"slope": (peaks[6] - peaks[2]) / 4, "shapes": st.param_shapes,
            "saved": saved_elems_per_step(st)}


@exercise_check(student="unroll_bytes_per_step")
def check_unroll_bytes_per_step(unroll_bytes_per_step) -> None:
    """``unroll_bytes_per_step(param_shapes, saved_elems, element_size) -> bytes``: within 10% of the
    measured growth of unroll-K's peak memory per inner step."""
    import math

    for config in _UNROLL_CONFIGS:
        meas = _unroll_measured(config)
        shapes, saved = meas["shapes"], meas["saved"]
        got = unroll_bytes_per_step([list(s) for s in shapes], saved, 4)
        require(isinstance(got, (int, float)) or (torch.is_tensor(got) and got.numel() == 1),
                f"return a number of bytes, got {type(got).__name__}")
        got = float(got)
        n_params = sum(math.prod(s) for s in shapes)
        known = [(4 * saved, "the weights θ_j of every step are missing: each step makes a new copy"),
                 (4 * n_params, "the saved activations are missing: each step's forward and its "
                  "create_graph backward save tensors for the outer backward"),
                 (n_params + saved, "elements, not bytes: multiply by element_size"),
                 (4 * (2 * n_params + saved), "the gradient ∇ℓ(θ_j) counted too: nothing keeps it once "
                  "θ_{j+1} is formed"),
                 (4 * (sum(sum(s) for s in shapes) + saved), "a tensor of shape (a, b, c) has a·b·c "
                  "elements, not a + b + c")]
        hint = next((h for w, h in known if math.isclose(got, w, rel_tol=1e-9)), "")
        width, classes, ipc, side = config
        err = abs(got - meas["slope"]) / meas["slope"]
        require(err <= 0.10,
                f"ConvNet-3 width {width}, {classes * ipc} synthetic {side}×{side} images: you predict "
                f"{got:.0f} bytes per inner step, the measured peak grows by {meas['slope']:.0f} per "
                f"step ({100 * err:.0f}% off, tolerance 10%)" + (f"; {hint}" if hint else ""))
