"""Token reducers: one interface, seven ways to shorten a ViT's token sequence mid-network.

Every reducer is a function ``reducer(x, ctx, keep=..., **options) -> Reduced``:

- ``x``: ``(B, N, dim)`` tokens, [CLS] at index 0;
- ``ctx``: a :class:`~effdl.tokens.vit.TokenContext` (attention weights and keys of the block before
  the reducer, keys of the first block, token sizes, which crop each patch is in, a generator);
- ``keep``: fraction of the patch tokens to keep, in (0, 1]; ``keep=1`` returns the input unchanged.

It returns a :class:`~effdl.tokens.vit.Reduced`: the new tokens ([CLS] kept first, padding last
with size 0), their sizes, and where each old token went.  Fixed-ratio reducers return exactly
``budget(n_patches, keep)`` patch tokens; :func:`tcc` chooses its count per crop and page.
Bind the options with :func:`make` (``make("evit", keep=0.5)``) to get ``reducer(x, ctx)`` for
:meth:`TinyViT.forward <effdl.tokens.vit.TinyViT.forward>`.

==============  ==============================================================================
keep_all        the naive baseline: every token
random_drop     keep a uniformly random subset
pool            average neighbouring tokens (raster order within the page) into ``budget`` groups
evit            top-k by [CLS] attention; the rest fused into one attention-weighted token
tome            bipartite soft matching on keys; size-weighted merges (proportional attention)
lat             drop tokens with the least attention paid to them (Latency Adjustable Transformer)
tcc             correlation-guided: per-crop budget from key redundancy, sampling by [CLS]
                attention, plus the page's [CLS]-attention outliers (IQR rule)
==============  ==============================================================================
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from effdl.tokens.vit import Reduced, TokenContext

__all__ = ["budget", "make", "REDUCERS", "keep_all", "random_drop", "pool", "evit", "tome", "lat", "tcc",
           "crop_density", "tcc_budget", "iqr_outliers", "bipartite_merge", "topk_fuse"]


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep must be a fraction in (0, 1] (1 = keep every token), got {keep!r}")
    return float(keep)


def budget(n_patches: int, keep: float) -> int:
    """Patch tokens a fixed-ratio reducer keeps: ``round(keep * n_patches)``, at least 1."""
    return max(1, min(n_patches, round(_check_keep(keep) * n_patches)))


def _identity(x: torch.Tensor, ctx: TokenContext) -> Reduced:
    B, N = x.shape[:2]
    return Reduced(x, ctx.size, torch.arange(N, device=x.device).expand(B, N))


def _select(x: torch.Tensor, ctx: TokenContext, chosen: torch.Tensor) -> Reduced:
    """Keep the [CLS] token and the patch tokens where ``chosen`` (B, n_patches) is True.

    Kept tokens stay in their original order; pages that keep fewer are padded (size 0) at the end.
    """
    B, N, D = x.shape
    keep_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), chosen], 1)  # (B, N)
    slot = keep_mask.long().cumsum(1) - 1  # the new position of each kept token (no sort needed)
    n_out = int(slot[:, -1].max()) + 1
    dest = torch.where(keep_mask, slot, n_out)  # dropped tokens go to a scratch slot, cut off below
    # why index_copy_ of whole rows into a flat (B*(n_out+1), D) buffer: it moves each token's D values
    # as one row, where scatter_ along dim 1 needs an expanded (B, N, D) index and goes element by
    # element (about 3x slower on CPU at batch 64); the result is bit-identical
    flat = (dest + (n_out + 1) * torch.arange(B, device=x.device)[:, None]).flatten()
    new_x = x.new_zeros(B * (n_out + 1), D).index_copy_(0, flat, x.reshape(B * N, D)).view(B, n_out + 1, D)[:, :n_out]
    new_size = ctx.size.new_zeros(B, n_out + 1).scatter_(1, dest, ctx.size)[:, :n_out]
    return Reduced(new_x, new_size, torch.where(keep_mask, slot, -1))


def keep_all(x: torch.Tensor, ctx: TokenContext, keep: float = 1.0) -> Reduced:
    """The naive baseline: every token goes on (``keep`` is accepted and ignored)."""
    _check_keep(keep)
    return _identity(x, ctx)


def random_drop(x: torch.Tensor, ctx: TokenContext, keep: float = 0.5) -> Reduced:
    """Keep ``budget(n, keep)`` patch tokens chosen uniformly at random
    (``ctx.generator``)."""
    k = budget(ctx.n_patches, keep)
    if k == ctx.n_patches:
        return _identity(x, ctx)
    B = x.shape[0]
    r = torch.rand(B, ctx.n_patches, generator=ctx.generator).to(x.device)
    chosen = torch.zeros(B, ctx.n_patches, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, r.topk(k, dim=1).indices, True)
    return _select(x, ctx, chosen)


def pool(x: torch.Tensor, ctx: TokenContext, keep: float = 0.5) -> Reduced:
    """Average runs of neighbouring patch tokens (raster order) into
    ``budget(n, keep)`` tokens.

    Runs are contiguous and non-overlapping (lengths differ by at most one); each output
    is the size-weighted mean of its run and its size is the run's total size.
    """
    n, k = ctx.n_patches, budget(ctx.n_patches, keep)
    if k == n:
        return _identity(x, ctx)
    B, N, D = x.shape
    bounds = torch.round(torch.arange(k + 1) * (n / k)).long()
    # (n,) run of each patch
    group = torch.bucketize(torch.arange(n), bounds[1:], right=True).to(x.device)
    member = F.one_hot(group, k).to(x.dtype).T  # (k, n)
    s = ctx.size[:, 1:]  # (B, n)
    size = (member @ s.T).T  # (B, k)
    # (B, k, D)
    pooled = (member @ (s[..., None] * x[:, 1:])) / size[..., None].clamp_min(1e-12)
    where = torch.cat(
        [
            torch.zeros(B, 1, dtype=torch.long, device=x.device),
            (group + 1).expand(B, -1),
        ],
        1,
    )
    return Reduced(
        torch.cat([x[:, :1], pooled], 1),
        torch.cat([ctx.size[:, :1], size], 1),
        where,
    )


def topk_fuse(x: torch.Tensor, a: torch.Tensor, k: int):
    """Keep the ``k`` patch tokens with the largest score ``a``; fuse the others into
    one.

    x: (B, n, D) patch tokens; a: (B, n) non-negative scores ([CLS] attention).
    Returns ``(kept (B, k, D) in their original order, fused (B, D) the a-weighted mean
    of the rest, chosen (B, n) bool)``.
    """
    B, n, D = x.shape
    chosen = torch.zeros(B, n, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, a.topk(k, dim=1).indices, True)
    kept = x[chosen].view(B, k, D)  # boolean indexing keeps the original order
    w = a * (~chosen)
    fused = (w[..., None] * x).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return kept, fused, chosen


def evit(x: torch.Tensor, ctx: TokenContext, keep: float = 0.5) -> Reduced:
    """EViT: keep the top ``budget-1`` patches by [CLS] attention and fuse the rest into one token.

    The fused token is the attention-weighted mean of the dropped tokens (:func:`topk_fuse`), so
    the total count (kept + fused) equals ``budget(n, keep)``.
    """
    n, k = ctx.n_patches, budget(ctx.n_patches, keep)
    if k == n:
        return _identity(x, ctx)
    a = ctx.cls_attention()
    _, fused, chosen = topk_fuse(x[:, 1:], a, max(1, k - 1))
    kept = _select(x, ctx, chosen)
    if k == 1:  # no room for a fused token
        return kept
    fused_size = (ctx.size[:, 1:] * (~chosen)).sum(1)
    where = kept.where.clone()
    where[:, 1:][~chosen] = kept.x.shape[1]
    return Reduced(torch.cat([kept.x, fused[:, None]], 1), torch.cat([kept.size, fused_size[:, None]], 1), where)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """One ToMe step on patch tokens: merge the ``r`` most similar (A, B) pairs.

    Tokens alternate into sets A (even) and B (odd); each A token finds its most similar
    B token (cosine of ``metric``); the ``r`` best edges merge A into B by a
    size-weighted average.
    x: (B, n, D); size: (B, n); metric: (B, n, d). Returns
    ``(x', size', metric', where)`` with ``n - r`` tokens ordered
    [unmerged A..., B...] and ``where`` (B, n) the new slot of each token.
    """
    Bsz, n, D = x.shape
    nA = (n + 1) // 2
    r = min(r, nA, n - nA)
    if r <= 0:
        return x, size, metric, torch.arange(n, device=x.device).expand(Bsz, n)
    m = F.normalize(metric, dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, nA, nB)
    best, best_b = scores.max(-1)  # each A token's most similar B token
    edge_order = best.argsort(-1, descending=True)
    src, unm = edge_order[:, :r], edge_order[:, r:]  # A tokens that merge / stay
    dst = torch.gather(best_b, 1, src)  # (B, r) their B partners

    # size-weighted sum into B, then the new size divides it out
    def merge(values, weights):
        a, b = values[:, ::2], values[:, 1::2]
        wa, wb = weights[:, ::2], weights[:, 1::2]
        d = values.shape[-1]
        b_sum = (wb[..., None] * b).scatter_add(
            1,
            dst[..., None].expand(-1, -1, d),
            torch.gather(wa[..., None] * a, 1, src[..., None].expand(-1, -1, d)),
        )
        return torch.gather(a, 1, unm[..., None].expand(-1, -1, d)), b_sum

    sa, sb = size[:, ::2], size[:, 1::2]
    sb_new = sb.scatter_add(1, dst, torch.gather(sa, 1, src))
    xa, xb_sum = merge(x, size)
    ma, mb_sum = merge(metric, size)
    new_x = torch.cat([xa, xb_sum / sb_new[..., None].clamp_min(1e-12)], 1)
    new_m = torch.cat([ma, mb_sum / sb_new[..., None].clamp_min(1e-12)], 1)
    new_size = torch.cat([torch.gather(sa, 1, unm), sb_new], 1)
    n_unm = unm.shape[1]
    where = torch.empty(Bsz, n, dtype=torch.long, device=x.device)
    where_a = torch.empty(Bsz, nA, dtype=torch.long, device=x.device)
    where_a.scatter_(1, unm, torch.arange(n_unm, device=x.device).expand(Bsz, -1))
    where_a.scatter_(1, src, n_unm + dst)
    where[:, ::2] = where_a
    where[:, 1::2] = n_unm + torch.arange(n - nA, device=x.device)
    return new_x, new_size, new_m, where


def tome(x: torch.Tensor, ctx: TokenContext, keep: float = 0.5) -> Reduced:
    """ToMe: bipartite soft matching on keys (mean over heads) until ``budget(n, keep)`` remain.

    [CLS] is never merged.  One matching step can at most halve the tokens, so lower budgets
    repeat it.  Sizes add up; the ViT's proportional attention uses them.
    """
    n, k = ctx.n_patches, budget(ctx.n_patches, keep)
    if k == n:
        return _identity(x, ctx)
    B = x.shape[0]
    xs, size, metric = x[:, 1:], ctx.size[:, 1:], ctx.keys[:, :, 1:].mean(1)
    where = torch.arange(n, device=x.device).expand(B, n)
    while xs.shape[1] > k:
        xs, size, metric, w = bipartite_merge(xs, size, metric, xs.shape[1] - k)
        where = torch.gather(w, 1, where)
    where = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), where + 1], 1)
    return Reduced(torch.cat([x[:, :1], xs], 1), torch.cat([ctx.size[:, :1], size], 1), where)


def lat(x: torch.Tensor, ctx: TokenContext, keep: float = 0.5) -> Reduced:
    """Latency Adjustable Transformer: drop the tokens the others attend to least.

    A token's *attention context contribution* is the attention all tokens pay it
    (column sum of the attention matrix, mean over heads); keep the
    ``budget(n, keep)`` largest.
    """
    n, k = ctx.n_patches, budget(ctx.n_patches, keep)
    if k == n:
        return _identity(x, ctx)
    contribution = ctx.attn.mean(1).sum(1)[:, 1:]  # (B, n) attention received
    chosen = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, contribution.topk(k, dim=1).indices, True)
    return _select(x, ctx, chosen)


# ----------------------------------------------------------------------------------------------
# TCC: token-level correlation-guided compression


def crop_density(keys: torch.Tensor, tokens_per_crop: int, sim_threshold: float = 0.9,
                 redundant_frac: float = 0.15) -> torch.Tensor:
    """Information density of each crop from the cosine similarity of its patch keys.

    A patch is *redundant* when its key's cosine similarity exceeds ``sim_threshold``
    with more than ``redundant_frac`` of the other patches of its crop (blank paper
    looks like all other blank paper); density = 1 - fraction of redundant patches.
    keys: (B, n_patches, d) patch keys, crop after crop. Returns (B, n_crops) in [0, 1].
    """
    B, n, d = keys.shape
    T = tokens_per_crop
    if n % T:
        raise ValueError(f"{n} patches do not split into crops of {T}")
    k = keys.reshape(B, n // T, T, d)
    # unit rows (cheaper than F.normalize on CPU)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True).clamp_min(1e-24))
    sim = k @ k.transpose(-2, -1)  # (B, C, T, T) cosine similarities
    # others each patch is close to (minus itself)
    similar = (sim > sim_threshold).sum(-1) - 1
    redundant = similar > redundant_frac * (T - 1)
    return 1.0 - redundant.float().mean(-1)


def tcc_budget(
    density: torch.Tensor,
    tokens_per_crop: int,
    keep: float,
    ref_density: float = 0.7,
    min_per_crop: int = 1,
) -> torch.Tensor:
    """Tokens each crop keeps: ``T * keep ** (ref_density / density)``, clamped to
    [min, T].

    A crop of density ``ref_density`` keeps the fraction ``keep``; denser crops keep
    more, sparser fewer; ``keep = 1`` keeps everything whatever the density.
    """
    keep = _check_keep(keep)
    frac = keep ** (ref_density / density.clamp_min(1e-3))
    n = torch.round(frac * tokens_per_crop).long()
    return n.clamp(min=min(min_per_crop, tokens_per_crop), max=tokens_per_crop)


def iqr_outliers(values: torch.Tensor, k: float = 1.5) -> torch.Tensor:
    """True where a value lies above ``Q3 + k * IQR`` of its row (Tukey's fence).
    values: (B, n)."""
    q = torch.quantile(
        values.float(), torch.tensor([0.25, 0.75], device=values.device), dim=1
    )  # (2, B)
    fence = q[1] + k * (q[1] - q[0])
    return values > fence[:, None]


def tcc(
    x: torch.Tensor,
    ctx: TokenContext,
    keep: float = 0.5,
    *,
    sim_threshold: float = 0.9,
    redundant_frac: float = 0.15,
    ref_density: float = 0.7,
    min_per_crop: int = 1,
    iqr_k: float = 1.5,
    temperature: float = 0.1,
    sample: bool = True,
    fuse: str | None = None,
) -> Reduced:
    """Token-level Correlation-guided Compression (our implementation; the paper's code
    is unreleased).

    1. density of each crop from the similarity of its first-block patch keys
       (:func:`crop_density`);
    2. a per-crop budget from that density (:func:`tcc_budget`);
    3. local: within each crop draw that many patches without replacement, with
       probability ∝ the [CLS] attention of the block before the reducer raised to
       ``1 / temperature`` (1 = the paper's proportional sampling; smaller is sharper;
       ``sample=False`` takes the top ones);
    4. global: add every patch whose [CLS] attention is an IQR outlier over the whole
       page;
    5. discard the rest (the paper's rule).  Pages keep different counts: the batch is
       padded.

    ``fuse="mean"`` (this course's addition, not the paper's): instead of discarding,
    average the dropped patches of each crop into one token whose size is their number,
    so proportional attention weighs it as all of them (EViT's fused token, per crop).
    """
    keep = _check_keep(keep)
    if fuse not in (None, "mean"):
        raise ValueError(
            f"fuse must be None (discard, the paper's rule) or 'mean', got {fuse!r}"
        )
    if temperature <= 0:
        raise ValueError(
            "temperature must be > 0 (use sample=False for top-k), "
            f"got {temperature}"
        )
    if keep == 1.0:
        return _identity(x, ctx)
    B, n, T = x.shape[0], ctx.n_patches, ctx.tokens_per_crop
    C = n // T
    # all heads' keys per patch
    pk = ctx.first_keys[:, :, 1:].transpose(1, 2).reshape(B, n, -1)
    density = crop_density(pk, T, sim_threshold, redundant_frac)  # (B, C)
    per_crop = tcc_budget(density, T, keep, ref_density, min_per_crop)  # (B, C)
    a = ctx.cls_attention()  # (B, n)
    scores = torch.log(a.clamp_min(1e-12)).reshape(B, C, T) / temperature
    if sample:  # Gumbel top-k == sampling without replacement with p ∝ attention
        u = (
            torch.rand(B, C, T, generator=ctx.generator)
            .to(x.device)
            .clamp(1e-9, 1 - 1e-9)
        )
        scores = scores - torch.log(-torch.log(u))
    # break exact ties (blank patches), keep counts exact
    scores = scores - 1e-6 * torch.arange(T, device=x.device) / T
    # the per_crop-th largest score of each crop is the bar to clear
    # (one sort, not a full ranking): (B, C, 1)
    bar = scores.sort(-1, descending=True).values.gather(-1, (per_crop - 1)[..., None])
    chosen = (scores >= bar).reshape(B, n)
    outliers = iqr_outliers(a, iqr_k)
    chosen = chosen | outliers
    out = _select(x, ctx, chosen)
    out.extra = {"density": density, "per_crop": per_crop, "outliers": outliers.sum(1)}
    return _fuse_per_crop(x, ctx, out, chosen) if fuse == "mean" else out


def _fuse_per_crop(
    x: torch.Tensor, ctx: TokenContext, out: Reduced, chosen: torch.Tensor
) -> Reduced:
    """Append one token per crop: the size-weighted mean of its dropped patches, sized
    by their total.  A crop that dropped nothing gets size 0 (masked like padding)."""
    B, n, T, D = x.shape[0], ctx.n_patches, ctx.tokens_per_crop, x.shape[-1]
    C = n // T
    # (B, C, T): the patches each dropped token stands for, 0 where kept
    s = ctx.size[:, 1:].reshape(B, C, T) * (~chosen).reshape(B, C, T)
    size = s.sum(-1)  # (B, C)
    fused = (s[..., None] * x[:, 1:].reshape(B, C, T, D)).sum(2)
    fused = fused / size[..., None].clamp_min(1e-12)  # (B, C, D)
    # (n,) the fused token of each patch's crop, appended after the kept ones
    slot = out.x.shape[1] + torch.arange(C, device=x.device).repeat_interleave(T)
    where = out.where.clone()
    where[:, 1:] = torch.where(chosen, where[:, 1:], slot)
    xs, sizes = torch.cat([out.x, fused], 1), torch.cat([out.size, size], 1)
    # padding (size 0) must stay last: move the real tokens to the front, in order
    perm = torch.sort((sizes == 0).to(torch.int8), dim=1, stable=True).indices  # (B, M)
    inv = torch.argsort(perm, dim=1)
    xs, sizes = xs.gather(1, perm[..., None].expand(-1, -1, D)), sizes.gather(1, perm)
    # every old token's slot follows the move
    where = torch.where(where >= 0, inv.gather(1, where.clamp_min(0)), where)
    m = int((sizes > 0).sum(1).max())
    return Reduced(xs[:, :m], sizes[:, :m], where, extra=out.extra)


REDUCERS = {"keep_all": keep_all, "random_drop": random_drop, "pool": pool, "evit": evit,
            "tome": tome, "lat": lat, "tcc": tcc}


def make(name: str, keep: float = 1.0, **options):
    """``reducer(x, ctx)`` with ``keep`` and options bound, e.g. ``make("tcc", keep=0.5)``."""
    if name not in REDUCERS:
        raise ValueError(f"unknown reducer {name!r}; choose one of {', '.join(REDUCERS)}")
    _check_keep(keep)
    fn = functools.partial(REDUCERS[name], keep=keep, **options)
    fn.__name__ = f"{name}(keep={keep:g})"  # type: ignore[attr-defined]
    return fn
