"""The distribution-matching loop shared by DM, CF with Gaussian frequencies and NCFM.

All three use the **same** feature extractors: a pool of randomly initialized ConvNets, fixed
during distillation (nothing is trained but the images — and, for NCFM, the sampler).  Because the
networks never change, the real images' features can be computed once per network and cached: an
iteration then costs one forward/backward of the *synthetic* images only.  A bi-level method cannot
do this — its network changes every step (see :mod:`effdl.distill.dc`).
"""

from __future__ import annotations

import torch

from effdl.distill.cf import cf_discrepancy, gaussian_frequencies
from effdl.distill.convnet import make_net
from effdl.distill.dm import dm_loss
from effdl.distill.ncfm import FrequencySampler

__all__ = ["FeaturePool", "MatchingStepper", "matching_loss", "match_distill"]


class FeaturePool:
    """``size`` fixed random ConvNets and (optionally cached) real features, per class.

    Features are divided by one constant per network (the RMS of its real features) so that one
    frequency scale ``sigma`` suits every network.  Without the cache, that RMS is taken over the
    first ``scale_per_class`` images of each class (why: on CIFAR-10 the whole training set
    through every network of the pool would cost more than the distillation).
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, size: int, width: int, seed: int,
        cache_real: bool = True, chunk: int = 1024, scale_per_class: int = 256,
    ):
        self.classes = torch.unique(y).tolist()
        self.nets = [
            make_net(x, len(self.classes), width, seed=10_000 * seed + k)
            for k in range(size)
        ]
        for net in self.nets:
            net.requires_grad_(False)            # why: only images/sampler are learned
        self.real_x = [x[y == c] for c in self.classes]
        self.cache_real, self.chunk = cache_real, chunk
        self.scale: list[float] = []
        self.real_f: list[list[torch.Tensor]] = []
        sample = self.real_x                     # the scale's images
        if not cache_real:
            sample = [xc[:scale_per_class] for xc in self.real_x]
        for net in self.nets:
            with torch.no_grad():
                feats = [self._embed(net, xc) for xc in sample]
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


def matching_loss(method: str, f_real: torch.Tensor, f_syn: torch.Tensor, t: torch.Tensor | None = None,
                  alpha: float = 0.5, beta: float = 0.5) -> torch.Tensor:
    """Σ over classes of DM's mean-embedding distance, or of the CF discrepancy at frequencies ``t``;
    ``f_real`` (classes, n, d), ``f_syn`` (classes, ipc, d)."""
    if method == "dm":
        return dm_loss(f_real, f_syn)
    return cf_discrepancy(f_real, f_syn, t, alpha, beta)


class MatchingStepper:
    """One image update of DM / CF / NCFM per :meth:`step` (state: images, optimizers, sampler, RNG).

    Kept as an object so that the benchmark can time exactly one iteration of the real loop."""

    def __init__(self, pool: FeaturePool, x_syn: torch.Tensor, y_syn: torch.Tensor, method: str, seed: int, *,
                 real_per_class: int = 64, lr: float = 0.05, n_freq: int = 256, sigma: float = 1.0,
                 alpha: float = 0.5, beta: float = 0.5, sampler_lr: float = 0.01, sampler_every: int = 1):
        if method not in ("dm", "cfd", "ncfm"):
            raise ValueError(f"MatchingStepper runs dm, cfd or ncfm, not {method!r}")
        self.pool, self.method, self.alpha, self.beta = pool, method, alpha, beta
        self.n_freq, self.sigma, self.sampler_every = n_freq, sigma, sampler_every
        self.g = torch.Generator().manual_seed(seed)
        self.real_per_class = min(real_per_class, min(len(xc) for xc in pool.real_x))
        self.x_syn = x_syn.detach().clone().requires_grad_(True)
        self.syn_idx = torch.stack([torch.nonzero(y_syn == c).flatten() for c in pool.classes])  # (classes, ipc)
        # why Adam for the pixels: the three losses have different scales; Adam's step does not care
        self.opt = torch.optim.Adam([self.x_syn], lr=lr)
        self.sampler = self.s_opt = None
        if method == "ncfm":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.sampler = FrequencySampler(pool.dim, n_freq, sigma=sigma / pool.dim ** 0.5).to(x_syn.device)
            # why maximize=True: the sampler ascends the very gradient the images descend (no negation
            # pass); fused: one kernel for its five small tensors instead of a Python loop over them
            self.s_opt = torch.optim.Adam(self.sampler.parameters(), lr=sampler_lr, maximize=True,
                                          fused=_fused_ok(x_syn.device))
        self.it = 0

    def step(self) -> float:
        pool, g = self.pool, self.g
        # k: a network of the pool
        k = int(torch.randint(len(pool.nets), (1,), generator=g))
        f_syn = pool.syn_features(k, self.x_syn)[self.syn_idx]    # (classes, ipc, d)
        f_real = torch.stack([                                    # (classes, n, d)
            pool.real_batch(k, ci, self.real_per_class, g)
            for ci in range(len(pool.classes))
        ])
        t = None
        if self.method == "cfd":
            t = gaussian_frequencies(
                self.n_freq, pool.dim, self.sigma / pool.dim ** 0.5, generator=g
            )
            t = t.to(self.x_syn.device)
        elif self.method == "ncfm" and self.it % self.sampler_every == 0:
            return self._minmax_step(f_real, f_syn)
        elif self.method == "ncfm":
            with torch.no_grad():
                t = self.sampler(self.sampler.draw_noise(g))
        loss = matching_loss(self.method, f_real, f_syn, t, self.alpha, self.beta)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.it += 1
        return float(loss.detach())

    def _minmax_step(self, f_real: torch.Tensor, f_syn: torch.Tensor) -> float:
        """Both players from ONE forward and ONE backward: descent for the images,
        ascent for the sampler.

        ∂L/∂θ_sampler does not depend on whether the images' side of the graph is
        detached, so one ``autograd.grad`` returns both gradients; the sampler's
        optimizer has ``maximize=True``, so it ascends the same gradient.  Each player
        gets its own gradient and its own step: nothing accumulates into a shared
        ``.grad`` (the official order's bug), and it costs one CF evaluation (one pass
        over the real features, see :func:`effdl.distill.cf.paired_cf`) instead of
        two."""
        params = list(self.sampler.parameters())
        t = self.sampler(self.sampler.draw_noise(self.g))
        loss = matching_loss("ncfm", f_real, f_syn, t, self.alpha, self.beta)
        grads = torch.autograd.grad(loss, [self.x_syn, *params])
        self.x_syn.grad = grads[0]               # minimize w.r.t. the images
        for p, gp in zip(params, grads[1:]):
            p.grad = gp                          # the sampler's optimizer maximizes
        self.opt.step()
        self.s_opt.step()
        self.it += 1
        return float(loss.detach())


def _fused_ok(device: torch.device) -> bool:
    """Fused Adam exists for CPU and CUDA tensors (not every backend)."""
    return torch.device(device).type in ("cpu", "cuda")


def match_distill(x: torch.Tensor, y: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, method: str,
                  iterations: int, seed: int, *, width: int = 128, pool_size: int = 16, cache_real: bool = True,
                  pool: FeaturePool | None = None, progress: bool = False, **step_options):
    """Optimize a copy of ``x_syn`` by DM (``"dm"``), CF with Gaussian frequencies (``"cfd"``) or NCFM
    (``"ncfm"``); returns ``(x_syn, sampler)`` (sampler is None but for NCFM).  Everything random is
    drawn from ``seed``; pass ``pool`` to share the feature extractors between methods."""
    from tqdm.auto import tqdm

    pool = pool or FeaturePool(x, y, pool_size, width, seed, cache_real=cache_real)
    stepper = MatchingStepper(pool, x_syn, y_syn, method, seed, **step_options)
    for _ in tqdm(range(iterations), desc=method, disable=not progress, leave=False):
        stepper.step()
    return stepper.x_syn.detach(), stepper.sampler
