"""A density-dependent page task: how many target glyphs (default ``●``) are written into the text?

:func:`effdl.tokens.documents.make_documents` asks *which stamp is on the page*: the answer sits in
one small box, so a token reducer only has to keep a few patches and the idea behind TCC (dense
crops deserve more tokens) is never put to the test.  Here the answer is spread over the page in
proportion to its text: pages are drawn by the same code (``_draw_page``), but every text glyph is
replaced by the *target* glyph with probability ``p`` (one ``p`` per page, drawn from ``rate``).
A crop with twice the text carries twice the targets on average and blank paper carries none, so a
model that drops the tokens of a dense crop loses part of the count.  The label is a *count
bucket* of the whole page (default 0–1, 2–3, 4–6, 7+ targets).

How the targets are placed and counted, without copying the drawing code: ``_draw_page`` looks
glyphs up in the ``atlas`` it is given, so we hand it a stand-in atlas that answers "the target"
with probability ``p``.  The target it hands out carries a *marker*: its darkest pixel near the
centre holds ink 2.0, above anything the drawing code writes (glyphs <= 1, rules 0.8, figure blocks
0.35; text glyphs never overlap and ``np.maximum`` keeps the larger value).  After drawing, the
pixels >= 2 are the exact positions of the targets that were pasted, and they are set back to the
glyph's own ink, so the page is exactly the page drawn with the plain glyph.  Counting look-ups
instead would be wrong: a glyph that overflows the end of a line is looked up but never drawn.

Page ``i`` depends only on ``(seed, i, options)``: its kind, ``p`` and layout come from one
generator seeded with ``SeedSequence(seed).spawn(n)[i]``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from effdl.tokens.documents import KINDS, SYMBOLS, _draw_page, glyph_atlas

__all__ = ["make_count_documents", "crop_counts", "bucket_of", "target_glyph",
           "DEFAULT_BUCKETS", "DEFAULT_RATE", "DEFAULT_TARGET"]

#: the default target: a filled dot, which ordinary text never contains (see ``_text_line``'s pools)
DEFAULT_TARGET = "●"
#: lower edges of classes 1.. (class 0 is ``count < 2``): 0–1, 2–3, 4–6, 7+.  With the default
#: ``rate`` and the four kinds uniformly, each class holds 22–28 % of 96×96 pages (2000 pages, seed
#: 0: 25.2 / 22.7 / 24.0 / 28.1 %); memos (≈40 glyph slots, mean 1.8 targets) sit mostly in the low
#: classes, letters, reports and tables (≈120 slots, mean 5–6 targets) spread over all four.
DEFAULT_BUCKETS = (2, 4, 7)
#: per-page probability that a text glyph becomes the target, uniform in this range
DEFAULT_RATE = (0.0, 0.1)
_MARK = 2.0  # marker ink: above anything the drawing code writes (glyphs <= 1, rules 0.8, blocks 0.35)


class _SwapAtlas:
    """Stands in for the glyph atlas in ``_draw_page``: each look-up is the target with probability ``p``."""

    def __init__(self, glyphs: dict, target: str, p: float, rng: np.random.Generator):
        self.glyphs, self.target, self.p, self.rng = glyphs, target, p, rng

    def __getitem__(self, ch: str) -> np.ndarray:
        if ch == self.target or self.rng.random() < self.p:
            return self.glyphs[self.target]
        return self.glyphs[ch]


@functools.lru_cache(maxsize=16)
def target_glyph(px: int, target: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The target's ink as pasted into text, and its marker pixel ``(row, col)`` within it.

    Letters keep the atlas's line band; a symbol (cropped tightly in the atlas) is padded to the
    band and centred on it.  The marker is the pixel nearest the centre among the darkest ones
    (ink >= 90 % of the glyph's maximum), so it always lies on ink and a crop holding it is never blank.
    """
    atlas = glyph_atlas(px)
    g = atlas[target]
    band = atlas["a"].shape[0]
    if target in SYMBOLS and g.shape[0] < band:
        top = (band - g.shape[0] + 1) // 2
        g = np.pad(g, ((top, band - g.shape[0] - top), (0, 0)))
    ys, xs = np.nonzero(g >= 0.9 * g.max())
    j = int(np.argmin((ys - (g.shape[0] - 1) / 2) ** 2 + (xs - (g.shape[1] - 1) / 2) ** 2))
    g.setflags(write=False)
    return g, (int(ys[j]), int(xs[j]))


@functools.lru_cache(maxsize=16)
def _marked_atlas(px: int, target: str) -> dict:
    glyphs = dict(glyph_atlas(px))
    g, (my, mx) = target_glyph(px, target)
    marked = g.copy()
    marked[my, mx] = _MARK
    glyphs[target] = marked
    return glyphs


def bucket_of(counts, buckets=DEFAULT_BUCKETS) -> torch.Tensor:
    """Class of each count: the number of bucket edges ``<= count``.

    With edges ``(2, 4, 7)``: counts 0–1 → 0, 2–3 → 1, 4–6 → 2, 7+ → 3.
    """
    c = np.asarray(counts)
    return torch.from_numpy(np.searchsorted(np.asarray(buckets), c, side="right").astype(np.int64))


def crop_counts(info: dict, crop: int) -> torch.Tensor:
    """Targets per ``crop × crop`` sub-image, ``(n, n_crops)`` in :func:`~effdl.tokens.documents.crop_pages` order.

    A target belongs to the crop holding its marker pixel (an inked pixel near its centre); the
    rows sum to ``info["count"]``.
    """
    H, W = (int(v) for v in info["size"])
    if not isinstance(crop, int) or crop < 1 or H % crop or W % crop:
        raise ValueError(f"page size {H}x{W} is not a multiple of the crop size {crop!r}; pick a divisor of both")
    n = len(info["count"])
    nx = W // crop
    c = info["centers"].numpy()
    out = np.zeros((n, (H // crop) * nx), np.int64)
    np.add.at(out, (c[:, 0], (c[:, 1] // crop) * nx + c[:, 2] // crop), 1)
    return torch.from_numpy(out)


def make_count_documents(
    n: int,
    seed: int,
    *,
    size: tuple[int, int] = (96, 96),
    glyph_px: int = 5,
    kinds: tuple[str, ...] = KINDS,
    target: str = DEFAULT_TARGET,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    rate: tuple[float, float] = DEFAULT_RATE,
    crop: int | None = None,
    return_info: bool = False,
):
    """``n`` pages whose label is the bucket of how many ``target`` glyphs their text contains.

    Args:
        n: number of pages.
        seed: every pixel is a function of ``(seed, page index, options)``.
        size: page ``(height, width)``; at least ``8 * glyph_px`` a side.
        glyph_px: text size in pixels, as in :func:`~effdl.tokens.documents.make_documents`.
        kinds: page kinds to draw from, uniformly (:data:`~effdl.tokens.documents.KINDS`, sparse to dense).
        target: the glyph to count; any key of ``glyph_atlas(glyph_px)``.  Glyphs ordinary text
            never uses (``●■▲◆`` and ``:;-/()``) appear only as planted targets; a letter such as
            ``"X"`` also occurs naturally, and those occurrences are counted too.
        buckets: increasing positive class edges; label = number of edges ``<= count``, so
            ``len(buckets) + 1`` classes.  The default ``(2, 4, 7)`` is balanced for the defaults.
        rate: ``(lo, hi)``; each page draws ``p ~ U(lo, hi)`` and each text glyph becomes the target
            with probability ``p``.  A per-page ``p`` keeps the page kind from giving the label away.
        crop: if given, ``info["crop_count"]`` holds :func:`crop_counts` for this crop size.
        return_info: also return ``info``: ``kind`` (index into ``KINDS``), ``count`` (exact number of
            targets), ``rate`` (the page's ``p``), ``centers`` ``(M, 3)`` rows ``(page, y, x)`` of each
            target's marker pixel, ``size`` ``(H, W)``, and ``crop_count`` when ``crop`` is given.

    Returns:
        ``images`` float32 ``(n, 1, H, W)`` in [0, 1] (white paper = 1, ink = 0) and ``labels`` int64
        ``(n,)`` in ``[0, len(buckets)]``; with ``return_info`` also ``info``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(glyph_px, int) or glyph_px < 3:
        raise ValueError(f"glyph_px must be an int >= 3, got {glyph_px!r}")
    H, W = (int(size[0]), int(size[1]))
    if min(H, W) < 8 * glyph_px:
        raise ValueError(f"page size {size} is too small for {glyph_px}px text; use at least {8 * glyph_px}px a side "
                         "(or a smaller glyph_px)")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown page kinds {bad}; choose from {KINDS}")
    atlas = glyph_atlas(glyph_px)
    if not isinstance(target, str) or target not in atlas:
        raise ValueError(f"target {target!r} is not a glyph of the atlas; pick one of {''.join(atlas)!r} "
                         f"(e.g. {DEFAULT_TARGET!r}, which ordinary text never contains)")
    b = list(buckets)
    if not b or any(not isinstance(e, (int, np.integer)) for e in b) or b[0] < 1 or any(
            x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"buckets must be strictly increasing positive ints (class edges), e.g. {DEFAULT_BUCKETS}; "
                         f"got {buckets!r}")
    lo, hi = (float(rate[0]), float(rate[1]))
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"rate must be (lo, hi) with 0 <= lo <= hi <= 1, got {rate!r}")
    if crop is not None and (not isinstance(crop, int) or crop < 1 or H % crop or W % crop):
        raise ValueError(f"page size {H}x{W} is not a multiple of the crop size {crop!r}; pick a divisor of both")

    glyphs = _marked_atlas(glyph_px, target)
    g, (my, mx) = target_glyph(glyph_px, target)
    images = np.empty((n, 1, H, W), np.float32)
    kind_idx = np.zeros(n, np.int64)
    rates = np.zeros(n, np.float64)
    counts = np.zeros(n, np.int64)
    centers = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        rng = np.random.default_rng(child)
        kind = kinds[int(rng.integers(len(kinds)))]
        p = float(rng.uniform(lo, hi))
        kind_idx[i], rates[i] = KINDS.index(kind), p
        page = _draw_page(rng, H, W, kind, glyph_px, _SwapAtlas(glyphs, target, p, rng))
        ys, xs = np.nonzero(page >= _MARK)
        page[ys, xs] = g[my, mx]  # the marker back to the glyph's own ink
        counts[i] = len(ys)
        centers.append(np.stack([np.full_like(ys, i), ys, xs], 1))
        images[i, 0] = 1.0 - np.clip(page, 0.0, 1.0)
    labels = bucket_of(counts, b)
    out = (torch.from_numpy(images), labels)
    if not return_info:
        return out
    info = {"kind": torch.from_numpy(kind_idx), "count": torch.from_numpy(counts),
            "rate": torch.from_numpy(rates), "size": torch.tensor([H, W]),
            "centers": torch.from_numpy(np.concatenate(centers).astype(np.int64).reshape(-1, 3))}
    if crop is not None:
        info["crop_count"] = crop_counts(info, crop)
    return (*out, info)
