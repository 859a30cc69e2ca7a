"""Per-layer token reduction: ToMe and EViT the way their papers run them, inside every block.

The reducers of :mod:`effdl.tokens.reducers` run *once*, before block ``reduce_at`` of
:class:`~effdl.tokens.vit.TinyViT`.  The published methods reduce *inside* the network, between a
block's attention and its MLP:

**ToMe** (Bolya et al., ICLR 2023, "Token Merging: Your ViT but Faster",
https://arxiv.org/abs/2210.09461; official code https://github.com/facebookresearch/ToMe, checked
at commit ``af95e4b``):

- ``tome/patch/timm.py`` ``ToMeBlock.forward``: attention (with proportional attention on the
  current sizes), residual add, *then* ``bipartite_soft_matching`` + ``merge_wavg`` with ``r``
  tokens, *then* the MLP, in every block;
- ``ToMeAttention.forward``: proportional attention adds ``size.log()`` to the attention logits
  before the softmax, and the matching metric is ``k.mean(1)``, the keys averaged over heads;
- ``tome/merge.py`` ``bipartite_soft_matching``: ``r = min(r, (t - protected) // 2)`` (one step
  merges at most half of the non-[CLS] tokens), cosine similarity of the metric, set A = even
  positions and B = odd positions *of the whole sequence with [CLS] at 0*, ``scores[..., 0, :] =
  -inf`` so [CLS] never merges, the ``r`` A tokens with the best edges merge into their most
  similar B token, and the unmerged A tokens are sorted back so [CLS] stays first; output
  ``[unmerged A..., B...]``;
- ``merge_wavg``: merged value = ``sum(size * x) / sum(size)``, new size = ``sum(size)``.

:func:`tome_merge` re-implements that matching step (the parity of the split included: with
[CLS] at position 0, patch tokens 1, 3, 5, ... sit in A).  A constant ``r`` per block, like
``model.r = 16`` (``parse_r`` also allows schedules, not offered here).

**EViT** (Liang et al., ICLR 2022, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", https://arxiv.org/abs/2202.07800; official code
https://github.com/youweiliang/evit, ``evit.py``):

- ``Attention.forward``: ``left_tokens = math.ceil(keep_rate * (N - 1))`` (``N - 1`` non-[CLS]
  tokens, an earlier fused token included); nothing happens when that is all of them; otherwise
  the top ``left_tokens`` by [CLS] attention ``attn[:, :, 0, 1:].mean(dim=1)`` (mean over heads)
  are kept;
- ``Block.forward``: the reorganisation sits between attention (after its residual add) and the
  MLP; with ``fuse_token`` the others become one extra token appended after the kept ones,
  ``extra_token = sum(non_topk * non_topk_attn)``;
- ``deit_small_patch16_shrink_base(base_keep_rate=0.7, drop_loc=(3, 6, 9))``: keep rate 0.7 at
  blocks 3, 6, 9 (0-based), i.e. the 4th, 7th and 10th of 12 layers.  No proportional attention.

Deviations (all deliberate, all documented where they happen):

- EViT's fused token is the attention-weighted *mean* ``sum(a_i x_i) / sum(a_i)`` by default
  (``fuse="mean"``), as :func:`effdl.tokens.reducers.topk_fuse` does: a model trained without
  EViT (ours) expects tokens of the usual scale.  ``fuse="sum"`` gives the official
  un-normalised ``sum(a_i x_i)``.
- EViT's ``ceil`` is taken as ``ceil(keep_rate * n - 1e-9)``: ``0.28 * 25`` is
  ``7.000000000000001`` in floating point and the bare ``ceil`` would keep 8 of 25, not 7.
- Kept EViT tokens stay in their original order (the official code orders them by attention);
  attention without positional terms is permutation-equivariant, so the outputs are the same.
- ``r`` larger than one block can merge at the first block (``floor(n_patches / 2)``) is refused
  (ValueError) instead of silently clamped; later blocks clamp to ``floor(n / 2)`` like the
  official code, which is the "floor" the token count then follows.
- The matching and fusion work is left out of :func:`per_layer_flops` (as
  :meth:`TinyViT.flops` leaves out the reducers').

:class:`~effdl.tokens.vit.Block` computes attention and MLP in one ``forward``; its submodules
(``norm1``, ``qkv``, ``proj``, ``norm2``, ``mlp``) are public, so :func:`attention_step` and
:func:`mlp_step` repeat its steps, operation for operation, and the reduction goes between them
(``vit.py`` is untouched).  With no reduction the result is bit-identical to ``model(images)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from effdl.tokens.vit import Block, TinyViT, block_flops

__all__ = ["forward_per_layer", "per_layer_flops", "attention_step", "mlp_step", "tome_merge", "evit_fuse",
           "evit_layers", "METHODS"]

METHODS = ("none", "tome", "evit")
_EVIT_DROP_LOC = (3, 6, 9)  # official deit_small_patch16_shrink_base, depth 12


def attention_step(block: Block, x: torch.Tensor, size: torch.Tensor | None = None, cls_attention: bool = False):
    """First half of ``block``: ``x + proj(attention(norm1 x))``, exactly as :meth:`Block.forward`.

    size: ``(B, N)`` token sizes for proportional attention (``log size`` added to the logits),
        or None (every token counts once; SDPA without a mask, bit-identical to ``block(x)``).
    Returns ``(x, keys, cls_attn)``: keys ``(B, heads, N, head_dim)``; ``cls_attn`` ``(B, N - 1)``
    the [CLS] row of the attention weights averaged over heads (EViT's score), None unless asked.
    """
    B, N, D = x.shape
    qkv = block.qkv(block.norm1(x)).view(B, N, 3, block.heads, block.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
    bias = None
    if size is not None:  # ToMe's proportional attention, as in Block.forward
        bias = torch.log(size.to(x.dtype))[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    cls_attn = None
    if cls_attention:  # one row of the weights: SDPA does not hand them out
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) / math.sqrt(block.head_dim)  # (B, h, 1, N)
        if bias is not None:
            logits = logits + bias
        cls_attn = logits.softmax(-1)[:, :, 0, 1:].mean(1)
    x = x + block.proj(out.transpose(1, 2).reshape(B, N, D))
    return x, k, cls_attn


def mlp_step(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Second half of ``block``: ``x + mlp(norm2 x)``."""
    return x + block.mlp(block.norm2(x))


def tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """One ToMe step on a sequence with [CLS] at 0: merge ``min(r, (N-1) // 2)`` tokens.

    Follows ``bipartite_soft_matching`` + ``merge_wavg`` of facebookresearch/ToMe
    (``tome/merge.py``): A = positions 0, 2, 4, ... ([CLS] among them, its scores set
    to -inf), B = positions 1, 3, ...; each A token's best B partner by cosine
    similarity of ``metric``; the ``r`` best edges merge A into B by the size-weighted
    mean; unmerged A tokens keep their order (so [CLS] stays first), then B.

    x: ``(B, N, D)``; size: ``(B, N)``; metric: ``(B, N, d)`` (keys, mean over heads).
    Returns ``(x', size')`` with ``N - r`` tokens.
    """
    Bsz, t, D = x.shape
    r = min(r, (t - 1) // 2)
    if r <= 0:
        return x, size
    with torch.no_grad():  # the matching is a discrete choice, as in the official code
        m = F.normalize(metric, dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
        scores[:, 0, :] = -math.inf  # [CLS] (A's first token) never merges
        node_max, node_idx = scores.max(-1)
        edge_idx = node_max.argsort(-1, descending=True)[..., None]  # (B, |A|, 1)
        unm_idx = edge_idx[:, r:].sort(1).values  # sorted back: [CLS] first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(v):  # sum-merge (B, t, c) -> (B, t - r, c)
        src, dst = v[:, ::2], v[:, 1::2]
        c = v.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, c))
        src = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce="sum")
        return torch.cat([unm, dst], 1)

    s = size[..., None].to(x.dtype)
    new_size = merge(s)
    return merge(x * s) / new_size, new_size[..., 0]


def evit_fuse(
    x: torch.Tensor, size: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float,
    fuse: str = "mean",
):
    """One EViT reorganisation: keep [CLS] and the ``ceil(keep_rate * n)`` most attended
    of the ``n`` other tokens (original order), fuse the rest into one token at the end.

    cls_attn: ``(B, n)`` [CLS] attention, mean over heads.  fuse: ``"mean"`` (default)
    the attention-weighted mean ``sum(a_i x_i) / sum(a_i)``; ``"sum"`` the official
    ``sum(a_i x_i)``; ``"none"`` discards the rest (a control: no fused token).
    The fused token's size is the total size of the tokens it absorbed.
    Returns ``(x', size', kept)`` with ``kept`` ``(B, n)`` bool; unchanged input (and
    all-True ``kept``) when ``ceil`` keeps every token, as in the official code.
    """
    B, N, D = x.shape
    n = N - 1
    # why -1e-9: 0.28 * 25 = 7.000000000000001
    left = max(1, math.ceil(keep_rate * n - 1e-9))
    if left >= n:
        return x, size, torch.ones(B, n, dtype=torch.bool, device=x.device)
    kept = torch.zeros(B, n, dtype=torch.bool, device=x.device)
    kept.scatter_(1, cls_attn.topk(left, dim=1).indices, True)
    patches, psize = x[:, 1:], size[:, 1:]
    kept_x = patches[kept].view(B, left, D)  # boolean indexing keeps the original order
    kept_s = psize[kept].view(B, left)
    if fuse == "none":
        new_x = torch.cat([x[:, :1], kept_x], 1)
        return new_x, torch.cat([size[:, :1], kept_s], 1), kept
    w = cls_attn * (~kept)
    fused = (w[..., None] * patches).sum(1)
    if fuse == "mean":
        fused = fused / w.sum(1, keepdim=True).clamp_min(1e-12)
    fused_s = (psize * (~kept)).sum(1)
    new_x = torch.cat([x[:, :1], kept_x, fused[:, None]], 1)
    new_size = torch.cat([size[:, :1], kept_s, fused_s[:, None]], 1)
    return new_x, new_size, kept


def evit_layers(depth: int) -> tuple[int, ...]:
    """EViT's reorganisation blocks (0-based) for a ViT of ``depth`` blocks: the official
    ``drop_loc=(3, 6, 9)`` of 12, scaled as ``floor(l * depth / 12)`` (depth 3 -> (0, 1, 2))."""
    return tuple(sorted({(l * depth) // 12 for l in _EVIT_DROP_LOC}))


def _check(model, method, r, keep_rate, layers, fuse, n_tokens):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    depth = len(model.blocks)
    if method != "tome" and r is not None:
        raise ValueError(f"r applies to method='tome' only; drop r={r!r} for method={method!r}")
    if method != "evit" and (keep_rate is not None or layers is not None):
        raise ValueError(f"keep_rate and layers apply to method='evit' only; drop them for method={method!r}")
    if fuse not in ("mean", "sum", "none"):
        raise ValueError(f"fuse must be 'mean' (attention-weighted mean), 'sum' (official EViT) or "
                         f"'none' (discard, a control), got {fuse!r}")
    if method == "tome":
        if r is None:
            raise ValueError("method='tome' needs r, the tokens merged in every block (r=0 merges nothing)")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be an int >= 0 (tokens merged per block), got {r!r}")
        most = (n_tokens - 1) // 2
        if r > most:
            raise ValueError(
                f"r={r} is too large for {n_tokens - 1} patch tokens: one bipartite step merges at most "
                f"half of them; pass r <= {most}"
            )
    if method == "evit":
        if keep_rate is None:
            keep_rate = 0.7  # official base_keep_rate
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be a fraction in (0, 1] (1 = keep every token), got {keep_rate!r}")
        if layers is None:
            layers = evit_layers(depth)
        if isinstance(layers, int) or not isinstance(layers, Sequence):
            raise ValueError(f"layers must be a list of block indices in [0, {depth}), got {layers!r}")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
                raise ValueError(
                    f"layer index {i!r} is outside the model's depth: use block indices in [0, {depth}) (0-based)"
                )
        layers = set(layers)
    return keep_rate, layers


def forward_per_layer(model: TinyViT, images: torch.Tensor, method: str = "none", *, r: int | None = None,
                      keep_rate: float | None = None, layers: Sequence[int] | None = None, fuse: str = "mean",
                      prop_attn: bool | None = None, return_info: bool = False):
    """Run ``model`` (its own embedding, blocks, norm and head) with token reduction inside the blocks.

    method:
        ``"none"``: no reduction; returns exactly ``model(images)``.
        ``"tome"``: merge ``r`` tokens in every block, between attention and MLP (bipartite soft
            matching on the keys averaged over heads, [CLS] never merged, size-weighted means);
            the next blocks use proportional attention on the sizes.
        ``"evit"``: at blocks ``layers`` (0-based; default :func:`evit_layers`, the paper's
            (3, 6, 9) for depth 12) keep [CLS] and the ``ceil(keep_rate * n)`` patch tokens with
            the most [CLS] attention (default keep_rate 0.7), and fuse the others into one token
            appended at the end (``fuse``: "mean", the official "sum", or "none" to discard them,
            see :func:`evit_fuse`).
    prop_attn: add ``log size`` to the attention logits; default True for ToMe (the official
        ``apply_patch(prop_attn=True)``), False for EViT (the official EViT has none).
    return_info: also return ``{"tokens": [(n_attention, n_mlp) per block] (tokens incl. [CLS]
        that block's attention and MLP ran on, for :func:`per_layer_flops`), "sizes": [(B, N')
        sizes after each block], "kept": {layer: (B, n) bool} (EViT)}``.

    Raises ValueError for an unknown method, ``r`` too large for the token count, a keep_rate
    outside (0, 1], a layer index outside the depth, or options of another method.
    """
    x = model.embed(model.patchify(images))
    B = x.shape[0]
    x = torch.cat([model.cls.expand(B, -1, -1), x], dim=1) + model.pos  # as TinyViT.forward
    keep_rate, layers = _check(model, method, r, keep_rate, layers, fuse, x.shape[1])
    if prop_attn is None:
        prop_attn = method == "tome"
    size = torch.ones(B, x.shape[1], dtype=x.dtype, device=x.device)
    info = {"tokens": [], "sizes": [], "kept": {}}
    merged = False  # why: before any merge all sizes are 1 and SDPA runs without a mask (bit-identical)
    for i, blk in enumerate(model.blocks):
        n_in = x.shape[1]
        if method == "none":
            x, _, _ = blk(x)
        else:
            use_size = size if (prop_attn and merged) else None
            evit_here = method == "evit" and i in layers
            x, k, cls_attn = attention_step(blk, x, use_size, cls_attention=evit_here)
            if method == "tome" and r > 0:
                x, size = tome_merge(x, size, k.mean(1), r)
            elif evit_here:
                x, size, kept = evit_fuse(x, size, cls_attn, keep_rate, fuse)
                info["kept"][i] = kept
            merged = merged or x.shape[1] != n_in
            x = mlp_step(blk, x)
        info["tokens"].append((n_in, x.shape[1]))
        info["sizes"].append(size)
    logits = model.head(model.norm(x[:, 0]))
    return (logits, info) if return_info else logits


def per_layer_flops(model: TinyViT, tokens_per_block) -> float:
    """FLOPs of one page when block ``i`` runs on ``tokens_per_block[i]`` tokens ([CLS] included).

    An entry is a count (the whole block on it) or a pair ``(n_attention, n_mlp)`` as
    :func:`forward_per_layer` reports (``info["tokens"]``): a reduction between attention and MLP
    makes the MLP cheaper in that very block.  Built on :func:`effdl.tokens.vit.block_flops`: the
    MLP's share is ``block_flops(n, d, ratio) - block_flops(n, d, 0)``.  Embedding and head as in
    :meth:`TinyViT.flops` (with every entry ``1 + n_patches`` the two agree); the matching and
    fusion work is left out, as there.
    """
    depth = len(model.blocks)
    if isinstance(tokens_per_block, (str, bytes)) or not isinstance(tokens_per_block, Sequence) \
            or len(tokens_per_block) != depth:
        raise ValueError(f"tokens_per_block needs one entry per block ({depth}); pass info['tokens'] "
                         "from forward_per_layer(..., return_info=True)")
    d, ratio = model.dim, model.blocks[0].mlp_ratio
    total = 2 * model.n_patches * model.patch ** 2 * d + 2 * d * model.head.out_features
    for entry in tokens_per_block:
        n_attn, n_mlp = (entry, entry) if isinstance(entry, (int, float)) else entry
        mlp = block_flops(n_mlp, d, ratio) - block_flops(n_mlp, d, 0.0)
        total += block_flops(n_attn, d, 0.0) + mlp  # attention half on n_attn, MLP on n_mlp
    return float(total)
