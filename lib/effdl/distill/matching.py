"""The distribution-matching loop shared by DM, CF with Gaussian frequencies and NCFM.

All three use the **same** feature extractors: a pool of randomly initialized ConvNets, fixed
during distillation (nothing is trained but the images — and, for NCFM, the sampler).  Because the
networks never change, the real images' features can be computed once per network and cached: an
iteration then costs one forward/backward of the *synthetic* images only.  A bi-level method cannot
do this — its network changes every step (see :mod:`effdl.distill.dc`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from effdl.distill.cf import cf_discrepancy, gaussian_frequencies
from effdl.distill.convnet import make_net
from effdl.distill.dm import dm_loss
from effdl.distill.ncfm import FrequencySampler, sampler_ascent_step

__all__ = ["FeaturePool", "matching_loss", "match_distill"]


class FeaturePool:
    """``size`` fixed random ConvNets and (optionally cached) real features, per class.

    Features are divided by one constant per network (the RMS of its real features) so that one
    frequency scale ``sigma`` suits every network.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, width: int, seed: int,
                 cache_real: bool = True, chunk: int = 1024):
        self.classes = torch.unique(y).tolist()
        self.nets = [make_net(x, len(self.classes), width, seed=10_000 * seed + k) for k in range(size)]
        for net in self.nets:
            net.requires_grad_(False)                          # why: only images/sampler are learned
        self.real_x = [x[y == c] for c in self.classes]
        self.cache_real, self.chunk = cache_real, chunk
        self.scale: list[float] = []
        self.real_f: list[list[torch.Tensor]] = []
        for net in self.nets:
            with torch.no_grad():
                feats = [self._embed(net, xc) for xc in self.real_x]
            self.scale.append(float(torch.cat(feats).pow(2).mean().sqrt()) + 1e-8)
            if cache_real:
                self.real_f.append([f / self.scale[-1] for f in feats])

    def _embed(self, net, x):
        return torch.cat([net.features(x[i:i + self.chunk]) for i in range(0, len(x), self.chunk)])

    @property
    def dim(self) -> int:
        return self.nets[0].feature_dim

    def real_batch(self, k: int, ci: int, n: int, g: torch.Generator) -> torch.Tensor:
        """Normalized features of ``n`` random real images of class index ``ci`` under network ``k``."""
        m = len(self.real_x[ci])
        idx = torch.randperm(m, generator=g)[:n].to(self.real_x[ci].device)
        if self.cache_real:
            return self.real_f[k][ci][idx]
        with torch.no_grad():
            return self.nets[k].features(self.real_x[ci][idx]) / self.scale[k]

    def syn_features(self, k: int, x_syn: torch.Tensor) -> torch.Tensor:
        return self.nets[k].features(x_syn) / self.scale[k]


def matching_loss(method: str, f_real: Sequence[torch.Tensor], f_syn: Sequence[torch.Tensor],
                  t: torch.Tensor | None = None, alpha: float = 0.5, beta: float = 0.5) -> torch.Tensor:
    """Σ over classes: DM's mean-embedding distance, or the CF discrepancy at frequencies ``t``."""
    if method == "dm":
        return dm_loss(f_real, f_syn)
    return sum(cf_discrepancy(r, s, t, alpha, beta) for r, s in zip(f_real, f_syn))


def match_distill(x: torch.Tensor, y: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, method: str,
                  iterations: int, seed: int, *, width: int = 128, pool_size: int = 16,
                  real_per_class: int = 64, lr: float = 0.05, n_freq: int = 256, sigma: float = 1.0,
                  alpha: float = 0.5, beta: float = 0.5, sampler_lr: float = 0.01, sampler_every: int = 1,
                  cache_real: bool = True, pool: FeaturePool | None = None, progress: bool = False):
    """Optimize a copy of ``x_syn`` by DM (``"dm"``), CF with Gaussian frequencies (``"cfd"``) or NCFM
    (``"ncfm"``); returns ``(x_syn, sampler)`` (sampler is None but for NCFM).  Everything random is
    drawn from ``seed``."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                                    # the sampler's noise and init
    pool = pool or FeaturePool(x, y, pool_size, width, seed, cache_real=cache_real)
    x_syn = x_syn.detach().clone().requires_grad_(True)
    syn_idx = [torch.nonzero(y_syn == c).flatten() for c in pool.classes]
    # why Adam for the pixels: the three losses have different scales; Adam's step does not care
    opt = torch.optim.Adam([x_syn], lr=lr)
    sampler = s_opt = None
    if method == "ncfm":
        sampler = FrequencySampler(pool.dim, n_freq, sigma=sigma / pool.dim ** 0.5).to(x.device)
        s_opt = torch.optim.Adam(sampler.parameters(), lr=sampler_lr)
    order = torch.randint(len(pool.nets), (iterations,), generator=g).tolist()
    for it in tqdm(range(iterations), desc=method, disable=not progress, leave=False):
        k = order[it]
        f_syn_all = pool.syn_features(k, x_syn)
        f_syn = [f_syn_all[i] for i in syn_idx]
        f_real = [pool.real_batch(k, ci, real_per_class, g) for ci in range(len(pool.classes))]
        t = None
        if method == "cfd":
            t = gaussian_frequencies(n_freq, pool.dim, sigma / pool.dim ** 0.5, generator=g).to(x.device)
        elif method == "ncfm":
            if it % sampler_every == 0:                        # max step: the sampler, features fixed
                sampler_ascent_step(sampler, s_opt, f_real, f_syn, alpha, beta)
            with torch.no_grad():
                t = sampler()                                  # min step: frequencies fixed
        loss = matching_loss(method, f_real, f_syn, t, alpha, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x_syn.detach(), sampler
