"""Tiled (FlashAttention) attention in plain PyTorch: exact, never materializing the N x N matrix.

- :func:`flash1_forward` — FlashAttention-1 loop order: K/V blocks outer, Q blocks inner; the output
  and the (m, ℓ) statistics live in slow memory and are read, rescaled and written back every step.
- :func:`flash2_forward` — FlashAttention-2 loop order: Q blocks outer, K/V blocks inner; the output
  stays unnormalized in fast memory, is divided by ℓ once, and only the logsumexp L = m + log ℓ is
  stored for the backward pass.  Causal attention skips tiles that are entirely masked.
- :func:`flash2_backward` — the backward pass that recomputes P tile by tile from (q, k, lse).
- :func:`tiled_attention` — a differentiable function (custom ``autograd.Function``) built on them.

Tensors are SDPA-shaped (..., seq, dim); every tile op is batched over the leading dims.
Accumulation is in fp32 for fp16/bf16 inputs, as a GPU kernel does in registers.
"""

from __future__ import annotations

import math

import torch

from effdl.attention.softmax import accumulation_dtype, finalize, safe_shift, state_lse
from effdl.validate import causal_mask, check_block, check_qkv

#: Default tile sizes.  On a CPU, big tiles win: every tile costs a fixed ~10 µs per PyTorch op and
#: small matrix products run far below the BLAS peak (see the chapter's tile-size sweep).  A
#: (512 x 1024) fp32 score tile is 2 MiB per head — still tiny next to the N x N matrix at long N.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 1024


def flash1_forward(
    q, k, v, causal: bool = False, scale: float | None = None,
    block_q=None, block_k=None,
):
    """FlashAttention-1 order. Returns ``(out (..., Nq, dv), lse (..., Nq))``.

    Outer loop over K/V tiles (each read once); inner loop over Q tiles, whose running
    output O_i and statistics (m_i, ℓ_i) are read from and written back to the full-size
    tensors each step.
    """
    scale = check_qkv(q, k, v, scale)
    bq = check_block("block_q", block_q, DEFAULT_BLOCK_Q)
    bk = check_block("block_k", block_k, DEFAULT_BLOCK_K)
    nq, nk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    off = nk - nq                                  # bottom-right causal alignment
    acc = accumulation_dtype(q.dtype)
    # the "HBM" copies of O, m and ℓ
    O = torch.zeros((*q.shape[:-1], dv), dtype=acc, device=q.device)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros(q.shape[:-1], dtype=acc, device=q.device)
    for j0 in range(0, nk, bk):
        j1 = min(j0 + bk, nk)
        # K_j, V_j: (..., bk, d), loaded once
        kj, vj = k[..., j0:j1, :].to(acc), v[..., j0:j1, :].to(acc)
        first_row = max(0, j0 - off) if causal else 0  # rows above see none of it
        for i0 in range(first_row // bq * bq, nq, bq):
            i1 = min(i0 + bq, nq)
            # S_ij: (..., bq, bk)
            s = (q[..., i0:i1, :].to(acc) * scale) @ kj.transpose(-2, -1)
            if causal and j1 - 1 > i0 + off:
                allowed = causal_mask(
                    i1 - i0, j1 - j0, q0=i0 + off, k0=j0, device=q.device
                )
                s.masked_fill_(~allowed, float("-inf"))
            m_i, l_i, O_i = m[..., i0:i1], l[..., i0:i1], O[..., i0:i1, :]  # read back
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            shift = safe_shift(m_new)                      # rows still at -inf: 0
            p = torch.exp(s - shift[..., None])
            alpha = torch.exp(m_i - shift)                 # safe_rescale(m_i, m_new)
            l_new = alpha * l_i + p.sum(dim=-1)
            # O_i stays normalized: undo the old 1/ℓ, rescale, add the new tile,
            # divide by the new ℓ
            O[..., i0:i1, :] = finalize((alpha * l_i)[..., None] * O_i + p @ vj, l_new)
            m[..., i0:i1], l[..., i0:i1] = m_new, l_new                   # write back
    return O.to(q.dtype), state_lse(m, l)


def flash2_forward(
    q, k, v, causal: bool = False, scale: float | None = None,
    block_q=None, block_k=None, parallel: bool | None = None,
):
    """FlashAttention-2 order. Returns ``(out (..., Nq, dv), lse (..., Nq))``.

    For each Q tile: stream the K/V tiles it can see, keep (m, ℓ, acc) for the tile's
    rows, divide by ℓ once at the end.  Causal: K/V tiles right of the diagonal are
    never touched, and only tiles crossing the diagonal build a mask.  Q tiles are
    independent, so on a CPU they run on separate cores (``parallel``, default on for
    CPU tensors), each with single-threaded operations.
    """
    scale = check_qkv(q, k, v, scale)
    bq = check_block("block_q", block_q, DEFAULT_BLOCK_Q)
    bk = check_block("block_k", block_k, DEFAULT_BLOCK_K)
    nq, nk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    off = nk - nq
    acc_t = accumulation_dtype(q.dtype)
    out = torch.empty((*q.shape[:-1], dv), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=acc_t, device=q.device)
    kT = k.transpose(-2, -1)                       # a view: BLAS reads it transposed
    starts = list(range(0, nq, bq))
    workers = tile_workers(
        q.device.type == "cpu" if parallel is None else parallel, len(starts)
    )
    lead = q.shape[:-2]
    # each worker's "fast memory": one score tile, allocated once, reused every step
    numel = math.prod(lead) * min(bq, nq) * min(bk, max(nk, 1))
    scratch = [torch.empty(numel, dtype=acc_t, device=q.device) for _ in range(workers)]

    def query_tile(i0: int, worker: int) -> None:
        i1 = min(i0 + bq, nq)
        qi = q[..., i0:i1, :].to(acc_t) * scale        # scale q once, not every S tile
        m = l = o = None                               # the state; empty before tile 0
        k_end = min(nk, i1 + off) if causal else nk    # causal: later keys all masked
        for j0 in range(0, max(k_end, 0), bk):
            j1 = min(j0 + bk, k_end)
            s = _tile(scratch[worker], (*lead, i1 - i0, j1 - j0))
            torch.matmul(qi, kT[..., j0:j1].to(acc_t), out=s)  # (..., bq, bk)
            masked = causal and j1 - 1 > i0 + off      # tile crosses the diagonal
            if masked:
                allowed = causal_mask(
                    i1 - i0, j1 - j0, q0=i0 + off, k0=j0, device=q.device
                )
                s.masked_fill_(~allowed, float("-inf"))
            m_new = s.amax(dim=-1) if m is None else torch.maximum(m, s.amax(dim=-1))
            # why: only a masked tile can leave a row's max at -inf, so unmasked
            # tiles skip the guard (a (..., bq) vector op, cheap next to the tile's)
            shift = safe_shift(m_new) if masked else m_new
            p = s.sub_(shift[..., None]).exp_()        # in place: no second tile
            vj = v[..., j0:j1, :].to(acc_t)
            if m is None:                              # first tile: nothing to rescale
                l, o = p.sum(dim=-1), p @ vj
            else:
                alpha = torch.exp(m - shift)           # safe_rescale(m, m_new)
                l = l.mul_(alpha).add_(p.sum(dim=-1))
                o = o.mul_(alpha[..., None]).add_(p @ vj)
            m = m_new
        if m is None:                                  # no visible key at all
            out[..., i0:i1, :] = 0
            lse[..., i0:i1] = float("-inf")
            return
        out[..., i0:i1, :] = finalize(o, l).to(q.dtype)  # rows with ℓ = 0: 0
        lse[..., i0:i1] = state_lse(m, l)                # ... and -inf

    with torch.no_grad():                              # out= buffers: no autograd here
        run_tiles(query_tile, starts, workers)
    return out, lse


def _tile(buf: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous view of the first elements of a scratch buffer, shaped like the current tile."""
    return buf[:math.prod(shape)].view(shape)


def tile_workers(parallel: bool, n_tiles: int) -> int:
    """How many tiles run at once: one per CPU thread when ``parallel``, else one."""
    return max(1, min(torch.get_num_threads(), n_tiles)) if parallel else 1


def run_tiles(fn, starts, workers: int) -> None:
    """Call ``fn(start, worker)`` for every tile: in order, or on a CPU one tile per
    core at a time.

    Why: every PyTorch CPU operation splits itself across all cores and ends when the
    slowest core is done.  With small operations, or another program holding a core,
    each one waits; tiles that are independent run better side by side, each
    single-threaded — the way a GPU runs one query tile per SM.  Worker w takes tiles
    w, w + W, w + 2W, ...: a fixed assignment, so results that a worker accumulates
    (dQ in the backward pass) are summed in the same order on every run.
    """
    if workers <= 1:
        for s0 in starts:
            fn(s0, 0)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    grad_mode = torch.is_grad_enabled()              # thread-local: pass it on

    def worker(w):
        torch.set_num_threads(1)                     # this worker: one core
        with torch.set_grad_enabled(grad_mode):
            for s0 in starts[w::workers]:
                fn(s0, w)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="effdl-tile") as pool:
            list(pool.map(worker, range(workers)))   # re-raises a worker's error
    finally:
        torch.set_num_threads(threads)


def flash2_backward(
    q, k, v, out, lse, dout, causal: bool = False, scale: float | None = None,
    block_q=None, block_k=None, parallel: bool | None = None,
):
    """Gradients (dq, dk, dv) from (q, k, v, out, lse, dout), recomputing P per tile.

    D = rowsum(dO ∘ O); for each K/V tile j (outer) and Q tile i (inner):
    P = exp(S − L), dV_j += Pᵀ dO_i, dP = dO_i V_jᵀ, dS = P ∘ (dP − D_i),
    dQ_i += dS K_j · scale, dK_j += dSᵀ Q_i · scale.
    K/V tiles are independent except for dQ, which each worker accumulates in its own
    buffer (a GPU kernel uses atomic adds instead).
    """
    scale = check_qkv(q, k, v, scale)
    bq = check_block("block_q", block_q, DEFAULT_BLOCK_Q)
    bk = check_block("block_k", block_k, DEFAULT_BLOCK_K)
    nq, nk = q.shape[-2], k.shape[-2]
    off = nk - nq
    acc = accumulation_dtype(q.dtype)
    qa, ka, va, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    D = (do * out.to(acc)).sum(dim=-1)                 # (..., Nq)
    lse_safe = torch.where(
        torch.isneginf(lse), torch.full_like(lse, float("inf")), lse
    ).to(acc)
    dk = torch.empty_like(ka)
    dv = torch.empty_like(va)
    starts = list(range(0, nk, bk))
    workers = tile_workers(
        q.device.type == "cpu" if parallel is None else parallel, len(starts)
    )
    lead = q.shape[:-2]
    numel = math.prod(lead) * min(bq, max(nq, 1)) * min(bk, max(nk, 1))
    dq_parts = [torch.zeros_like(qa) for _ in range(workers)]  # each worker's dQ
    # P and dP tiles, reused
    scratch = [
        (torch.empty(numel, dtype=acc, device=q.device),
         torch.empty(numel, dtype=acc, device=q.device))
        for _ in range(workers)
    ]

    def key_tile(j0: int, worker: int) -> None:
        j1 = min(j0 + bk, nk)
        kj, vj = ka[..., j0:j1, :], va[..., j0:j1, :]
        dq, (p_buf, dp_buf) = dq_parts[worker], scratch[worker]
        dkj = torch.zeros_like(kj)
        dvj = torch.zeros_like(vj)
        first_row = max(0, j0 - off) if causal else 0
        for i0 in range(first_row // bq * bq, nq, bq):
            i1 = min(i0 + bq, nq)
            qi, doi = qa[..., i0:i1, :], do[..., i0:i1, :]
            shape = (*lead, i1 - i0, j1 - j0)
            s = torch.matmul(qi, kj.transpose(-2, -1), out=_tile(p_buf, shape))
            s.mul_(scale)
            if causal and j1 - 1 > i0 + off:
                allowed = causal_mask(
                    i1 - i0, j1 - j0, q0=i0 + off, k0=j0, device=q.device
                )
                s.masked_fill_(~allowed, float("-inf"))
            p = s.sub_(lse_safe[..., i0:i1, None]).exp_()  # P recomputed, never stored
            dvj += p.transpose(-2, -1) @ doi
            dp = torch.matmul(doi, vj.transpose(-2, -1), out=_tile(dp_buf, shape))
            ds = dp.sub_(D[..., i0:i1, None]).mul_(p)      # dS = P ∘ (dP − D), in place
            dq[..., i0:i1, :] += (ds @ kj) * scale
            dkj += (ds.transpose(-2, -1) @ qi) * scale
        dk[..., j0:j1, :], dv[..., j0:j1, :] = dkj, dvj

    with torch.no_grad():
        run_tiles(key_tile, starts, workers)
    dq = dq_parts[0]
    for part in dq_parts[1:]:                          # fixed order: deterministic
        dq = dq + part
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledAttentionFunction(torch.autograd.Function):
    """Forward: FlashAttention-2 tiles; saves only (q, k, v, out, lse).

    Backward: recomputes P.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):
        out, lse = flash2_forward(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.args
        dq, dk, dv = flash2_backward(
            q, k, v, out, lse, dout, causal, scale, block_q, block_k
        )
        return dq, dk, dv, None, None, None, None


def tiled_attention(q, k, v, causal: bool = False, scale: float | None = None,
                    block_q: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Exact attention in tiles of ``block_q`` queries x ``block_k`` keys; differentiable.

    Peak extra memory O(heads · block_q · block_k) instead of O(heads · N²); the backward pass
    recomputes P from the saved logsumexp instead of storing it.  Causal is bottom-right aligned.
    """
    check_qkv(q, k, v, scale)
    check_block("block_q", block_q, 1), check_block("block_k", block_k, 1)
    return TiledAttentionFunction.apply(q, k, v, causal, scale, block_q, block_k)


def causal_tile_plan(
    nq: int, nk: int, block_q: int, block_k: int
) -> dict[tuple[int, int], str]:
    """Which (query, key) tile pairs a causal pass must visit, bottom-right aligned.

    ``"full"``: every query of the tile sees every key of it (no mask needed);
    ``"partial"``: the tile crosses the diagonal (build a mask).  Pairs absent from the
    dict are entirely masked: skipped.
    """
    off = nk - nq
    plan = {}
    for i, i0 in enumerate(range(0, nq, block_q)):
        i1 = min(i0 + block_q, nq)
        for j, j0 in enumerate(range(0, nk, block_k)):
            j1 = min(j0 + block_k, nk)
            if j0 > i1 - 1 + off:                      # even the last row sees none
                continue
            plan[(i, j)] = "full" if j1 - 1 <= i0 + off else "partial"
    return plan
