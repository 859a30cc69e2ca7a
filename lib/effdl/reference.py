"""Reference implementations more than one chapter uses: the textbook (naive) attention.

Naive attention materializes the (N x N) score matrix S and probabilities P: memory Θ(N²) per head,
HBM traffic Θ(Nd + N²) (S and P are written out and read back).  It is the reference every faster
implementation is tested against; the attention chapter teaches it, the measuring chapter places
it on the roofline.
"""

from __future__ import annotations

import torch

from effdl.validate import causal_mask, check_qkv


def naive_attention(
    q, k, v, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, with S and P materialized.

    q: (..., Nq, d), k: (..., Nk, d), v: (..., Nk, dv) -> (..., Nq, dv), same dtype
    as q.  ``causal`` masks bottom-right aligned (query i sees keys j <= i + Nk - Nq,
    as in flash-attn); rows that see no key at all return zeros.
    """
    scale = check_qkv(q, k, v, scale)
    s = (q @ k.transpose(-2, -1)) * scale       # (..., Nq, Nk)  written to memory
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        allowed = causal_mask(nq, nk, q0=nk - nq, device=q.device)
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)                # (..., Nq, Nk)  another N² tensor
    if causal and q.shape[-2] > k.shape[-2]:
        p = torch.nan_to_num(p, nan=0.0)        # rows with no visible key
    return p @ v                                # (..., Nq, dv)


def reference_attention(q, k, v, causal: bool = False, scale: float | None = None, dtype=torch.float64):
    """The test reference: :func:`naive_attention` computed in ``dtype`` (fp64 by default).

    The result stays in ``dtype`` (it is not cast back to the inputs' dtype): comparing a low-precision
    output with it measures that output's error, not the error of a rounded reference.
    """
    return naive_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, scale=scale)


def attention_lse(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The row logsumexp L = log Σ_j exp(S_ij) of the scaled, masked scores: (..., Nq)."""
    scale = check_qkv(q, k, v, scale)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        s = s.masked_fill(~causal_mask(nq, nk, q0=nk - nq, device=q.device), float("-inf"))
    return torch.logsumexp(s, dim=-1)
