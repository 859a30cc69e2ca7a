"""Figures of the distillation chapter: the results table and a recorded GPU run."""

from __future__ import annotations

from effdl.distill.experiments import PUBLISHED, summarize, summarize_seconds

__all__ = ["NAMES", "plot_bench", "plot_recorded", "plot_toy_points", "plot_toy_frequencies",
           "plot_unroll_memory", "plot_equal_seconds"]

#: the methods' names on the page (the library's keys are lower case; ``cfd`` is CF)
NAMES = {"dc": "DC", "dm": "DM", "cfd": "CF", "ncfm": "NCFM", "random": "random"}
_NAMES = NAMES


def plot_bench(rows: list[dict], published: bool = True):
    """Accuracy (mean ± std over seeds) per method, one panel per IPC; the paper's CIFAR-10 numbers as
    hollow markers on a second axis, labelled *published*."""
    import matplotlib.pyplot as plt

    summ = summarize(rows)
    ipcs = list(dict.fromkeys(r["ipc"] for r in summ))
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5.2 * len(ipcs), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        sub = [r for r in summ if r["ipc"] == ipc]
        names = [r["method"] for r in sub]
        ax.bar(names, [r["acc_mean"] for r in sub], yerr=[r["acc_std"] for r in sub], capsize=3,
               color="tab:blue", alpha=0.8, label="measured here (mean ± std)")
        lo = min(r["acc_mean"] - r["acc_std"] for r in sub)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"IPC {ipc}")
        ax.grid(axis="y", alpha=0.3)
        pub = [(n, PUBLISHED.get((n, ipc))) for n in names]
        if published and any(v is not None for _, v in pub):
            ax2 = ax.twinx()
            ax2.plot([n for n, v in pub if v is not None], [v for _, v in pub if v is not None], "o",
                     mfc="none", color="tab:red", label="published, CIFAR-10 (NCFM paper)")
            ax2.set_ylim(0, 100)
            ax2.set_ylabel("published accuracy, CIFAR-10 (%)", color="tab:red")
            ax2.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def plot_recorded(doc: dict):
    """A recorded GPU run: time per iteration and peak memory against IPC, one line per method."""
    import matplotlib.pyplot as plt

    from effdl.plot import recorded_label

    rec = [r for r in doc["results"] if r.get("sec_per_iter") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, unit, scale in [(axes[0], "sec_per_iter", "time per iteration (ms)", 1e3),
                                 (axes[1], "peak_mem_bytes", "peak memory (MiB)", 2**-20)]:
        for m in dict.fromkeys(r["method"] for r in rec):
            pts = sorted((r["ipc"], r[key] * scale) for r in rec
                         if r["method"] == m and r.get(key) is not None)
            ax.plot([p for p, _ in pts], [v for _, v in pts], "o-", label=m)
        ax.set(xscale="log", yscale="log", xlabel="IPC", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(recorded_label(doc["meta"]))
    fig.tight_layout()
    return fig


_TOY_NAMES = {"dm": "DM (mean only)", "cfd": "CF, Gaussian frequencies",
              "ncfm": "NCFM, learned frequencies"}


def plot_toy_points(run: dict):
    """One panel per method of :func:`effdl.distill.toy.run_toy`: the real points faint,
    the start as grey crosses, the fitted points large; titles give modes and energy
    distance."""
    import matplotlib.pyplot as plt

    from effdl.distill.toy import TOY_METHODS

    x, rows = run["real"], {r["method"]: r for r in run["rows"]}
    fig, axes = plt.subplots(1, len(TOY_METHODS), figsize=(11, 3.8), sharex=True,
                             sharey=True)
    for ax, method in zip(axes, TOY_METHODS):
        pts, r = run["points"][method], rows[method]
        ax.scatter(x[:, 0], x[:, 1], s=2, color="tab:blue", alpha=0.15, label="real")
        ax.scatter(run["start"][:, 0], run["start"][:, 1], s=25, marker="x",
                   color="grey", label="start")
        ax.scatter(pts[:, 0], pts[:, 1], s=70, color="tab:red", edgecolor="black",
                   label=f"{len(pts)} synthetic")
        ax.set_title(f"{_TOY_NAMES[method]}\n{r['modes']}/{len(run['centres'])} modes, "
                     f"energy distance {r['energy']:.3f}", fontsize=9)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"seed {run['seed']}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_toy_frequencies(run: dict, grid: int = 91, directions: int = 32):
    """NCFM's frequencies on one noise draw, before and after training.  Left: the
    frequencies over a map of ``|Φ_real(t) − Φ_syn(t)|`` for NCFM's final points (where
    the two sets still differ).  Right: that gap averaged over directions against
    ``|t|``, for each method's final points, with the frequencies' lengths as ticks."""
    import math

    import matplotlib.pyplot as plt
    import torch

    from effdl.distill.toy import TOY_METHODS, cf_gap

    x, t0, t1 = run["real"], run["t_before"], run["t_after"]
    lim = 1.1 * float(torch.cat([t0, t1]).abs().max())
    axis = torch.linspace(-lim, lim, grid)
    tt = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    gap = cf_gap(x, run["points"]["ncfm"], tt).reshape(grid, grid)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    im = ax.imshow(gap, origin="lower", extent=(-lim, lim, -lim, lim), cmap="Greys",
                   vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="|Φ_real(t) − Φ_syn(t)|, final NCFM points")
    for a, b in zip(t0.tolist(), t1.tolist()):       # each frequency's path
        ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:orange", lw=0.5, alpha=0.5)
    ax.scatter(t0[:, 0], t0[:, 1], s=12, color="tab:blue", label="before")
    ax.scatter(t1[:, 0], t1[:, 1], s=12, color="tab:red", label="after")
    ax.set(xlabel="$t_1$", ylabel="$t_2$", title=f"NCFM's {len(t0)} frequencies "
           f"(one noise draw, seed {run['seed']})")
    ax.legend(loc="lower left", fontsize=8)
    # the gap against |t|: mean over evenly spaced directions
    angle = 2 * math.pi * torch.arange(directions) / directions
    unit = torch.stack([angle.cos(), angle.sin()], 1)            # (directions, 2)
    radii = torch.logspace(-1, math.log10(lim), 40)
    ring = (radii[:, None, None] * unit).reshape(-1, 2)          # (40 · directions, 2)
    for method in TOY_METHODS:
        g = cf_gap(x, run["points"][method], ring).reshape(len(radii), directions)
        ax2.plot(radii, g.mean(1), label=_TOY_NAMES[method])
    for t, color, name in ((t0, "tab:blue", "before"), (t1, "tab:red", "after")):
        ax2.plot(t.norm(dim=1), torch.full((len(t),), -0.03), "|", color=color, ms=8,
                 label=f"|t| of NCFM's frequencies, {name}")
    ax2.set(xscale="log", xlabel="|t|", ylabel="mean |Φ_real − Φ_syn| over directions",
            title="where the sets still differ")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_unroll_memory(rows: list[dict]):
    """Peak memory of one iteration against the number of unrolled inner steps K: one line per
    method (rows of :func:`effdl.distill.unroll.memory_sweep`); DM, CF and NCFM do not unroll, so
    their lines are flat."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    styles = {"unroll": "o-", "dm": "s--", "cfd": "^--", "ncfm": "d--"}
    for m in dict.fromkeys(r["method"] for r in rows):
        sub = sorted((r for r in rows if r["method"] == m), key=lambda r: r["unroll"])
        label = "unroll-K (trajectory matching)" if m == "unroll" else f"{m} (one matching step)"
        ax.plot([r["unroll"] for r in sub], [r["peak_mem_bytes"] / 2**20 for r in sub],
                styles.get(m, "o-"), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ks = sorted({r["unroll"] for r in rows})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("unrolled inner steps K")
    ax.set_ylabel("peak memory per iteration (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_equal_seconds(rows: list[dict]):
    """Accuracy against seconds of distillation (rows of
    :func:`effdl.distill.experiments.equal_seconds`), one panel per IPC: one line per method
    from the random start at 0 s through its snapshots (mean over seeds, bars: ± std), the mean
    number of iterations written at each method's last point."""
    import matplotlib.pyplot as plt

    summ = summarize_seconds(rows)
    if not summ:
        raise ValueError("no rows to plot: pass the rows of equal_seconds(...)")
    ipcs = list(dict.fromkeys(r["ipc"] for r in summ))
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5.2 * len(ipcs), 3.7), squeeze=False)
    styles = {"dc": "v-", "dm": "s-", "cfd": "^-", "ncfm": "o-"}
    for ax, ipc in zip(axes[0], ipcs):
        sub = [r for r in summ if r["ipc"] == ipc]
        start = next(r for r in sub if r["method"] == "random")
        ax.axhline(start["acc_mean"], color="grey", lw=0.8, ls=":",
                   label=f"random subset ({start['acc_mean']:.1f}%)")
        methods = list(dict.fromkeys(r["method"] for r in sub if r["method"] != "random"))
        for j, m in enumerate(methods):
            pts = [start] + [r for r in sub if r["method"] == m]
            line = ax.errorbar([r["seconds"] for r in pts], [r["acc_mean"] for r in pts],
                               yerr=[r["acc_std"] for r in pts], fmt=styles.get(m, "o-"),
                               ms=4, capsize=2, label=_NAMES.get(m, m))
            last = pts[-1]
            ax.annotate(f"{last['iterations']:.0f} it", (last["seconds"], last["acc_mean"]),
                        textcoords="offset points", fontsize=7,
                        xytext=(4, 8 * (j - (len(methods) - 1) / 2)),   # apart if close
                        color=line[0].get_color(), va="center")
        ax.set(xlabel="seconds of distillation (image updates only)",
               ylabel="test accuracy (%)", title=f"IPC {ipc}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
