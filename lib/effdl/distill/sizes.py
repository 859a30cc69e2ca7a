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
    "gpu": Sizes(dataset="cifar10", ipcs=(1, 10), seeds=(0, 1, 2), iterations=(2000, 2000),
                 dc_iterations=(200, 100), eval_epochs=(1000, 1000), full_epochs=30, width=128, pool_size=16,
                 cache_real=False, real_per_class=256, n_freq=1024, sigma=1.0, lr=(0.05, 0.01), sampler_lr=0.01,
                 cost_repeat=10, demo_iterations=200, suite_ipcs=(1, 10, 50), suite_image=32,
                 cpu_threads=None),
}
