"""The decode phase: a few query tokens against a long KV cache, split along the keys.

One new token per sequence means Nq = 1: a prefill kernel that parallelizes over (query tiles x
heads) launches only batch x heads programs, far too few to fill a GPU, and each of them streams the
whole cache alone.  Flash-Decoding splits the keys into chunks, computes a partial (output, logsumexp)
per chunk in parallel, and merges them with the associative softmax-state merge.  Lean Attention
balances the work further: every worker gets the same number of key tiles, even across heads
(stream-K).  Causal masking is bottom-right aligned: query t of Nq sees keys j <= L - Nq + t.
"""

from __future__ import annotations

import math

import torch

from effdl.attention.softmax import (
    SoftmaxState,
    accumulation_dtype,
    finalize,
    init_state,
    merge_lse,
    merge_states,
    safe_shift,
    state_lse,
    update_state,
)
from effdl.validate import check_qkv

BACKENDS = ("torch", "triton")


def split_chunk(L: int, num_splits: int, block: int = 1) -> int:
    """The split-KV rule: the chunk size c for ``L`` keys and ``num_splits`` splits.

    Chunk s holds keys [s·c, min((s+1)·c, L)) for s < ⌈L / c⌉ (:func:`even_split`
    lists them): all of size c but the last, which may be shorter.  c is
    ⌈L / num_splits⌉, rounded up to whole tiles of ``block`` keys once c >= ``block``.
    So no chunk is empty, there are never more chunks than keys (none for L = 0,
    where c = 0), and there may be fewer than ``num_splits``: L = 10 in 4 splits is
    3, 3, 3, 1; in 6, five of 2.  Both decode paths use it: :func:`split_kv_partials`
    and the Triton wrapper ``triton_decode``.
    """
    # why equal chunks: chunk s starts at s·c, so the PyTorch path reads the full chunks
    # as one strided view (one batched matmul) and the Triton kernel needs only c.
    # why whole tiles: a kernel streaming `block`-key tiles never splits a tile between
    # two programs; short caches (c < block) keep all their splits instead.
    for name, n in (("num_splits", num_splits), ("block", block)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(L, int) or isinstance(L, bool) or L < 0:
        raise ValueError(f"L (the number of keys) must be an int >= 0, got {L!r}")
    chunk = -(-L // num_splits)
    return -(-chunk // block) * block if chunk >= block else chunk


def even_split(L: int, num_splits: int, block: int = 1) -> list[tuple[int, int]]:
    """:func:`split_chunk`'s chunks as ``[(start, end), ...]``: [0, L) in order."""
    chunk = split_chunk(L, num_splits, block)
    return [(start, min(start + chunk, L)) for start in range(0, L, chunk)] if L else []


def default_num_splits(rows: int, L: int, device: torch.device, min_chunk: int = 256) -> int:
    """How many splits :func:`decode_attention` asks for when it is not told.

    GPU: enough that ``rows`` x splits programs give every SM ~16; CPU: one split per
    2048 keys (rounded down, at least one).  Never more than ⌈L / min_chunk⌉.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-16 * sms // max(rows, 1))
    else:
        want = max(1, L // 2048)
    return int(max(1, min(want, -(-L // min_chunk))))


def split_kv_partials(
    q, k, v, num_splits: int, causal: bool = True, scale: float | None = None
):
    """Partial results of each key chunk, vectorized:
    ``(out (S, ..., Nq, dv), lse (S, ..., Nq))``.

    The chunks are :func:`split_chunk`'s: S <= ``num_splits`` of them (none for L = 0).
    The equal ones are taken together as views of the cache (no copy), a shorter last
    one on its own.  Scores are computed in the cache's dtype (fp32 accumulation inside
    the matmul) and the softmax statistics in fp32 (fp16/bf16 caches; else the cache's
    dtype), as a GPU kernel does.
    """
    scale = check_qkv(q, k, v, scale)
    nq, L = q.shape[-2], k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    chunk = split_chunk(L, num_splits)
    if L == 0:                                         # no keys, no split: merges to 0
        lead = (0, *q.shape[:-1])
        return (q.new_zeros((*lead, v.shape[-1]), dtype=acc),
                q.new_full(lead, float("-inf"), dtype=acc))
    n_full = L // chunk                                # all but a shorter last chunk
    qs = q * scale
    # the last key each query sees (bottom-right causal): one vector for all chunks,
    # not validate.causal_mask per chunk, so the chunks stay one batched matmul
    rows = torch.arange(nq, device=q.device)
    key_limit = rows + (L - nq) if causal else torch.full((nq,), L - 1, device=q.device)
    outs, lses = [], []
    parts = [(0, n_full, chunk)]
    if n_full * chunk < L:
        parts.append((n_full * chunk, 1, L - n_full * chunk))
    for start, n, c in parts:
        # kc, vc: (..., n, c, d), views of the cache
        kc = k[..., start:start + n * c, :].unflatten(-2, (n, c))
        vc = v[..., start:start + n * c, :].unflatten(-2, (n, c))
        s = (qs.unsqueeze(-3) @ kc.transpose(-2, -1)).to(acc)  # (..., n, Nq, c)
        key = start + torch.arange(n * c, device=q.device).view(n, 1, c)
        s = s.masked_fill(key > key_limit.view(nq, 1), float("-inf"))
        m = s.amax(dim=-1)                                     # (..., n, Nq)
        p = torch.exp(s - safe_shift(m)[..., None])            # fully masked rows: 0
        l = p.sum(dim=-1)
        outs.append(finalize((p.to(v.dtype) @ vc).to(acc), l))  # (..., n, Nq, dv)
        lses.append(state_lse(m, l))
    out = torch.cat(outs, dim=-3) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=-2) if len(lses) > 1 else lses[0]
    return out.movedim(-3, 0), lse.movedim(-2, 0)


def decode_attention(
    q, k_cache, v_cache, num_splits: int | None = None, backend: str = "torch",
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """Split-KV (Flash-Decoding) attention of ``q`` (B, H, Nq, d) against a cache
    (B, H, L, d).

    Up to ``num_splits`` key chunks (:func:`split_chunk`; by default
    :func:`default_num_splits`) are processed independently and merged by their
    logsumexps.  ``backend="triton"`` runs the Triton kernels (CUDA sm_80+, or the CPU
    under TRITON_INTERPRET=1).  ``causal`` aligns bottom-right, so with Nq = 1 every key
    is seen.  An empty cache (L = 0) gives zeros.
    """
    check_qkv(q, k_cache, v_cache, scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    L = k_cache.shape[-2]
    if num_splits is None:
        rows = math.prod(q.shape[:-1])
        num_splits = default_num_splits(rows, L, q.device)
    if backend == "triton":
        from effdl.attention.triton_kernels import triton_decode

        return triton_decode(
            q, k_cache, v_cache, num_splits=num_splits, causal=causal, scale=scale
        )
    outs, lses = split_kv_partials(
        q, k_cache, v_cache, num_splits, causal=causal, scale=scale
    )
    out, _ = merge_lse(outs, lses, dim=0)
    return out.to(q.dtype)


def lean_schedule(
    num_heads: int, tiles_per_head: int, workers: int
) -> list[list[tuple[int, int, int]]]:
    """Stream-K (Lean Attention) schedule: each worker gets an equal share (±1) of all
    key tiles.

    Returns, per worker, its segments ``(head, first_tile, end_tile)``; a worker's range
    may end in one head and continue in the next, so every worker does the same work
    however heads and lengths divide.  Each head's partial states are then merged.
    (Not :func:`split_chunk`'s rule, on purpose: that one cuts each head's keys alone,
    into equal chunks.)
    """
    if min(num_heads, tiles_per_head, workers) < 1:
        raise ValueError("num_heads, tiles_per_head and workers must all be >= 1")
    total = num_heads * tiles_per_head
    schedule, start = [], 0
    for w in range(workers):
        n = total // workers + (1 if w < total % workers else 0)
        segs, pos, end = [], start, start + n
        while pos < end:
            head, t0 = divmod(pos, tiles_per_head)
            t1 = min(tiles_per_head, t0 + (end - pos))
            segs.append((head, t0, t1))
            pos += t1 - t0
        schedule.append(segs)
        start = end
    return schedule


def lean_decode(q, k, v, workers: int, block: int = 64, scale: float | None = None) -> torch.Tensor:
    """Run :func:`lean_schedule` step by step (a readable reference, not fast): q (B, H, 1, d)."""
    scale = check_qkv(q, k, v, scale)
    B, H, nq, _ = q.shape
    if nq != 1:
        raise ValueError(f"lean_decode handles one query token (Nq = 1), got Nq = {nq}")
    L, dv = k.shape[-2], v.shape[-1]
    heads = B * H
    qf, kf, vf = q.reshape(heads, 1, -1).double(), k.reshape(heads, L, -1).double(), v.reshape(heads, L, dv).double()
    states: list[SoftmaxState | None] = [None] * heads
    for segs in lean_schedule(heads, -(-L // block), workers):
        for head, t0, t1 in segs:                                        # one worker's share
            st = init_state((1,), dv, dtype=torch.float64)
            for t in range(t0, t1):
                ks, vs = kf[head, t * block:(t + 1) * block], vf[head, t * block:(t + 1) * block]
                st = update_state(st, (qf[head] * scale) @ ks.T, vs)
            states[head] = st if states[head] is None else merge_states(states[head], st)
    out = torch.stack([s.finalize()[0] for s in states])                 # (heads, 1, dv)
    return out.reshape(B, H, 1, dv).to(q.dtype)
