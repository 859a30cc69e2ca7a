"""Dataset condensation with gradient matching (DC): a *bi-level* method, shown for its cost.

Each step compares, layer by layer, the gradient of the training loss on real images with the
gradient on synthetic images, and moves the synthetic images to make them agree.  Moving the images
needs the derivative *of a gradient*: the synthetic gradient is built with ``create_graph=True`` and
backpropagated again (second order), which keeps the whole network's activations and the gradient
graph alive.  Between image updates the network is trained on the synthetic set (the inner level).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gradient_distance", "dc_match_loss", "dc_inner_train"]


def gradient_distance(g_real: Sequence[torch.Tensor], g_syn: Sequence[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise distance: Σ over weight tensors and output units of ``1 − cos(g_real, g_syn)``.

    1-D parameters (biases, norm scales) are skipped, as in the DC paper."""
    total = 0.0
    for gr, gs in zip(g_real, g_syn):
        if gr.ndim == 1:
            continue
        gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)      # (out, rest)
        cos = (gr * gs).sum(1) / (gr.norm(dim=1) * gs.norm(dim=1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def dc_match_loss(net: nn.Module, real_by_class: Sequence[torch.Tensor], syn_by_class: Sequence[torch.Tensor],
                  labels: Sequence[int]) -> torch.Tensor:
    """Σ over classes of the gradient distance; differentiable w.r.t. the synthetic images."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = 0.0
    for xr, xs, c in zip(real_by_class, syn_by_class, labels):
        yr = torch.full((xr.shape[0],), c, dtype=torch.long, device=xr.device)
        ys = torch.full((xs.shape[0],), c, dtype=torch.long, device=xs.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(xr), yr), params)]
        # why create_graph: the loss below must be differentiated again, w.r.t. the images
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
        loss = loss + gradient_distance(g_real, g_syn)
    return loss


def dc_inner_train(net: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor, steps: int, lr: float = 0.01) -> None:
    """The inner level: a few SGD steps of the network on the (detached) synthetic set."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    x, y = x_syn.detach(), y_syn
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
