"""ConvNet-3, the network of the dataset-distillation literature (DC, DM, NCFM evaluate with it).

``depth`` blocks of conv 3×3 → instance norm → ReLU → 2×2 average pool, then one linear layer.
Instance norm is ``GroupNorm(width, width)``: one group per channel, with an affine part, as the DC
code's ``instancenorm``.  :meth:`ConvNet.features` is the embedding that distribution matching uses.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNet", "make_net"]


class ConvNet(nn.Module):
    """ConvNet-``depth`` for ``(n, channels, *im_size)`` images; ``width`` channels in
    every block."""

    def __init__(
        self, channels: int = 1, num_classes: int = 10, width: int = 128,
        depth: int = 3, im_size: tuple[int, int] = (8, 8),
    ):
        super().__init__()
        if min(im_size) < 2 ** depth:
            raise ValueError(
                f"images of size {tuple(im_size)} are too small for depth {depth}: "
                "each block halves the side; "
                f"use depth ≤ {int(min(im_size)).bit_length() - 1}"
            )
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            c = width
        self.body = nn.Sequential(*layers)
        h, w = im_size[0] >> depth, im_size[1] >> depth
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)                        # (n, width·h·w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))              # (n, num_classes)


def make_net(x: torch.Tensor, num_classes: int, width: int, seed: int, depth: int = 3) -> ConvNet:
    """A freshly initialized ConvNet shaped for images like ``x``, deterministic under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConvNet(x.shape[1], num_classes, width, depth, tuple(x.shape[-2:]))
    return net.to(x.device)
