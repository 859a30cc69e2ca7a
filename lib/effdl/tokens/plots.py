"""Figures of the token-compression chapter: kept tokens on pages, and an interactive explorer.

:func:`kept_tokens_figure` is a plain matplotlib figure (what the static site shows);
:func:`explore_kept` adds ipywidgets controls around the same drawing.  The widgets use only
``IntSlider``, ``FloatSlider``, ``Dropdown``, ``Output`` and ``interactive_output``, which behave the
same in ipywidgets 7.7.1 (Colab) and 8.x.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kept_tokens_figure", "explore_kept", "token_overlay"]


@torch.no_grad()
def token_overlay(model, image: torch.Tensor, reducer, seed: int = 0):
    """Per-patch status of one page: ``(H/p, W/p)`` array, 1 kept, 0.5 merged/fused, 0 dropped."""
    gen = torch.Generator().manual_seed(seed)
    _, info = model(image[None], reducer, generator=gen, return_info=True)
    n = model.n_patches
    assign = info["assign"][0] if info["assign"] is not None else torch.arange(1, n + 1)
    counts = torch.bincount(assign.clamp_min(0), minlength=n + 2)
    status = torch.where(assign < 0, 0.0, torch.where(counts[assign.clamp_min(0)] > 1, 0.5, 1.0))
    # patches are ordered crop by crop: put them back on the page grid
    g = model.crop // model.patch
    H, W = model.image_size
    cy, cx = H // model.crop, W // model.crop
    grid = status.view(cy, cx, g, g).permute(0, 2, 1, 3).reshape(cy * g, cx * g)
    return grid.numpy(), int(info["n_kept"][0])


def _draw(ax, model, image, reducer, title, seed=0):
    grid, kept = token_overlay(model, image, reducer, seed)
    H, W = model.image_size
    ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
    p = model.patch
    overlay = np.zeros((*grid.shape, 4))
    overlay[grid == 0] = (0.1, 0.1, 0.1, 0.55)      # dropped: darkened
    overlay[grid == 0.5] = (0.2, 0.4, 1.0, 0.35)    # merged or fused: blue
    ax.imshow(overlay, extent=(0, W, H, 0), interpolation="nearest")
    for c in range(1, W // model.crop):
        ax.axvline(c * model.crop, color="red", lw=0.8)
    for r in range(1, H // model.crop):
        ax.axhline(r * model.crop, color="red", lw=0.8)
    ax.set_title(f"{title}\n{kept}/{model.n_patches} tokens", fontsize=8)
    ax.set_xticks(range(0, W + 1, p * 4)), ax.set_yticks([])
    ax.tick_params(labelsize=6)


def kept_tokens_figure(model, images, reducers: dict, *, pages=(0, 1, 2), seed: int = 0, titles=None):
    """Grid of pages (rows) × reducers (columns): dropped patches dark, merged ones blue, crops red."""
    import matplotlib.pyplot as plt

    pages = list(pages)
    fig, axes = plt.subplots(len(pages), len(reducers), figsize=(2.3 * len(reducers), 2.5 * len(pages)),
                             squeeze=False)
    for i, page in enumerate(pages):
        for j, (name, red) in enumerate(reducers.items()):
            label = name if titles is None else f"{name} · {titles[i]}"
            _draw(axes[i, j], model, images[page], red, label, seed)
    fig.tight_layout()
    return fig


def explore_kept(model, images, make_reducer, methods, *, titles=None, keep: float = 0.5):
    """Interactive: choose page, method and budget; always returns the static figure too.

    ``make_reducer(name, keep)`` builds a reducer.  Without ipywidgets (or without a live kernel,
    as on the static site: `make book` sets ``$EFFDL_SITE_BUILD``) the static figure of page 0 for
    every method is what you see.
    """
    import matplotlib.pyplot as plt

    static = kept_tokens_figure(model, images, {m: make_reducer(m, keep) for m in methods}, pages=[0],
                                titles=None if titles is None else titles[:1])
    import os

    from effdl.plot import SITE_BUILD_ENV

    if os.environ.get(SITE_BUILD_ENV):  # building the site: a static page can't run callbacks, no dead widget
        return static
    try:
        import ipywidgets as w
        from IPython.display import display
    except ImportError:  # the static figure is the fallback
        return static
    page = w.IntSlider(value=0, min=0, max=len(images) - 1, description="page")
    method = w.Dropdown(options=list(methods), value=list(methods)[-1], description="method")
    budget = w.FloatSlider(value=keep, min=0.1, max=1.0, step=0.05, description="keep")

    def draw(page, method, keep):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        title = method if titles is None else f"{method} · {titles[page]}"
        _draw(ax, model, images[page], make_reducer(method, keep), title)
        plt.show()

    out = w.interactive_output(draw, {"page": page, "method": method, "keep": budget})
    display(w.VBox([w.HBox([page, method, budget]), out]))
    return static
