"""Small plotting helpers: labelled axes with units, no global style changes."""

from __future__ import annotations

from typing import Sequence

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

    ``draw(**values)`` makes one figure.  The static figures (one per dict in ``static``) are always
    drawn, so the rendered site and any notebook viewer show real results.  In a live kernel, and
    unless ``$EFFDL_SITE_BUILD`` is set (``make book`` sets it: a static page cannot run callbacks), an
    ``ipywidgets.interact`` explorer over ``controls`` follows.  Works with ipywidgets 7.7.1 (Colab)
    and 8.x: only ``interact`` with plain value lists/tuples is used.
    """
    import os

    from IPython.display import display

    for values in static:
        fig = draw(**values)
        if fig is not None:
            display(fig)
            plt.close(fig)
    if os.environ.get(SITE_BUILD_ENV) or not controls:
        return None
    try:
        import ipywidgets
    except ImportError:
        print("(install ipywidgets for the interactive version)")
        return None

    def _show(**values):
        fig = draw(**values)
        if fig is not None:
            display(fig)
            plt.close(fig)

    return ipywidgets.interact(_show, **controls)
