"""The two baselines with no optimization at all: a random real subset, and herding."""

from __future__ import annotations

import torch

from effdl.data import class_balanced_subset

__all__ = ["random_subset", "herding_indices", "herding_subset"]


def random_subset(x: torch.Tensor, y: torch.Tensor, ipc: int, seed: int = 0):
    """``ipc`` random real images per class (sorted by class)."""
    return class_balanced_subset(x, y, ipc, seed)


def herding_indices(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy mean matching: pick ``k`` rows of ``features`` (n, d) one at a time, each
    time the row that brings the mean of the picked rows closest to the mean of all
    rows.  Returns (k,) row indices."""
    if not 1 <= k <= features.shape[0]:
        raise ValueError(f"cannot pick k={k} rows out of {features.shape[0]}")
    f = features.double()
    target = f.mean(0)
    picked: list[int] = []
    acc = torch.zeros_like(target)
    available = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
    for j in range(k):
        cand = (acc + f) / (j + 1)          # (n, d): the mean if row i were added
        dist = ((cand - target) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        picked.append(i)
        available[i] = False
        acc += f[i]
    return torch.tensor(picked, dtype=torch.long)


def herding_subset(x: torch.Tensor, y: torch.Tensor, ipc: int, embed) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the ``ipc`` real images that herding picks in the feature space ``embed(x)``."""
    xs, ys = [], []
    for c in torch.unique(y).tolist():
        xc = x[y == c]
        with torch.no_grad():
            fc = embed(xc)
        idx = herding_indices(fc, ipc).to(x.device)
        xs.append(xc[idx])
        ys.append(torch.full((ipc,), c, dtype=y.dtype, device=y.device))
    return torch.cat(xs), torch.cat(ys)
