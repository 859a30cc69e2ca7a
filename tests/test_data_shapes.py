"""Tests of effdl.data_shapes: the procedural multimodal ``shapes`` dataset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effdl.data_shapes import SHAPES, make_shapes, mode_table, shape_data
from effdl.measure import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_deterministic_under_seed_and_split():
    a, ya = make_shapes(6, "train", seed=3)
    b, yb = make_shapes(6, "train", seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, _ = make_shapes(6, "train", seed=4)
    assert not torch.allclose(a, c)
    # global RNG state is neither used nor disturbed
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_shapes(2, "val")
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("n,size,classes,modes", [(5, 32, 10, 4), (3, 16, 3, 1), (7, 24, 2, 16)])
def test_shapes_dtypes_ranges(n, size, classes, modes):
    x, y = make_shapes(n, "test", size=size, classes=classes, modes=modes)
    assert x.shape == (n * classes, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (n * classes,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and torch.isfinite(x).all()
    assert float(x.std()) > 0.1                                  # not a blank image set


def test_classes_balanced_and_sorted():
    _, y = make_shapes(9, "train", classes=7, modes=4)
    assert torch.equal(torch.bincount(y), torch.full((7,), 9))
    assert torch.equal(y, torch.sort(y).values)


def test_splits_differ_and_share_no_image():
    xs = {s: make_shapes(8, s)[0] for s in ("train", "val", "test")}
    for a in xs:
        for b in xs:
            if a < b:
                d = torch.cdist(xs[a].flatten(1), xs[b].flatten(1))
                assert float(d.min()) > 1.0, f"{a} and {b} share (near-)identical images"


def test_modes_fixed_by_seed_not_split():
    assert mode_table(0, 10, 4)[2][1]["texture"] == mode_table(0, 10, 4)[2][1]["texture"]
    t0, t1 = mode_table(0, 10, 4), mode_table(1, 10, 4)
    assert any(not torch.allclose(t0[c][m]["fg"], t1[c][m]["fg"]) for c in range(10) for m in range(4))


@pytest.mark.parametrize("modes,most", [(2, 0.9), (4, 0.4), (8, 0.4)])
def test_modes_are_distinct(modes, most):
    """Per class, mode means from the train split; a val image is nearest its own mode's mean
    (on 8×8 average-pooled images) far above chance 1/modes, and the modes' means summarize the
    class far better than its one mean image."""
    n = 6 * modes
    x, y = make_shapes(n, "train", modes=modes)
    xv, yv = make_shapes(n, "val", modes=modes)
    mode = torch.arange(n) % modes                      # documented: sample i is in mode i % modes
    for c in range(10):
        a = F.avg_pool2d(x[y == c], 4).flatten(1)
        b = F.avg_pool2d(xv[yv == c], 4).flatten(1)
        means = torch.stack([a[mode == k].mean(0) for k in range(modes)])
        hit = (torch.cdist(b, means).argmin(1) == mode).float().mean()
        assert hit >= 0.8, f"class {c}: only {float(hit):.0%} of val images nearest their own mode"
        # one mean per class summarizes far worse than one mean per mode: the modes' means leave
        # under ``most`` of the squared error that the class mean leaves (measured ~0.2 at 4+ modes)
        err_class = ((b - a.mean(0)) ** 2).sum(1).mean()
        err_mode = ((b - means[mode]) ** 2).sum(1).mean()
        assert err_mode < most * err_class, f"class {c}: {float(err_mode / err_class):.2f}"


def test_shape_data_names_classes():
    d = shape_data(2, "val", classes=4)
    assert d.classes == list(SHAPES[:4]) and d.x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("kwargs,hint", [
    (dict(n_per_class=0), "n_per_class must be an int ≥ 1"),
    (dict(n_per_class=2.5), "n_per_class must be an int"),
    (dict(split="validation"), "split must be one of train, val, test"),
    (dict(seed=-1), "seed must be an int ≥ 0"),
    (dict(size=8), "size must be an int ≥ 16"),
    (dict(classes=11), "classes must be an int in 2..10"),
    (dict(classes=1), "classes must be an int in 2..10"),
    (dict(modes=0), "modes must be an int in 1..16"),
    (dict(modes=17), "modes must be an int in 1..16"),
])
def test_bad_input_raises_valueerror_naming_fix(kwargs, hint):
    args = dict(n_per_class=2, split="train") | kwargs
    with pytest.raises(ValueError, match=hint):
        make_shapes(**args)


def test_load_images_shapes_has_three_splits_matching_the_sizes_table():
    from effdl.data import SHAPES_SIZES, load_images
    from effdl.distill.sizes import DATASETS

    n_train, n_test, side, ch, classes = DATASETS["shapes"]
    tr, va, te = (load_images("shapes", s) for s in ("train", "val", "test"))
    assert tr.x.shape == (n_train, ch, side, side) and te.x.shape == (n_test, ch, side, side)
    assert va.x.shape[0] == classes * SHAPES_SIZES["val"] and tr.classes == list(SHAPES)
    assert torch.equal(tr.x, load_images("shapes", "train").x)          # deterministic
    # the splits are different samples (no val image is a training image)
    assert not (torch.cdist(va.x[:50].flatten(1), tr.x.flatten(1)).min(1).values < 1e-6).any()


@pytest.mark.parametrize("name,split,match", [
    ("digits", "val", "only 'shapes' has one"),
    ("cifar10", "val", "only 'shapes' has one"),
    ("shapes", "validation", "split must be 'train', 'val' or 'test'"),
    ("shape", "train", "choose from digits, shapes"),
])
def test_load_images_rejects_bad_names_and_splits(name, split, match):
    from effdl.data import load_images

    with pytest.raises(ValueError, match=match):
        load_images(name, split)
