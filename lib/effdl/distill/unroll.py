"""Unrolled bi-level matching, trajectory-matching style (MTT, Cazenavette et al. 2022), for its memory.

An *expert* ConvNet-3 is trained for a few SGD steps on real images, from a starting point θ₀, to
θ*.  A *student* starts from the same θ₀ and takes ``K`` SGD steps on the synthetic images,
``θ_{j+1} = θ_j − lr·∇ℓ(θ_j; x_syn)``, with ``create_graph=True`` so that the steps themselves can
be differentiated.  The loss is MTT's normalized distance of the unrolled weights to the expert's,

    L(x_syn) = ‖θ_K − θ*‖² / ‖θ₀ − θ*‖²,

and one outer iteration backpropagates it through all ``K`` steps to the pixels.  Every inner step
must stay alive until that backward: its weights θ_j (a copy of every parameter), the activations
of its forward, and what its differentiable backward saved.  So the peak memory grows linearly in
``K`` — the cost DM, CF and NCFM avoid: their one matching step trains no network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from effdl.distill.baselines import random_subset
from effdl.distill.convnet import make_net
from effdl.measure import peak_memory

__all__ = ["expert_weights", "unrolled_loss", "UnrollStepper", "saved_elems_per_step",
           "bytes_per_inner_step", "default_unrolls", "memory_sweep"]


def _sgd_step(net, params: dict, x, y, lr: float, create_graph: bool) -> dict:
    """One SGD step of ``net`` with weights ``params`` on ``(x, y)``: the new weights."""
    loss = F.cross_entropy(functional_call(net, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}


def expert_weights(net, x_real, y_real, steps: int, lr: float) -> dict:
    """θ*: ``steps`` plain SGD steps on the real batch from ``net``'s weights (no graph)."""
    params = {n: p.detach().clone().requires_grad_(True)
              for n, p in net.named_parameters()}
    for _ in range(steps):
        params = {n: p.detach().requires_grad_(True)
                  for n, p in _sgd_step(net, params, x_real, y_real, lr, False).items()}
    return {n: p.detach() for n, p in params.items()}


def unrolled_loss(net, x_syn, y_syn, start: dict, expert: dict, k: int, lr: float):
    """MTT's loss after ``k`` differentiable SGD steps on the synthetic images
    (a scalar)."""
    params = {n: p.requires_grad_(True) for n, p in start.items()}
    for _ in range(k):
        # why create_graph: the outer backward goes through this step to x_syn
        params = _sgd_step(net, params, x_syn, y_syn, lr, create_graph=True)
    num = sum(((params[n] - expert[n]) ** 2).sum() for n in expert)
    den = sum(((start[n] - expert[n]) ** 2).sum() for n in expert)
    return num / den


class UnrollStepper:
    """One outer iteration per :meth:`step`: unroll ``k`` steps, backward to the pixels, Adam step.

    The expert (θ₀ → θ*, ``expert_steps`` SGD steps on a real batch) is computed once here, as
    MTT precomputes its buffer of trajectories; only the outer iteration is measured."""

    def __init__(self, x, y, ipc: int, k: int, seed: int = 0, *, width: int = 128,
                 real_per_class: int = 64, expert_steps: int = 2, lr_inner: float = 0.01,
                 lr: float = 0.01):
        x0, self.y_syn = random_subset(x, y, ipc, seed)
        self.x_syn = x0.detach().clone().requires_grad_(True)
        self.net = make_net(x, int(y.max()) + 1, width, seed)
        self.net.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(y == c).flatten()[
            torch.randperm(int((y == c).sum()), generator=g)[:real_per_class].to(y.device)]
            for c in torch.unique(y)])
        self.start = {n: p.detach().clone() for n, p in self.net.named_parameters()}
        self.expert = expert_weights(self.net, x[idx], y[idx], expert_steps, lr_inner)
        self.k, self.lr_inner = k, lr_inner
        self.opt = torch.optim.Adam([self.x_syn], lr=lr)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.start.values())

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.start.values()]

    def step(self) -> float:
        start = {n: p.clone() for n, p in self.start.items()}
        loss = unrolled_loss(
            self.net, self.x_syn, self.y_syn, start, self.expert, self.k, self.lr_inner
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def saved_elems_per_step(stepper: UnrollStepper) -> int:
    """Elements autograd saves for one differentiable inner step (forward and its
    ``create_graph`` backward), counted once per storage with a saved-tensors hook."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes() // t.element_size())
        return t

    params = {n: p.clone().requires_grad_(True) for n, p in stepper.start.items()}
    x = stepper.x_syn.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        new = _sgd_step(stepper.net, params, x, stepper.y_syn, stepper.lr_inner, True)
    ids = {p.untyped_storage().data_ptr() for p in [*params.values(), *new.values(), x]}
    del new
    return sum(v for (ptr, _), v in seen.items() if ptr not in ids)


def bytes_per_inner_step(param_shapes, saved_elems: int, element_size: int = 4) -> int:
    """Bytes one more inner step keeps alive until the outer backward: its new weights θ_j (one
    tensor per shape of ``param_shapes``) and the ``saved_elems`` elements autograd saved for its
    forward and its differentiable backward.  The gradient ∇ℓ(θ_j) is not counted: once θ_{j+1}
    is formed nothing holds it."""
    n_params = sum(math.prod(shape) for shape in param_shapes)  # a copy of each weight
    return element_size * (n_params + saved_elems)


def default_unrolls() -> tuple[int, ...]:
    """The ``K`` of the chapter's sweep: a few on the smoke profile (a test run), up to 20 else."""
    from effdl.profile import current

    return (1, 4, 8) if current() == "smoke" else (1, 2, 5, 10, 20)


def memory_sweep(x, y, ipc: int, unrolls, device, *, pool=None, S=None, width: int = 128,
                 real_per_class: int = 64) -> list[dict]:
    """Peak bytes of one outer iteration of unroll-``K`` matching for each ``K`` of ``unrolls``,
    and of one DM, CF and NCFM matching step (one row per ``K`` too: they do not unroll).

    Rows: ``{"method", "unroll", "peak_mem_bytes"}``, and for unroll-``K`` also ``n_params``,
    ``saved_elems`` and ``model_bytes_per_step`` (:func:`bytes_per_inner_step`); DM/CF/NCFM need
    ``pool`` and sizes ``S`` (see :func:`effdl.distill.experiments.stepper_for`)."""
    from effdl.distill.experiments import stepper_for

    rows = []
    for k in unrolls:
        st = UnrollStepper(x, y, ipc, k, width=width, real_per_class=real_per_class)
        st.step()                                     # warm-up: Adam's state exists
        saved = saved_elems_per_step(st)
        rows.append({"method": "unroll", "unroll": k,
                     "peak_mem_bytes": peak_memory(st.step, device),
                     "n_params": st.n_params, "saved_elems": saved,
                     "model_bytes_per_step": bytes_per_inner_step(st.param_shapes, saved)})
    if pool is not None and S is not None:
        for m in ("dm", "cfd", "ncfm"):
            st = stepper_for(m, x, y, ipc, 0, S, pool)
            st.step()
            mem = peak_memory(st.step, device)
            rows += [{"method": m, "unroll": k, "peak_mem_bytes": mem} for k in unrolls]
    return rows
