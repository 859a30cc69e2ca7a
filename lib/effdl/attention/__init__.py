"""Attention from naive to FlashAttention: tiles, IO counts, Triton kernels and split-KV decoding.

Public API (SDPA-shaped tensors: (batch, heads, seq, dim)):

- :func:`naive_attention` — materializes S and P (the reference);
- :func:`tiled_attention` — FlashAttention-2 tiles in PyTorch, differentiable with a recomputing backward;
- :func:`triton_attention` — the Triton FA2 kernels, forward and backward (CUDA sm_80+, or the CPU under
  TRITON_INTERPRET=1);
- :func:`decode_attention` — one (or a few) query tokens against a long KV cache, split-KV;
- :mod:`effdl.attention.textbook` — FlashAttention-2 as the paper writes it (forward loop, backward tile);
- :mod:`effdl.attention.iosim` — a two-level memory simulator: ``io_count``, ``lower_bound``, ``best_tiles``;
- :mod:`effdl.attention.makespan` — decode schedules on a model GPU: fixed, Flash-Decoding, stream-K.

Triton is imported only when a Triton path is called, so this package imports on any machine.
"""

from effdl.attention.decode import decode_attention
from effdl.attention.softmax import (
    SoftmaxState,
    init_state,
    merge_lse,
    merge_states,
    naive_softmax,
    online_softmax,
    safe_softmax,
    update_state,
)
from effdl.attention.tiled import flash1_forward, flash2_backward, flash2_forward, tiled_attention
from effdl.reference import attention_lse, naive_attention, reference_attention


def triton_attention(q, k, v, causal: bool = False, scale: float | None = None):
    """Triton FlashAttention-2: forward kernel, and a backward in Triton kernels (dK, dV per key tile, then dQ
    per query tile) wherever the forward runs; see :mod:`effdl.attention.triton_kernels`."""
    from effdl.attention.triton_kernels import triton_attention as _impl

    return _impl(q, k, v, causal=causal, scale=scale)


__all__ = [
    "naive_attention", "tiled_attention", "triton_attention", "decode_attention",
    "reference_attention", "attention_lse",
    "flash1_forward", "flash2_forward", "flash2_backward",
    "naive_softmax", "safe_softmax", "online_softmax",
    "SoftmaxState", "init_state", "update_state", "merge_states", "merge_lse",
]
