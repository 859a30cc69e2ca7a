"""Exercise checks of the token-compression chapter (``checks.<name>(your_function)`` after
``from effdl.tokens import checks``)."""

from __future__ import annotations

import torch

from effdl.checks import assert_close, exercise_check, require
from effdl.tokens import kvcache, reducers
from effdl.tokens.vit import block_flops

__all__ = ["check_crop_density", "check_topk_fuse", "check_tome_step", "check_vit_flops", "check_delta_quantize"]


@exercise_check(student="crop_density")
def check_crop_density(crop_density):
    """``crop_density(keys, tokens_per_crop, sim_threshold, redundant_frac) -> (B, n_crops)``."""
    g = torch.Generator().manual_seed(0)
    for B, C, T, d, thr, frac in [(2, 3, 9, 8, 0.9, 0.15), (1, 4, 25, 12, 0.8, 0.3), (3, 2, 16, 5, 0.95, 0.1)]:
        base = torch.randn(B, C, 1, d, generator=g)  # a "blank paper" direction per crop
        noise = torch.randn(B, C, T, d, generator=g)
        blank = torch.rand(B, C, T, 1, generator=g) < torch.rand(B, C, 1, 1, generator=g)
        keys = torch.where(blank, base + 0.05 * noise, noise).reshape(B, C * T, d)
        expected = reducers.crop_density(keys, T, thr, frac)
        got = crop_density(keys, T, thr, frac)
        assert_close(got, expected, what=f"density of {C} crops of {T} tokens (threshold {thr}, frac {frac})",
                     atol=1e-6)


@exercise_check(student="topk_fuse")
def check_topk_fuse(topk_fuse):
    """``topk_fuse(x, a, k) -> (kept (B, k, D) in original order, fused (B, D))``."""
    g = torch.Generator().manual_seed(1)
    for B, n, D, k in [(2, 10, 4, 3), (3, 37, 7, 12), (1, 5, 3, 4)]:
        x = torch.randn(B, n, D, generator=g)
        a = torch.rand(B, n, generator=g).softmax(-1)
        kept, fused, _ = reducers.topk_fuse(x, a, k)
        out = topk_fuse(x, a, k)
        require(isinstance(out, tuple) and len(out) >= 2, "return a tuple (kept, fused)")
        assert_close(out[0], kept, what=f"kept tokens (n={n}, k={k}); keep them in their original order")
        assert_close(out[1], fused, what=f"fused token (n={n}, k={k}): the a-weighted mean of the dropped ones")


def _rows_sorted(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([size[..., None], x], -1)  # (B, n, 1+D)
    keys = rows[..., 1] * 1e3 + rows[..., 0]
    return torch.gather(rows, 1, keys.argsort(1)[..., None].expand_as(rows))


@exercise_check(student="tome_step")
def check_tome_step(tome_step):
    """``tome_step(x, size, metric, r) -> (x', size')``: one bipartite soft-matching merge."""
    g = torch.Generator().manual_seed(2)
    for B, n, D, r in [(2, 8, 3, 2), (1, 15, 5, 7), (3, 22, 4, 5)]:
        x = torch.randn(B, n, D, generator=g)
        size = torch.randint(1, 4, (B, n), generator=g).float()
        metric = torch.randn(B, n, 6, generator=g)
        ex, es, _, _ = reducers.bipartite_merge(x, size, metric, r)
        out = tome_step(x, size, metric, r)
        require(isinstance(out, tuple) and len(out) >= 2, "return a tuple (x_merged, size_merged)")
        gx, gs = out[0], out[1]
        require(tuple(gx.shape) == (B, n - r, D),
                f"expected {n - r} tokens after merging r={r} of {n}, "
                f"got shape {tuple(gx.shape)}")
        assert_close((gs[..., None] * gx).sum(1), (size[..., None] * x).sum(1),
                     what="size-weighted sum of the tokens (a merge must preserve it)", atol=1e-4)
        assert_close(_rows_sorted(gx, gs), _rows_sorted(ex, es),
                     what=f"merged tokens and sizes (any order; n={n}, r={r})", atol=1e-5)


@exercise_check(student="vit_flops")
def check_vit_flops(vit_flops):
    """``vit_flops(n_tokens, dim, depth, mlp_ratio) -> FLOPs`` of ``depth`` blocks on one sequence."""
    for n, d, depth, r in [(1, 8, 1, 2.0), (145, 32, 6, 2.0), (97, 48, 3, 4.0), (1025, 64, 12, 4.0)]:
        expected = depth * block_flops(n, d, r)
        got = vit_flops(n, d, depth, r)
        require(got is not None, "vit_flops returned None: did you forget `return`?")
        rel = abs(float(got) - expected) / expected
        require(rel < 1e-6, f"N={n}, dim={d}, depth={depth}, mlp_ratio={r}: got {float(got):.6g} FLOPs, expected "
                f"{expected:.6g} (count a multiply-add as 2; qkv, projection, the MLP's two layers, QKᵀ and PV)")


@exercise_check(student="delta_quantize")
def check_delta_quantize(delta_quantize):
    """``delta_quantize(x, bits, group) -> x_hat``: anchors every ``group`` tokens, deltas vs them."""
    g = torch.Generator().manual_seed(3)
    for T, C, bits, group in [(10, 8, 4, 3), (33, 16, 6, 8), (7, 5, 8, 1), (50, 12, 3, 50)]:
        x = torch.cumsum(torch.randn(T, C, generator=g) * 0.3, 0) + torch.randn(C, generator=g)
        q, step, expected = kvcache.delta_quantize(x, bits, group)
        got = delta_quantize(x, bits, group)
        require(got is not None and tuple(torch.as_tensor(got).shape) == (T, C),
                f"return the reconstruction x_hat of shape {(T, C)}")
        got = torch.as_tensor(got).float()
        err = (got - x).abs().amax(1)
        require(bool((err <= step / 2 + 1e-6).all()),
                f"T={T}, bits={bits}, group={group}: error {float(err.max()):.3g} exceeds half a step; "
                "each token's step is its absmax / (2**(bits-1) - 1), rounded to fp16")
        assert_close(got, expected, what=f"reconstruction (T={T}, bits={bits}, group={group})", atol=1e-5)
