"""The counting-task helpers of the token chapter (effdl.tokens.experiments, plots):
datasets, the per-layer setting search, the sweep's rows, latency, TCC's per-crop view."""

import math

import matplotlib
import pytest
import torch

from effdl.profile import sizes
from effdl.tokens import experiments as tx
from effdl.tokens import plots as tplots
from effdl.tokens.perlayer import forward_per_layer, per_layer_flops

matplotlib.use("Agg")
S = sizes("tokens", "smoke")


@pytest.fixture(scope="module")
def data():
    return tx.count_datasets(S)


@pytest.fixture(scope="module")
def model():
    return tx.build_model(S).eval()


def test_count_datasets_labels_follow_counts(data):
    (xtr, ytr), (xte, yte, info) = data
    assert xtr.shape[0] == S.count_train and xte.shape[0] == S.count_test
    assert xte.shape[-2:] == S.page
    # label = count bucket (0-1, 2-3, 4-6, 7+), and per-crop counts add up to the page's count
    edges = torch.tensor([2, 4, 7])
    assert torch.equal(yte, (info["count"][:, None] >= edges).sum(1))
    assert torch.equal(info["crop_count"].sum(1), info["count"])


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_per_layer_setting_is_the_closest(model, data, method):
    images = data[1][0][:2]
    goal = 0.6
    opt = tx.per_layer_setting(model, method, goal, images)
    _, info = forward_per_layer(model, images, method, return_info=True, **opt)
    got = abs(per_layer_flops(model, info["tokens"]) / model.flops() - goal)
    # no other setting of the grid is closer
    grid = ([{"r": r} for r in range(0, model.n_patches // 2 + 1)]
            if method == "tome" else [{"keep_rate": k / 20} for k in range(1, 21)])
    for o in grid:
        try:
            _, inf = forward_per_layer(model, images, method, return_info=True, **o)
        except ValueError:
            continue
        assert abs(per_layer_flops(model, inf["tokens"]) / model.flops() - goal) >= got - 1e-12


@pytest.mark.parametrize("bad", [dict(method="pool", flops_frac=0.5), dict(method="tome", flops_frac=0),
                                 dict(method="evit", flops_frac=1.5)])
def test_per_layer_setting_rejects_bad_input(model, data, bad):
    with pytest.raises(ValueError, match="method must be|flops_frac must be"):
        tx.per_layer_setting(model, images=data[1][0][:2], **bad)


def test_count_sweep_rows(model, data):
    (_, _), (xte, yte, _) = data
    rows = tx.count_sweep(model, xte, yte, keeps=(0.5,), methods=("random_drop", "tcc"))
    assert rows[0]["method"] == "keep_all" and rows[0]["flops_frac"] == 1.0
    assert [r["method"] for r in rows[1:]] == ["random_drop", "tcc", "tome per layer",
                                               "evit per layer", "evit per layer, discard"]
    for r in rows:
        assert r["task"] == "count" and 0 <= r["accuracy"] <= 1 and 0 < r["flops_frac"] <= 1
    # keep-all accuracy is the model's own
    pred = model(xte).argmax(-1)
    assert math.isclose(rows[0]["accuracy"], float((pred == yte).float().mean()))
    # a one-shot half keeps about half the patches and costs less than keep-all
    assert rows[1]["kept_frac"] == pytest.approx(0.5, abs=0.05) and rows[1]["flops_frac"] < 0.7
    # per-layer rows say which option they ran, and it reproduces their accuracy
    tome = rows[3]
    logits = forward_per_layer(model, xte, "tome", **tome["option"])
    assert math.isclose(tome["accuracy"], float((logits.argmax(-1) == yte).float().mean()))
    # the control runs EViT's own choice without the fused token: one token fewer
    fused, dropped = rows[4], rows[5]
    assert dropped["option"]["fuse"] == "none" and dropped["setting"] == fused["setting"]
    assert dropped["flops_frac"] < fused["flops_frac"]
    rows = tx.count_latency(model, xte, rows, batch=4, repeat=1)
    assert all(r["ms_batch64"] > 0 and r["batch"] == 4 for r in rows)


def test_crop_budgets_and_figure(model, data):
    (_, _), (xte, _, info) = data
    b = tx.crop_budgets(model, xte[:3], keep=0.5)
    C, T = model.n_crops, model.tokens_per_crop
    assert b["density"].shape == b["per_crop"].shape == b["kept"].shape == (3, C)
    # every crop keeps at least its budget (plus global outliers), never more than its patches
    assert bool((b["kept"] >= b["per_crop"]).all()) and bool((b["kept"] <= T).all())
    assert torch.equal(b["kept"].sum(1), b["mask"].sum(1))
    _, full = model(xte[:3], tx.make("tcc", keep=0.5), generator=torch.Generator().manual_seed(0),
                    return_info=True)
    assert torch.equal(b["kept"].sum(1), full["n_kept"])
    fig = tplots.plot_crop_budgets(model, xte[:3], b, info["crop_count"][:3], titles=["a", "b", "c"])
    assert len(fig.axes) == 3
    matplotlib.pyplot.close(fig)


def test_tcc_fuse_keeps_every_patch_once(model, data):
    """fuse="mean": each dropped patch goes to its crop's fused token, sizes add up to the page,
    padding stays last, and buckets=4 (padded groups) gives the same logits as one batch."""
    x = data[1][0][:6]
    gen = torch.Generator().manual_seed(0)
    ctx_out = {}

    def spy(xx, ctx):
        red = tx.make("tcc", keep=0.35, fuse="mean")(xx, ctx)
        ctx_out["red"] = red
        return red

    logits = model(x, spy, generator=gen)
    red = ctx_out["red"]
    n = model.n_patches
    # sizes: [CLS] 1, then every patch counted exactly once (kept 1 each, fused = its dropped)
    assert torch.equal(red.size.sum(1), torch.full((6,), 1.0 + n))
    # padding (size 0) only at the end of each row
    pad = red.size == 0
    assert bool((pad.int().diff(dim=1) >= 0).all())
    # every patch has a slot; dropped patches share their crop's fused slot
    w = red.where[:, 1:]
    assert bool((w > 0).all())
    for b in range(6):
        for c in range(model.n_crops):
            slots = w[b, c * model.tokens_per_crop:(c + 1) * model.tokens_per_crop]
            merged = slots[torch.bincount(w[b], minlength=red.x.shape[1])[slots] > 1]
            assert merged.unique().numel() <= 1  # at most one fused token per crop
    gen = torch.Generator().manual_seed(0)
    bucketed = model(x, tx.make("tcc", keep=0.35, fuse="mean"), buckets=4, generator=gen)
    assert torch.allclose(logits, bucketed, atol=1e-5)
    with pytest.raises(ValueError, match="fuse must be"):
        tx.make("tcc", keep=0.5, fuse="sum")(x[:, None], None)


def test_count_comparison_picks_the_best_within_tolerance():
    rows = [{"method": "keep_all", "keep": 1.0, "flops_frac": 1.0, "accuracy": 0.9},
            {"method": "a", "keep": 0.5, "flops_frac": 0.40, "accuracy": 0.70},
            {"method": "b", "keep": 0.5, "flops_frac": 0.44, "accuracy": 0.80},
            {"method": "c", "keep": 0.5, "flops_frac": 0.30, "accuracy": 0.95},   # too cheap
            {"method": "tcc", "keep": 0.5, "flops_frac": 0.41, "accuracy": 0.99},  # excluded
            {"method": "tcc+fuse", "keep": 0.5, "flops_frac": 0.41, "accuracy": 0.85, "pages": 400},
            {"method": "tcc+fuse", "keep": 0.2, "flops_frac": 0.10, "accuracy": 0.5}]
    out = tx.count_comparison(rows)
    assert out[0]["best_other"] == "b" and out[0]["gain_pts"] == pytest.approx(5)
    assert out[0]["vs_keep_all_pts"] == pytest.approx(-5)
    assert out[0]["se_pts"] == pytest.approx(100 * math.sqrt((0.85 * 0.15 + 0.8 * 0.2) / 400))
    assert out[1]["best_other"] == "-" and math.isnan(out[1]["gain_pts"])
