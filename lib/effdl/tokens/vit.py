"""A tiny Vision Transformer for document pages, with a hook for token reducers.

Pages are cut into crops (sub-images) and each crop into ``patch × patch`` patches; the token
sequence is ``[CLS]`` followed by the patches of crop 0 (row by row), crop 1, ...  Blocks are
pre-norm; each can hand out its attention weights and keys, which is what the reducers of
:mod:`effdl.tokens.reducers` read.  One reducer call sits before block ``reduce_at``.

Token *sizes* (how many original patches a token stands for) make merging honest: attention adds
``log(size)`` to its logits (ToMe's proportional attention), so a token that is the average of 3
patches gets the attention those 3 patches would have had.  A size of 0 gives ``log 0 = -inf``:
that is how padded slots (pages that kept fewer tokens than others in the batch) are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from effdl.tokens.documents import crop_pages

__all__ = ["TinyViT", "Block", "TokenContext", "Reduced", "block_flops"]


@dataclass
class TokenContext:
    """What a reducer may read, for a batch of B sequences of N tokens ([CLS] first).

    queries, keys: ``(B, heads, N, head_dim)`` of the block just before the reducer; the attention
        weights are derived from them on demand: :meth:`cls_attention` (cheap, one row) and
        :attr:`attn` (the full ``(B, heads, N, N)`` matrix, computed once if a reducer asks).
    first_keys: ``(B, heads, N0, head_dim)`` keys of the first block (a *low* layer), over the
        original N0 = 1 + n_patches tokens.
    size: ``(B, N)`` patches per token (0 marks padding).
    crop_id: ``(N0 - 1,)`` which crop each original patch belongs to; ``n_crops`` crops of
        ``tokens_per_crop`` patches each.
    generator: randomness for sampling reducers (deterministic under a seed).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    first_keys: torch.Tensor
    size: torch.Tensor
    crop_id: torch.Tensor
    n_crops: int
    tokens_per_crop: int
    generator: torch.Generator | None = None
    _attn: torch.Tensor | None = None

    @property
    def n_patches(self) -> int:
        return self.size.shape[1] - 1

    def _weights(self, q: torch.Tensor) -> torch.Tensor:
        logits = (q @ self.keys.transpose(-2, -1)) / math.sqrt(self.keys.shape[-1])
        return (logits + torch.log(self.size)[:, None, None, :]).softmax(-1)

    @property
    def attn(self) -> torch.Tensor:
        """Full attention weights ``(B, heads, N, N)`` of the block before the reducer."""
        if self._attn is None:
            self._attn = self._weights(self.queries)
        return self._attn

    def cls_attention(self) -> torch.Tensor:
        """[CLS]-to-patch attention, mean over heads: ``(B, n_patches)``; costs one row, not N×N."""
        row = self._attn[:, :, :1] if self._attn is not None else self._weights(self.queries[:, :, :1])
        return row[:, :, 0, 1:].mean(1)


@dataclass
class Reduced:
    """What a reducer returns.

    x: ``(B, N', dim)`` new tokens, [CLS] first, padding (size 0) last.
    size: ``(B, N')`` patches per new token; 0 for padding.
    where: ``(B, N)`` the new slot of each old token, ``-1`` if it was discarded.
    """

    x: torch.Tensor
    size: torch.Tensor
    where: torch.Tensor
    extra: dict = field(default_factory=dict)


def block_flops(n_tokens: float, dim: int, mlp_ratio: float = 2.0) -> float:
    """FLOPs of one :class:`Block` on one sequence of ``n_tokens`` (a multiply-add
    counts 2).

    Linear layers grow with N: qkv ``2·N·d·3d``, output projection ``2·N·d·d``, MLP
    ``2·2·N·d·(r·d)``; attention grows with N²: scores ``Q Kᵀ`` and ``P V`` are
    ``2·N²·d`` each.
    (Norms, softmax and GELU are a few FLOPs per element: left out, as usual.)
    """
    n, d, h = n_tokens, dim, int(dim * mlp_ratio)  # n may be a mean count (a float)
    linear = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * h
    attention = 2 * 2 * n * n * d
    return linear + attention


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_ratio = mlp_ratio

    def qk(self, x):
        """Queries and keys ``(B, heads, N, head_dim)`` this block would use: for scoring tokens."""
        B, N, _ = x.shape
        q, k = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, self.head_dim)[:, :, :2].permute(2, 0, 3, 1, 4)
        return q, k

    def forward(self, x, size=None, need_weights=False):
        """x: (B, N, dim); size: (B, N) or None (all ones). Returns (x, attn or None, (q, k)).

        The fused SDPA kernel never materialises the N×N weights; ``need_weights=True`` computes
        them explicitly (slower) for inspection.
        """
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        bias = None
        if size is not None:  # proportional attention; log 0 = -inf masks padding
            bias = torch.log(size.to(x.dtype))[:, None, None, :]  # (B, 1, 1, N)
        if need_weights:  # explicit softmax: the reducer needs the weights
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, h, N, N)
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(-1)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.proj(out.transpose(1, 2).reshape(B, N, D))
        x = x + self.mlp(self.norm2(x))
        return x, attn, (q, k)


class TinyViT(nn.Module):
    """ViT over cropped pages: ``forward(images, reducer=None)`` -> class logits.

    Args:
        image_size: page ``(H, W)``; crop: sub-image side; patch: patch side (crop % patch == 0).
        dim, depth, heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        n_classes: outputs; reduce_at: the reducer runs before block ``reduce_at`` (0 ≤ it < depth).
            With 0 (the default) it reads the first block's queries and keys, computed on all tokens,
            and *every* block runs on the kept tokens only: a dropped patch's content never reaches
            [CLS].  With ``reduce_at ≥ 1`` earlier blocks see every token (and may already have copied
            what a dropped token held into the ones that stay).
    """

    def __init__(self, image_size=(96, 96), crop=48, patch=8, dim=64, depth=6, heads=4, mlp_ratio=2.0,
                 n_classes=4, reduce_at=0):
        super().__init__()
        H, W = image_size
        if H % crop or W % crop or crop % patch:
            raise ValueError(
                "need H, W multiples of crop and crop a multiple of patch; "
                f"got {image_size}, {crop}, {patch}"
            )
        if not 0 <= reduce_at < depth:
            raise ValueError(f"reduce_at={reduce_at} must be in [0, depth={depth})")
        self.image_size, self.crop, self.patch = (H, W), crop, patch
        self.n_crops = (H // crop) * (W // crop)
        self.tokens_per_crop = (crop // patch) ** 2
        self.n_patches = self.n_crops * self.tokens_per_crop
        self.reduce_at, self.dim = reduce_at, dim
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.n_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        # the crop each patch token comes from
        crop_id = torch.arange(self.n_crops).repeat_interleave(self.tokens_per_crop)
        self.register_buffer("crop_id", crop_id, persistent=False)

    def flops(self, n_kept: float | None = None) -> float:
        """FLOPs of one page when ``n_kept`` patch tokens go on after the reducer (default: all).

        Counted analytically with :func:`block_flops` (PyTorch's FLOP counter does not see the
        CPU attention kernel); the reducers' own work is small and left out.
        """
        n0 = 1 + self.n_patches
        n1 = n0 if n_kept is None else 1 + n_kept
        r = self.blocks[0].mlp_ratio
        embed = 2 * self.n_patches * self.patch ** 2 * self.dim
        before = self.reduce_at * block_flops(n0, self.dim, r)
        after = (len(self.blocks) - self.reduce_at) * block_flops(n1, self.dim, r)
        scoring = 0
        if n_kept is not None and self.reduce_at == 0:  # q, k of block 0 on all tokens, [CLS] row
            scoring = 2 * n0 * self.dim * 2 * self.dim + 2 * n0 * self.dim
        return float(embed + scoring + before + after + 2 * self.dim * self.head.out_features)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) pages -> (B, n_patches, patch*patch) ink values, crop by
        crop."""
        if (
            not isinstance(images, torch.Tensor)
            or images.ndim != 4
            or tuple(images.shape[1:]) != (1, *self.image_size)
        ):
            raise ValueError(
                "expected pages of shape "
                f"(B, 1, {self.image_size[0]}, {self.image_size[1]}), got "
                f"{tuple(getattr(images, 'shape', ()))}; make them with "
                f"make_documents(..., size={self.image_size})"
            )
        crops = crop_pages(images, self.crop)  # (B, n_crops, 1, c, c)
        B, C = crops.shape[:2]
        p, g = self.patch, self.crop // self.patch
        # (B, C, gy, gx, p, p)
        x = crops.reshape(B, C, g, p, g, p).permute(0, 1, 2, 4, 3, 5)
        # why: ink = 1, paper = 0, so blank patches embed alike
        return 1.0 - x.reshape(B, C * g * g, p * p)

    def forward(
        self,
        images,
        reducer=None,
        *,
        buckets: int = 1,
        generator=None,
        return_info=False,
    ):
        """Logits ``(B, n_classes)``; ``reducer(x, ctx) -> Reduced`` runs before block
        ``reduce_at``.

        buckets: after a reducer that keeps different counts per page, sort pages by
            count and run the remaining blocks in at most this many groups, each padded
            only to its own longest page; the cut points minimise the padded FLOPs
            (``_bucket_bounds``).
        return_info: also return ``{"n_kept": (B,) patch tokens kept,
            "assign": (B, n_patches) output slot of each original patch or -1,
            "attn": [CLS] attention before the reducer}``.
        """
        x = self.embed(self.patchify(images))
        B = x.shape[0]
        # (B, 1+Np, dim)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.pos
        size = None
        info = {
            "n_kept": torch.full((B,), self.n_patches),
            "assign": None,
            "attn": None,
        }
        if reducer is None and not return_info:  # the naive path: no scoring at all
            for blk in self.blocks:
                x, _, _ = blk(x)
            return self.head(self.norm(x[:, 0]))
        if self.reduce_at == 0:
            # scoring only; block 0 runs below on the kept tokens
            q, k = self.blocks[0].qk(x)
            first_keys = k
        for i in range(self.reduce_at):
            x, _, (q, k) = self.blocks[i](x)
            if i == 0:
                first_keys = k
        ctx = TokenContext(
            queries=q,
            keys=k,
            first_keys=first_keys,
            size=torch.ones(B, x.shape[1], dtype=x.dtype, device=x.device),
            crop_id=self.crop_id,
            n_crops=self.n_crops,
            tokens_per_crop=self.tokens_per_crop,
            generator=generator,
        )
        if return_info:
            info["attn"] = ctx.cls_attention()
        if reducer is not None:
            red = reducer(x, ctx)
            x, size = red.x, red.size
            info["n_kept"] = (size > 0).sum(1) - 1
            info["assign"] = red.where[:, 1:]
            info.update(red.extra)
            if bool((size == 1).all()):
                size = None  # why: SDPA's fast path; log(1) = 0 adds nothing
        rest = self.blocks[self.reduce_at:]
        if size is not None and buckets > 1 and B > 1:
            cls = self._bucketed(x, size, rest, buckets)
        else:
            for blk in rest:
                x, _, _ = blk(x, size)
            cls = x[:, 0]
        logits = self.head(self.norm(cls))
        return (logits, info) if return_info else logits

    def _bucket_bounds(self, sorted_counts: torch.Tensor, buckets: int) -> list[int]:
        """Split ascending token counts into at most ``buckets`` contiguous groups of least padded work.

        A group runs padded to its last (largest) count ``m``, costing ``len(group) * block_flops(m)``.
        Dynamic programming over the split points (a few (B+1)x(B+1) tensor ops per group, no Python
        loop over pages); an extra group must save ≥ 1% of the work to be worth its per-group launch
        overhead (so equal counts run as one group).  Returns the end index of each group.
        """
        # why: fixed chunks of B/buckets pages cut through runs of equal counts and lump short pages
        # with long ones; choosing the cuts to minimise padded FLOPs wastes fewer padded slots, and
        # equal counts (fixed-ratio reducers) collapse into one group instead of four small batches.
        c = sorted_counts.double()
        B = c.numel()
        per_page = block_flops(c, self.dim, self.blocks[0].mlp_ratio)  # (B,) cost of one page at each count
        i = torch.arange(B + 1, dtype=torch.double)
        # cost[i, j]: pages i..j-1 in one group padded to count c[j-1]; inf where j <= i
        cost = (i[None, 1:] - i[:-1, None]) * per_page[None, :]  # (B, B) rows i = 0..B-1, cols j = 1..B
        cost = torch.where(i[None, 1:] > i[:-1, None], cost, torch.inf)
        best = [torch.full((B + 1,), torch.inf, dtype=torch.double)]
        best[0][0] = 0.0
        args = []
        for _ in range(max(1, min(buckets, B))):
            tot = best[-1][:-1, None] + cost  # (B, B): best split of pages 0..i-1, then one group i..j-1
            val, arg = tot.min(0)
            best.append(torch.cat([torch.full((1,), torch.inf, dtype=torch.double), val]))
            args.append(arg)
        totals = [float(b[B]) for b in best[1:]]
        g = 0
        for k in range(1, len(totals)):
            if totals[k] < totals[g] * 0.99:  # why 1%: measured, each extra group costs far less than its padding saves
                g = k
        ends, j = [], B
        for k in range(g, -1, -1):  # walk the split points back
            ends.append(j)
            j = int(args[k][j - 1])
        return ends[::-1]

    def _bucketed(self, x, size, blocks, buckets):
        """Run ``blocks`` on groups of pages with similar token counts; return [CLS] outputs."""
        counts = (size > 0).sum(1)
        order = counts.argsort()
        out = torch.empty(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
        start = 0
        for end in self._bucket_bounds(counts[order].cpu(), buckets):
            idx = order[start:end]
            start = end
            n = int(counts[idx].max())  # padding is last: this group only needs n slots
            xs, ss = x[idx, :n], size[idx, :n]
            ss = None if bool((ss == 1).all()) else ss
            for blk in blocks:
                xs, _, _ = blk(xs, ss)
            out[idx] = xs[:, 0]
        return out
