"""Every check fed the wrong answers a student might plausibly write, and the library's own answer.

For each check: the mistakes the exercise is about (a two-pass softmax, an empty split that keeps a
weight, a clamped quantizer, a timer without warm-up...) and at least two more; each must fail, and
where the check can recognise the mistake its message must say what it is (``match``).  Then every
check must refuse the library's function that answers it, a pasted copy of that function's code, and
a function that calls it.  The wrong answers are written as a student would, without the library's
answer functions (a check refuses those for that reason alone).
"""

from __future__ import annotations

import inspect
import linecache
import math
import statistics
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from effdl import chapters
from effdl.checks import ExerciseFailed, answer_paths, resolve


def _reject(chapter, name, wrong, match):
    with pytest.raises(ExerciseFailed, match=match):
        getattr(chapters.module(chapter, "checks"), name)(wrong)


# ============================================================================== attention
def _softmax(x, block, *, rescale=True, last=True, per_block=False, shift=True, normalize=True):
    """A one-pass online softmax with the mistakes a student makes switched on."""
    n = x.shape[-1]
    if per_block:
        return torch.cat([torch.exp(b - b.amax(-1, keepdim=True)) / torch.exp(b - b.amax(-1, keepdim=True))
                          .sum(-1, keepdim=True) for b in x.split(block, -1)], -1)
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for s in range(0, n if last else n - n % block, block):
        xb = x[..., s:s + block]
        m_new = torch.maximum(m, xb.amax(-1)) if shift else torch.zeros_like(m)
        l = (l * torch.exp(m - m_new) if rescale and shift else l) + torch.exp(xb - m_new[..., None]).sum(-1)
        m = m_new
    e = torch.exp(x - m[..., None])
    return e / l[..., None] if normalize else e


def _two_pass_softmax(x, block):  # blocked, but one pass for the max and another for the sum
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype)
    for s in range(0, x.shape[-1], block):
        m = torch.maximum(m, x[..., s:s + block].amax(-1))
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for s in range(0, x.shape[-1], block):
        l = l + torch.exp(x[..., s:s + block] - m[..., None]).sum(-1)
    return torch.exp(x - m[..., None]) / l[..., None]


def _safe_softmax(x, block):  # the textbook three passes, written out
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _blocked_safe_softmax(x, block):  # blocks side by side, but the sum waits for the row's max
    xb = F.pad(x, (0, -x.shape[-1] % block), value=-math.inf).unflatten(-1, (-1, block))
    m = xb.amax(-1).amax(-1)                         # pass 1: the max of every block, then of the row
    l = torch.exp(xb - m[..., None, None]).sum(-1).sum(-1)   # pass 2: the sum, against that max
    return torch.exp(x - m[..., None]) / l[..., None]


def _merge(m1, l1, a1, m2, l2, a2, *, empty=True, rescale_l=True, rescale_acc=True, swap=False, keep_m1=False):
    m = m1 if keep_m1 else torch.maximum(m1, m2)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m) if empty else m
    w1, w2 = torch.exp(m1 - shift), torch.exp(m2 - shift)
    if swap:
        w1, w2 = w2, w1
    l = l1 * w1 + l2 * w2 if rescale_l else l1 + l2
    acc = a1 * w1[..., None] + a2 * w2[..., None] if rescale_acc else a1 + a2
    return m, l, acc


def _plan(nq, nk, bq, bk, *, top_left=False, transpose=False, floor=False, strict_full=False):
    off = 0 if top_left else nk - nq
    plan = {}
    for i, i0 in enumerate(range(0, nq - nq % bq if floor else nq, bq)):
        last_q = min(i0 + bq, nq) - 1
        for j, j0 in enumerate(range(0, nk - nk % bk if floor else nk, bk)):
            last_k = min(j0 + bk, nk) - 1
            if j0 <= last_q + off:
                full = last_k < i0 + off if strict_full else last_k <= i0 + off
                plan[(j, i) if transpose else (i, j)] = "full" if full else "partial"
    return plan


def _split_merge(outs, lses, *, empty_weight_one=False, shift=True, normalize=True, all_empty_safe=True):
    if empty_weight_one:  # "avoid the NaN": treat an empty split as lse 0
        lses = torch.where(torch.isneginf(lses), torch.zeros_like(lses), lses)
    if not shift:
        w = torch.exp(lses)
        return (outs * w[..., None]).sum(0) / w.sum(0)[..., None]
    if not normalize:
        return (outs * torch.exp(lses - lses.amax(0))[..., None]).sum(0)
    lse = torch.logsumexp(lses, 0)
    if all_empty_safe:
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return (outs * torch.exp(lses - lse)[..., None]).sum(0)


def _tiles(M, d, *, ignore_s=False, swap=False, square=False, unrounded=False, bc=16):
    """FA2's tiles for fast memory M in whole 16-wide blocks, with the mistakes switched on."""
    if unrounded:  # the largest Br that fits, not rounded down to a tensor-core block
        return (M - 2 * bc * d) // (2 * d + 2 + bc), bc
    if square:
        b = math.isqrt(M // 4) // 16 * 16
        return b, b
    if ignore_s:  # Q_i, O_i, K_j, V_j fill M: nothing left for S_ij, m_i and l_i
        return (M - 2 * bc * d) // (2 * d) // 16 * 16, bc
    br = (M - 2 * bc * d) // (2 * d + 2 + bc) // 16 * 16
    return (bc, br) if swap else (br, bc)


def _fa2(q, k, v, causal, bq, bk, *, rescale=True, each_step=False, top_left=False, last_q=True,
         last_k=True, whole=False, lse_m=False, scale=True, safe=True, row_block=False, full_mask=False,
         running_max=True):
    """FA2's forward loop, as a student writes it, with the mistakes switched on."""
    B, H, nq, d = q.shape
    nk = k.shape[-2]
    off = 0 if top_left else nk - nq
    c = d ** -0.5 if scale else 1.0
    if whole:  # the textbook formula: S and P of the whole sequence
        s = q @ k.transpose(-2, -1) * c
        if causal:
            s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + off, -math.inf)
        return torch.softmax(s, -1).nan_to_num() @ v, torch.logsumexp(s, -1)
    if full_mask:  # one causal mask for the whole matrix, sliced per tile
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(off)
    out, lse = torch.zeros_like(q), q.new_full((B, H, nq), -math.inf)
    bk = nk if row_block else bk  # a query tile against all keys at once
    for i0 in range(0, nq if last_q else nq - nq % bq, bq):
        i1 = min(i0 + bq, nq)
        m = q.new_full((B, H, i1 - i0), -math.inf)
        l = q.new_zeros(B, H, i1 - i0)
        acc = q.new_zeros(B, H, i1 - i0, d)
        for j0 in range(0, nk if last_k else nk - nk % bk, bk):
            j1 = min(j0 + bk, nk)
            s = q[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-2, -1) * c
            if causal:
                ok = (allowed[i0:i1, j0:j1] if full_mask
                      else torch.arange(j0, j1)[None, :] <= torch.arange(i0, i1)[:, None] + off)
                s = s.masked_fill(~ok, -math.inf)
            m_new = torch.maximum(m, s.amax(-1)) if running_max else torch.zeros_like(m)
            shift = torch.where(torch.isneginf(m_new), 0.0, m_new) if safe else m_new
            p = torch.exp(s - shift[..., None])
            alpha = torch.exp(m - shift)
            l_new = alpha * l + p.sum(-1)
            if each_step:  # normalized at every step, the previous division never undone
                acc = (alpha[..., None] * acc + p @ v[..., j0:j1, :]) / l_new[..., None]
            else:
                acc = (alpha[..., None] * acc if rescale else acc) + p @ v[..., j0:j1, :]
            m, l = m_new, l_new
        out[..., i0:i1, :] = acc if each_step else acc / l.clamp_min(1e-30)[..., None]
        lse[..., i0:i1] = m if lse_m else m + torch.log(l)
    return out, lse


def _sdpa_fa2(q, k, v, causal, bq, bk):  # PyTorch's fused kernel for the output
    return F.scaled_dot_product_attention(q, k, v), _fa2(q, k, v, causal, bq, bk)[1]


def _fa2_step(s, m, l, acc, vj):
    """One key tile folded into a running state (m, l, acc): the online softmax, written out."""
    m_new = torch.maximum(m, s.amax(-1))
    shift = torch.where(torch.isneginf(m_new), 0.0, m_new)
    p = torch.exp(s - shift[..., None])
    alpha = torch.exp(m - shift)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + p @ vj


def _scores(q, k, causal, i0, i1, j0, j1):
    s = q[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        off = k.shape[-2] - q.shape[-2]
        s = s.masked_fill(torch.arange(j0, j1)[None, :] > torch.arange(i0, i1)[:, None] + off, -math.inf)
    return s


def _hbm_state(q, k, v, causal, bq, bk, *, key_outer=True):
    """The running state (m, l, acc) of every query row in full-size tensors, read and written back
    at each step: with key tiles outside, FlashAttention-1's order; with query tiles outside, FA2's
    order with its state in slow memory."""
    B, H, nq, d = q.shape
    nk = k.shape[-2]
    m, l, acc = q.new_full((B, H, nq), -math.inf), q.new_zeros(B, H, nq), torch.zeros_like(q)
    pairs = [(i0, j0) for i0 in range(0, nq, bq) for j0 in range(0, nk, bk)]
    for i0, j0 in sorted(pairs, key=lambda p: p[::-1]) if key_outer else pairs:
        i1, j1 = min(i0 + bq, nq), min(j0 + bk, nk)
        s = _scores(q, k, causal, i0, i1, j0, j1)
        mi, li, ai = _fa2_step(s, m[..., i0:i1], l[..., i0:i1], acc[..., i0:i1, :], v[..., j0:j1, :])
        m[..., i0:i1], l[..., i0:i1], acc[..., i0:i1, :] = mi, li, ai
    return acc / l.clamp_min(1e-30)[..., None], m + torch.log(l)


def _two_pass_fa2(q, k, v, causal, bq, bk):
    """Per query tile, one pass over the key tiles for m and l, a second one for P V."""
    B, H, nq, d = q.shape
    nk = k.shape[-2]
    out, lse = torch.zeros_like(q), q.new_full((B, H, nq), -math.inf)
    for i0 in range(0, nq, bq):
        i1 = min(i0 + bq, nq)
        m, l = q.new_full((B, H, i1 - i0), -math.inf), q.new_zeros(B, H, i1 - i0)
        for j0 in range(0, nk, bk):                      # pass 1: the row statistics
            s = _scores(q, k, causal, i0, i1, j0, min(j0 + bk, nk))
            m_new = torch.maximum(m, s.amax(-1))
            shift = torch.where(torch.isneginf(m_new), 0.0, m_new)
            l = l * torch.exp(m - shift) + torch.exp(s - shift[..., None]).sum(-1)
            m = m_new
        shift = torch.where(torch.isneginf(m), 0.0, m)
        acc = q.new_zeros(B, H, i1 - i0, d)
        for j0 in range(0, nk, bk):                      # pass 2: the output, with the final m and l
            j1 = min(j0 + bk, nk)
            acc = acc + torch.exp(_scores(q, k, causal, i0, i1, j0, j1) - shift[..., None]) @ v[..., j0:j1, :]
        out[..., i0:i1, :], lse[..., i0:i1] = acc / l.clamp_min(1e-30)[..., None], m + torch.log(l)
    return out, lse


def _fa2_variant(q, k, v, causal, bq, bk, *, scale_q=True, f64=False, product="@", heads="batched",
                 skip=True, reverse=False):
    """Correct FA2 loops written other ways: the scale on q or on S, float64 inside, the product by
    @, torch.matmul, torch.einsum or torch.bmm, a loop per head (outside or innermost), invisible
    causal tiles skipped or masked, the key tiles in reverse order."""
    B, H, nq, d = q.shape
    nk = k.shape[-2]
    dtype = q.dtype
    if f64:
        q, k, v = q.double(), k.double(), v.double()
    c = d ** -0.5
    out, lse = torch.zeros_like(q), q.new_full((B, H, nq), -math.inf)
    mul = {"@": lambda a, b: a @ b.mT, "matmul": lambda a, b: torch.matmul(a, b.transpose(-2, -1)),
           "einsum": lambda a, b: torch.einsum("...qd,...kd->...qk", a, b),
           "bmm": lambda a, b: torch.bmm(a.reshape(-1, *a.shape[-2:]),
                                         b.reshape(-1, *b.shape[-2:]).transpose(1, 2)).view(*a.shape[:-1], -1)}
    every = [(slice(None), slice(None))]
    each = [(b, h) for b in range(B) for h in range(H)]
    for outer in each if heads == "outer" else every:
        for i0 in range(0, nq, bq):
            i1 = min(i0 + bq, nq)
            state = {}
            keys = list(range(0, nk, bk))
            for j0 in keys[::-1] if reverse else keys:
                j1 = min(j0 + bk, nk)
                if causal and skip and j0 > i1 - 1 + nk - nq:
                    continue
                for n, (b, h) in enumerate(each if heads == "inner" else [outer]):
                    qi = q[b, h, i0:i1] * c if scale_q else q[b, h, i0:i1]
                    s = mul[product if qi.ndim == 4 or product != "bmm" else "@"](qi, k[b, h, j0:j1])
                    s = s if scale_q else s * c
                    if causal:
                        s = s.masked_fill(torch.arange(j0, j1)[None, :] > torch.arange(i0, i1)[:, None] + nk - nq,
                                          -math.inf)
                    empty = q.new_full(s.shape[:-1], -math.inf)
                    st = state.get(n, (b, h, empty, torch.zeros_like(empty), q.new_zeros(*empty.shape, d)))
                    state[n] = (b, h, *_fa2_step(s, *st[2:], v[b, h, j0:j1]))
            for b, h, m, l, acc in state.values():
                out[b, h, i0:i1] = acc / l.clamp_min(1e-30)[..., None]
                lse[b, h, i0:i1] = m + torch.log(l)
    return out.to(dtype), lse.to(dtype)


def _causal_io(N, d, Br, Bc, *, causal=True, diagonal=True, partial=True, lse=True, whole=True,
               by_index=False, ints=True):
    """Causal FA2's (reads, writes), as a student counts them, with the mistakes switched on."""
    reads = N * d                                          # Q, once
    for i, i0 in enumerate(range(0, N, Br)):
        last = min(i0 + Br, N) - 1                         # the query tile's last query
        if not causal:
            tiles = -(-N // Bc)
        elif by_index:                                     # right only when Br == Bc
            tiles = i + 1
        elif not ints:
            tiles = last / Bc + 1
        else:
            tiles = last // Bc + 1 if diagonal else i0 // Bc    # else: strictly below the diagonal
        keys = min(N, tiles * Bc) if partial else tiles * Bc
        reads += 2 * (keys if whole else last + 1) * d     # K_j and V_j
    return reads, N * d + (N if lse else 0)


def _tile(Qi, dOi, Li, Di, Kj, Vj, scale, mask, *, use_D=True, tile_D=False, dk_T=True, scaled=True,
          use_L=True, use_mask=True, invert=False):
    """One backward key tile, as a student writes it, with the mistakes switched on."""
    s = Qi @ Kj.transpose(-2, -1) * scale
    if mask is not None and use_mask:
        s = s.masked_fill(mask if invert else ~mask, -math.inf)
    p = torch.exp(s - Li[..., None]) if use_L else torch.exp(s)
    dp = dOi @ Vj.transpose(-2, -1)
    D = (p * dp).sum(-1) if tile_D else Di
    ds = p * (dp - D[..., None]) if use_D else p * dp
    c = scale if scaled else 1.0
    dq = ds @ Kj * c
    dk = (ds.transpose(-2, -1) if dk_T else ds) @ Qi * c
    return dq, dk, p.transpose(-2, -1) @ dOi


def _intensity(B, H, Hkv, L, d, b, *, gqa=True, v=True, two=True, per_el=True, q_out=True):
    flops = (2 if two else 1) * 2 * B * H * L * d             # q·kᵀ and P·v
    cache = (2 if v else 1) * B * (Hkv if gqa else H) * L * d   # K and V
    return flops / ((cache + (2 * B * H * d if q_out else 0)) * (b if per_el else 1))


ATTENTION = [
    # the online softmax must be one pass over blocks
    ("check_online_softmax", _two_pass_softmax, "went over the blocks 2 times"),
    ("check_online_softmax", lambda x, block: torch.softmax(x, -1), "calls torch.softmax"),
    ("check_online_softmax", _safe_softmax, "read whole rows"),
    ("check_online_softmax", _blocked_safe_softmax, "value computed from later blocks"),
    ("check_online_softmax", resolve("effdl.attention.softmax.safe_softmax"), "function of the library"),
    ("check_online_softmax", lambda x, block: _softmax(x, block, shift=False), "NaN or inf.*subtract the running"),
    ("check_online_softmax", lambda x, block: _softmax(x, block, rescale=False), "not rescaled"),
    ("check_online_softmax", lambda x, block: _softmax(x, block, last=False), "last, shorter block"),
    ("check_online_softmax", lambda x, block: _softmax(x, block, per_block=True), "normalized on its own"),
    ("check_online_softmax", lambda x, block: _softmax(x, block, normalize=False), "not divided"),
    # merging states: the empty state, and the rescaling of both sides
    ("check_merge_states", lambda *s: _merge(*s, empty=False), "empty"),
    ("check_merge_states", lambda *s: _merge(*s, rescale_l=False), "l was added without rescaling"),
    ("check_merge_states", lambda *s: _merge(*s, rescale_acc=False), "acc was added without rescaling"),
    ("check_merge_states", lambda *s: _merge(*s, swap=True), "swapped"),
    ("check_merge_states", lambda *s: _merge(*s, keep_m1=True), "max\\(m1, m2\\)"),
    # the causal plan
    ("check_causal_tile_plan", lambda *a: _plan(*a, top_left=True), "top-left"),
    ("check_causal_tile_plan", lambda *a: _plan(*a, transpose=True), "\\(key tile, query tile\\)"),
    ("check_causal_tile_plan", lambda *a: _plan(*a, floor=True), "shorter tile"),
    ("check_causal_tile_plan", lambda *a: _plan(*a, strict_full=True), "should be 'full'"),
    # causal FA2's I/O: the skipped tiles, the diagonal tiles, partial tiles, whole numbers
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, causal=False), "every key tile was counted"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, diagonal=False), "diagonal tiles are missing"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, partial=False), "last key tile was counted as Bc"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, lse=False), "one logsumexp per row is written too"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, ints=False), "float"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, whole=False), "only the visible keys"),
    ("check_fa2_causal_io", lambda *a: _causal_io(*a, by_index=True), "unless Br = Bc"),
    # tile sizes: fit, whole numbers, a large query tile
    ("check_tile_sizes", lambda M, d: (M // d // 16 * 16, d), "elements on chip"),
    ("check_tile_sizes", lambda M, d: (M / (4 * d), min(d, M / (8 * d))), "float"),
    ("check_tile_sizes", lambda M, d: _tiles(M, d, ignore_s=True), "S_ij, Br x Bc, and m_i"),
    ("check_tile_sizes", lambda M, d: _tiles(M, d, swap=True), "swapped"),
    ("check_tile_sizes", lambda M, d: _tiles(M, d, square=True), "make Br as large as fits"),
    ("check_tile_sizes", lambda M, d: _tiles(M, d, unrounded=True), "multiples of 16"),
    ("check_tile_sizes", lambda M, d: _tiles(M, d, bc=1), "multiples of 16"),
    # the split-KV merge
    ("check_split_kv_merge", lambda outs, lses: outs.mean(0), "plain average"),
    ("check_split_kv_merge", lambda o, s: _split_merge(o, s, empty_weight_one=True), "empty split"),
    ("check_split_kv_merge", lambda o, s: _split_merge(o, s, shift=False), "overflowed"),
    ("check_split_kv_merge", lambda o, s: _split_merge(o, s, normalize=False), "divided by their sum"),
    ("check_split_kv_merge", lambda o, s: _split_merge(o, s, all_empty_safe=False), "every split is empty"),
    ("check_split_kv_merge", lambda o, s: (o * torch.softmax(s, 0)[..., None]).sum(0), "every split is empty"),
    # FA2's forward loop: accurate in float32, in tiles, bottom-right causal
    ("check_fa2_forward", lambda *a: _fa2(*a, rescale=False), "accumulator was not rescaled"),
    ("check_fa2_forward", lambda *a: _fa2(*a, each_step=True), "divided by ℓ at every key tile"),
    ("check_fa2_forward", lambda *a: _fa2(*a, top_left=True), "aligned top-left"),
    ("check_fa2_forward", lambda *a: _fa2(*a, last_k=False), "last, shorter key tile is missing"),
    ("check_fa2_forward", lambda *a: _fa2(*a, last_q=False), "last, shorter query tile"),
    ("check_fa2_forward", lambda *a: _fa2(*a, last_q=False, last_k=False), "last, shorter tiles are missing"),
    ("check_fa2_forward", lambda *a: _fa2(*a, whole=True), "the whole 200 x 230 score matrix"),
    ("check_fa2_forward", lambda *a: _fa2(*a, full_mask=True), "a causal mask of the whole"),
    ("check_fa2_forward", lambda *a: _fa2(*a, row_block=True), "against all 230 keys"),
    ("check_fa2_forward", _sdpa_fa2, "fused attention"),
    ("check_fa2_forward", lambda *a: _fa2(*a, lse_m=True), "lse is the running max m"),
    ("check_fa2_forward", lambda *a: _fa2(*a, scale=False), "not scaled"),
    ("check_fa2_forward", lambda *a: _fa2(*a, running_max=False), "exp overflowed"),
    ("check_fa2_forward", lambda *a: _fa2(*a, safe=False), "see no key.*NaN.*-inf - \\(-inf\\)"),
    ("check_fa2_forward", _hbm_state, "key tiles outside, query tiles inside is FlashAttention-1's order"),
    ("check_fa2_forward", _two_pass_fa2, "twice: two passes over the keys: FA2 finds the max, the sum"),
    ("check_fa2_forward", lambda *a: _hbm_state(*a, key_outer=False), "running state in slow memory"),
    # one backward key tile
    ("check_backward_tile", lambda *a: _tile(*a, use_D=False), "leaves out D"),
    ("check_backward_tile", lambda *a: _tile(*a, tile_D=True), "this tile's P ∘ dP only"),
    ("check_backward_tile", lambda *a: _tile(*a, dk_T=False), "dK must be dSᵀ Q"),
    ("check_backward_tile", lambda *a: _tile(*a, scaled=False), "miss the factor scale"),
    ("check_backward_tile", lambda *a: _tile(*a, use_L=False), "recomputed as exp\\(S\\)"),
    ("check_backward_tile", lambda *a: _tile(*a, use_mask=False), "mask was ignored"),
    ("check_backward_tile", lambda *a: _tile(*a, invert=True), "mask is inverted"),
    # the arithmetic intensity of a GQA decode step
    ("check_decode_intensity", lambda *a: _intensity(*a, gqa=False), "once per query head"),
    ("check_decode_intensity", lambda *a: _intensity(*a, v=False), "only K was counted"),
    ("check_decode_intensity", lambda *a: _intensity(*a, two=False), "2 FLOPs per multiply-add"),
    ("check_decode_intensity", lambda *a: _intensity(*a, per_el=False), "bytes_per_el was ignored"),
    ("check_decode_intensity", lambda *a: _intensity(*a, q_out=False), "q \\(read\\) and the output"),
    ("check_decode_intensity", lambda *a: (4 * a[0] * a[1] * a[3] * a[4], 1.0), "one number"),
]


def test_the_attention_helpers_without_mistakes_pass():
    """The FA2 loop, backward tile and intensity above, with no mistake switched on, pass: the failures
    come from the mistakes."""
    from effdl.attention import checks

    checks.check_fa2_forward(lambda *a: _fa2(*a))
    checks.check_backward_tile(lambda *a: _tile(*a))
    checks.check_decode_intensity(lambda *a: _intensity(*a))
    checks.check_fa2_causal_io(lambda *a: _causal_io(*a))


@pytest.mark.parametrize("way", [
    dict(scale_q=False, product="einsum"),
    dict(f64=True, product="matmul", skip=False),
    dict(product="bmm", reverse=True),
    dict(heads="outer"),
    dict(heads="inner", product="einsum", scale_q=False),
], ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items()))
def test_fa2_loops_written_other_ways_pass(way):
    """The check follows the tiles through the scale, a cast, any product and a loop over heads: FA2's
    order written another way passes, and every product of a query tile with a key tile is seen."""
    from effdl.attention import checks

    checks.check_fa2_forward(lambda *a: _fa2_variant(*a, **way))
    B, H, nq, nk, d, bq, bk = 2, 2, 70, 90, 8, 16, 32
    q, k, v = torch.randn(B, H, nq, d), torch.randn(B, H, nk, d), torch.randn(B, H, nk, d)
    seen = checks._fa2_trial(lambda *a: _fa2_variant(*a, **way), q, k, v, True, bq, bk)
    logged = sorted((h, i, j) for kind, *tiles in seen["order"] if kind == "S"
                    for h in tiles[0] for i in tiles[1] for j in tiles[2])
    visible = [(h, i0 // bq, j0 // bk) for h in range(B * H) for i0 in range(0, nq, bq)
               for j0 in range(0, nk, bk) if not way.get("skip", True) or j0 <= min(i0 + bq, nq) - 1 + nk - nq]
    assert logged == sorted(visible)


# ============================================================================== distill
def _ecf(f, t, *, swap=False, total=False, conj=False, axis=1):
    p = t @ f.T                                      # (m, n)
    re, im = (p.cos().sum(axis), p.sin().sum(axis)) if total else (p.cos().mean(axis), p.sin().mean(axis))
    im = -im if conj else im
    return (im, re) if swap else (re, im)


def _paired(fr, fs, t, *, conj=False, root="per", reduce="mean", detach=False, two=False, weight=0.5):
    """The paired CF loss (α = β = ``weight``), correct with every switch off."""
    if detach:
        fs = fs.detach()
    n = fr.shape[0]
    if two:                                          # two matmuls, two cos and two sin calls
        pr, ps = fr @ t.T, fs @ t.T
        c, s = torch.cat([pr.cos(), ps.cos()]), torch.cat([pr.sin(), ps.sin()])
    else:
        p = torch.cat([fr, fs]) @ t.T                # (n + k, m)
        c, s = p.cos(), p.sin()
    im_s = -s[n:].mean(0) if conj else s[n:].mean(0)
    d2 = (c[:n].mean(0) - c[n:].mean(0)) ** 2 + (s[:n].mean(0) - im_s) ** 2
    per = weight * d2
    if root == "none":
        return per.mean()
    if root == "outside":
        return per.mean().sqrt()
    return per.sqrt().sum() if reduce == "sum" else per.sqrt().mean()


def _unroll_bytes(shapes, saved, es, *, weights=True, activations=True, bytes_=True, grads=False,
                  add_dims=False):
    """Bytes one more unrolled inner step keeps, correct with every switch at its default."""
    size = (lambda s: sum(s)) if add_dims else (lambda s: torch.Size(s).numel())
    n = sum(size(s) for s in shapes)
    elems = (n if weights else 0) + (n if grads else 0) + (saved if activations else 0)
    return elems * (es if bytes_ else 1)


def _amp_phase(fr, fs, t, *, factor=2.0, swap=False, squared=False):
    rr, ir = _ecf(fr, t)
    rs, is_ = _ecf(fs, t)
    ar, as_ = (rr**2 + ir**2 + 1e-12).sqrt(), (rs**2 + is_**2 + 1e-12).sqrt()
    amp = ((rr**2 + ir**2) - (rs**2 + is_**2)) ** 2 if squared else (ar - as_) ** 2
    phase = (factor * (ar * as_ - (rr * rs + ir * is_))).clamp_min(0)
    return (phase, amp) if swap else (amp, phase)


def _herding(features, k, *, exclude=True, greedy=True, dtype=torch.long):
    f = features.double()
    target, acc, picked = f.mean(0), torch.zeros(f.shape[1], dtype=f.dtype), []
    if not greedy:  # the rows nearest the mean, one by one
        return ((f - target) ** 2).sum(1).argsort()[:k].to(dtype)
    for j in range(k):
        dist = (((acc + f) / (j + 1) - target) ** 2).sum(1)
        if exclude:
            dist[picked] = float("inf")
        i = int(dist.argmin())
        picked.append(i)
        acc += f[i]
    return torch.tensor(picked, dtype=dtype)


def _minmax(sampler, optimizer, f_real, f_syn, *, sign=-1.0, detach=True, same_noise=True, cancel=False):
    import effdl.distill as dd

    if detach:
        f_real, f_syn = f_real.detach(), f_syn.detach()
    noise = sampler.draw_noise()
    optimizer.zero_grad()
    loss = dd.cf_discrepancy(f_real, f_syn, sampler(noise))
    if cancel:
        loss.backward(retain_graph=True)
        (-loss).backward()
    else:
        (sign * loss).backward()
    optimizer.step()
    with torch.no_grad():
        after = dd.cf_discrepancy(f_real, f_syn, sampler(noise if same_noise else sampler.draw_noise()))
    return float(loss.detach()), float(after)


DISTILL = [
    ("check_amplitude_phase", lambda fr, fs, t: _amp_phase(fr, fs, t, factor=1.0), "factor 2"),
    ("check_amplitude_phase", lambda fr, fs, t: _amp_phase(fr, fs, t, swap=True), "swapped"),
    ("check_amplitude_phase", lambda fr, fs, t: _amp_phase(fr, fs, t, squared=True), "moduli"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, conj=True), "conjugated"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, root="none"), "no square root"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, root="outside"), "root of the mean"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, reduce="sum"), "a sum over the freq"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, weight=1.0), "without the weights"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, detach=True), "no gradient reached f_syn"),
    ("check_paired_cf_loss", lambda fr, fs, t: _paired(fr, fs, t, two=True), "2 matrix products"),
    ("check_herding", lambda f, k: _herding(f, k, exclude=False), "picked twice"),
    ("check_herding", lambda f, k: _herding(f, k, greedy=False), "nearest the mean one by one"),
    ("check_herding", lambda f, k: _herding(f, k, dtype=torch.float32), "torch.long"),
    ("check_herding", lambda f, k: list(range(k)), "return a tensor"),
    ("check_minmax_step", lambda *a: _minmax(*a, sign=1.0), "descent step"),
    ("check_minmax_step", lambda *a: _minmax(*a, cancel=True), "gradient is zero"),
    ("check_minmax_step", lambda *a: _minmax(*a, detach=False), "detach them"),
    ("check_minmax_step", lambda *a: _minmax(*a, same_noise=False), "same noise"),
    ("check_unroll_bytes_per_step", lambda *a: _unroll_bytes(*a, weights=False), "weights θ_j"),
    ("check_unroll_bytes_per_step", lambda *a: _unroll_bytes(*a, activations=False), "saved activations"),
    ("check_unroll_bytes_per_step", lambda *a: _unroll_bytes(*a, bytes_=False), "not bytes"),
    ("check_unroll_bytes_per_step", lambda *a: _unroll_bytes(*a, grads=True), "gradient"),
    ("check_unroll_bytes_per_step", lambda *a: _unroll_bytes(*a, add_dims=True), "a·b·c"),
]


# ============================================================================== tokens
def _density(keys, T, thr, frac, *, self_count=False, ge_sim=False, ge_count=False, cosine=True, of_t=False,
             flip=False):
    B, n, d = keys.shape
    k = keys.reshape(B, n // T, T, d)
    if cosine:
        k = k / k.norm(dim=-1, keepdim=True)
    sim = k @ k.transpose(-2, -1)
    similar = ((sim >= thr) if ge_sim else (sim > thr)).sum(-1) - (0 if self_count else 1)
    limit = frac * (T if of_t else T - 1)
    redundant = ((similar >= limit) if ge_count else (similar > limit)).to(keys.dtype).mean(-1)
    return redundant if flip else 1.0 - redundant


def _topk(x, a, k, *, order=True, fuse="dropped"):
    B, n, D = x.shape
    idx = a.topk(k, dim=1).indices
    idx = idx.sort(dim=1).values if order else idx
    kept = torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
    w = a.scatter(1, idx, 0.0) if fuse != "all" else a
    if fuse == "unweighted":
        w = (w > 0).to(x.dtype)
    return kept, (w[..., None] * x).sum(1) / w.sum(1, keepdim=True)


def _tome(x, size, metric, r, *, weighted=True, most=True, a_even=True):
    if not a_even:  # A = odd positions: reorder so that they come first in each pair
        perm = torch.arange(x.shape[1]).view(-1, 2).flip(1).flatten() if x.shape[1] % 2 == 0 else None
        if perm is None:
            return x[:, :-r], size[:, :-r]
        x, size, metric = x[:, perm], size[:, perm], metric[:, perm]
    m = metric / metric.norm(dim=-1, keepdim=True)
    best, partner = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(-1)
    order = best.argsort(-1, descending=most)
    src, stay = order[:, :r], order[:, r:]
    dst = torch.gather(partner, 1, src)
    D = x.shape[-1]
    w = size if weighted else torch.ones_like(size)
    xa, xb, wa, wb = x[:, ::2], x[:, 1::2], w[:, ::2], w[:, 1::2]
    take = lambda t, i: torch.gather(t, 1, i[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    sum_b = (wb[..., None] * xb).scatter_add(1, dst[..., None].expand(-1, -1, D), take(wa[..., None] * xa, src))
    w_b = wb.scatter_add(1, dst, torch.gather(wa, 1, src))
    size_b = size[:, 1::2].scatter_add(1, dst, torch.gather(size[:, ::2], 1, src))
    return torch.cat([take(xa, stay), sum_b / w_b[..., None]], 1), torch.cat([torch.gather(size[:, ::2], 1, stay),
                                                                               size_b], 1)


def _vit(n, d, depth, r, *, attn=2, out_proj=True, mac=2, ratio=None, per_block=False):
    h = int(d * (r if ratio is None else ratio))
    linear = mac * n * d * 3 * d + (mac * n * d * d if out_proj else 0) + 2 * mac * n * d * h
    return (1 if per_block else depth) * (linear + attn * mac * n * n * d)


def _delta(x, bits, group, *, clamp=False, fp16=True, original=False, chain=False):
    qmax = 2 ** (bits - 1) - 1
    step = (x.abs().amax(1) / qmax).clamp_min(1e-8)
    if fp16:
        step = step.half().float().clamp_min(2 ** -24)
    x_hat = torch.empty_like(x)
    for t in range(x.shape[0]):
        src = x if original else x_hat
        ref = 0.0 if t % group == 0 else src[t - 1 if chain else t - t % group]
        q = torch.round((x[t] - ref) / step[t])
        x_hat[t] = ref + (q.clamp(-qmax - 1, qmax) if clamp else q) * step[t]
    return x_hat


TOKENS = [
    ("check_crop_density", lambda *a: _density(*a, self_count=True), "counted among its own"),
    ("check_crop_density", lambda *a: _density(*a, ge_sim=True), "use >, not >="),
    ("check_crop_density", lambda *a: _density(*a, ge_count=True), "needs more than that"),
    ("check_crop_density", lambda *a: _density(*a, cosine=False), "normalize the keys"),
    ("check_crop_density", lambda *a: _density(*a, of_t=True), "\\(T - 1\\)"),
    ("check_crop_density", lambda *a: _density(*a, flip=True), "redundant fraction"),
    ("check_topk_fuse", lambda x, a, k: _topk(x, a, k, order=False), "original order"),
    ("check_topk_fuse", lambda x, a, k: _topk(x, a, k, fuse="all"), "\\*all\\* tokens"),
    ("check_topk_fuse", lambda x, a, k: _topk(x, a, k, fuse="unweighted"), "unweighted mean"),
    ("check_tome_step", lambda *a: _tome(*a, weighted=False), "size-weighted sum"),
    ("check_tome_step", lambda *a: _tome(*a, most=False), "least\\* similar"),
    ("check_tome_step", lambda *a: _tome(*a, a_even=False), "even positions"),
    ("check_vit_flops", lambda *a: _vit(*a, attn=1), "two products"),
    ("check_vit_flops", lambda *a: _vit(*a, mac=1), "counts 2 FLOPs"),
    ("check_vit_flops", lambda *a: _vit(*a, out_proj=False), "output projection"),
    ("check_vit_flops", lambda *a: _vit(*a, ratio=4.0), "use mlp_ratio"),
    ("check_vit_flops", lambda *a: _vit(*a, per_block=True), "multiply by depth"),
    ("check_delta_quantize", lambda *a: _delta(*a, original=True), "reconstructed\\* anchor"),
    ("check_delta_quantize", lambda *a: _delta(*a, clamp=True), "do not clamp"),
    ("check_delta_quantize", lambda *a: _delta(*a, fp16=False), "fp16"),
    ("check_delta_quantize", lambda *a: _delta(*a, chain=True), "group's anchor"),
]


# ============================================================================== measuring
def _timer(fn, device, *, warmup=3, repeat=10, sync_before=True, sync_after=True, reduce=statistics.median,
           scale=1e3, per_call=True):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync_before:
            device.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync_after:
            device.synchronize()
        times.append((time.perf_counter() - t0) * scale)
    return reduce(times) if per_call else sum(times)


def _loop_timer(fn, device, repeat=10):  # a mean over a loop, synchronized only at the end
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    device.synchronize()
    return (time.perf_counter() - t0) * 1e3 / repeat


def _event_timer(fn, device, *, warmup=3, repeat=10):  # CUDA-style events
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(repeat):
        start, end = device.Event(enable_timing=True), device.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    device.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def _read(events, **mistake):
    from test_exercise_trace import _read as read  # a student's read_profile with one mistake

    return read(events, **mistake)


def _bottleneck(stages, *, warmup=1, repeat=3, percent=False):
    """Times every stage (after ``warmup`` calls); the slowest and its share of the total."""
    ms = {}
    for name, stage in stages.items():
        for _ in range(warmup):
            stage()
        t0 = time.perf_counter()
        for _ in range(repeat):
            stage()
        ms[name] = (time.perf_counter() - t0) / repeat
    name = max(ms, key=ms.get)
    share = ms[name] / sum(ms.values())
    return name, 100 * share if percent else share


MEASURING = [
    ("check_async_timer", _loop_timer, "first call"),
    # a median-only timer: each trap alone must make it fail
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, warmup=0), "warm up"),
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, sync_before=False), "earlier work"),
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, warmup=0, sync_before=False), "first call|earlier work"),
    ("check_async_timer", lambda fn, dev: _event_timer(fn, dev, warmup=0), "warm up"),
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, sync_after=False), "timed the launch"),
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, scale=1.0), "seconds"),
    ("check_async_timer", lambda fn, dev: _timer(fn, dev, per_call=False), "divide by the number of calls"),
    ("check_matmul_intensity", lambda m, n, k, e: 2 * m * n * k / (m * k + k * n + m * n), None),
    ("check_matmul_intensity", lambda m, n, k, e: m * n * k / ((m * k + k * n + m * n) * e), None),
    ("check_roofline_time", lambda f, b, p, w: f / p + b / w, None),
    ("check_roofline_time", lambda f, b, p, w: f / p, None),
    ("check_attention_layer_flops", lambda b, n, d: 4 * b * n * n * d, None),
    ("check_attention_layer_flops", lambda b, n, d: 8 * b * n * d * d + 2 * b * n * n * d, None),
    ("check_find_bottleneck", lambda stages: (next(iter(stages)), 1.0), None),
    ("check_matmul_intensity", lambda m, n, k, e: 2 * m * n * k / ((m * k + k * n) * e), None),  # no output
    ("check_roofline_time", lambda f, b, p, w: min(f / p, b / w), None),
    ("check_attention_layer_flops", lambda b, n, d: 4 * b * n * d * d + 2 * b * n * n * d, None),  # MAC = 1
    ("check_attention_layer_flops", lambda b, n, d: 6 * b * n * d * d + 4 * b * n * n * d, None),  # no W_out
    ("check_find_bottleneck", lambda stages: _bottleneck(stages, warmup=0), "first call"),
    ("check_find_bottleneck", lambda stages: _bottleneck(stages, percent=True), "share"),
    ("check_read_profile", lambda ev: _read(ev, self_time=False), "largest total time"),
    ("check_read_profile", lambda ev: _read(ev, nested_cover=True), "nested ones too"),
    ("check_read_profile", lambda ev: _read(ev, main_only=False), "read the main thread only"),
    ("check_read_profile", lambda ev: _read(ev, scale=1e9), "not a fraction"),
]

# ============================================================================== inference
def _kv_bytes(config, tokens, batch, b, *, two=True, kv=True, layers=True, head=True, per_seq=True):
    head_dim = config["d_model"] // config["n_head"] if head else config["d_model"]
    heads = config["n_kv_head"] if kv else config["n_head"]
    n = (2 if two else 1) * (config["n_layer"] if layers else 1) * heads * head_dim
    return n * tokens * (batch if per_seq else 1) * b


def _append(kc, vc, n, kn, vn, *, at=0, whole=False, new=True, swap=False):
    end = n + kn.shape[2]
    kc[:, :, n + at:end + at] = kn
    vc[:, :, n + at:end + at] = vn
    k, v = (kc, vc) if whole else (kc[:, :, :end if new else n], vc[:, :, :end if new else n])
    return (v, k) if swap else (k, v)


def _gather(pool, table, length, *, use_table=True, order=True, trim=True):
    if not use_table:
        return pool.reshape(-1, pool.shape[-1])[:length]
    t = table if order else sorted(table)
    out = torch.cat([pool[b] for b in t])
    return out[:length] if trim else out


def _greedy(drafted, best, *, bonus=True, prefix=True, own=True):
    d, b = [int(x) for x in drafted], [int(x) for x in best]
    if prefix:
        a = 0
        while a < len(d) and d[a] == b[a]:
            a += 1
        kept = d[:a]
    else:
        kept = [x for x, y in zip(d, b) if x == y]
        a = len(kept)
    if not bonus:
        return kept
    if not own and a < len(d):
        return kept + [d[a]]
    return kept + [b[a]]


def _spec(p, q, x, u, w, *, residual=True, invert=False, normalize=True, clamp=True, fixed=False):
    px, qx = p.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]
    accept = (u < 0.5) if fixed else (u * qx < px)
    accept = ~accept if invert else accept
    r = (p - q) if residual else p
    r = r.clamp_min(0) if clamp else r
    cdf = r.cumsum(1)
    if normalize:
        cdf = cdf / cdf[:, -1:].clamp_min(1e-300)
    redraw = torch.searchsorted(cdf, w[:, None], right=True)[:, 0].clamp_max(p.shape[1] - 1)
    return torch.where(accept, x, redraw)


INFERENCE = [
    ("check_kv_cache_bytes", lambda c, t, b, e: _kv_bytes(c, t, b, e, two=False), "factor 2"),
    ("check_kv_cache_bytes", lambda c, t, b, e: _kv_bytes(c, t, b, e, kv=False), "n_kv_head"),
    ("check_kv_cache_bytes", lambda c, t, b, e: _kv_bytes(c, t, b, e, layers=False), "n_layer"),
    ("check_kv_cache_bytes", lambda c, t, b, e: _kv_bytes(c, t, b, e, head=False), "d_model // n_head"),
    ("check_kv_cache_bytes", lambda c, t, b, e: _kv_bytes(c, t, b, e, per_seq=False), "batch"),
    ("check_append_kv", lambda *a: _append(*a, at=-1), "not length - 1"),
    ("check_append_kv", lambda *a: _append(*a, whole=True), "preallocated buffer"),
    ("check_append_kv", lambda *a: _append(*a, new=False), "shape"),
    ("check_append_kv", lambda *a: _append(*a, swap=True), "swapped"),
    ("check_append_kv", lambda kc, vc, n, kn, vn: (torch.cat([kc[:, :, :n], kn], 2),
                                                   torch.cat([vc[:, :, :n], vn], 2)), "copied"),
    ("check_gather_kv", lambda p, t, n: _gather(p, t, n, use_table=False), "table names"),
    ("check_gather_kv", lambda p, t, n: _gather(p, t, n, order=False), "not sorted"),
    ("check_gather_kv", lambda p, t, n: _gather(p, t, n, trim=False), "partly"),
    ("check_greedy_accept", lambda d, b: _greedy(d, b, bonus=False), "bonus"),
    ("check_greedy_accept", lambda d, b: _greedy(d, b, prefix=False), "first disagreement"),
    ("check_greedy_accept", lambda d, b: _greedy(d, b, own=False), "not the draft's"),
    ("check_accept_or_resample", lambda *a: _spec(*a, residual=False), "residual"),
    ("check_accept_or_resample", lambda *a: _spec(*a, invert=True), "inverted"),
    ("check_accept_or_resample", lambda *a: _spec(*a, fixed=True), "not a fixed one"),
    ("check_accept_or_resample", lambda *a: _spec(*a, normalize=False), "differ"),
    ("check_accept_or_resample", lambda *a: _spec(*a, clamp=False), "differ"),
]

# ============================================================================== memory
def _step(P, T, A, *, moments=8, grads_all=False, acts=True, frozen=True, size=4):
    weights = size * (P if frozen else T)
    grads = size * (P if grads_all else T)
    return weights + grads + moments * size // 4 * T + (A if acts else 0)


def _nf4(w, *, levels="nf4", scale="absmax", rounding="nearest"):
    from effdl.memory.quant import NF4_LEVELS

    grid = {"nf4": NF4_LEVELS, "uniform": torch.linspace(-1, 1, 16)}.get(levels)
    s = {"absmax": w.abs().max(), "mean": w.abs().mean(), "max": w.max(), "none": torch.tensor(1.0),
         "std": w.std() if w.numel() > 1 else w.abs().mean()}[scale]
    if s == 0:
        return torch.zeros_like(w)
    x = w / s
    if levels == "int4":  # absmax int4: 15 evenly spaced levels
        return torch.round(x * 7).clamp(-7, 7) / 7 * s
    if rounding == "nearest":
        q = grid[(x[:, None] - grid).abs().argmin(1)]
    else:
        down = grid[(torch.bucketize(x, grid, right=True) - 1).clamp(0, 15)]
        up = grid[torch.bucketize(x, grid).clamp(0, 15)]
        q = down if rounding == "floor" else torch.where(x >= 0, down, up)
    return q * s


def _lora(x, W, A, B, alpha, *, scale="alpha/r", base=True, w_t=True, a_t=True):
    r, inp = A.shape
    c = {"alpha/r": alpha / r, "alpha": alpha, "none": 1.0, "alpha/in": alpha / inp}[scale]
    update = ((x @ A.T) if a_t else (x @ A)) @ B.T
    out = c * update
    return out + ((x @ W.T) if w_t else (x @ W)) if base else out


def _mix(z, s, gate, *, sigmoid=True, swap=False, one_minus=True, detach=False):
    b = torch.sigmoid(gate) if sigmoid else gate
    b = b.item() if detach else b  # a Python number: the right values, no gradient
    if swap:
        z, s = s, z
    return ((1 - b) if one_minus else 1) * z + b * s


def _prefetch(L, k, *, ahead=None, reissue=False, clamp=True):
    ahead = k - 1 if ahead is None else ahead(k)
    loaded, out = 0, []
    for i in range(L):
        end = min(L, i + ahead + 1) if clamp else i + ahead + 1
        out.append(list(range(i if reissue else loaded, end)))
        loaded = max(loaded, end)
    return out


MEMORY = [
    ("check_step_bytes", lambda P, T, A: _step(P, T, A, moments=4), "two moments"),
    ("check_step_bytes", lambda P, T, A: _step(P, T, A, grads_all=True), "no gradient"),
    ("check_step_bytes", lambda P, T, A: _step(P, T, A, acts=False), "activations"),
    ("check_step_bytes", lambda P, T, A: _step(P, T, A, frozen=False), "every weight is stored"),
    ("check_step_bytes", lambda P, T, A: _step(P, T, A, size=1), "4 bytes"),
    ("check_step_bytes", lambda P, T, A: 4 * P + 16 * T + A, "not 16"),  # trained weights twice
    ("check_nf4_round_trip", lambda w: _nf4(w, levels="uniform"), "uniform grid"),
    ("check_nf4_round_trip", lambda w: _nf4(w, levels="int4"), "evenly spaced"),
    ("check_nf4_round_trip", lambda w: _nf4(w, scale="none"), "divide the block by its absmax"),
    ("check_nf4_round_trip", lambda w: _nf4(w, scale="mean"), "not the mean"),
    ("check_nf4_round_trip", lambda w: _nf4(w, scale="std"), "standard deviation"),
    ("check_nf4_round_trip", lambda w: _nf4(w, rounding="floor"), "not down"),
    ("check_nf4_round_trip", lambda w: _nf4(w, rounding="zero"), "towards zero"),
    ("check_nf4_round_trip", lambda w: _nf4(w, scale="max"), "not max"),
    ("check_lora_forward", lambda *a: _lora(*a, scale="alpha"), "not alpha"),
    ("check_lora_forward", lambda *a: _lora(*a, scale="none"), "scale the update by alpha / r"),
    ("check_lora_forward", lambda *a: _lora(*a, scale="alpha/in"), "not the input width"),
    ("check_lora_forward", lambda *a: _lora(*a, base=False), "frozen layer's output"),
    ("check_lora_forward", lambda *a: _lora(*a, w_t=False), "check the transposes"),
    ("check_lora_forward", lambda *a: _lora(*a, a_t=False), "check the transposes"),
    ("check_ladder_mix", lambda z, s, g: _mix(z, s, g, sigmoid=False), "logit"),
    ("check_ladder_mix", lambda z, s, g: _mix(z, s, g, swap=True), "swapped"),
    ("check_ladder_mix", lambda z, s, g: _mix(z, s, g, one_minus=False), "weigh z by 1 - β"),
    ("check_ladder_mix", lambda z, s, g: _mix(z, s, g, detach=True), "no gradient reaches the gate"),
    ("check_prefetch_schedule", lambda L, k: _prefetch(L, k, ahead=lambda k: k), "not k"),
    ("check_prefetch_schedule", lambda L, k: _prefetch(L, k, reissue=True), "not loaded again"),
    ("check_prefetch_schedule", lambda L, k: _prefetch(L, k, clamp=False), "no layer"),
    ("check_prefetch_schedule", lambda L, k: _prefetch(L, k, ahead=lambda k: max(1, k - 1)), "k = 1"),
]

MISTAKES = {"attention": ATTENTION, "distill": DISTILL, "tokens": TOKENS, "measuring": MEASURING,
            "inference": INFERENCE, "memory": MEMORY}
CASES = [pytest.param(ch, *m, id=f"{ch}-{m[0]}-{i}") for ch, ms in MISTAKES.items() for i, m in enumerate(ms)]


@pytest.mark.parametrize("chapter, name, wrong, match", CASES)
def test_check_rejects_a_plausible_mistake_and_says_which(chapter, name, wrong, match):
    _reject(chapter, name, wrong, match)


@pytest.mark.parametrize("chapter", sorted(MISTAKES))
def test_every_exercise_gets_at_least_three_mistakes(chapter):
    """The mistake the exercise is about and at least two more, for every check the grader scores."""
    from collections import Counter

    counts = Counter(m[0] for m in MISTAKES[chapter])
    wanted = chapters.module(chapter, "checks").__all__
    assert set(counts) == set(wanted), set(wanted) ^ set(counts)
    assert min(counts.values()) >= 3, counts


# ============================================================================== the library's own answer
def _copy(obj):
    """A pasted copy of a library function: the same source, defined outside the library (as in a
    notebook), under another name."""
    fn = getattr(obj, "__func__", obj)
    src = textwrap.dedent(inspect.getsource(fn))
    src = src.replace(f"def {fn.__name__}(", "def pasted(", 1)
    namespace = dict(inspect.getmodule(fn).__dict__)
    namespace["__name__"] = "notebook"
    filename = f"<pasted {fn.__qualname__}>"  # IPython keeps each cell's source like this
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), namespace)
    return namespace["pasted"]


ANSWERED = [pytest.param(ch, name, id=f"{ch}-{name}") for ch in sorted(MISTAKES)
            for name in chapters.module(ch, "checks").__all__]


@pytest.mark.parametrize("chapter, name", ANSWERED)
def test_check_refuses_the_library_answer(chapter, name):
    """The answer itself, a copy of its code, and a function that calls it all fail, saying why."""
    check = getattr(chapters.module(chapter, "checks"), name)
    paths = answer_paths(check)
    if not paths:  # no library function answers it: any library function is refused
        from effdl.measure import benchmark

        _reject(chapter, name, benchmark, "function of the library")
        return
    answer = resolve(paths[0])
    _reject(chapter, name, answer, "library's own")
    _reject(chapter, name, _copy(answer), "same code as the library's")
    calls = f"def calls(*args):\n    return {answer.__qualname__}(*args)\n"
    namespace = {"__name__": "notebook", answer.__qualname__.split(".")[0]:
                 getattr(inspect.getmodule(answer), answer.__qualname__.split(".")[0])}
    exec(calls, namespace)
    _reject(chapter, name, namespace["calls"], "calls the library's|library's own")


def test_every_check_declares_its_answers():
    """``REVEALS`` names a check of the chapter, and every path resolves to a library function."""
    for chapter in sorted(MISTAKES):
        module = chapters.module(chapter, "checks")
        assert set(module.REVEALS) == set(module.__all__), chapter
        for paths in module.REVEALS.values():
            for p in paths:
                obj = resolve(p)
                assert callable(obj) and obj.__module__.startswith("effdl."), p


def test_a_short_answer_written_the_same_way_is_not_refused():
    """A two-line answer an honest student may write exactly like the library (without its comments)
    passes; pasted with its comments, it is refused."""
    from effdl.distill import checks

    def mine(param_shapes, saved_elems, element_size=4):
        n_params = sum(math.prod(shape) for shape in param_shapes)
        return element_size * (n_params + saved_elems)

    checks.check_unroll_bytes_per_step(mine)
    with pytest.raises(ExerciseFailed, match="same code"):
        checks.check_unroll_bytes_per_step(_copy(resolve("effdl.distill.unroll.bytes_per_inner_step")))


def test_the_correct_variants_pass():
    """The helpers above with no mistake switched on are correct: the failures come from the mistakes."""
    from effdl.attention import checks as a
    from effdl.tokens import checks as t

    a.check_online_softmax(lambda x, block: _softmax(x, block))
    a.check_merge_states(lambda *s: _merge(*s))
    a.check_causal_tile_plan(lambda *args: _plan(*args))
    a.check_tile_sizes(lambda M, d: _tiles(M, d))
    a.check_split_kv_merge(lambda o, s: _split_merge(o, s))
    t.check_crop_density(lambda *args: _density(*args))
    t.check_topk_fuse(lambda x, a_, k: _topk(x, a_, k))
    t.check_tome_step(lambda *args: _tome(*args))
    t.check_vit_flops(lambda *args: _vit(*args))
    t.check_delta_quantize(lambda *args: _delta(*args))
    from effdl.distill import checks as dc
    from effdl.measuring import checks as mc

    dc.check_paired_cf_loss(lambda fr, fs, t_: _paired(fr, fs, t_))
    dc.check_amplitude_phase(lambda fr, fs, t_: _amp_phase(fr, fs, t_))
    dc.check_herding(lambda f, k: _herding(f, k))
    dc.check_minmax_step(lambda *args: _minmax(*args))
    dc.check_unroll_bytes_per_step(lambda *args: _unroll_bytes(*args))
    mc.check_async_timer(lambda fn, dev: _timer(fn, dev))
    mc.check_async_timer(lambda fn, dev: _event_timer(fn, dev))


def test_the_memory_helpers_without_mistakes_pass():
    """The memory chapter's helpers above with no mistake switched on are correct."""
    from effdl.memory import checks as m

    m.check_step_bytes(lambda P, T, A: _step(P, T, A))
    m.check_nf4_round_trip(lambda w: _nf4(w))
    m.check_lora_forward(lambda *a: _lora(*a))
    m.check_ladder_mix(lambda z, s, g: _mix(z, s, g))
    m.check_prefetch_schedule(lambda L, k: _prefetch(L, k))


def test_a_vectorized_one_pass_softmax_passes():
    """Blocks reduced side by side (padded and reshaped) and their states merged is one pass too."""
    from effdl.attention import checks

    def vectorized(x, block):
        pad = (-x.shape[-1]) % block
        xb = F.pad(x, (0, pad), value=float("-inf")).unflatten(-1, (-1, block))
        mb = xb.amax(-1)
        lb = torch.exp(xb - mb[..., None]).sum(-1)
        m = mb.amax(-1)
        l = (lb * torch.exp(mb - m[..., None])).sum(-1)
        return torch.exp(x - m[..., None]) / l[..., None]

    checks.check_online_softmax(vectorized)
