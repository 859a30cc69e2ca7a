"""Token compression: documents, the ViT and its reducers, the KV codec, benchmark helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdl.tokens import crop_pages, kvcache, make_documents, reducers
from effdl.tokens.reducers import REDUCERS, budget, make
from effdl.tokens.vit import Block, TinyViT, TokenContext, block_flops

# ------------------------------------------------------------------ documents


def test_documents_deterministic_and_shaped():
    a, ya, ia = make_documents(6, 3, size=(48, 64), return_info=True)
    b, yb = make_documents(6, 3, size=(48, 64))
    assert a.shape == (6, 1, 48, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert a.min() >= 0 and a.max() <= 1 and ya.min() >= 0 and ya.max() < 4
    assert set(ia) == {"kind", "box"}
    c, _ = make_documents(6, 4, size=(48, 64))
    assert not torch.equal(a, c)


def test_stamp_snapped_to_grid_and_sparse_pages_have_less_ink():
    x, _, info = make_documents(40, 0, return_info=True)
    assert bool((info["box"] % 8 == 0).all())
    ink = (1 - x).mean((1, 2, 3))
    memo, table = ink[info["kind"] == 0], ink[info["kind"] == 3]
    assert memo.mean() < table.mean()


@pytest.mark.parametrize("bad", [dict(n=0), dict(size=(20, 20)), dict(kinds=("poem",))])
def test_documents_bad_input(bad):
    args = dict(n=2, seed=0) | bad
    with pytest.raises(ValueError):
        make_documents(**args)


def test_crop_pages():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    c = crop_pages(x, 2)
    assert c.shape == (2, 6, 1, 2, 2)
    assert torch.equal(c[1, 4, 0], x[1, 0, 2:4, 2:4])  # crop 4 = row 1, column 1
    with pytest.raises(ValueError, match="multiple"):
        crop_pages(x, 4)
    with pytest.raises(ValueError, match="channel"):
        crop_pages(x[:, 0], 2)


# ------------------------------------------------------------------ model and reducers


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return TinyViT(image_size=(48, 72), crop=24, patch=8, dim=16, depth=3, heads=2).eval()


@pytest.fixture(scope="module")
def pages():
    x, y, info = make_documents(7, 1, size=(48, 72), return_info=True)
    return x, y, info


def test_vit_rejects_wrong_shape(vit):
    with pytest.raises(ValueError, match="expected pages"):
        vit(torch.zeros(2, 1, 48, 48))
    with pytest.raises(ValueError):
        TinyViT(image_size=(50, 48), crop=24)


def _context(vit, x):
    """Run the first block by hand and build the reducer's context, as forward does."""
    h = vit.embed(vit.patchify(x))
    h = torch.cat([vit.cls.expand(len(x), -1, -1), h], 1) + vit.pos
    h, _, (q, k) = vit.blocks[0](h)
    ctx = TokenContext(queries=q, keys=k, first_keys=k, size=torch.ones(h.shape[:2]), crop_id=vit.crop_id,
                       n_crops=vit.n_crops, tokens_per_crop=vit.tokens_per_crop,
                       generator=torch.Generator().manual_seed(0))
    return h, ctx


@pytest.mark.parametrize("name", list(REDUCERS))
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.21, 0.01])
def test_reducer_contract(vit, pages, name, keep):
    x = pages[0]
    with torch.no_grad():
        h, ctx = _context(vit, x)
        out = REDUCERS[name](h, ctx, keep=keep)
    n = vit.n_patches
    assert torch.equal(out.x[:, 0], h[:, 0]), "[CLS] must stay first and untouched"
    assert bool((out.where[:, 0] == 0).all())
    valid = out.size > 0
    assert bool(valid[:, 0].all())
    # padding is last: valid slots form a prefix
    assert bool((valid.int().diff(dim=1) <= 0).all())
    kept = valid.sum(1) - 1
    if keep == 1.0 or name == "keep_all":
        assert torch.equal(out.x, h) and bool((out.size == 1).all())
    elif name == "tcc":
        per_crop = out.extra["per_crop"]
        assert bool((kept >= per_crop.sum(1)).all()) and bool((kept <= per_crop.sum(1) + out.extra["outliers"]).all())
        assert bool((per_crop >= 1).all()) and bool((per_crop <= vit.tokens_per_crop).all())
    else:
        assert bool((kept == budget(n, keep)).all())
    # where: every old token goes to a valid new slot or is dropped
    w = out.where
    assert bool(((w == -1) | ((w >= 0) & (w < out.x.shape[1]))).all())
    # sizes account for every patch that was not dropped
    kept_patches = (w[:, 1:] >= 0).sum(1).float()
    assert torch.allclose(out.size[:, 1:].sum(1), kept_patches)


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, "half", True])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        make("evit", keep=keep)
    with pytest.raises(ValueError, match="unknown reducer"):
        make("nope")


@pytest.mark.parametrize("name", ["tome", "pool", "evit"])
def test_merges_preserve_size_weighted_sum(vit, pages, name):
    """ToMe and pooling average, EViT fuses by attention: ToMe and pool keep sum(size * x) exactly."""
    with torch.no_grad():
        h, ctx = _context(vit, pages[0])
        out = REDUCERS[name](h, ctx, keep=0.3)
    total = (out.size[..., None] * out.x)[:, 1:].sum(1)
    if name == "evit":  # kept tokens plus the fused one: sizes still add up to all patches
        assert torch.allclose(out.size[:, 1:].sum(1), torch.full((len(h),), float(vit.n_patches)))
    else:
        assert torch.allclose(total, h[:, 1:].sum(1), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 41), r=st.integers(0, 25), d=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_bipartite_merge_properties(n, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (2, n), generator=g).double()
    metric = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    x2, s2, _, where = reducers.bipartite_merge(x, size, metric, r)
    r_eff = min(r, (n + 1) // 2, n // 2)
    assert x2.shape == (2, n - r_eff, d)
    assert torch.allclose((s2[..., None] * x2).sum(1), (size[..., None] * x).sum(1))
    assert torch.allclose(s2.sum(1), size.sum(1))
    # where is consistent: each new token is the size-weighted mean of the old tokens mapped to it
    for b in range(2):
        for j in range(x2.shape[1]):
            m = where[b] == j
            assert m.any()
            assert torch.allclose(x2[b, j], (size[b, m, None] * x[b, m]).sum(0) / size[b, m].sum())


def test_proportional_attention_equals_duplication():
    """A token of size 2 must act like two copies of it (ToMe's proportional attention)."""
    torch.manual_seed(0)
    blk = Block(8, 2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    dup = torch.cat([x, x[:, 4:5]], 1)
    out_dup, _, _ = blk(dup)
    out_size, _, _ = blk(x, size=torch.tensor([[1, 1, 1, 1, 2.0]], dtype=torch.float64))
    assert torch.allclose(out_size[:, :4], out_dup[:, :4])


def test_padding_does_not_change_results(vit, pages):
    """A page's logits are the same alone, in a padded batch, and in length buckets."""
    x = pages[0]
    red = make("tcc", keep=0.4, sample=False)
    with torch.no_grad():
        alone = torch.cat([vit(x[i:i + 1], red) for i in range(len(x))])
        batched, info = vit(x, red, return_info=True)
        bucketed = vit(x, red, buckets=3)
    assert info["n_kept"].unique().numel() > 1, "pages should keep different counts here"
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(alone, bucketed, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=9), st.integers(1, 4))
def test_bucket_bounds_least_padded_work(counts, buckets):
    """The DP's cut points cost no more than any split into at most ``buckets`` groups (brute force)."""
    import itertools

    vit = TinyViT(image_size=(48, 48), crop=24, patch=8, dim=16, depth=2, heads=2)
    c = torch.tensor(sorted(counts))
    ends = vit._bucket_bounds(c, buckets)
    assert ends[-1] == len(c) and len(ends) <= buckets and ends == sorted(set(ends))

    def work(ends):
        starts = [0] + ends[:-1]
        return sum((e - s) * block_flops(int(c[e - 1]), 16) for s, e in zip(starts, ends))

    best = min(work(list(cut) + [len(c)]) for g in range(buckets)
               for cut in itertools.combinations(range(1, len(c)), g))
    assert work(ends) <= best / 0.99 + 1e-6  # an extra group must save >= 1% to be used
    if len(set(counts)) == 1:
        assert ends == [len(c)], "equal counts should run as one group"


def test_explicit_and_fused_attention_agree():
    """need_weights=True (explicit softmax) vs SDPA: error vs fp64 at most 2x the plain path's."""
    torch.manual_seed(1)
    blk = Block(24, 3)
    x = torch.randn(2, 37, 24)
    size = torch.randint(0, 3, (2, 37)).float()
    size[:, 0] = 1
    ref, _, _ = blk.double()(x.double(), size.double())
    blk = blk.float()
    fused, _, _ = blk(x, size)
    plain, attn, _ = blk(x, size, need_weights=True)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    assert (fused.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6


def test_tcc_density_and_budget():
    # crops of blank-like keys are dense in redundancy: low density
    g = torch.Generator().manual_seed(0)
    blank = torch.randn(1, 1, 16, generator=g).expand(1, 16, 16) + 0.01 * torch.randn(1, 16, 16, generator=g)
    busy = torch.randn(1, 16, 16, generator=g)
    d = reducers.crop_density(torch.cat([blank, busy], 1), 16)
    assert d[0, 0] < 0.1 and d[0, 1] > 0.9
    n = reducers.tcc_budget(torch.tensor([[0.1, 0.7, 1.0]]), 20, keep=0.5, ref_density=0.7)
    assert n[0, 0] < n[0, 1] == 10 < n[0, 2]
    assert bool((reducers.tcc_budget(torch.rand(3, 4), 9, keep=1.0) == 9).all())
    with pytest.raises(ValueError, match="temperature"):
        make("tcc", keep=0.5, temperature=0)(torch.zeros(1, 2, 4), None)


def test_tcc_gives_sparse_pages_fewer_tokens():
    torch.manual_seed(0)
    m = TinyViT(dim=32, heads=2, depth=2).eval()
    x, _, info = make_documents(24, 5, return_info=True)
    with torch.no_grad():
        _, out = m(x, make("tcc", keep=0.5), return_info=True, generator=torch.Generator().manual_seed(0))
    memo = out["n_kept"][info["kind"] == 0].float().mean()
    dense = out["n_kept"][info["kind"] >= 2].float().mean()
    assert memo < dense


def test_iqr_outliers():
    v = torch.tensor([[1.0, 1.1, 0.9, 1.0, 5.0, 1.05, 0.95, 1.0]])
    assert reducers.iqr_outliers(v).tolist() == [[False] * 4 + [True] + [False] * 3]


def test_flops_formula():
    assert block_flops(10, 8, 2.0) == 2 * 10 * 8 * 24 + 2 * 10 * 64 + 4 * 10 * 8 * 16 + 4 * 100 * 8
    m = TinyViT(dim=16, heads=2, depth=3)
    n0 = 1 + m.n_patches  # a reducer adds the scoring pass: block 0's q, k on every token, [CLS] row
    assert m.flops(m.n_patches) == pytest.approx(m.flops() + 2 * n0 * 16 * 32 + 2 * n0 * 16)
    assert m.flops(10) < m.flops()


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("shape,bits,group", [((2, 2, 37, 16), 5, 8), ((3, 1, 13, 7), [8, 6, 4], 1),
                                              ((1, 3, 5, 9), 3, 64), ((2, 1, 1, 4), 16, 2)])
def test_kv_roundtrip_within_bound(shape, bits, group):
    g = torch.Generator().manual_seed(0)
    k = torch.cumsum(torch.randn(shape, generator=g) * 0.2, 2) + torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g) * 3
    blob = kvcache.compress(k, v, bits=bits, group=group)
    k2, v2 = kvcache.decompress(blob)
    assert k2.shape == k.shape and v2.shape == v.shape
    L, H, T, d = shape
    per_layer = [bits] * L if isinstance(bits, int) else bits
    for t, t2 in ((k, k2), (v, v2)):
        for layer in range(L):
            x = t[layer].permute(1, 0, 2).reshape(T, H * d)
            x2 = t2[layer].permute(1, 0, 2).reshape(T, H * d)
            step = (x.abs().amax(1) / (2 ** (per_layer[layer] - 1) - 1)).half().float()
            assert bool(((x - x2).abs().amax(1) <= step / 2 * (1 + 1e-3) + 1e-6).all())


def test_kv_smaller_than_fp16_and_more_bits_less_error():
    lm = kvcache.CausalLM(dim=32, depth=2, heads=2)
    q, k, v = lm.kv_cache(kvcache.corpus_tokens(128))
    out = kvcache.attention_output(q, k, v)
    errs, sizes = [], []
    for b in (4, 6, 8):
        blob = kvcache.compress(k, v, bits=b)
        k2, v2 = kvcache.decompress(blob)
        errs.append(kvcache.relative_error(out, kvcache.attention_output(q, k2, v2)))
        sizes.append(len(blob))
    assert sizes[0] < sizes[1] < sizes[2] < kvcache.fp16_bytes(k, v)
    assert errs[0] > errs[1] > errs[2]


def test_kv_corrupt_blob_raises():
    k = torch.randn(2, 2, 9, 4)
    blob = kvcache.compress(k, k.flip(2), bits=5, group=4)
    bad = bytearray(blob)
    bad[-3] ^= 0x10
    with pytest.raises(ValueError, match="checksum"):
        kvcache.decompress(bytes(bad))
    with pytest.raises(ValueError):
        kvcache.decompress(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="magic"):
        kvcache.decompress(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="short"):
        kvcache.decompress(b"ED")
    with pytest.raises(TypeError):
        kvcache.decompress("not bytes")


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=[5]), dict(group=0)])
def test_kv_bad_options(bad):
    k = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError):
        kvcache.compress(k, k, **bad)


def test_kv_bad_tensors():
    with pytest.raises(ValueError, match="same shape"):
        kvcache.compress(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 5, 4))
    with pytest.raises(ValueError, match="NaN"):
        kvcache.compress(torch.full((1, 1, 2, 2), math.nan), torch.zeros(1, 1, 2, 2))


def test_layer_bits():
    assert kvcache.layer_bits(4) == [6, 5, 5, 5]
    assert kvcache.layer_bits(1) == [6]
    assert kvcache.layer_bits(4, early=8, late=4, early_frac=0.5) == [8, 8, 4, 4]


# ---------------------------------------------------------------- benchmark rows, TCC summary
@pytest.fixture(scope="module")
def smoke_rows(smoke_bench_rows):
    rows, threads, threads_after = smoke_bench_rows("tokens")  # smoke sizes run with 1 thread
    assert threads_after == threads
    return rows


def test_bench_rows_hold_every_method_and_the_kv_codec(smoke_rows):
    vit = [r for r in smoke_rows if r["method"] != "kv" and "task" not in r]
    kv = [r for r in smoke_rows if r["method"] == "kv"]
    count = [r for r in smoke_rows if r.get("task") == "count"]
    # the counting task: every one-shot method, TCC with fused tokens, ToMe and EViT per layer
    assert {r["method"] for r in count} == {"keep_all", "random_drop", "pool", "evit", "tome", "tcc",
                                            "tcc+fuse", "tome per layer", "evit per layer",
                                            "evit per layer, discard"}
    for r in count:
        assert {"keep", "flops_frac", "accuracy", "ms_batch64", "ms_batch64_iqr"} <= set(r)
        assert 0 < r["flops_frac"] <= 1 and 0 <= r["accuracy"] <= 1 and r["ms_batch64"] > 0
    assert {r["method"] for r in vit} == set(REDUCERS) == {"keep_all", "random_drop", "pool", "evit", "tome",
                                                            "lat", "tcc"}
    for r in vit:
        assert {"method", "mean_tokens_kept_frac", "accuracy", "ms_batch1", "ms_batch64", "ms_batch64_iqr",
                "gflops"} <= set(r)
        assert 0 < r["mean_tokens_kept_frac"] <= 1 and 0 <= r["accuracy"] <= 1 and r["ms_batch64"] > 0
    keep_all = next(r for r in vit if r["method"] == "keep_all")
    assert keep_all["mean_tokens_kept_frac"] == 1.0
    assert all(r["gflops"] <= keep_all["gflops"] * (1 + 1e-9) for r in vit)  # fewer tokens, fewer FLOPs
    assert kv and all({"method", "bits", "group", "ratio_vs_fp16", "attn_rel_err"} <= set(r) for r in kv)
    assert all(r["ratio_vs_fp16"] > 1 for r in kv)


def test_tcc_summary_reads_rows():
    from effdl.tokens.experiments import tcc_summary

    rows = [
        {"method": "keep_all", "keep": 1.0, "mean_tokens_kept_frac": 1.0, "accuracy": 0.99, "ms_batch64": 100.0},
        {"method": "tcc", "keep": 0.5, "mean_tokens_kept_frac": 0.45, "accuracy": 0.985, "ms_batch64": 55.0},
        {"method": "tcc", "keep": 0.7, "mean_tokens_kept_frac": 0.65, "accuracy": 0.99, "ms_batch64": 70.0},
        {"method": "evit", "keep": 0.5, "mean_tokens_kept_frac": 0.5, "accuracy": 0.99, "ms_batch64": 50.0},
        {"method": "evit", "keep": 0.25, "mean_tokens_kept_frac": 0.25, "accuracy": 0.995, "ms_batch64": 30.0},
        {"method": "kv", "bits": 5, "group": 8, "ratio_vs_fp16": 3.9, "attn_rel_err": 7e-3},
        {"method": "kv", "bits": 4, "group": 8, "ratio_vs_fp16": 5.0, "attn_rel_err": 2e-2},
    ]
    out = tcc_summary(rows)
    assert all({"comparison", "value", "unit"} <= set(r) for r in out)
    assert not any("met" in r or "pass" in r for r in out)  # numbers, no verdicts
    by = {r["comparison"]: r for r in out}
    # the TCC row keeping <= 50% of the tokens (45%), not the more accurate one at 65%
    assert by["TCC accuracy - keep-all accuracy"]["kept_frac"] == 0.45
    assert by["TCC accuracy - keep-all accuracy"]["value"] == pytest.approx(100 * (0.985 - 0.99))
    # EViT interpolated at TCC's 45%: 0.995 + (0.99 - 0.995) * 0.8 = 0.991
    assert by["TCC accuracy - evit accuracy, same budget"]["value"] == pytest.approx(100 * (0.985 - 0.991))
    assert by["keep-all time / TCC time, batch 64"]["value"] == pytest.approx(100 / 55)
    kv = [r for r in out if r["comparison"].startswith("KV size")]
    assert len(kv) == 1 and kv[0]["value"] == 3.9 and "bits 5" in kv[0]["comparison"]  # 5.0x has error > 1e-2


def test_tcc_summary_without_a_small_budget_says_so():
    from effdl.tokens.experiments import tcc_summary

    rows = [{"method": "keep_all", "mean_tokens_kept_frac": 1.0, "accuracy": 0.9},
            {"method": "tcc", "mean_tokens_kept_frac": 0.8, "accuracy": 0.9}]
    (only,) = tcc_summary(rows)
    assert "no TCC budget" in only["note"]


def test_gpu_suite_code_paths_on_cpu():
    """gpu_suite runs on a GPU; its code paths run here on the CPU at smoke sizes."""
    from effdl.measure import torch_threads
    from effdl.profile import sizes
    from effdl.tokens import bench

    with torch_threads(1):
        rows = bench.gpu_suite(torch.device("cpu"), sizes("tokens", "smoke"))
    vit = [r for r in rows if r["method"] != "blocks"]
    assert {r["method"] for r in vit} == set(REDUCERS)
    assert all(r["ms_batch1"] > 0 and r["ms_batch64"] > 0 and 0 < r["mean_tokens_kept_frac"] <= 1 for r in vit)
    blocks = [r for r in rows if r["method"] == "blocks"]
    assert [r["n_tokens"] for r in blocks] == list(sizes("tokens", "smoke").cost_tokens)
    assert all(0 < r["attn_flops_frac"] < 1 for r in blocks)
