"""The chapter's two entry points: :func:`distill` a dataset, :func:`evaluate` a synthetic set.

Protocol (as in DC, DM and NCFM): a class-balanced synthetic set of ``ipc`` images per class is
judged by training a *fresh* ConvNet-3 on it and measuring accuracy on the real test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effdl.distill.baselines import herding_subset, random_subset
from effdl.distill.convnet import make_net
from effdl.distill.dc import DCStepper
from effdl.distill.matching import match_distill

__all__ = ["METHODS", "distill", "evaluate", "dc_distill", "validate"]

METHODS = ("random", "herding", "dc", "dm", "cfd", "ncfm")


def validate(x: torch.Tensor, y: torch.Tensor, ipc: int | None = None) -> None:
    """Raise ValueError on images/labels that do not fit together or an impossible ``ipc``."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors (images (n, C, H, W) float, labels (n,) int64)")
    if x.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {tuple(x.shape)}; add a channel axis with x[:, None]")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels/images mismatch: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if y.dtype != torch.long:
        raise TypeError(f"labels must be int64 class indices, got {y.dtype}; use y.long()")
    if ipc is not None:
        if ipc < 1:
            raise ValueError(f"ipc (images per class) must be ≥ 1, got {ipc}")
        counts = torch.bincount(y)
        smallest = int(counts[counts > 0].min())
        if ipc > smallest:
            raise ValueError(f"ipc={ipc} is larger than a class: the smallest class has {smallest} images; "
                             f"choose ipc ≤ {smallest}")


def dc_distill(x, y, x_syn, y_syn, iterations: int, seed: int, *, progress: bool = False, **options):
    """Gradient matching for ``iterations`` image updates (see :class:`effdl.distill.dc.DCStepper`)."""
    from tqdm.auto import tqdm

    stepper = DCStepper(x, y, x_syn, y_syn, seed, **options)
    for _ in tqdm(range(iterations), desc="dc", disable=not progress, leave=False):
        stepper.step()
    return stepper.x_syn.detach()


def distill(x: torch.Tensor, y: torch.Tensor, method: str, ipc: int, iterations: int = 200, seed: int = 0,
            **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Distill ``(x, y)`` into ``ipc`` images per class; returns ``(x_syn, y_syn)`` sorted by class.

    ``method``: ``random`` | ``herding`` | ``dc`` | ``dm`` | ``cfd`` (CF, Gaussian frequencies) |
    ``ncfm``.  Optimizing methods start from a random real subset (same ``seed`` → same start) and
    take ``iterations`` image updates.  ``options`` go to the method (``width``, ``real_per_class``,
    ``lr``, ``pool_size``, ``n_freq``, ``sigma``, ``alpha``, ``beta``, ``sampler_lr``, ...).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    validate(x, y, ipc)
    if iterations < 0:
        raise ValueError(f"iterations must be ≥ 0, got {iterations}")
    x0, y0 = random_subset(x, y, ipc, seed)
    if method == "random":
        return x0, y0
    if method == "herding":
        width = options.get("width", 128)
        net = make_net(x, int(y.max()) + 1, width, seed=10_000 * seed)   # pool network 0 of the matchers
        return herding_subset(x, y, ipc, net.features)
    if method == "dc":
        allowed = {"width", "real_per_class", "lr", "outer_loop", "inner_steps", "net_lr", "progress"}
        _reject(options, allowed, method)
        return dc_distill(x, y, x0, y0, iterations, seed, **options), y0
    allowed = {"width", "pool_size", "real_per_class", "lr", "n_freq", "sigma", "alpha", "beta",
               "sampler_lr", "sampler_every", "cache_real", "pool", "progress"}
    if method == "dm":
        allowed -= {"n_freq", "sigma", "alpha", "beta", "sampler_lr", "sampler_every"}
    elif method == "cfd":
        allowed -= {"sampler_lr", "sampler_every"}
    _reject(options, allowed, method)
    x_syn, _ = match_distill(x, y, x0, y0, method, iterations, seed, **options)
    return x_syn, y0


def _reject(options: dict, allowed: set, method: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"method {method!r} takes no option(s) {sorted(unknown)}; it takes {sorted(allowed)}")


def evaluate(
    x_syn: torch.Tensor, y_syn: torch.Tensor,
    x_test: torch.Tensor, y_test: torch.Tensor,
    seed: int = 0, epochs: int | None = None, *,
    width: int = 128, lr: float = 0.01, batch_size: int = 256,
    num_classes: int | None = None,
) -> float:
    """Train a fresh ConvNet-3 on ``(x_syn, y_syn)`` and return its test accuracy in %.

    SGD (momentum 0.9, weight decay 5e-4), learning rate ÷10 halfway; ``epochs``
    defaults to 300.
    """
    validate(x_syn, y_syn)
    validate(x_test, y_test)
    if x_syn.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"synthetic images {tuple(x_syn.shape[1:])} and test images "
                         f"{tuple(x_test.shape[1:])} have different shapes")
    epochs = 300 if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    n_cls = num_classes or int(max(y_syn.max(), y_test.max())) + 1
    net = make_net(x_test, n_cls, width, seed=777_777 + seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    g = torch.Generator().manual_seed(seed)
    x_syn, y_syn = x_syn.detach(), y_syn.to(x_syn.device)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_syn), generator=g).to(x_syn.device)
        for i in range(0, len(x_syn), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_syn[idx]), y_syn[idx]).backward()
            opt.step()
        sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 1024):
            pred = net(x_test[i:i + 1024]).argmax(1)
            correct += int((pred == y_test[i:i + 1024].to(x_test.device)).sum())
    return 100.0 * correct / len(x_test)
