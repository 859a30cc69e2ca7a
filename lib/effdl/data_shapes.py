"""``shapes``: a procedural, offline teaching dataset whose classes are *multimodal*.

Each class is a shape family (disk, square, triangle, plus, ring, diamond, X, two bars, L,
half-disk).  Each class has ``modes`` distinct *appearances* — a mode fixes the shape's scale and
place in the image, its colour, the background's colour and texture (plain, stripes, checker,
blotchy noise) and the polarity (light shape on a dark background or the reverse).  Every image
then adds per-sample jitter: position, scale, rotation, shear, the texture's phase, colour and
pixel noise.  So one mean image per class is a blur of ``modes`` unrelated pictures, and a few
random images per class see only some of the modes, each with its own jitter: the dataset where
*which* images a small training set keeps (distribution matching) matters.

    from effdl.data_shapes import make_shapes
    x, y = make_shapes(500, "train")      # x float32 (5000, 3, 32, 32) in [0, 1], y int64 (5000,)

Conventions follow :mod:`effdl.data`: images in ``[0, 1]`` (not normalized), ``(n, C, H, W)``,
labels int64; the images are sorted by class (``n_per_class`` of class 0, then class 1, ...).
The modes depend on ``seed`` only (they are the same in every split); the samples depend on
``(seed, split)``, and the three splits draw from disjoint generator seeds.  Torch only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SHAPES", "SPLITS", "TEXTURES", "make_shapes", "mode_table", "shape_data"]

#: the shape family of each class, in label order
SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "x", "bars", "ell", "half_disk")
SPLITS = ("train", "val", "test")
TEXTURES = ("plain", "stripes", "checker", "noise")

_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}
_MAX_MODES = 16
_MIN_SIZE = 16

# per-sample jitter (the "within-mode" variation)
# (tuned on the val split: with half these values a ConvNet trained on 10 random images per class
# already reached ~80 % at modes=4; at these, ~50 %, while the full training set gives ~97 %)
_JITTER_POS = 0.25        # centre shift, in units of half the image side
_JITTER_SCALE = 0.25      # relative scale change
_JITTER_ROT = math.radians(15)
_JITTER_SHEAR = 0.25
_JITTER_COLOUR = 0.15
_PIXEL_NOISE = 0.12


def _check(n_per_class, split, seed, size, classes, modes) -> None:
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an int ≥ 1, got {n_per_class!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int ≥ 0, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < _MIN_SIZE:
        raise ValueError(f"size must be an int ≥ {_MIN_SIZE} (shapes need room), got {size!r}; "
                         "use size=32 as CIFAR-10")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be an int in 2..{len(SHAPES)} (one shape family each: "
                         f"{', '.join(SHAPES)}), got {classes!r}")
    if isinstance(modes, bool) or not isinstance(modes, int) or not 1 <= modes <= _MAX_MODES:
        raise ValueError(f"modes must be an int in 1..{_MAX_MODES}, got {modes!r}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(…,) hue in [0, 1), saturation, value → (…, 3) RGB in [0, 1]."""
    k = (torch.stack([h + 5 / 6, h + 3 / 6, h + 1 / 6], -1) * 6) % 6      # r, g, b phases
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[..., None] * (1 - s[..., None] * f)


def mode_table(seed: int = 0, classes: int = 10, modes: int = 4) -> list[list[dict]]:
    """The appearance of every (class, mode), fixed by ``seed`` alone: ``table[c][m]`` is a dict
    with ``scale``, ``centre`` (x, y in [-1, 1]), ``angle``, ``texture``, ``freq``, ``orient``,
    ``fg`` and ``bg`` (RGB in [0, 1]) and ``dark_fg``."""
    _check(1, "train", seed, 32, classes, modes)
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    # small modes sit in one of four quadrant slots, large ones near the centre; the slot, texture
    # and polarity are spread over a class's modes so that no two modes of a class look alike
    slots = [(-0.45, -0.45), (0.45, 0.45), (0.45, -0.45), (-0.45, 0.45)]
    table = []
    for c in range(classes):
        start = int(torch.randint(0, 4, (1,), generator=g))
        hues = (torch.rand(1, generator=g) + torch.arange(modes) / modes) % 1.0
        rows = []
        for m in range(modes):
            large = m % 2 == 1
            slot = slots[(start + m // 2 + (m % 2) * 2) % 4]
            u = torch.rand(8, generator=g)
            centre = (0.15 * slot[0], 0.15 * slot[1]) if large else slot
            dark_fg = (m // 2 + c) % 2 == 1                 # polarity alternates over modes
            fg_v, bg_v = (0.25, 0.9) if dark_fg else (0.95, 0.2)
            fg = _hsv_to_rgb(hues[m], torch.tensor(0.55 + 0.4 * float(u[0])), torch.tensor(fg_v))
            bg_h = (hues[m] + 0.33 + 0.33 * u[1]) % 1.0
            bg = _hsv_to_rgb(bg_h, torch.tensor(0.3 + 0.5 * float(u[2])), torch.tensor(bg_v))
            rows.append({
                "scale": (0.55 + 0.1 * float(u[3])) if large else (0.3 + 0.06 * float(u[3])),
                "centre": centre,
                "angle": (float(u[4]) - 0.5) * math.radians(20),
                "texture": TEXTURES[(start + m + c) % len(TEXTURES)],
                "freq": 2.0 + 3.0 * float(u[5]),                  # cycles across the image
                "orient": math.pi * float(u[6]),
                "fg": fg, "bg": bg, "dark_fg": dark_fg,
            })
        table.append(rows)
    return table


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (≈, negative inside) of ``shape`` of radius ~1 at local coordinates."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    if shape == "disk":
        return r - 0.95
    if shape == "square":
        return torch.maximum(au, av) - 0.8
    if shape == "triangle":                                 # pointing up (v grows downwards)
        return torch.maximum(v - 0.55, (0.866 * au - 0.5 * v) - 0.45)
    if shape == "plus":
        return torch.minimum(torch.maximum(au - 0.3, av - 0.95), torch.maximum(au - 0.95, av - 0.3))
    if shape == "ring":
        return (r - 0.72).abs() - 0.22
    if shape == "diamond":
        return (au + av) * 0.7071 - 0.72
    if shape == "x":
        a, b = (u + v) * 0.7071, (u - v) * 0.7071
        return _sdf("plus", a, b)
    if shape == "bars":
        return torch.maximum(au - 0.9, (av - 0.5).abs() - 0.2)
    if shape == "ell":
        return torch.minimum(torch.maximum((u + 0.6).abs() - 0.28, av - 0.95),
                             torch.maximum(au - 0.9, (v - 0.67).abs() - 0.28))
    if shape == "half_disk":
        return torch.maximum(r - 0.95, -v - 0.05)
    raise AssertionError(shape)


def _texture(kind: str, n: int, size: int, freq: float, orient: float, g: torch.Generator,
             X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(n, size, size) pattern in [0, 1]; X, Y the image grid in [-1, 1]."""
    if kind == "plain":
        return torch.zeros(n, size, size)
    f = freq * (1 + 0.15 * (torch.rand(n, 1, 1, generator=g) - 0.5) * 2) * math.pi
    th = orient + (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.4
    ph = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    a = X * torch.cos(th) + Y * torch.sin(th)
    if kind == "stripes":
        return (torch.sin(f * a + ph) > 0).float()
    if kind == "checker":
        b = -X * torch.sin(th) + Y * torch.cos(th)
        ph2 = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        return ((torch.sin(f * a + ph) * torch.sin(f * b + ph2)) > 0).float()
    if kind == "noise":
        lo = torch.rand(n, 1, 6, 6, generator=g)
        up = torch.nn.functional.interpolate(lo, size=(size, size), mode="bilinear", align_corners=False)
        return (up[:, 0] > 0.5).float() * 0.8 + 0.2 * up[:, 0]
    raise AssertionError(kind)


def make_shapes(n_per_class: int, split: str = "train", seed: int = 0, size: int = 32,
                classes: int = 10, modes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of each of ``classes`` shape families, each family in ``modes``
    appearances (modes take turns: sample ``i`` of a class is in mode ``i % modes``).

    Returns ``(x, y)``: x float32 ``(classes·n_per_class, 3, size, size)`` in ``[0, 1]``, y int64,
    sorted by class.  Deterministic under ``(seed, split)``; ``split`` is train, val or test
    (disjoint sample seeds, the same modes).
    """
    _check(n_per_class, split, seed, size, classes, modes)
    table = mode_table(seed, classes, modes)
    g = torch.Generator().manual_seed(3 * (1_000_003 * seed + 29) + _SPLIT_OFFSET[split] + 7_919)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    Y, X = torch.meshgrid(lin, lin, indexing="ij")          # (size, size), y grows downwards
    px = size / 2                                           # pixels per unit of the grid
    xs = []
    for c in range(classes):
        mode_of = torch.arange(n_per_class) % modes
        xc = torch.empty(n_per_class, 3, size, size)
        for m in range(modes):
            idx = torch.nonzero(mode_of == m).flatten()
            n = len(idx)
            if n == 0:
                continue
            md = table[c][m]
            j = lambda *shape: (torch.rand(*shape, generator=g) - 0.5) * 2   # noqa: E731  U(-1, 1)
            cx = md["centre"][0] + _JITTER_POS * j(n, 1, 1)
            cy = md["centre"][1] + _JITTER_POS * j(n, 1, 1)
            s = md["scale"] * (1 + _JITTER_SCALE * j(n, 1, 1))
            a = md["angle"] + _JITTER_ROT * j(n, 1, 1)
            sh = _JITTER_SHEAR * j(n, 1, 1)
            dx, dy = X - cx, Y - cy
            ru = torch.cos(a) * dx + torch.sin(a) * dy            # rotate by -a, then un-shear
            rv = -torch.sin(a) * dx + torch.cos(a) * dy
            u, v = (ru - sh * rv) / s, rv / s
            d = _sdf(SHAPES[c], u, v) * s * px                    # ≈ signed distance in pixels
            mask = torch.sigmoid(-d / 0.45)[:, None]              # (n, 1, size, size), antialiased
            tex = _texture(md["texture"], n, size, md["freq"], md["orient"], g, X, Y)[:, None]
            fg = (md["fg"] + _JITTER_COLOUR * j(n, 3)).clamp(0, 1)[:, :, None, None]
            bg = (md["bg"] + _JITTER_COLOUR * j(n, 3)).clamp(0, 1)[:, :, None, None]
            # the texture shifts the background's brightness away from the shape's
            toward = 1.0 if md["dark_fg"] else 0.0
            bg_img = bg + 0.45 * tex * (toward - bg)
            img = bg_img * (1 - mask) + fg * mask
            img = img + _PIXEL_NOISE * torch.randn(n, 3, size, size, generator=g)
            xc[idx] = img.clamp(0, 1)
        xs.append(xc)
    x = torch.cat(xs).contiguous()
    y = torch.arange(classes, dtype=torch.int64).repeat_interleave(n_per_class)
    return x, y


def shape_data(n_per_class: int, split: str = "train", **kwargs):
    """:func:`make_shapes` as an :class:`effdl.data.ImageData` (with the shape families' names)."""
    from effdl.data import ImageData

    x, y = make_shapes(n_per_class, split, **kwargs)
    return ImageData(x, y, list(SHAPES[: int(y.max()) + 1]))
