"""NCFM's minmax: a frequency sampler that *maximizes* the CF discrepancy, images that minimize it.

:class:`FrequencySampler` is a scale mixture of Gaussians: each frequency is ``t = s(u) · D · z`` with
``z ~ N(0, I)``, a per-frequency scale ``s(u)`` produced by a small network from noise ``u`` (so the
mixture over scales is learned) and a learned per-dimension scale ``D``.  Sampling is
reparameterized, so gradients reach every parameter.

:func:`sampler_ascent_step` is one correct ascent step on fixed (detached) features.
:func:`cancelled_sampler_step` reproduces the update order of the official code, where the
sampler's gradient cancels to exactly zero — kept only to show the pitfall.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effdl.distill.cf import cf_discrepancy

__all__ = ["FrequencySampler", "sampler_ascent_step", "cancelled_sampler_step", "grad_norm",
           "summed_discrepancy"]

Features = "torch.Tensor | Sequence[torch.Tensor]"


class FrequencySampler(nn.Module):
    """Learned distribution of ``n_freq`` frequencies in ``dim`` dimensions;
    ``sampler()`` -> (n_freq, dim).

    ``sigma`` is the initial typical scale (the sampler starts close to N(0, σ²I)); the
    learned scales stay within ``[sigma / max_ratio, sigma · max_ratio]`` so the
    adversary cannot run off to frequencies so high that every empirical CF is noise.
    """

    def __init__(
        self,
        dim: int,
        n_freq: int,
        sigma: float = 1.0,
        noise_dim: int = 8,
        hidden: int = 32,
        max_ratio: float = 4.0,
    ):
        super().__init__()
        if dim < 1 or n_freq < 1:
            raise ValueError(
                f"dim and n_freq must be ≥ 1, got dim={dim}, n_freq={n_freq}"
            )
        if sigma <= 0 or max_ratio < 1:
            raise ValueError(
                "need sigma > 0 and max_ratio ≥ 1, "
                f"got sigma={sigma}, max_ratio={max_ratio}"
            )
        self.dim, self.n_freq, self.noise_dim = dim, n_freq, noise_dim
        self.log_sigma, self.log_ratio = math.log(sigma), math.log(max_ratio)
        self.scale_net = nn.Sequential(
            nn.Linear(noise_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        self.log_diag = nn.Parameter(torch.zeros(dim))  # per-dimension log scale
        # why: start at "all scales = sigma", the Gaussian-frequency baseline
        with torch.no_grad():
            self.scale_net[2].weight.mul_(0.1)
            self.scale_net[2].bias.zero_()

    def draw_noise(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The randomness of one draw, ``(u, z)``; pass it back to :meth:`forward` to
        reuse a draw.  A (CPU) ``generator`` makes the draw reproducible."""
        u = torch.randn(self.n_freq, self.noise_dim, generator=generator)
        z = torch.randn(self.n_freq, self.dim, generator=generator)
        return u.to(self.log_diag.device), z.to(self.log_diag.device)

    def scales(self, u: torch.Tensor) -> torch.Tensor:
        """Per-frequency scales (n_freq, 1), within sigma·[1/max_ratio, max_ratio]."""
        return torch.exp(
            self.log_sigma + self.log_ratio * torch.tanh(self.scale_net(u))
        )

    def forward(
        self, noise: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        u, z = self.draw_noise() if noise is None else noise
        # (dim,), within [1/r, r]
        diag = torch.exp(self.log_ratio * torch.tanh(self.log_diag))
        return self.scales(u) * diag * z  # (n_freq, dim)


def summed_discrepancy(f_real: Features, f_syn: Features, t: torch.Tensor, alpha: float = 0.5,
                       beta: float = 0.5) -> torch.Tensor:
    """CF discrepancy of one pair of feature sets (2-D, or batched per class 3-D), or the sum over
    per-class pairs given as two lists."""
    if isinstance(f_real, torch.Tensor):
        return cf_discrepancy(f_real, f_syn, t, alpha, beta)
    if len(f_real) != len(f_syn):
        raise ValueError(f"{len(f_real)} real feature sets but {len(f_syn)} synthetic ones: pass one per class")
    return sum(cf_discrepancy(r, s, t, alpha, beta) for r, s in zip(f_real, f_syn))


def _detach(f: Features):
    return f.detach() if isinstance(f, torch.Tensor) else [v.detach() for v in f]


def grad_norm(module: nn.Module) -> float:
    """L2 norm of all ``.grad`` of ``module`` (0 when none is set)."""
    grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def sampler_ascent_step(
    sampler: FrequencySampler,
    optimizer: torch.optim.Optimizer,
    f_real: Features,
    f_syn: Features,
    alpha: float = 0.5,
    beta: float = 0.5,
    *,
    measure: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """One gradient-*ascent* step of the sampler on fixed features; returns
    (before, after).

    The features are detached: the images' side of the graph plays no part in the
    sampler's gradient, and the sampler's step never touches the images.  Before and
    after are measured on the same noise draw, so their difference is the step's effect
    alone (``measure=False`` skips the extra "after" pass and returns NaN for it: the
    distillation loop does not need it).
    """
    f_real, f_syn = _detach(f_real), _detach(f_syn)
    noise = sampler.draw_noise(generator)
    optimizer.zero_grad(set_to_none=True)
    loss = summed_discrepancy(f_real, f_syn, sampler(noise), alpha, beta)
    (-loss).backward()  # ascent = descent on −loss
    optimizer.step()
    if not measure:
        return float(loss.detach()), float("nan")
    with torch.no_grad():
        after = summed_discrepancy(f_real, f_syn, sampler(noise), alpha, beta)
    return float(loss.detach()), float(after)


def cancelled_sampler_step(
    sampler: FrequencySampler,
    optimizer: torch.optim.Optimizer,
    f_real: Features,
    f_syn: Features,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> tuple[float, float]:
    """The PITFALL, the sampler's half of the official order: backward(loss), then
    backward(−loss), then step.

    Both backward passes accumulate into the sampler's ``.grad``: ``g + (−g) = 0``, so
    its step does nothing.  In the official loop (gszfwsb/NCFM,
    ``condenser/compute_loss.py``, ``compute_match_loss``, commit 7a59d7b) the images'
    optimizer steps *between* the two passes and zeroes their gradient before the
    second, so the images get the correct step; only the sampler's gradient cancels.
    This function leaves the image step out.  Returns (before, after) like
    :func:`sampler_ascent_step`; they come out equal.
    """
    noise = sampler.draw_noise()
    optimizer.zero_grad(set_to_none=True)
    loss = summed_discrepancy(f_real, f_syn, sampler(noise), alpha, beta)
    loss.backward(retain_graph=True)  # "for the images"
    # (the official loop steps the images and zeroes their grad here: left out)
    (-loss).backward()  # "for the sampler": cancels the first in the sampler's .grad
    optimizer.step()
    with torch.no_grad():
        after = summed_discrepancy(
            _detach(f_real), _detach(f_syn), sampler(noise), alpha, beta
        )
    return float(loss.detach()), float(after)
