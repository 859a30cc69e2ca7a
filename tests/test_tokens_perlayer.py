"""Per-layer ToMe / EViT (effdl.tokens.perlayer): exactness, token counts, sizes, fusion, FLOPs, errors."""

import math

import pytest
import torch

from effdl.tokens.documents import make_documents
from effdl.tokens.perlayer import (
    attention_step,
    evit_fuse,
    evit_layers,
    forward_per_layer,
    mlp_step,
    per_layer_flops,
    tome_merge,
)
from effdl.tokens.vit import TinyViT


def _model(image_size=(48, 48), depth=3, seed=0):
    torch.manual_seed(seed)
    return TinyViT(image_size=image_size, crop=24, patch=8, dim=32, depth=depth, heads=4).eval()


@pytest.fixture(scope="module")
def model():
    return _model()  # 4 crops x 9 patches = 36 patch tokens, N = 37


@pytest.fixture(scope="module")
def pages():
    return make_documents(4, 11, size=(48, 48))[0]


def _close(a, b, atol=1e-5):
    # why not torch.testing.assert_close: its first call spends ~1.5 s on lazy imports
    assert a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=atol), (a - b).abs().max()


def _embed(model, images):
    x = model.embed(model.patchify(images))
    return torch.cat([model.cls.expand(x.shape[0], -1, -1), x], 1) + model.pos


@torch.no_grad()
def test_none_equals_model_exactly(model, pages):
    logits, info = forward_per_layer(model, pages, "none", return_info=True)
    assert torch.equal(logits, model(pages))
    assert info["tokens"] == [(37, 37)] * 3


@torch.no_grad()
def test_tome_r0_equals_model_exactly(model, pages):
    logits, info = forward_per_layer(model, pages, "tome", r=0, return_info=True)
    assert torch.equal(logits, model(pages))
    assert info["tokens"] == [(37, 37)] * 3


@torch.no_grad()
@pytest.mark.parametrize("image_size,r,expected", [
    ((48, 48), 5, [(37, 32), (32, 27), (27, 22)]),
    ((48, 48), 16, [(37, 21), (21, 11), (11, 6)]),   # floor: at most half of the patch tokens per block
    ((24, 72), 13, [(28, 15), (15, 8), (8, 5)]),      # 27 patches (odd); r = 13 is the most allowed
    ((24, 72), 4, [(28, 24), (24, 20), (20, 16)]),
])
def test_tome_drops_r_per_block_until_floor(image_size, r, expected):
    m = _model(image_size)
    x = make_documents(3, 2, size=image_size, stamp_px=6)[0]  # 24 px pages: a smaller stamp
    logits, info = forward_per_layer(m, x, "tome", r=r, return_info=True)
    assert info["tokens"] == expected
    for n_in, n_out in info["tokens"]:
        assert n_out == n_in - min(r, (n_in - 1) // 2)
    assert torch.isfinite(logits).all()


@torch.no_grad()
@pytest.mark.parametrize("r", [3, 9, 18])
def test_tome_sizes_sum_to_patches_every_block(model, pages, r):
    _, info = forward_per_layer(model, pages, "tome", r=r, return_info=True)
    for (_, n_out), size in zip(info["tokens"], info["sizes"]):
        assert size.shape == (pages.shape[0], n_out)
        assert torch.equal(size[:, 0], torch.ones(pages.shape[0]))  # [CLS] is never merged
        assert torch.equal(size[:, 1:].sum(1), torch.full((pages.shape[0],), 36.0))
        assert (size >= 1).all() and torch.equal(size, size.round())


@torch.no_grad()
def test_tome_merges_between_attention_and_mlp_with_this_blocks_keys(model, pages):
    """The official ToMeBlock order: attention (proportional on the sizes so far), merge on that
    block's keys averaged over heads, then the MLP; every block."""
    x, size = _embed(model, pages), None
    for blk in model.blocks:
        x, k, _ = attention_step(blk, x, size)
        x, size = tome_merge(x, torch.ones(x.shape[:2]) if size is None else size, k.mean(1), 6)
        x = mlp_step(blk, x)
    expected = model.head(model.norm(x[:, 0]))
    assert torch.equal(forward_per_layer(model, pages, "tome", r=6), expected)


@torch.no_grad()
def test_tome_pages_are_independent(model, pages):
    together = forward_per_layer(model, pages, "tome", r=7)
    alone = torch.cat([forward_per_layer(model, pages[i:i + 1], "tome", r=7) for i in range(len(pages))])
    _close(together, alone)


@torch.no_grad()
def test_proportional_attention_matters(model, pages):
    with_sizes = forward_per_layer(model, pages, "tome", r=12)
    without = forward_per_layer(model, pages, "tome", r=12, prop_attn=False)
    assert (with_sizes - without).abs().max() > 1e-4
    blk, x = model.blocks[1], _embed(model, pages)
    plain = blk(x)[0]
    assert torch.equal(mlp_step(blk, attention_step(blk, x)[0]), plain)  # the split block is the block
    ones = torch.ones(x.shape[:2])
    _close(mlp_step(blk, attention_step(blk, x, ones)[0]), plain, atol=1e-6)
    sizes = ones.clone()
    sizes[:, 5:9] = 3.0
    assert (attention_step(blk, x, sizes)[0] - attention_step(blk, x)[0]).abs().max() > 1e-4


@torch.no_grad()
def test_size_two_equals_a_duplicated_token(model, pages):
    """log(size) in the logits: one token of size 2 draws the attention two copies of it would."""
    blk, x = model.blocks[0], _embed(model, pages)
    dup = torch.cat([x, x[:, -1:]], 1)  # last token twice, every size 1
    size = torch.ones(x.shape[:2])
    size[:, -1] = 2.0
    _close(attention_step(blk, x, size)[0], attention_step(blk, dup)[0][:, :-1])


def test_tome_merge_step_on_a_known_case():
    """A = positions 0, 2, 4 ([CLS] at 0), B = 1, 3, 5; only A2 and B5 are similar -> r = 1 merges them."""
    metric = torch.eye(6)[None]
    metric[0, 2] = metric[0, 5]
    metric[0, 0] = metric[0, 1]  # [CLS] identical to B1, yet must not merge
    x = torch.arange(6.0)[None, :, None] * torch.ones(1, 6, 3)
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 2.0, 1.0]])
    new_x, new_size = tome_merge(x, size, metric, 1)
    assert new_size.tolist() == [[1.0, 2.0, 1.0, 1.0, 4.0]]  # [unmerged A: 0, 4] + [B: 1, 3, 5+2]
    assert new_x[0, :, 0].tolist() == pytest.approx([0.0, 4.0, 1.0, 3.0, (3 * 2 + 1 * 5) / 4])
    # mass is conserved and r clamps to half of the non-[CLS] tokens
    x2, s2 = tome_merge(torch.randn(2, 9, 4), torch.ones(2, 9), torch.randn(2, 9, 5), 100)
    assert x2.shape == (2, 5, 4) and s2.sum(1).tolist() == [9.0, 9.0]


@torch.no_grad()
@pytest.mark.parametrize("keep_rate,layers,expected", [
    (0.3, [1], [(37, 37), (37, 13), (13, 13)]),            # ceil(0.3 * 36) = 11 kept + 1 fused
    (0.5, [0, 2], [(37, 20), (20, 20), (20, 12)]),         # 18 + 1; then ceil(0.5 * 19) = 10 + 1
    (0.7, None, [(37, 28), (28, 21), (21, 16)]),           # default layers (0, 1, 2) at depth 3
])
def test_evit_keeps_ceil_at_chosen_layers_plus_fused(model, pages, keep_rate, layers, expected):
    logits, info = forward_per_layer(model, pages, "evit", keep_rate=keep_rate, layers=layers, return_info=True)
    assert info["tokens"] == expected
    assert sorted(info["kept"]) == sorted(layers if layers is not None else evit_layers(3))
    for i, (n_in, n_out) in enumerate(info["tokens"]):
        if i in info["kept"]:
            assert n_out == math.ceil(keep_rate * (n_in - 1)) + 2  # [CLS] + kept + fused
        else:
            assert n_out == n_in
    assert torch.isfinite(logits).all()


def test_evit_default_layers_follow_the_paper():
    assert evit_layers(12) == (3, 6, 9)  # official drop_loc: the 4th, 7th and 10th of 12 layers
    assert evit_layers(3) == (0, 1, 2)


@torch.no_grad()
def test_evit_keep_rate_one_is_the_model(model, pages):
    assert torch.equal(forward_per_layer(model, pages, "evit", keep_rate=1.0, layers=[0, 1, 2]), model(pages))


@torch.no_grad()
@pytest.mark.parametrize("fuse", ["mean", "sum"])
def test_evit_fused_token_is_attention_weighted_over_dropped(model, pages, fuse):
    blk, x0 = model.blocks[0], _embed(model, pages)
    x, _, a = attention_step(blk, x0, cls_attention=True)
    explicit = blk(x0, need_weights=True)[1][:, :, 0, 1:].mean(1)  # [CLS] row of the full weights
    _close(a, explicit, atol=1e-6)
    new_x, new_size, kept = evit_fuse(x, torch.ones(x.shape[:2]), a, 0.4, fuse)
    k = math.ceil(0.4 * 36)
    assert new_x.shape[1] == 1 + k + 1 and kept.sum(1).tolist() == [k] * len(pages)
    assert torch.equal(new_x[:, 0], x[:, 0])
    for b in range(len(pages)):
        assert a[b][kept[b]].min() >= a[b][~kept[b]].max()  # the most attended are kept
        assert torch.equal(new_x[b, 1:1 + k], x[b, 1:][kept[b]])  # in their original order
        w = a[b][~kept[b]]
        fused = (w[:, None] * x[b, 1:][~kept[b]]).sum(0)
        if fuse == "mean":
            fused = fused / w.sum()
        _close(new_x[b, -1], fused, atol=1e-6)
    assert new_size[:, -1].tolist() == [36.0 - k] * len(pages)
    # the whole forward is this step followed by the block's MLP and the rest
    y = mlp_step(blk, new_x)
    for later in model.blocks[1:]:
        y = later(y)[0]
    assert torch.equal(model.head(model.norm(y[:, 0])),
                       forward_per_layer(model, pages, "evit", keep_rate=0.4, layers=[0], fuse=fuse))


@torch.no_grad()
def test_irregular_odd_counts_depth3_keep03():
    m = _model((24, 72))  # 27 patch tokens
    x = make_documents(2, 5, size=(24, 72), stamp_px=6)[0]
    logits, info = forward_per_layer(m, x, "evit", keep_rate=0.3, return_info=True)
    # 27 -> ceil(8.1) = 9 + 1; 10 -> ceil(3.0) = 3 + 1; 4 -> ceil(1.2) = 2 + 1
    assert info["tokens"] == [(28, 11), (11, 5), (5, 4)]
    assert torch.isfinite(logits).all()
    # 0.28 * 25 = 7.000000000000001 in floating point: the paper's ceil means 7, not 8
    assert evit_fuse(torch.randn(1, 26, 4), torch.ones(1, 26), torch.rand(1, 25), 0.28)[0].shape[1] == 1 + 7 + 1
    _, info = forward_per_layer(m, x, "tome", r=3, return_info=True)
    assert info["tokens"] == [(28, 25), (25, 22), (22, 19)]


@torch.no_grad()
def test_per_layer_flops(model, pages):
    assert per_layer_flops(model, [37] * 3) == model.flops()
    flops = []
    for r in (0, 2, 5, 10, 18):
        _, info = forward_per_layer(model, pages, "tome", r=r, return_info=True)
        flops.append(per_layer_flops(model, info["tokens"]))
    assert flops[0] == model.flops()
    assert all(a > b for a, b in zip(flops, flops[1:]))
    # a reduction between attention and MLP already saves MLP work in that block
    assert per_layer_flops(model, [(37, 20), 20, 20]) < per_layer_flops(model, [37, 20, 20])
    with pytest.raises(ValueError, match="one entry per block"):
        per_layer_flops(model, [37, 37])


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="merge"), "choose one of"),
    (dict(method="tome"), "needs r"),
    (dict(method="tome", r=19), r"r <= 18"),
    (dict(method="tome", r=-1), "int >= 0"),
    (dict(method="tome", r=2.0), "int >= 0"),
    (dict(method="evit", keep_rate=0.0), r"\(0, 1\]"),
    (dict(method="evit", keep_rate=1.5), r"\(0, 1\]"),
    (dict(method="evit", layers=[3]), r"\[0, 3\)"),
    (dict(method="evit", layers=[-1]), r"\[0, 3\)"),
    (dict(method="evit", r=4), "method='tome' only"),
    (dict(method="tome", r=2, keep_rate=0.5), "method='evit' only"),
    (dict(method="evit", fuse="max"), "fuse must be"),
])
def test_errors_name_the_fix(model, pages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward_per_layer(model, pages, **kwargs)
