"""Figures of the token-compression chapter: kept tokens on pages, and an interactive explorer.

:func:`kept_tokens_figure` is a plain matplotlib figure (what the static site shows);
:func:`explore_kept` adds ipywidgets controls around the same drawing, through
:func:`effdl.plot.explorer` (only the widgets ipywidgets 7.7.1, Colab's, and 8.x share).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kept_tokens_figure", "explore_kept", "token_overlay", "plot_tradeoff", "plot_kv",
           "plot_kv_loss", "plot_ttft",
           "plot_bench", "plot_recorded", "plot_count_sweep", "plot_crop_budgets"]


@torch.no_grad()
def token_overlay(model, image: torch.Tensor, reducer, seed: int = 0):
    """Per-patch status of one page: ``(H/p, W/p)`` array, 1 kept, 0.5 merged/fused, 0 dropped."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    _, info = model(image[None].to(dev), reducer, generator=gen, return_info=True)
    info = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in info.items()}
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

    ``make_reducer(name, keep)`` builds a reducer.  The static figure (page 0, every
    method) is always made and returned; the controls come from
    :func:`effdl.plot.explorer`, so none appear on the site (`make book` sets
    ``$EFFDL_SITE_BUILD``) or without ipywidgets.  They start at page 0, the last
    method and ``keep``.
    """
    import matplotlib.pyplot as plt

    from effdl.plot import explorer

    methods = list(methods)
    reducers = {m: make_reducer(m, keep) for m in methods}
    static = kept_tokens_figure(model, images, reducers, pages=[0],
                                titles=None if titles is None else titles[:1])

    def draw(page=0, method=methods[-1], keep=keep):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        title = method if titles is None else f"{method} · {titles[page]}"
        _draw(ax, model, images[page], make_reducer(method, keep), title)
        return fig

    explorer(draw, (), page=(0, len(images) - 1), method=methods, keep=(0.1, 1.0, 0.05))
    return static


def plot_tradeoff(rows, axes=None):
    """Accuracy and batch-64 latency against the mean fraction of tokens kept, one line per method."""
    import matplotlib.pyplot as plt

    vit = [r for r in rows if r.get("method") not in ("kv", "blocks") and r.get("task") != "count"]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for method in dict.fromkeys(r["method"] for r in vit):
        pts = sorted((r["mean_tokens_kept_frac"], r["accuracy"], r.get("ms_batch64"))
                     for r in vit if r["method"] == method)
        if method == "keep_all":  # one point: draw it as a reference line across the panel
            axes[0].axhline(100 * pts[0][1], color="k", ls="--", lw=1, label="keep_all")
            if pts[0][2] is not None:
                axes[1].axhline(pts[0][2], color="k", ls="--", lw=1, label="keep_all")
            continue
        style = dict(marker="*" if method == "tcc" else "o", ms=11 if method == "tcc" else 5, label=method)
        axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], **style)
        if pts[0][2] is not None:
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    axes[0].set(xlabel="mean fraction of patch tokens kept", ylabel="accuracy (%)", title="accuracy vs tokens kept")
    axes[1].set(xlabel="mean fraction of patch tokens kept", ylabel="batch-64 latency (ms)",
                title="latency vs tokens kept", ylim=(0, None))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def plot_kv(rows, ax=None):
    """Attention-output error against compression ratio for the KV codec's settings."""
    import matplotlib.pyplot as plt

    kv = [r for r in rows if r.get("method") == "kv"]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    for g in dict.fromkeys(r["group"] for r in kv):
        pts = sorted((r["ratio_vs_fp16"], r["attn_rel_err"], r["bits"]) for r in kv
                     if r["group"] == g and isinstance(r["bits"], int))
        if pts:
            label = "no anchors (group 1)" if g == 1 else f"anchor every {g} tokens"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"uniform bits, {label}")
            for x, y, b in pts:
                ax.annotate(f"{b}b", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in kv:
        if isinstance(r["bits"], str):
            ax.plot(r["ratio_vs_fp16"], r["attn_rel_err"], "k*", ms=12, label=f"layer bits {r['bits']}")
    ax.axhline(1e-2, color="gray", ls=":")
    ax.axvline(3.5, color="gray", ls=":")
    ax.set(xlabel="compression ratio vs fp16 (×)", ylabel="attention-output relative error", yscale="log",
           title="KV cache: size vs error (better: lower right)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def plot_bench(rows):
    """The CLI's figure: :func:`plot_tradeoff` and :func:`plot_kv` side by side."""
    import matplotlib.pyplot as plt

    count = any(r.get("task") == "count" for r in rows)
    fig, axes = plt.subplots(1, 4 if count else 3, figsize=(21 if count else 16, 3.8))
    plot_tradeoff(rows, axes[:2])
    plot_kv(rows, axes[2])
    if count:
        plot_count_sweep(rows, axes[3])
    fig.tight_layout()
    return fig


def plot_recorded(doc: dict):
    """A recorded GPU run: batch-64 latency against the fraction of tokens kept, one line per method."""
    from effdl.bench.core import plot_rows, print_table
    from effdl.plot import recorded_label

    rows = [r for r in doc["results"] if r["method"] not in ("blocks",)]
    print_table(rows, ["method", "keep", "mean_tokens_kept_frac", "ms_batch1", "ms_batch64", "gflops"])
    return plot_rows(rows, x="mean_tokens_kept_frac", y="ms_batch64", line="method", logx=False,
                     xlabel="mean fraction of patch tokens kept", ylabel="batch-64 latency (ms)",
                     title=recorded_label(doc["meta"]))


def plot_kv_loss(rows, ax=None):
    """Next-byte loss increase against compression ratio, one line per bit allocation."""
    import matplotlib.pyplot as plt

    kv = [r for r in rows if r.get("method") == "kv" and "loss_rel_increase" in r]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    for alloc, marker in (("even", "o"), ("measured", "s")):
        pts = sorted((r["ratio_vs_fp16"], 100 * r["loss_rel_increase"], r["bits"])
                     for r in kv if r["allocation"] == alloc)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    label=f"{alloc} bits per layer")
    for r in kv:
        if r["allocation"] == "even":
            ax.annotate(str(r["bits"]), (r["ratio_vs_fp16"], 100 * r["loss_rel_increase"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="gray", ls=":")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set(xlabel="compression ratio vs fp16 (×)", ylabel="next-byte loss increase (%)",
           title="KV cache: size vs loss (better: lower right)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def plot_ttft(nbytes: dict, decode_s: dict, recompute_s: float, gbps, ax=None):
    """Time to first token against bandwidth: one line per way of shipping the cache
    (``nbytes[name]`` bytes, ``decode_s[name]`` to turn them into a cache), and the
    prefill recomputed (flat)."""
    import matplotlib.pyplot as plt

    from effdl.tokens.experiments import ttft_s

    gbps = np.asarray(gbps, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, n in nbytes.items():
        ax.plot(gbps, 1e3 * ttft_s(n, gbps, decode_s[name]), label=f"fetch {name}")
    ax.axhline(1e3 * recompute_s, color="black", ls="--", label="recompute the prefill")
    ax.set(xscale="log", yscale="log", xlabel="bandwidth (Gbit/s)",
           ylabel="time to first token (ms)", title="Fetch the cache or recompute it")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def plot_count_sweep(rows, ax=None):
    """Accuracy on the counting pages against the fraction of keep-all FLOPs, one line per method
    (rows of :func:`effdl.tokens.experiments.count_sweep`); per-layer methods dashed."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("task") == "count"]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["flops_frac"], 100 * r["accuracy"]) for r in rows if r["method"] == method)
        if method == "keep_all":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="keep_all")
            continue
        tcc = method.startswith("tcc")
        style = dict(marker="*" if tcc else "o", ms=11 if tcc else 5,
                     ls="--" if "per layer" in method else "-", label=method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 classes)")
    ax.set(xlabel="FLOPs per page, fraction of keep-all", ylabel="accuracy (%)",
           title="counting marks: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax.figure


def plot_crop_budgets(model, images, budgets: dict, crop_counts, *, titles=None):
    """Pages with TCC's kept patches (dropped ones darkened) and, in each crop, its density ρ,
    the tokens it kept out of its patches, and how many marks it really holds.

    budgets: :func:`effdl.tokens.experiments.crop_budgets` of ``images``;
    crop_counts: ``(B, n_crops)`` true marks per crop (``info["crop_count"]``).
    """
    import matplotlib.pyplot as plt

    B = images.shape[0]
    fig, axes = plt.subplots(1, B, figsize=(4.6 * B, 4.8))
    axes = np.atleast_1d(axes)
    H, W = model.image_size
    g, cx = model.crop // model.patch, W // model.crop
    T = model.tokens_per_crop
    for b, ax in enumerate(axes):
        mask = budgets["mask"][b].cpu().float()
        grid = mask.view(H // model.crop, cx, g, g).permute(0, 2, 1, 3).reshape(H // model.patch,
                                                                              W // model.patch)
        ax.imshow(images[b, 0].numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
        overlay = np.zeros((*grid.shape, 4))
        overlay[grid.numpy() == 0] = (0.1, 0.1, 0.1, 0.55)   # dropped: darkened
        ax.imshow(overlay, extent=(0, W, H, 0), interpolation="nearest")
        for c in range(budgets["density"].shape[1]):
            y0, x0 = (c // cx) * model.crop, (c % cx) * model.crop
            ax.add_patch(plt.Rectangle((x0, y0), model.crop, model.crop, fill=False, ec="red",
                                       lw=0.8))
            ax.text(x0 + 2, y0 + 2, f"ρ={float(budgets['density'][b, c]):.2f}\n"
                    f"{int(budgets['kept'][b, c])}/{T} kept\n{int(crop_counts[b, c])} ●",
                    fontsize=9, va="top", color="white",
                    bbox=dict(facecolor="black", alpha=0.45, pad=0.5, lw=0))
        ax.set_title(titles[b] if titles else "", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig
