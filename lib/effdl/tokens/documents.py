"""Synthetic document pages: text rendered with matplotlib's bundled DejaVu fonts, no downloads.

A page is white paper with text blocks whose density ranges from a sparse memo (a few short lines at
the top) to a dense table (numbers in every cell, rule lines).  Somewhere on the page sits one small
*stamp*, a filled symbol (■ ● ▲ ◆) in a box; the label is which symbol it is.  The answer therefore
depends on a small part of the page and everything else is distraction, as in document questions
("what is the invoice total?").

Glyphs are rasterised once by matplotlib's Agg backend (``FigureCanvasAgg``) into an atlas and then
pasted with numpy, which keeps thousands of pages cheap.  Everything is drawn from one
``numpy.random.Generator(seed)``: the same ``(n, seed, options)`` gives the same pixels.

Document models cut a page into *sub-images* (crops) and encode each; :func:`crop_pages` does that,
and the ViT of :mod:`effdl.tokens.vit` tokenises the crops in order.
"""

from __future__ import annotations

import functools
import string

import numpy as np
import torch

__all__ = ["make_documents", "crop_pages", "KINDS", "SYMBOLS", "glyph_atlas"]

#: page kinds from sparse to dense (``info["kind"]`` indexes this tuple)
KINDS = ("memo", "letter", "report", "table")
#: the stamp symbols; the label of a page is the index of its symbol here
SYMBOLS = ("■", "●", "▲", "◆")
_CHARS = string.ascii_letters + string.digits + ".,:;-$%/()"


@functools.lru_cache(maxsize=8)
def glyph_atlas(px: int) -> dict[str, np.ndarray]:
    """Ink masks (float32 in [0, 1], height ``px``-ish) of letters, digits and the stamp symbols.

    Rendered once per size with matplotlib's Agg canvas and DejaVu Sans, then cropped per glyph.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chars = list(_CHARS) + list(SYMBOLS)
    cell = 2 * px + 4
    ncols = 16
    nrows = (len(chars) + ncols - 1) // ncols
    dpi = 72  # why: at 72 dpi one point is one pixel, so `fontsize=px` gives glyphs about px tall
    fig = Figure(figsize=(ncols * cell / dpi, nrows * cell / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    for i, ch in enumerate(chars):
        r, c = divmod(i, ncols)
        size = px * 1.6 if ch in SYMBOLS else px * 1.25
        fig.text((c * cell + px / 2) / (ncols * cell), 1 - (r * cell + 1.4 * px) / (nrows * cell), ch,
                 fontsize=size, family="DejaVu Sans", color="black", va="baseline", ha="left")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    ink = 1.0 - rgba[..., :3].mean(-1).astype(np.float32) / 255.0
    atlas: dict[str, np.ndarray] = {}
    for i, ch in enumerate(chars):
        r, c = divmod(i, ncols)
        tile = ink[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        ys, xs = np.nonzero(tile > 0.05)
        if len(ys) == 0:  # a glyph missing from the font would silently vanish: fail loudly
            raise RuntimeError(f"glyph {ch!r} rendered empty at {px}px; is matplotlib's DejaVu font present?")
        if ch in SYMBOLS:
            atlas[ch] = tile[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()
        else:  # keep the baseline: crop columns tightly, rows to a fixed band
            top = max(0, int(0.1 * px))
            atlas[ch] = tile[top:top + int(1.8 * px), xs.min():xs.max() + 1].copy()
    return atlas


def _paste(page: np.ndarray, glyph: np.ndarray, y: int, x: int) -> None:
    h, w = glyph.shape
    H, W = page.shape
    if y >= H or x >= W or y + h <= 0 or x + w <= 0:
        return
    gy0, gx0 = max(0, -y), max(0, -x)
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(H, y + h), min(W, x + w)
    region = page[y0:y1, x0:x1]
    np.maximum(region, glyph[gy0:gy0 + (y1 - y0), gx0:gx0 + (x1 - x0)], out=region)


def _text_line(page, atlas, rng, y, x0, x1, numeric=False):
    """Words of random glyphs from x0 to about x1 on baseline band starting at y."""
    x = x0
    pool = string.digits + ".,$%" if numeric else string.ascii_lowercase * 3 + string.ascii_uppercase + string.digits
    while x < x1:
        word = rng.integers(2, 8)
        for _ in range(word):
            g = atlas[pool[rng.integers(len(pool))]]
            if x + g.shape[1] > x1:
                return
            _paste(page, g, y, x)
            x += g.shape[1] + 1
        x += int(rng.integers(2, 5))


def _draw_page(rng, H, W, kind, px, atlas):
    page = np.zeros((H, W), np.float32)  # ink, 0 = white paper
    lh = int(2.0 * px)  # line height
    m = int(rng.integers(2, max(3, W // 16)))  # margin
    if kind == "table":
        rows = int(rng.integers(H // (lh + 2) - 2, H // (lh + 2) + 1))
        cols = int(rng.integers(2, 5))
        y = m
        for _ in range(max(2, rows)):
            page[min(H - 1, y), m:W - m] = 0.8
            for c in range(cols):
                xa = m + c * (W - 2 * m) // cols + 2
                xb = m + (c + 1) * (W - 2 * m) // cols - 2
                _text_line(page, atlas, rng, y + 2, xa, xb, numeric=c > 0)
            y += lh + 2
            if y > H - lh:
                break
        for c in range(cols + 1):
            page[m:min(H, y), min(W - 1, m + c * (W - 2 * m) // cols)] = 0.8
    else:
        n_lines = {"memo": (2, 5), "letter": (5, 10), "report": (10, 40)}[kind]
        n = int(rng.integers(*n_lines))
        y = m
        para = 0
        for i in range(n):
            if y > H - lh:
                break
            right = W - m - (int(rng.integers(0, W // 3)) if (kind == "memo" or rng.random() < 0.2) else 0)
            indent = m + (int(rng.integers(4, 12)) if para == 0 else 0)
            _text_line(page, atlas, rng, y, indent, right)
            y += lh
            para = (para + 1) % int(rng.integers(3, 7))
            if para == 0:
                y += lh // 2
            if kind == "memo" and i == 1:
                y += lh  # memo: a heading, then a gap
            if kind == "report" and rng.random() < 0.08:  # a figure-like block
                bh = int(rng.integers(lh, 3 * lh))
                page[y:y + bh, m + 4:W - m - 4] = np.maximum(page[y:y + bh, m + 4:W - m - 4], 0.35)
                y += bh + lh // 2
    return page


def make_documents(
    n: int,
    seed: int,
    *,
    size: tuple[int, int] = (96, 96),
    glyph_px: int = 5,
    kinds: tuple[str, ...] = KINDS,
    stamp_px: int = 8,
    grid: int | None = 8,
    return_info: bool = False,
):
    """``n`` synthetic document pages and their labels (which stamp symbol each page carries).

    Args:
        n: number of pages.
        seed: every pixel is a function of ``(n, seed, options)``.
        size: page ``(height, width)`` in pixels.
        glyph_px: text size in pixels (letters are about this tall).
        kinds: which page kinds to draw from (:data:`KINDS`, sparse to dense), uniformly.
        stamp_px: size of the boxed stamp symbol; the label is its index in :data:`SYMBOLS`.
        grid: snap the stamp box to this pixel grid (the ViT's patch size), so the answer sits in a
            few whole patches; ``None`` places it anywhere.
        return_info: also return ``info`` with per-page ``kind`` (index into :data:`KINDS`) and the
            stamp's ``box`` ``(y0, x0, y1, x1)``.

    Returns:
        ``images`` float32 ``(n, 1, H, W)`` in [0, 1] (white paper = 1, ink = 0) and ``labels`` int64
        ``(n,)``; with ``return_info`` also the ``info`` dict of tensors.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    H, W = (int(size[0]), int(size[1]))
    if H < 4 * stamp_px or W < 4 * stamp_px:
        raise ValueError(f"page size {size} is too small for a {stamp_px}px stamp; "
                         f"use at least {4 * stamp_px}px a side")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown page kinds {bad}; choose from {KINDS}")
    atlas = glyph_atlas(glyph_px)
    stamps = glyph_atlas(stamp_px)
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, H, W), np.float32)
    labels = rng.integers(0, len(SYMBOLS), size=n)
    kind_idx = np.zeros(n, np.int64)
    boxes = np.zeros((n, 4), np.int64)
    for i in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        kind_idx[i] = KINDS.index(kind)
        page = _draw_page(rng, H, W, kind, glyph_px, atlas)
        sym = stamps[SYMBOLS[labels[i]]]
        sh, sw = sym.shape
        bh, bw = sh + 4, sw + 4
        if grid:  # box = whole grid cells, symbol centred in it
            bh, bw = -(-bh // grid) * grid, -(-bw // grid) * grid
            y0 = int(rng.integers(0, (H - bh) // grid + 1)) * grid
            x0 = int(rng.integers(0, (W - bw) // grid + 1)) * grid
        else:
            y0 = int(rng.integers(0, H - bh))
            x0 = int(rng.integers(0, W - bw))
        page[y0:y0 + bh, x0:x0 + bw] = 0.0  # clear paper under the stamp, then a thin box
        page[y0, x0:x0 + bw] = page[y0 + bh - 1, x0:x0 + bw] = 0.9
        page[y0:y0 + bh, x0] = page[y0:y0 + bh, x0 + bw - 1] = 0.9
        _paste(page, sym, y0 + (bh - sh) // 2, x0 + (bw - sw) // 2)
        boxes[i] = (y0, x0, y0 + bh, x0 + bw)
        images[i, 0] = 1.0 - np.clip(page, 0.0, 1.0)
    out = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    if return_info:
        return (*out, {"kind": torch.from_numpy(kind_idx), "box": torch.from_numpy(boxes)})
    return out


def crop_pages(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Cut pages ``(n, C, H, W)`` into a grid of ``crop × crop`` sub-images, row by row.

    Returns ``(n, n_crops, C, crop, crop)``; H and W must be multiples of ``crop``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(
            f"expected pages as a (n, C, H, W) tensor, got {getattr(images, 'shape', type(images))}; "
            "add a channel axis with images[:, None] if you have (n, H, W)"
        )
    n, C, H, W = images.shape
    if H % crop or W % crop:
        raise ValueError(f"page size {H}x{W} is not a multiple of the crop size {crop}; resize or pad the pages")
    x = images.reshape(n, C, H // crop, crop, W // crop, crop)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (H // crop) * (W // crop), C, crop, crop)
