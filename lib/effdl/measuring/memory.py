"""Memory: peak bytes, parameters vs activations, and why naive attention runs out of memory.

Peaks are measured with :func:`effdl.measure.peak_memory`: on the CPU it replays the profiler's raw
allocation records (each allocation and free with its own time stamp), so a temporary allocated and
freed *inside* one op (autograd's backward nodes do this) still counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from effdl.bench.core import oom_guard
from effdl.measure import peak_memory, resolve_device
from effdl.reference import naive_attention

__all__ = [
    "parameter_bytes", "make_mlp", "training_step", "mlp_activation_bytes",
    "training_memory_sweep", "attention_scores_bytes", "attention_memory_sweep", "max_seq_len_for_memory",
]


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_mlp(width: int, depth: int, *, n_in: int | None = None, n_out: int = 10, seed: int = 0) -> torch.nn.Sequential:
    """``depth`` blocks of Linear(width, width) + ReLU, then a Linear to ``n_out``."""
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
    g = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layers += [torch.nn.Linear(n_in or width if i == 0 else width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, n_out))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def training_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A zero-argument forward + backward of ``model(x).square().mean()`` (gradients accumulate).

    To see the gradients' memory in a peak, call ``model.zero_grad(set_to_none=True)`` first.
    """
    def step():
        model(x).square().mean().backward()
    return step


def mlp_activation_bytes(
    batch: int, width: int, depth: int, bytes_per_element: int = 4
) -> int:
    """What autograd keeps for backward, by hand: each block's ReLU output
    (batch × width values).

    The ReLU saves its output to compute its gradient, and the next Linear saves its
    input to compute its weight gradient: the same tensor, stored once.  The Linear's
    output is not kept.
    """
    return depth * batch * width * bytes_per_element


def training_memory_sweep(width: int, depth: int, batches: Sequence[int], device=None) -> list[dict]:
    """Peak memory of one training step at each batch size, next to parameters and activations by hand."""
    dev = resolve_device(device)
    model = make_mlp(width, depth).to(dev)
    rows = []
    for b in batches:
        x = torch.randn(b, width, device=dev)
        model.zero_grad(set_to_none=True)  # why: the step then allocates its gradients, as a first step does
        rows.append(dict(
            batch=b, peak_bytes=peak_memory(training_step(model, x), dev),
            parameter_bytes=parameter_bytes(model), activation_bytes=mlp_activation_bytes(b, width, depth),
        ))
    return rows


def attention_scores_bytes(batch: int, heads: int, seq: int, bytes_per_element: int = 4) -> int:
    """One (batch, heads, seq, seq) score matrix."""
    return batch * heads * seq * seq * bytes_per_element


def attention_memory_sweep(seqs: Sequence[int], *, batch: int = 1, heads: int = 4, head_dim: int = 64,
                           device=None, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Peak memory of the naive attention forward at each sequence length.

    A length that runs out of memory gets ``peak_bytes=None`` and ``error="out of memory"``, and the
    sweep stops there (longer ones would fail too).
    """
    dev = resolve_device(device)
    e = torch.empty((), dtype=dtype).element_size()
    rows = []
    for n in seqs:
        row = dict(seq=n, peak_bytes=None, scores_bytes=attention_scores_bytes(batch, heads, n, e),
                   qkv_bytes=3 * batch * heads * n * head_dim * e)
        with oom_guard(row, dev):
            q, k, v = (torch.randn(batch, heads, n, head_dim, device=dev, dtype=dtype) for _ in range(3))
            row["peak_bytes"] = peak_memory(lambda: naive_attention(q, k, v), dev)
        q = k = v = None  # why: free this length's inputs before allocating the next
        rows.append(row)
        if "error" in row:
            break
    return rows


def max_seq_len_for_memory(memory_bytes: float, *, batch: int, heads: int, bytes_per_element: int = 2,
                           matrices: int = 2) -> int:
    """Longest sequence whose ``matrices`` score-sized (N×N per head) buffers fit in ``memory_bytes``."""
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be > 0, got {memory_bytes}")
    return int(math.isqrt(int(memory_bytes // (matrices * batch * heads * bytes_per_element))))
