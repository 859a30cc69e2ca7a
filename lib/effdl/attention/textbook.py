"""FlashAttention-2 as the paper writes it: the forward loop, one backward key tile.

These are the chapter's first versions — no scratch buffers, no in-place operations,
no threads — so that each line maps to a line of Algorithm 1 (forward) and
Algorithm 2 (backward) of Dao, "FlashAttention-2" (2023).  The engineered versions with
the same arithmetic are :func:`effdl.attention.tiled.flash2_forward` and
:func:`effdl.attention.tiled.flash2_backward`.  Tensors are SDPA-shaped
``(..., seq, dim)`` and causal masking is bottom-right aligned: query ``i`` sees
key ``j`` iff ``j <= i + Nk - Nq``.
"""

from __future__ import annotations

import torch

from effdl.validate import check_block, check_qkv

__all__ = ["fa2_forward", "backward_key_tile", "fa2_backward"]


def _mask(i0, i1, j0, j1, off, device):
    """(i1 - i0, j1 - j0) bool: which (query, key) pairs of the tile are visible."""
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return cols <= rows + off


def fa2_forward(q, k, v, causal=False, scale=None, block_q=64, block_k=64):
    """Algorithm 1 of FlashAttention-2; returns ``(O, L)``, L the logsumexp per row."""
    scale = check_qkv(q, k, v, scale)
    Br = check_block("block_q", block_q, 64)
    Bc = check_block("block_k", block_k, 64)
    Nq, Nk, off = q.shape[-2], k.shape[-2], k.shape[-2] - q.shape[-2]
    O = q.new_empty(*q.shape[:-1], v.shape[-1])
    L = q.new_empty(q.shape[:-1])
    for i0 in range(0, Nq, Br):                                  # line 3
        i1 = min(i0 + Br, Nq)
        Qi = q[..., i0:i1, :]                                    # line 4
        Oi = q.new_zeros(*Qi.shape[:-1], v.shape[-1])            # line 5
        li = q.new_zeros(Qi.shape[:-1])
        mi = q.new_full(Qi.shape[:-1], float("-inf"))
        for j0 in range(0, Nk, Bc):                              # line 6
            j1 = min(j0 + Bc, Nk)
            Kj, Vj = k[..., j0:j1, :], v[..., j0:j1, :]          # line 7
            Sij = Qi @ Kj.transpose(-2, -1) * scale              # line 8
            if causal:
                Sij = Sij.masked_fill(~_mask(i0, i1, j0, j1, off, q.device), -torch.inf)
            m_new = torch.maximum(mi, Sij.amax(-1))              # line 9
            m_safe = m_new.nan_to_num(neginf=0.0)      # rows that saw no key yet
            Pij = torch.exp(Sij - m_safe[..., None])
            alpha = torch.exp(mi - m_safe)
            li = alpha * li + Pij.sum(-1)
            Oi = alpha[..., None] * Oi + Pij @ Vj                # line 10
            mi = m_new
        O[..., i0:i1, :] = Oi / li.clamp_min(1e-30)[..., None]   # line 12
        L[..., i0:i1] = mi + torch.log(li)                       # line 13
    return O, L                                                  # lines 14-15, 17


def backward_key_tile(Qi, dOi, Li, Di, Kj, Vj, scale, mask=None):
    """One (query tile i, key tile j) step of FlashAttention-2's backward pass.

    Given ``Qi, dOi (..., Br, d)``, the saved logsumexp ``Li (..., Br)``,
    ``Di = rowsum(dOi * Oi) (..., Br)`` and ``Kj, Vj (..., Bc, d)``, return this
    tile's contributions ``(dQi, dKj, dVj)``; ``mask (Br, Bc)`` bool, True = visible.
    """
    Sij = Qi @ Kj.transpose(-2, -1) * scale                      # S, as forward
    if mask is not None:
        Sij = Sij.masked_fill(~mask, -torch.inf)
    Pij = torch.exp(Sij - Li[..., None])             # P recomputed from L, not stored
    dVj = Pij.transpose(-2, -1) @ dOi                            # O = PV
    dPij = dOi @ Vj.transpose(-2, -1)
    dSij = Pij * (dPij - Di[..., None])                          # softmax's Jacobian
    dQi = dSij @ Kj * scale                                      # S = QKᵀ·scale
    dKj = dSij.transpose(-2, -1) @ Qi * scale
    return dQi, dKj, dVj


def fa2_backward(q, k, v, O, L, dO, causal=False, scale=None, block_q=64, block_k=64):
    """FlashAttention-2's backward pass (key tiles outer): ``(dq, dk, dv)``."""
    scale = check_qkv(q, k, v, scale)
    Br = check_block("block_q", block_q, 64)
    Bc = check_block("block_k", block_k, 64)
    Nq, Nk, off = q.shape[-2], k.shape[-2], k.shape[-2] - q.shape[-2]
    D = (dO * O).sum(-1)                             # = rowsum(P ∘ dP), per query
    L = L.nan_to_num(neginf=float("inf"))           # a row that saw no key: P = 0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j0 in range(0, Nk, Bc):                      # key tiles outside: dK_j, dV_j
        j1 = min(j0 + Bc, Nk)
        for i0 in range(0, Nq, Br):                  # ... stay on chip; dQ_i does not
            i1 = min(i0 + Br, Nq)
            mask = _mask(i0, i1, j0, j1, off, q.device) if causal else None
            dQi, dKj, dVj = backward_key_tile(
                q[..., i0:i1, :], dO[..., i0:i1, :], L[..., i0:i1], D[..., i0:i1],
                k[..., j0:j1, :], v[..., j0:j1, :], scale, mask)
            dq[..., i0:i1, :] += dQi                 # read, add, write back to HBM
            dk[..., j0:j1, :] += dKj
            dv[..., j0:j1, :] += dVj
    return dq, dk, dv
