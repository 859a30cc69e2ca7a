"""The density-dependent page task: count target glyphs planted in the text (effdl.tokens.density)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from effdl.tokens.density import DEFAULT_BUCKETS, bucket_of, crop_counts, make_count_documents, target_glyph
from effdl.tokens.documents import KINDS


@pytest.fixture(scope="module")
def pages():
    """400 default pages (96x96, all kinds) with info and 48px crop counts, shared by the tests."""
    return make_count_documents(400, 11, crop=48, return_info=True)


def _matches(ink: np.ndarray, glyph: np.ndarray) -> np.ndarray:
    """(k, 2) top-left corners where ``glyph`` sits exactly (to float rounding) on the ink page."""
    h, w = glyph.shape
    win = sliding_window_view(ink, (h, w))
    hit = np.abs(win - glyph).max(axis=(-2, -1)) < 1e-5
    return np.argwhere(hit)


def test_deterministic_shaped_and_per_page():
    a, ya, ia = make_count_documents(6, 3, size=(48, 64), return_info=True)
    b, yb = make_count_documents(6, 3, size=(48, 64))
    assert a.shape == (6, 1, 48, 64) and a.dtype == torch.float32 and ya.dtype == torch.int64
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert a.min() >= 0 and a.max() <= 1 and float(a.mean()) > 0.5  # white paper (1) with dark ink (0)
    assert {"kind", "count", "rate", "centers", "size"} <= set(ia)
    c, yc = make_count_documents(3, 3, size=(48, 64))  # page i depends on (seed, i), not on n
    assert torch.equal(c, a[:3]) and torch.equal(yc, ya[:3])
    d, _ = make_count_documents(6, 4, size=(48, 64))
    assert not torch.equal(a, d)


def test_label_is_bucket_of_count(pages):
    _, y, info = pages
    c = info["count"].numpy()
    want = np.select([c < 2, c < 4, c < 7], [0, 1, 2], 3)  # the documented default 0-1, 2-3, 4-6, 7+
    assert DEFAULT_BUCKETS == (2, 4, 7) and np.array_equal(y.numpy(), want)
    _, y2, info2 = make_count_documents(60, 11, buckets=(1, 3, 5, 9), return_info=True)
    assert torch.equal(info2["count"], info["count"][:60])  # buckets change labels only
    c2 = info2["count"].numpy()
    assert np.array_equal(y2.numpy(), (c2[:, None] >= np.array([1, 3, 5, 9])).sum(1))
    assert torch.equal(bucket_of(c2, (1, 3, 5, 9)), y2) and int(y2.max()) <= 4


@pytest.mark.parametrize("target", ["●", "X"])
def test_count_is_visible_in_the_pixels(target):
    """Template-match the target's pixels on each page: as many hits as the reported count, at the
    reported places.  "X" also occurs in ordinary text; with rate 0 only those natural ones are there."""
    rate = (0.02, 0.12) if target == "●" else (0.0, 0.0)
    x, _, info = make_count_documents(40, 5, target=target, rate=rate, return_info=True)
    g, (my, mx) = target_glyph(5, target)
    cen = info["centers"].numpy()
    for i in range(len(x)):
        hits = _matches(1.0 - x[i, 0].numpy(), g)
        assert len(hits) == int(info["count"][i]), i
        mine = cen[cen[:, 0] == i, 1:]
        assert sorted(map(tuple, hits + (my, mx))) == sorted(map(tuple, mine)), i
    assert int(info["count"].sum()) > (100 if target == "●" else 3)  # the test saw targets


def test_crop_counts_sum_and_blank_crops_are_empty(pages):
    x, _, info = pages
    assert torch.equal(info["crop_count"], crop_counts(info, 48))
    for crop in (48, 24, 16):
        cc = crop_counts(info, crop)
        assert cc.shape == (len(x), (96 // crop) ** 2)
        assert torch.equal(cc.sum(1), info["count"])
        crops = x.unfold(2, crop, crop).unfold(3, crop, crop).reshape(len(x), -1, crop * crop)
        blank = (1.0 - crops).amax(-1) < 1e-6
        assert int(blank.sum()) > 0 and int(cc[blank].sum()) == 0
    with pytest.raises(ValueError, match="multiple"):
        crop_counts(info, 40)


def test_denser_text_carries_more_targets():
    """Targets replace text glyphs, so they follow the text: at one fixed rate memos (a few lines)
    carry far fewer than full pages, and a crop's count follows its ink (blank crops none)."""
    x, _, info = make_count_documents(300, 12, rate=(0.08, 0.08), return_info=True)
    c, k = info["count"].double(), info["kind"]
    mean = [float(c[k == j].mean()) for j in range(len(KINDS))]
    assert all(mean[0] < 0.5 * m for m in mean[1:]), mean
    # letter, report and table hold about the same amount of text at 96x96 (tables: more ink from
    # rules, fewer glyphs per cell), so they are only required to be close, not ordered
    assert max(mean[1:]) < 1.35 * min(mean[1:]), mean
    crops = x.unfold(2, 24, 24).unfold(3, 24, 24).reshape(len(x), -1, 24 * 24)
    ink = (1.0 - crops).mean(-1).flatten().numpy()
    per = crop_counts(info, 24).flatten().double().numpy()
    r = np.corrcoef(ink, per)[0, 1]
    assert r > 0.3, r


def test_classes_balanced(pages):
    _, y, _ = pages
    frac = torch.bincount(y, minlength=4).double() / len(y)
    assert len(frac) == 4 and bool((frac > 0.15).all() and (frac < 0.35).all()), frac.tolist()


@pytest.mark.parametrize("bad, fix", [
    (dict(n=0), "positive"),
    (dict(size=(30, 30)), "at least 40px"),
    (dict(kinds=("poem",)), "choose from"),
    (dict(kinds=()), "choose from"),
    (dict(target="☃"), "pick one of"),
    (dict(buckets=(4, 2)), "strictly increasing"),
    (dict(buckets=()), "strictly increasing"),
    (dict(buckets=(0, 3)), "strictly increasing"),
    (dict(rate=(0.5, 0.1)), "lo <= hi"),
    (dict(crop=40), "multiple"),
])
def test_bad_input_names_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix):
        make_count_documents(**(dict(n=2, seed=0) | bad))
