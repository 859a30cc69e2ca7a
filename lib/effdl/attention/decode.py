"""The decode phase: a few query tokens against a long KV cache, split along the keys.

One new token per sequence means Nq = 1: a prefill kernel that parallelizes over (query tiles x
heads) launches only batch x heads programs, far too few to fill a GPU, and each of them streams the
whole cache alone.  Flash-Decoding splits the keys into chunks, computes a partial (output, logsumexp)
per chunk in parallel, and merges them with the associative softmax-state merge.  Lean Attention
balances the work further: every worker gets the same number of key tiles, even across heads
(stream-K).  Causal masking is bottom-right aligned: query t of Nq sees keys j <= L - Nq + t.

Grouped-query attention (GQA; multi-query when H_kv = 1) keeps H_kv < H K/V heads: query head h
reads K/V head h // G, G = H / H_kv.  Every function here accepts such a cache as it is, never
expanded: the cache is what decode reads, and a group of G query heads sharing one K/V head reads
it once.  :func:`decode_intensity` counts what that buys: about 2G/bytes-per-element FLOPs per byte.
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
    # why equal chunks: chunk s starts at s·c, so a kernel program finds its keys from
    # s and c alone (the Triton kernel needs only c).
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


def default_num_splits(
    rows: int, L: int, device: torch.device, min_chunk: int = 256
) -> int:
    """How many splits :func:`decode_attention` asks for when it is not told.

    ``rows``: the programs that run side by side before the keys are split, B·H_kv·P
    for P programs per K/V head.  :func:`decode_attention` passes B·H_kv (P = 1): one
    program serves all G·Nq query rows that read its K/V head, as
    :func:`split_kv_partials` does with one matmul, so grouping G query heads on a K/V
    head adds rows, not programs.  Flash-Decoding's reason to split is this count
    being below the number of SMs, and GQA makes it G times smaller.

    GPU: enough splits that ``rows`` x splits programs give every SM ~16; CPU: one
    split per 2048 keys (rounded down, at least one).  Never more than ⌈L / min_chunk⌉.
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
    """Partial results of each key chunk:
    ``(out (S, ..., H, Nq, dv), lse (S, ..., H, Nq))``.

    The chunks are :func:`split_chunk`'s: S <= ``num_splits`` of them (none for L = 0),
    each read as a view of the cache (no copy).  ``k``, ``v`` may be grouped-query,
    (..., H_kv, L, d) with H_kv dividing H.  Scores are computed in the cache's dtype
    (fp32 accumulation inside the matmul) and the softmax statistics in fp32 (fp16/bf16
    caches; else the cache's dtype), as a GPU kernel does.
    """
    scale = check_qkv(q, k, v, scale, grouped=True)
    nq, L = q.shape[-2], k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    if L == 0:                                         # no keys, no split: merges to 0
        lead = (0, *q.shape[:-1])
        return (q.new_zeros((*lead, v.shape[-1]), dtype=acc),
                q.new_full(lead, float("-inf"), dtype=acc))
    qs = q * scale
    g = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1   # query heads per K/V head
    if g > 1:
        # GQA without expanding the cache (decode is memory-bound, and sharing one K/V
        # head is GQA's point): the G query heads of a group become G·Nq rows of one
        # matmul against their K/V head.  Query head h = h_kv·G + i: a reshape does it
        qs = qs.unflatten(-3, (-1, g)).flatten(-3, -2)   # (..., H_kv, G·Nq, d)
    # the last key each row sees (bottom-right causal): row r holds query position
    # r % Nq (r itself only when G = 1)
    t = torch.arange(g * nq, device=q.device) % nq
    key_limit = t + (L - nq) if causal else torch.full_like(t, L - 1)
    chunk = split_chunk(L, num_splits)
    if L % chunk == 0 and k.is_contiguous() and v.is_contiguous():
        out, lse = _equal_chunks(qs, k, v, chunk, key_limit, acc)
    else:
        out, lse = _chunk_by_chunk(qs, k, v, chunk, key_limit, acc)
    if g > 1:                                          # rows back to (H, Nq)
        out = out.unflatten(-2, (g, nq)).flatten(-4, -3)
        lse = lse.unflatten(-1, (g, nq)).flatten(-3, -2)
    return out, lse


def _equal_chunks(qs, k, v, chunk, key_limit, acc):
    """All chunks at once: when they tile each head's keys exactly, (..., n, c, d) is a
    view of a contiguous cache and the two products are single batched matmuls — a few
    operations in all, whatever the number of splits (a CPU pays per operation)."""
    n = k.shape[-2] // chunk
    kc, vc = k.unflatten(-2, (n, chunk)), v.unflatten(-2, (n, chunk))  # (..., n, c, d)
    s = (qs.unsqueeze(-3) @ kc.transpose(-2, -1)).to(acc)  # (..., n, G·Nq, c)
    key = torch.arange(n * chunk, device=qs.device).view(n, 1, chunk)
    s = s.masked_fill(key > key_limit[:, None], float("-inf"))
    m = s.amax(dim=-1)                                 # (..., n, G·Nq)
    p = torch.exp(s - safe_shift(m)[..., None])        # fully masked rows: 0
    l = p.sum(dim=-1)
    out = finalize((p.to(vc.dtype) @ vc).to(acc), l)   # (..., n, G·Nq, dv)
    return out.movedim(-3, 0), state_lse(m, l).movedim(-2, 0)


def _chunk_by_chunk(qs, k, v, chunk, key_limit, acc):
    """One chunk at a time, each a view of the cache (a shorter last chunk, or a cache
    with spare capacity, would make the batched view copy the whole cache)."""
    L = k.shape[-2]
    outs, lses = [], []
    for start in range(0, L, chunk):
        # one chunk at a time, each a view of the cache: the chunks taken together as
        # one (..., n, c, d) tensor make matmul copy the cache unless n·c fills each
        # head's rows exactly (no shorter last chunk, no spare capacity)
        kc, vc = k[..., start:start + chunk, :], v[..., start:start + chunk, :]
        s = (qs @ kc.transpose(-2, -1)).to(acc)        # (..., H_kv, G·Nq, c)
        key = torch.arange(start, start + kc.shape[-2], device=qs.device)
        s = s.masked_fill(key > key_limit[:, None], float("-inf"))
        m = s.amax(dim=-1)                             # (..., H_kv, G·Nq)
        p = torch.exp(s - safe_shift(m)[..., None])    # fully masked rows: 0
        l = p.sum(dim=-1)
        outs.append(finalize((p.to(v.dtype) @ vc).to(acc), l))
        lses.append(state_lse(m, l))
    return torch.stack(outs), torch.stack(lses)        # (S, ..., H_kv, G·Nq[, dv])


def decode_attention(
    q, k_cache, v_cache, num_splits: int | None = None, backend: str = "torch",
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """Split-KV (Flash-Decoding) attention of ``q`` (B, H, Nq, d) against a cache
    (B, H_kv, L, d), H_kv dividing H (H_kv < H: grouped-query attention).

    Up to ``num_splits`` key chunks (:func:`split_chunk`; by default
    :func:`default_num_splits`) are processed independently and merged by their
    logsumexps.  ``backend="triton"`` runs the Triton kernels (CUDA sm_80+, or the CPU
    under TRITON_INTERPRET=1).  ``causal`` aligns bottom-right, so with Nq = 1 every key
    is seen.  An empty cache (L = 0) gives zeros.
    """
    check_qkv(q, k_cache, v_cache, scale, grouped=True)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    L = k_cache.shape[-2]
    if num_splits is None:
        programs = math.prod(k_cache.shape[:-2])       # B·H_kv: see default_num_splits
        num_splits = default_num_splits(programs, L, q.device)
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


def lean_decode(
    q, k, v, workers: int, block: int = 64, scale: float | None = None
) -> torch.Tensor:
    """Run :func:`lean_schedule` step by step (a readable reference, not fast):
    q (B, H, 1, d), k, v (B, H_kv, L, d) with H_kv dividing H.

    The schedule's heads are the B·H_kv K/V heads; the G = H / H_kv query heads that
    share one ride along as G rows of the same tiles.
    """
    scale = check_qkv(q, k, v, scale, grouped=True)
    if q.ndim != 4 or q.shape[-2] != 1:
        raise ValueError(
            f"lean_decode handles q of shape (B, H, 1, d), one query token, got "
            f"{tuple(q.shape)}; call decode_attention for Nq > 1"
        )
    B, H, _, _ = q.shape
    L, dv = k.shape[-2], v.shape[-1]
    heads = B * k.shape[1]                                 # the K/V heads
    g = H // k.shape[1]                                    # query heads per K/V head
    qf = q.reshape(heads, g, -1).double() * scale          # (heads, G, d)
    kf = k.reshape(heads, L, -1).double()
    vf = v.reshape(heads, L, dv).double()
    states: list[SoftmaxState | None] = [None] * heads
    for segs in lean_schedule(heads, -(-L // block), workers):
        for head, t0, t1 in segs:                          # one worker's share
            st = init_state((g,), dv, dtype=torch.float64)
            for t in range(t0, t1):
                ks = kf[head, t * block:(t + 1) * block]
                vs = vf[head, t * block:(t + 1) * block]
                st = update_state(st, qf[head] @ ks.T, vs)
            old = states[head]
            states[head] = st if old is None else merge_states(old, st)
    out = torch.stack([s.finalize()[0] for s in states])   # (heads, G, dv)
    return out.reshape(B, H, 1, dv).to(q.dtype)


def decode_intensity(
    batch: int, heads: int, heads_kv: int, L: int, d: int, bytes_per_el=2
) -> dict:
    """FLOPs, bytes moved and arithmetic intensity of one decode step: one query token
    per sequence against a cache of ``L`` keys, head dim ``d`` for K and V.

    FLOPs.  Per query head the scores q·kᵀ take 2·L·d FLOPs (a multiply-add is 2) and
    P·v another 2·L·d; the softmax's O(L) is left out:

        FLOPs = 4·B·H·L·d.

    Bytes, ``bytes_per_el`` = b each.  The K and V caches are read once per K/V head
    (the G = H / H_kv query heads of a group share that read); q is read and the
    output written once per query head:

        bytes = b·(2·B·H_kv·L·d + 2·B·H·d) = 2·b·B·d·(H_kv·L + H).

    Intensity = FLOPs / bytes = 2·H·L / (b·(H_kv·L + H)) = (2/b)·G·L / (L + G),
    which is 2G/b for L >> G: about G FLOPs per byte in fp16/bf16 (b = 2), growing in
    proportion to G.  Ungrouped (G = 1), ~1 FLOP/byte is far below any GPU's ridge
    point: decode is memory-bound, and sharing K/V heads multiplies its intensity by G.
    Returns ``{"flops", "bytes", "intensity"}`` (floats).
    """
    sizes = dict(batch=batch, heads=heads, heads_kv=heads_kv, L=L, d=d)
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if heads % heads_kv:
        raise ValueError(
            f"heads_kv ({heads_kv}) must divide heads ({heads}): each K/V head "
            "serves a whole group of query heads; pick heads_kv among the divisors "
            f"of {heads}"
        )
    b = bytes_per_el
    number = isinstance(b, (int, float)) and not isinstance(b, bool)
    if not number or not math.isfinite(b) or b <= 0:
        raise ValueError(
            "bytes_per_el must be a positive number of bytes per element (2 for "
            f"fp16/bf16, 4 for fp32), got {bytes_per_el!r}"
        )
    flops = 4.0 * batch * heads * L * d
    nbytes = 2.0 * b * batch * d * (heads_kv * L + heads)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes}
