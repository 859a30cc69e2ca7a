"""Distribution matching (DM): match class-wise mean embeddings under random networks.

``‖mean φ(real) − mean φ(syn)‖²`` is the squared MMD with a *linear* kernel: it compares only the
first moment of the feature distributions.  No network is trained; each step needs one forward pass
of the synthetic images (and of the real batch, unless its features are cached).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mean_embedding_mmd", "dm_loss"]


def mean_embedding_mmd(f_real: torch.Tensor, f_syn: torch.Tensor) -> torch.Tensor:
    """Squared distance of mean embeddings (MMD², linear kernel):
    ``f_*`` are (n, d) -> scalar."""
    if f_real.ndim != 2 or f_syn.ndim != 2 or f_real.shape[1] != f_syn.shape[1]:
        raise ValueError(
            "need two (n, d) feature sets with the same d, "
            f"got {tuple(f_real.shape)} and {tuple(f_syn.shape)}"
        )
    return ((f_real.mean(0) - f_syn.mean(0)) ** 2).sum()


def dm_loss(
    f_real: torch.Tensor | Sequence[torch.Tensor],
    f_syn: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """DM's loss: the sum over classes of :func:`mean_embedding_mmd`; per-class lists, or batched
    (classes, n, d) and (classes, k, d) tensors."""
    if isinstance(f_real, torch.Tensor) and f_real.ndim == 3:
        return ((f_real.mean(1) - f_syn.mean(1)) ** 2).sum()
    return sum(mean_embedding_mmd(r, s) for r, s in zip(f_real, f_syn))
