"""Exercise checks of the token-compression chapter (``checks.<name>(your_function)`` after
``from effdl.tokens import checks``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effdl.checks import assert_close, exercise_check, require, same, when_solved  # noqa: F401
from effdl.tokens import kvcache, reducers
from effdl.tokens.vit import block_flops

__all__ = ["check_crop_density", "check_topk_fuse", "check_tome_step", "check_vit_flops", "check_delta_quantize"]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_crop_density": ["effdl.tokens.reducers.crop_density"],
    "check_topk_fuse": ["effdl.tokens.reducers.topk_fuse"],
    "check_tome_step": ["effdl.tokens.reducers.bipartite_merge"],
    "check_vit_flops": ["effdl.tokens.vit.block_flops"],
    "check_delta_quantize": ["effdl.tokens.kvcache.delta_quantize"],
}


def _density_variant(keys, T, thr, frac, *, ge_sim=False, ge_count=False, self_count=False, cosine=True,
                     frac_of_t=False):
    """Crop density with one known mistake (for the hints)."""
    B, n, d = keys.shape
    k = keys.reshape(B, n // T, T, d)
    k = F.normalize(k, dim=-1) if cosine else k
    sim = k @ k.transpose(-2, -1)
    similar = ((sim >= thr) if ge_sim else (sim > thr)).sum(-1) - (0 if self_count else 1)
    limit = frac * (T if frac_of_t else T - 1)
    redundant = (similar >= limit) if ge_count else (similar > limit)
    return 1.0 - redundant.to(keys.dtype).mean(-1)


_DENSITY_HINTS = [
    (dict(ge_sim=True), "a similarity equal to sim_threshold does not count: use >, not >="),
    (dict(ge_count=True), "a patch similar to exactly redundant_frac·(T - 1) others is not redundant: it needs "
                          "more than that (>, not >=), and the patch itself does not count"),
    (dict(self_count=True), "the patch was counted among its own similar patches (its similarity with itself is "
                            "1): subtract it"),
    (dict(cosine=False), "compare cosine similarities: normalize the keys first"),
    (dict(frac_of_t=True), "the limit is redundant_frac·(T - 1), the number of *other* patches"),
]


def _density_hint(got, keys, T, thr, frac) -> str:
    for options, hint in _DENSITY_HINTS:
        if same(got, _density_variant(keys, T, thr, frac, **options), atol=1e-6):
            return hint
    if same(got, 1.0 - _density_variant(keys, T, thr, frac), atol=1e-6):
        return "that is the redundant fraction: density = 1 - redundant fraction"
    return ""


def _exact_crops() -> list[tuple[torch.Tensor, int]]:
    """(keys, patches per crop) whose cosine similarities are exactly 0, 0.6, 0.8, 0.96 or 1 in float64:
    a similarity equal to the threshold 0.8, a count equal to the limit 0.5·(5 - 1) = 2, and a count of
    3 between 0.5·(6 - 1) and 0.5·6 all occur."""
    a, b, c, d = [torch.tensor(v, dtype=torch.float64) for v in ([5.0, 0], [3.0, 4], [4.0, 3], [0.0, 5])]
    return [(torch.stack([a, b, c, d, a, a, a, a, b, d])[None], 5),  # (1, 2 crops x 5 patches, 2)
            (torch.stack([a, a, a, a, b, d])[None], 6)]


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
        assert_close(got, expected, what=f"density (B, n_crops) = {(B, C)} of crops of {T} tokens (threshold "
                     f"{thr}, frac {frac})", atol=1e-6, hint=lambda: _density_hint(got, keys, T, thr, frac))
    for keys, T in _exact_crops():
        expected = reducers.crop_density(keys, T, 0.8, 0.5)
        got = crop_density(keys, T, 0.8, 0.5)
        assert_close(got, expected, what=f"density of crops of {T} patches whose similarities hit the threshold "
                     f"0.8 and whose counts hit the limit 0.5·({T} - 1) exactly (float64 keys)", atol=1e-9,
                     hint=lambda: _density_hint(got, keys, T, 0.8, 0.5))


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
        idx = a.topk(k, dim=1).indices
        in_score_order = torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
        assert_close(out[0], kept, what=f"kept tokens (B, k, D) = {(B, k, D)} (n={n}); keep them in their "
                     "original order", hint=lambda: "they are in score order: sort the top-k indices"
                     if same(out[0], in_score_order) else "")
        dropped = torch.ones(B, n, dtype=torch.bool).scatter(1, idx, False)
        known = [((a[..., None] * x).sum(1) / a.sum(1, keepdim=True),
                  "that is the weighted mean of *all* tokens: leave the kept ones out"),
                 ((dropped[..., None] * x).sum(1) / dropped.sum(1, keepdim=True),
                  "an unweighted mean: weight each dropped token by its attention a")]
        assert_close(out[1], fused, what=f"fused token (B, D) = {(B, D)} (n={n}, k={k}): the a-weighted mean of "
                     "the dropped ones", hint=lambda: next((h for w, h in known if same(out[1], w)), ""))


def _rows_sorted(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([size[..., None], x], -1)  # (B, n, 1+D)
    keys = rows[..., 1] * 1e3 + rows[..., 0]
    return torch.gather(rows, 1, keys.argsort(1)[..., None].expand_as(rows))


def _tome_variant(x, size, metric, r, *, most=True, a_even=True):
    """One ToMe step with one known mistake (for the hints)."""
    first, second = (slice(0, None, 2), slice(1, None, 2)) if a_even else (slice(1, None, 2), slice(0, None, 2))
    m = F.normalize(metric, dim=-1)
    best, partner = (m[:, first] @ m[:, second].transpose(1, 2)).max(-1)
    order = best.argsort(-1, descending=most)
    src, stay = order[:, :r], order[:, r:]
    dst = torch.gather(partner, 1, src)
    xa, xb, sa, sb = x[:, first], x[:, second], size[:, first], size[:, second]
    D = x.shape[-1]
    sum_b = (sb[..., None] * xb).scatter_add(1, dst[..., None].expand(-1, -1, D),
                                             torch.gather(sa[..., None] * xa, 1, src[..., None].expand(-1, -1, D)))
    size_b = sb.scatter_add(1, dst, torch.gather(sa, 1, src))
    kept = torch.gather(xa, 1, stay[..., None].expand(-1, -1, D))
    return torch.cat([kept, sum_b / size_b[..., None]], 1), torch.cat([torch.gather(sa, 1, stay), size_b], 1)


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
        def hint():
            known = [(_tome_variant(x, size, metric, r, most=False), "those are the r *least* similar pairs: "
                      "merge the r A tokens with the highest similarity"),
                     (_tome_variant(x, size, metric, r, a_even=False), "A is the even positions (0, 2, ...), B "
                      "the odd ones")]
            for (wx, ws), h in known:
                if same(_rows_sorted(gx, gs), _rows_sorted(wx, ws), atol=1e-5):
                    return h
            return ""

        assert_close(_rows_sorted(gx, gs), _rows_sorted(ex, es),
                     what=f"merged tokens and sizes (any order; n={n}, r={r})", atol=1e-5, hint=hint)


@exercise_check(student="vit_flops")
def check_vit_flops(vit_flops):
    """``vit_flops(n_tokens, dim, depth, mlp_ratio) -> FLOPs`` of ``depth`` blocks on one sequence."""
    for n, d, depth, r in [(1, 8, 1, 2.0), (145, 32, 6, 2.0), (97, 48, 3, 4.0), (1025, 64, 12, 4.0)]:
        expected = depth * block_flops(n, d, r)
        got = vit_flops(n, d, depth, r)
        require(got is not None, "vit_flops returned None: did you forget `return`?")
        rel = abs(float(got) - expected) / expected
        h = int(d * r)
        known = [(depth * (2 * n * d * 4 * d + 4 * n * d * h + 2 * n * n * d), "QKᵀ and PV are two products: "
                  "2·N²·d FLOPs each"),
                 (expected / 2, "a multiply-add counts 2 FLOPs"),
                 (depth * (2 * n * d * 3 * d + 4 * n * d * h + 4 * n * n * d), "the output projection (d → d) is "
                  "missing"),
                 (depth * block_flops(n, d, 4.0), "use mlp_ratio: the MLP's hidden width is mlp_ratio·dim"),
                 (block_flops(n, d, r), "that is one block: multiply by depth")]
        hint = next((f"; {msg}" for w, msg in known if w != expected and abs(float(got) - w) <= 1e-6 * w), "")
        require(rel < 1e-6, f"N={n}, dim={d}, depth={depth}, mlp_ratio={r}: got {float(got):.6g} FLOPs, expected "
                f"{expected:.6g} (count a multiply-add as 2; qkv, projection, the MLP's two layers, QKᵀ and PV)"
                + hint)


@exercise_check(student="delta_quantize")
def check_delta_quantize(delta_quantize):
    """``delta_quantize(x, bits, group) -> x_hat``: anchors every ``group`` tokens, deltas vs them."""
    g = torch.Generator().manual_seed(3)
    flip = torch.tensor([1.0, -1.0]).repeat(6)[:, None] * (1 + torch.rand(12, 6, generator=g))
    cases = [(torch.cumsum(torch.randn(T, C, generator=g) * 0.3, 0) + torch.randn(C, generator=g), bits, group)
             for T, C, bits, group in [(10, 8, 4, 3), (33, 16, 6, 8), (7, 5, 8, 1), (50, 12, 3, 50)]]
    cases.append((flip, 4, 4))  # neighbours of opposite sign: deltas twice the tokens' own range
    for x, bits, group in cases:
        T, C = x.shape
        q, step, expected = kvcache.delta_quantize(x, bits, group)
        got = delta_quantize(x, bits, group)
        require(got is not None and tuple(torch.as_tensor(got).shape) == (T, C),
                f"return the reconstruction x_hat of shape {(T, C)}")
        got = torch.as_tensor(got).float()
        err = (got - x).abs().amax(1)
        hint = _delta_hint(got, x, bits, group)
        require(bool((err <= step / 2 + 1e-6).all()),
                f"T={T}, bits={bits}, group={group}: error {float(err.max()):.3g} exceeds half a step; "
                "each token's step is its absmax / (2**(bits-1) - 1), rounded to fp16" + hint)
        assert_close(got, expected, what=f"reconstruction (T={T}, bits={bits}, group={group})", atol=1e-5,
                     hint=hint[2:])


def _delta_variant(x, bits, group, *, clamp=False, fp16=True, original=False, chain=False):
    qmax = 2 ** (bits - 1) - 1
    step = (x.abs().amax(1) / qmax).clamp_min(1e-8)
    step = step.half().float().clamp_min(2 ** -24) if fp16 else step
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        src = x if original else out
        ref = 0.0 if t % group == 0 else src[t - 1 if chain else t - t % group]
        q = torch.round((x[t] - ref) / step[t])
        out[t] = ref + (q.clamp(-qmax - 1, qmax) if clamp else q) * step[t]
    return out


def _delta_hint(got, x, bits, group) -> str:
    known = [(dict(clamp=True), "do not clamp to the bits' range: a delta can need more than `bits` bits (the "
                                "entropy coder stores any integer), and clamping breaks the half-step bound"),
             (dict(original=True), "code each delta against the *reconstructed* anchor, the one the decoder has"),
             (dict(fp16=False), "round each step to fp16 (.half().float()), as the stored blob does"),
             (dict(chain=True), "every row of a group codes its delta against the group's anchor, not the row "
                                "before it")]
    for options, hint in known:
        wrong = _delta_variant(x, bits, group, **options)
        if not same(wrong, kvcache.delta_quantize(x, bits, group)[2], atol=1e-5) and same(got, wrong, atol=1e-5):
            return "; " + hint
    return ""
