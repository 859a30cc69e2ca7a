"""LoRA: train a low-rank correction beside a frozen weight.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685.  A frozen layer ``y = base(x)`` gets a trainable update

    y = base(x) + (alpha / r) · x Aᵀ Bᵀ,   A (r, in), B (out, r),

with A random and B = 0, so training starts exactly at the pretrained model.  Only
A and B get gradients and optimizer states: r · (in + out) numbers per layer
instead of in · out.  With a :class:`effdl.memory.quant.QuantLinear` as ``base``
this is QLoRA (Dettmers et al. 2023, arXiv:2305.14314): a 4-bit frozen base, the
adapters in full precision.

Initialization: the paper draws A from a Gaussian; its reference code (and PEFT)
uses ``kaiming_uniform_(a=sqrt(5))``, the default ``nn.Linear`` init.  Both are
offered (``init="kaiming"`` default, ``init="normal"``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "trainable_parameters", "DEFAULT_TARGETS"]

#: the ByteLM linear layers adapted by default (all of them but the head)
DEFAULT_TARGETS = ("wq", "wkv", "wo", "mlp.0", "mlp.2")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · (x @ A.T) @ B.T``; ``base`` frozen (nn.Linear or
    QuantLinear: anything with ``in_features`` and ``out_features``)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0,
                 init: str = "kaiming"):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if init not in ("kaiming", "normal"):
            raise ValueError(f"init must be 'kaiming' or 'normal', got {init!r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.scale = alpha / r       # why alpha / r: changing r keeps the update size
        for p in base.parameters():
            p.requires_grad_(False)
        ref = next(iter([*base.parameters(), *base.buffers()]), None)
        kw = {"device": None if ref is None else ref.device}
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1 / r)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        # why two thin matmuls: x (.., in) -> (.., r) -> (.., out) costs r·(in + out)
        # per token; forming B @ A (out, in) first would cost in·out
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0,
             targets=DEFAULT_TARGETS, init: str = "kaiming") -> nn.Module:
    """A copy of ``model``, every parameter frozen, with each linear layer whose
    qualified name ends with one of ``targets`` wrapped in a :class:`LoRALinear`."""
    new = copy.deepcopy(model)
    for p in new.parameters():
        p.requires_grad_(False)
    found = [(name, m) for name, m in new.named_modules()
             if hasattr(m, "in_features") and not isinstance(m, LoRALinear)
             and any(name == t or name.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(f"no linear layer of the model matches targets {targets!r}; "
                         "name layers as model.named_modules() lists them, e.g. "
                         "'wq' or 'mlp.0'")
    for name, m in found:
        parent, _, leaf = name.rpartition(".")
        owner = new.get_submodule(parent) if parent else new
        setattr(owner, leaf, LoRALinear(m, r, alpha, init))
    return new


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers the optimizer updates (parameters with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
