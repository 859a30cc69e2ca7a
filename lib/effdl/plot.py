"""Small plotting helpers: labelled axes with units, no global style changes."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt


def new_axes(xlabel: str, ylabel: str, title: str = "", *, figsize=(5.5, 3.6), logx=False, logy=False):
    """A figure with one labelled axes (always pass units in the labels, e.g. 'time (ms)')."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig, ax


def image_grid(images, titles: Sequence[str] | None = None, *, ncols: int = 10, cmap="gray", size=1.2, suptitle=""):
    """Show a (n, C, H, W) or (n, H, W) batch of images in a grid; values are min-max scaled."""
    import torch

    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    n = x.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = x[i]
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap=cmap if img.shape[0] == 1 else None)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def recorded_label(meta: dict) -> str:
    """"recorded on <device>, <date> (torch X)" — the caption every recorded-result figure carries."""
    dev = meta.get("device_name") or meta.get("device", "?")
    date = str(meta.get("date", "?"))[:10]
    return f"recorded on {dev}, {date} (torch {meta.get('torch', '?')})"


SITE_BUILD_ENV = "EFFDL_SITE_BUILD"


def explorer(draw, static: Sequence[dict], **controls):
    """An interactive explorer that never leaves a dead widget on the site.

    ``draw(**values)`` makes one figure.  The static figures (one per dict in
    ``static``) are always drawn, so the rendered site and any notebook viewer show
    real results.  Then, unless ``$EFFDL_SITE_BUILD`` is set (``make book`` sets it: a
    static page cannot run callbacks), one control per keyword in ``controls``
    redraws on every change:

    - ``(lo, hi)`` or ``(lo, hi, step)``: an ``IntSlider`` if all are ints, else a
      ``FloatSlider``;
    - a non-empty list: a ``Dropdown`` of its items.

    A control starts at ``draw``'s default for its argument, else at ``lo`` or the first
    item.  Only ``IntSlider``, ``FloatSlider``, ``Dropdown`` and ``interactive_output``
    (an ``Output``) are used: the API ipywidgets 7.7.1 (Colab) and 8.x share.  Returns
    that ``Output``, or None when no widget is made.
    """
    import inspect
    import os

    params = inspect.signature(draw).parameters
    defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    # checked before the site test, so that a bad control fails the site build too
    specs = {name: _control_spec(name, spec, defaults.get(name))
             for name, spec in controls.items()}
    for values in static:
        _show(draw(**values))
    if os.environ.get(SITE_BUILD_ENV) or not specs:
        return None
    try:
        import ipywidgets
    except ImportError:
        print("(install ipywidgets for the interactive version)")
        return None
    from IPython.display import display

    widgets = {name: getattr(ipywidgets, kind)(**kw)
               for name, (kind, kw) in specs.items()}
    out = ipywidgets.interactive_output(lambda **values: _show(draw(**values)), widgets)
    display(*widgets.values(), out)
    return out


def _control_spec(name: str, spec, default) -> tuple[str, dict]:
    """``(widget class name, keyword arguments)`` for one :func:`explorer` control."""
    if isinstance(spec, list) and spec:
        value = spec[0] if default is None else default
        if value not in spec:
            raise TypeError(f"explorer control {name}: the default {value!r} is not among {spec!r}")
        return "Dropdown", dict(options=spec, value=value, description=name)
    numbers = isinstance(spec, tuple) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec)
    if numbers and len(spec) in (2, 3):
        kind = "IntSlider" if all(isinstance(x, int) for x in spec) else "FloatSlider"
        kw = dict(min=spec[0], max=spec[1], description=name)
        if len(spec) == 3:
            kw["step"] = spec[2]
        value = spec[0] if default is None else default
        ok = spec[0] <= value <= spec[1] and (kind == "FloatSlider" or isinstance(value, int))
        if not ok:
            raise TypeError(f"explorer control {name}: the default {value!r} does not fit the "
                            f"{kind} range {spec[:2]!r}")
        return kind, dict(kw, value=value)
    raise TypeError(
        f"explorer control {name}={spec!r}: give (lo, hi) or (lo, hi, step) for a "
        "slider, or a non-empty list for a dropdown")


def _show(fig) -> None:
    """Display a figure that ``draw`` returned (None: nothing), then close it."""
    from IPython.display import display

    if fig is not None:
        display(fig)
        plt.close(fig)        # why: else the inline backend shows it again at the cell's end
