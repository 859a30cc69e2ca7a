"""Characteristic functions of features and the CF discrepancy that NCFM minimizes.

The empirical characteristic function of features ``f`` (n, d) at frequencies ``t`` (m, d) is
``Φ(t) = mean_j exp(i⟨t, f_j⟩)``: a complex number per frequency, kept here as (real, imag).
Comparing two sets at frequency t splits into an **amplitude** term ``(|Φ_r| − |Φ_s|)²`` (how spread
the sets are) and a **phase** term ``2|Φ_r||Φ_s|(1 − cos(θ_r − θ_s))`` (where they sit); the two add
up to ``|Φ_r − Φ_s|²``.  With ``t ~ N(0, σ²I)`` the mean of ``|Φ_r − Φ_s|²`` over t is the squared
MMD with the Gaussian kernel ``exp(−σ²‖x − y‖²/2)``.  The loss :func:`cf_discrepancy` is not
that MMD: it takes a square root per frequency before averaging; with α = β = ½ it is the mean of
``|Φ_r − Φ_s| / √2``, at most MMD/√2 by Jensen's inequality, and with α ≠ β not a function of
``|Φ_r − Φ_s|`` at all.
"""

from __future__ import annotations

import torch

__all__ = ["empirical_cf", "paired_cf", "cf_terms", "cf_discrepancy", "gaussian_frequencies", "gaussian_mmd2"]

_TINY = 1e-12  # keeps sqrt differentiable where a CF is exactly 0


def _check(f_real: torch.Tensor, f_syn: torch.Tensor, t: torch.Tensor) -> None:
    for name, v, dims in (("f_real", f_real, (2, 3)), ("f_syn", f_syn, (2, 3)), ("t", t, (2,))):
        if not isinstance(v, torch.Tensor) or v.ndim not in dims:
            raise ValueError(f"{name} must be a {' or '.join(map(str, dims))}-D tensor ([classes,] rows, "
                             f"feature dim), got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if f_real.ndim != f_syn.ndim or f_real.shape[:-2] != f_syn.shape[:-2]:
        raise ValueError(f"f_real {tuple(f_real.shape)} and f_syn {tuple(f_syn.shape)} must both be (n, d), "
                         "or both (classes, n, d) with the same number of classes")
    if not (f_real.shape[-1] == f_syn.shape[-1] == t.shape[1]):
        raise ValueError(f"feature dims disagree: f_real {tuple(f_real.shape)}, f_syn {tuple(f_syn.shape)}, "
                         f"t {tuple(t.shape)}; frequencies need one entry per feature")


def empirical_cf(f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``mean_j exp(i⟨t_k, f_j⟩)`` for ``f`` (n, d) and
    ``t`` (m, d): two tensors of shape (m,).  A leading batch axis on ``f``
    (classes, n, d) gives (classes, m)."""
    phase = f @ t.T  # (..., n, m): ⟨t_k, f_j⟩
    return phase.cos().mean(-2), phase.sin().mean(-2)


class _PairedCF(torch.autograd.Function):
    """Both empirical CFs from one matmul and one cos/sin pass, the cos/sin reused by
    the backward.

    Autograd through two ``empirical_cf`` calls runs two matmuls and, in the backward,
    evaluates sin and cos a second time (the derivative of cos is −sin); autograd
    through one stacked matmul would also form a gradient for the real features, which
    nothing needs.  Here the backward is two elementwise products per row group and one
    matmul per input that needs a gradient (``t`` for NCFM's sampler, the synthetic
    features); with fixed frequencies (CF) the real rows are skipped altogether."""

    @staticmethod
    def forward(ctx, f_real, f_syn, t):
        n = f_real.shape[-2]
        f = torch.cat([f_real, f_syn], -2)  # (..., n + k, d)
        phase = f @ t.T  # (..., n + k, m): ONE matmul
        c = phase.cos()
        # in place: the phases are not needed again
        s = phase.sin_()
        out = (
            c[..., :n, :].mean(-2),
            s[..., :n, :].mean(-2),
            c[..., n:, :].mean(-2),
            s[..., n:, :].mean(-2),
        )
        need_real, _, need_t = ctx.needs_input_grad
        # why: with fixed frequencies (CF) the backward never reads the real rows:
        # do not keep them
        ctx.n, ctx.lo = n, 0 if (need_real or need_t) else n
        # a view would pin it all
        keep = (lambda v: v) if ctx.lo == 0 else (lambda v: v[..., n:, :].clone())
        ctx.save_for_backward(keep(f), t, keep(c), keep(s))
        return out

    @staticmethod
    def backward(ctx, g_re_r, g_im_r, g_re_s, g_im_s):
        # rows lo.. of the stacked features
        f, t, c, s = ctx.saved_tensors
        n, lo = ctx.n, ctx.lo
        k = f.shape[-2] + lo - n
        need_real, need_syn, need_t = ctx.needs_input_grad
        # d mean_j cos(p_j) / d p_j = −sin(p_j)/n
        # d mean_j sin(p_j) / d p_j = cos(p_j)/n
        g_phase = torch.empty_like(c)
        groups = (
            [(0, n, g_re_r, g_im_r), (n, n + k, g_re_s, g_im_s)]
            if lo == 0
            else [(n, n + k, g_re_s, g_im_s)]
        )
        for a, b, g_re, g_im in groups:
            rows = slice(a - lo, b - lo)
            out = g_phase[..., rows, :]  # written in place: no concatenation
            torch.mul(c[..., rows, :], (g_im / (b - a)).unsqueeze(-2), out=out)
            out.addcmul_(s[..., rows, :], (g_re / (b - a)).unsqueeze(-2), value=-1)
        m, d = t.shape
        g_t = g_phase.reshape(-1, m).T @ f.reshape(-1, d) if need_t else None
        g_real = g_phase[..., :n, :] @ t if need_real else None
        g_syn = g_phase[..., n - lo:, :] @ t if need_syn else None
        return g_real, g_syn, g_t


def paired_cf(f_real: torch.Tensor, f_syn: torch.Tensor, t: torch.Tensor):
    """``(*empirical_cf(f_real, t), *empirical_cf(f_syn, t))`` in one fused pass (same values and
    gradients, one matmul and one cos/sin pass shared: see :class:`_PairedCF`).  ``f_real`` and
    ``f_syn`` have the same leading (class) axes and feature dim; their row counts may differ."""
    return _PairedCF.apply(f_real, f_syn, t)


def cf_terms(
    f_real: torch.Tensor, f_syn: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency amplitude and phase terms, each (m,) (or (classes, m) for batched
    features); their sum is ``|Φ_r(t) − Φ_s(t)|²``."""
    _check(f_real, f_syn, t)
    # = empirical_cf of each, fused
    re_r, im_r, re_s, im_s = paired_cf(f_real, f_syn, t)
    amp_r = (re_r ** 2 + im_r ** 2 + _TINY).sqrt()
    amp_s = (re_s ** 2 + im_s ** 2 + _TINY).sqrt()
    amplitude = (amp_r - amp_s) ** 2
    # why: |Φ_r||Φ_s|cos(θ_r − θ_s) = Re(Φ_r conj Φ_s) — no atan2, so no undefined
    # angle at Φ = 0
    phase = 2 * (amp_r * amp_s - (re_r * re_s + im_r * im_s))
    return amplitude, phase.clamp_min(0)


def cf_discrepancy(
    f_real: torch.Tensor,
    f_syn: torch.Tensor,
    t: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> torch.Tensor:
    """NCFM's discrepancy: mean over frequencies of ``sqrt(α·amplitude + β·phase)``
    (a scalar).  With α = β = ½ each root is ``|Φ_r(t) − Φ_s(t)| / √2``: a mean of
    ``|ΔΦ|``, not the Gaussian-kernel MMD² (a mean of ``|ΔΦ|²``), and at most MMD/√2.

    ``f_real`` (n, d), ``f_syn`` (k, d), ``t`` (m, d).  Batched (classes, n, d) and
    (classes, k, d) features give the sum over classes of the per-class
    discrepancies."""
    if alpha < 0 or beta < 0:
        raise ValueError(
            "alpha and beta weight two squared terms and must be ≥ 0, "
            f"got {alpha}, {beta}"
        )
    amplitude, phase = cf_terms(f_real, f_syn, t)
    per_freq = alpha * amplitude + beta * phase
    return _safe_sqrt(per_freq).mean(-1).sum()


def _safe_sqrt(p: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """sqrt(p) for p ≥ eps, the linear p/sqrt(eps) below: exactly 0 at 0, finite slope there.

    Why: sqrt'(0) is infinite (NaN gradients for a perfectly matched frequency); shifting the
    argument, sqrt(p + eps) − sqrt(eps), would bias every term by about sqrt(eps)."""
    return torch.where(p > eps, p.clamp_min(eps).sqrt(), p / eps ** 0.5)


def gaussian_frequencies(n_freq: int, dim: int, sigma: float = 1.0, *, generator=None,
                         device=None) -> torch.Tensor:
    """``n_freq`` frequencies drawn from N(0, σ²I), shape (n_freq, dim)."""
    return sigma * torch.randn(n_freq, dim, generator=generator, device=device)


def gaussian_mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Biased squared MMD with kernel ``exp(−σ²‖a − b‖²/2)``: the limit of E_t|Φ_x − Φ_y|², t ~ N(0, σ²I)."""
    def k(a, b):
        return torch.exp(-0.5 * sigma ** 2 * torch.cdist(a, b) ** 2).mean()
    return k(x, x) + k(y, y) - 2 * k(x, y)
