"""Sizes of the distillation chapter per profile (read with ``effdl.profile.sizes("distill")``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    dataset: str                    # effdl.data.load_images name
    ipcs: tuple[int, ...]           # images per class of the results table
    seeds: tuple[int, ...]          # distillation + evaluation seeds (mean ± std over them)
    iterations: tuple[int, ...]     # DM / CF / NCFM image updates, one per entry of ipcs (same for all three)
    dc_iterations: tuple[int, ...]  # DC image updates (bi-level: far costlier per iteration)
    eval_epochs: tuple[int, ...]    # epochs of the evaluation network, per ipc
    full_epochs: int                # epochs of the full-data reference
    width: int                      # ConvNet-3 width (distillation pool and evaluation)
    pool_size: int                  # random feature extractors shared by DM / CF / NCFM
    cache_real: bool                # cache the real images' features (fixed extractors)
    real_per_class: int             # real images per class per iteration
    n_freq: int                     # frequencies of the CF discrepancy
    sigma: float                    # frequency scale (relative to unit-RMS features)
    lr: tuple[float, ...]           # Adam learning rate of the synthetic pixels, per ipc
    sampler_lr: float               # Adam learning rate of NCFM's frequency sampler
    cost_repeat: int                # timed iterations per method for sec/iter
    demo_iterations: int            # the CF / sampler demonstration cells
    suite_ipcs: tuple[int, ...]     # the GPU suite's cost sweep (CIFAR-10-shaped tensors)
    suite_image: int                # its image side (32 for CIFAR-10)
    # torch threads on the CPU (None: leave as is).  Why 1: on 8×8 images every convolution is a
    # few microseconds of work, less than waking and joining a second thread costs
    cpu_threads: int | None


SIZES = {
    "smoke": Sizes(dataset="digits", ipcs=(1, 2), seeds=(0,), iterations=(3, 3), dc_iterations=(2, 2),
                   eval_epochs=(3, 3), full_epochs=1, width=16, pool_size=2, cache_real=True,
                   real_per_class=16, n_freq=16, sigma=1.0, lr=(0.05, 0.01), sampler_lr=0.01,
                   cost_repeat=1, demo_iterations=3, suite_ipcs=(1, 2), suite_image=8, cpu_threads=1),
    "cpu": Sizes(dataset="digits", ipcs=(1, 10), seeds=(0, 1, 2), iterations=(200, 80), dc_iterations=(10, 4),
                 eval_epochs=(250, 60), full_epochs=20, width=128, pool_size=16, cache_real=True,
                 real_per_class=64, n_freq=256, sigma=1.0, lr=(0.05, 0.01), sampler_lr=0.01,
                 cost_repeat=10, demo_iterations=30, suite_ipcs=(1, 10), suite_image=32,
                 cpu_threads=1),
    # sized for a free Colab T4 by effdl.estimate (the papers run 10-100x longer)
    "gpu": Sizes(dataset="cifar10", ipcs=(1, 10), seeds=(0, 1, 2), iterations=(200, 200),
                 dc_iterations=(30, 15), eval_epochs=(200, 200), full_epochs=5, width=128, pool_size=16,
                 cache_real=False, real_per_class=32, n_freq=1024, sigma=1.0, lr=(0.05, 0.01), sampler_lr=0.01,
                 cost_repeat=10, demo_iterations=200, suite_ipcs=(1, 10, 50), suite_image=32,
                 cpu_threads=None),
}


#: (train images, test images, side, channels, classes) of the datasets a profile may use
DATASETS = {"digits": (1257, 540, 8, 1, 10), "mnist": (60000, 10000, 28, 1, 10),
            "fashion_mnist": (60000, 10000, 28, 1, 10), "cifar10": (50000, 10000, 32, 3, 10),
            "cifar100": (50000, 10000, 32, 3, 100)}


def work(S: Sizes):
    """Dominant work of the chapter's live cells at sizes ``S`` (see :mod:`effdl.estimate`)."""
    from math import ceil

    from effdl.estimate import Work

    n_train, n_test, side, ch, classes = DATASETS[S.dataset]

    def conv(n):                                   # ConvNet-3 forward on n images
        f, b, s, c = 0, 0, side, ch
        for _ in range(3):
            f += 2 * 9 * c * S.width * s * s
            b += 8 * 4 * S.width * s * s           # conv, GroupNorm, ReLU, pool: ~8 passes
            s, c = s // 2, S.width
        return Work(flops32=n * f, bytes=n * b, ops=13)

    def evaluate(n_syn, epochs, batch=256):        # train a fresh net, then test it
        steps = epochs * ceil(n_syn / batch)
        return 3 * conv(n_syn * epochs) + Work(ops=60 * steps) + conv(n_test)

    def matching(ipc):                             # DM / CF / NCFM: one iteration
        real = Work() if S.cache_real else conv(S.real_per_class * classes)
        return real + 3 * conv(ipc * classes) + Work(ops=40)

    def dc(ipc):                                   # DC: gradients of gradients, plus inner steps
        return 9 * conv(S.real_per_class * classes + ipc * classes) + Work(ops=100 * classes)

    ipc0 = S.ipcs[0]
    w = 2 * evaluate(ipc0 * classes, S.eval_epochs[0]) + evaluate(n_train, S.full_epochs, 64)
    for ipc in S.ipcs:                             # sec / iteration, four methods, then NCFM again
        w += (S.cost_repeat + 2) * (dc(ipc) + 4 * matching(ipc))
    w += S.iterations[0] * matching(ipc0) + evaluate(ipc0 * classes, S.eval_epochs[0])
    w += 2 * S.demo_iterations * matching(ipc0)
    for _seed in S.seeds:                          # the results table
        if S.cache_real:
            w += S.pool_size * conv(n_train)
        for i, ipc in enumerate(S.ipcs):
            w += S.dc_iterations[i] * dc(ipc) + 3 * S.iterations[i] * matching(ipc)
            w += 6 * evaluate(ipc * classes, S.eval_epochs[i])
    return w
