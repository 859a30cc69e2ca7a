"""Reference implementations more than one chapter uses: the textbook (naive) attention.

Naive attention materializes the (N x N) score matrix S and probabilities P: memory Θ(N²) per head,
HBM traffic Θ(Nd + N²) (S and P are written out and read back).  It is the reference every faster
implementation is tested against; the attention chapter teaches it, the measuring chapter places
it on the roofline.  :func:`reference_attention` and :func:`attention_lse` also accept grouped-query
K/V (fewer K/V heads than query heads), which they expand with :func:`expand_kv`; the textbook
:func:`naive_attention` keeps one K/V head per query head.
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


def expand_kv(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped K or V ``(..., H_kv, L, d)`` repeated for ``heads`` query heads:
    ``(..., heads, L, d)``.

    Query head h reads K/V head h // G with G = heads // H_kv, so each K/V head is
    repeated G times in place (``repeat_interleave``, not ``repeat``).  This is a copy,
    G times the cache: fine in a reference, what a decode kernel must avoid.
    """
    if kv.ndim < 3:
        raise ValueError(
            f"expand_kv needs (..., heads, seq, dim), got shape {tuple(kv.shape)}"
        )
    h_kv = kv.shape[-3]
    if not isinstance(heads, int) or heads < 1 or h_kv < 1 or heads % h_kv:
        raise ValueError(
            f"cannot expand {h_kv} K/V heads to {heads!r} query heads: the number of "
            f"K/V heads must divide the number of query heads (pass a multiple of {h_kv})"
        )
    return kv.repeat_interleave(heads // h_kv, dim=-3)


def _ungroup(q, k, v, scale):
    """Validate (grouped K/V allowed) and return k, v with one head per query head."""
    check_qkv(q, k, v, scale, grouped=True)
    if q.ndim > 2 and k.shape[-3] != q.shape[-3]:
        k, v = expand_kv(k, q.shape[-3]), expand_kv(v, q.shape[-3])
    return k, v


def reference_attention(q, k, v, causal: bool = False, scale: float | None = None, dtype=torch.float64):
    """The test reference: :func:`naive_attention` computed in ``dtype`` (fp64 by default).

    The result stays in ``dtype`` (it is not cast back to the inputs' dtype): comparing a low-precision
    output with it measures that output's error, not the error of a rounded reference.  Grouped-query
    K/V ``(B, H_kv, Nk, d)`` with H_kv dividing H is accepted (expanded with :func:`expand_kv`).
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = _ungroup(q, k, v, scale)
    return naive_attention(q, k, v, causal=causal, scale=scale)


def attention_lse(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The row logsumexp L = log Σ_j exp(S_ij) of the scaled, masked scores: (..., Nq).

    Grouped-query K/V is accepted as in :func:`reference_attention`.
    """
    k, v = _ungroup(q, k, v, scale)
    scale = check_qkv(q, k, v, scale)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        s = s.masked_fill(~causal_mask(nq, nk, q0=nk - nq, device=q.device), float("-inf"))
    return torch.logsumexp(s, dim=-1)
