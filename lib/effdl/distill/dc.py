"""Dataset condensation with gradient matching (DC): a *bi-level* method, shown for its cost.

Each step compares, layer by layer, the gradient of the training loss on real images with the
gradient on synthetic images, and moves the synthetic images to make them agree.  Moving the images
needs the derivative *of a gradient*: the synthetic gradient is built with ``create_graph=True`` and
backpropagated again (second order), which keeps the whole network's activations and the gradient
graph alive.  Between image updates the network is trained on the synthetic set (the inner level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effdl.distill.convnet import make_net

__all__ = ["gradient_distance", "dc_match_loss", "dc_inner_train", "DCStepper"]


def gradient_distance(
    g_real: Sequence[torch.Tensor], g_syn: Sequence[torch.Tensor]
) -> torch.Tensor:
    """DC's layer-wise distance: Σ over weight tensors and output units of
    ``1 − cos(g_real, g_syn)``.

    1-D parameters (biases, norm scales) are skipped, as in the DC paper."""
    total = 0.0
    for gr, gs in zip(g_real, g_syn):
        if gr.ndim == 1:
            continue
        gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)  # (out, rest)
        cos = (gr * gs).sum(1) / (gr.norm(dim=1) * gs.norm(dim=1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def dc_match_loss(
    net: nn.Module, real_by_class: Sequence[torch.Tensor],
    syn_by_class: Sequence[torch.Tensor], labels: Sequence[int],
) -> torch.Tensor:
    """Σ over classes of the gradient distance; differentiable w.r.t. the synthetic
    images."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = 0.0
    for xr, xs, c in zip(real_by_class, syn_by_class, labels):
        yr = torch.full((xr.shape[0],), c, dtype=torch.long, device=xr.device)
        ys = torch.full((xs.shape[0],), c, dtype=torch.long, device=xs.device)
        g_real = torch.autograd.grad(F.cross_entropy(net(xr), yr), params)
        g_real = [g.detach() for g in g_real]
        # why create_graph: the loss below is differentiated again, w.r.t. the images
        g_syn = torch.autograd.grad(
            F.cross_entropy(net(xs), ys), params, create_graph=True
        )
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


class DCStepper:
    """One DC iteration per :meth:`step`: match gradients, update the images, train the network
    ``inner_steps`` steps on them; a fresh network every ``outer_loop`` iterations."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, seed: int, *,
                 width: int = 128, real_per_class: int = 64, lr: float = 0.01, outer_loop: int = 10,
                 inner_steps: int = 5, net_lr: float = 0.01):
        self.g = torch.Generator().manual_seed(seed)
        self.seed, self.width, self.net_lr = seed, width, net_lr
        self.outer_loop, self.inner_steps = outer_loop, inner_steps
        self.classes = torch.unique(y).tolist()
        self.real_x = [x[y == c] for c in self.classes]
        self.real_per_class = min(real_per_class, min(len(xc) for xc in self.real_x))
        self.x_syn = x_syn.detach().clone().requires_grad_(True)
        self.y_syn = y_syn
        self.syn_idx = [torch.nonzero(y_syn == c).flatten() for c in self.classes]
        self.opt = torch.optim.Adam([self.x_syn], lr=lr)
        self.net: nn.Module | None = None
        self.it = 0

    def step(self) -> float:
        if self.it % self.outer_loop == 0:
            seed = 10_000 * self.seed + 5_000 + self.it
            self.net = make_net(self.x_syn, len(self.classes), self.width, seed=seed)
        reals = []
        for xc in self.real_x:
            idx = torch.randperm(len(xc), generator=self.g)[:self.real_per_class]
            reals.append(xc[idx.to(xc.device)])
        loss = dc_match_loss(
            self.net, reals, [self.x_syn[i] for i in self.syn_idx], self.classes
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()                      # second order: through the gradients
        self.opt.step()
        dc_inner_train(self.net, self.x_syn, self.y_syn, self.inner_steps, self.net_lr)
        self.it += 1
        return float(loss.detach())
