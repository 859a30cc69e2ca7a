"""Figures of the distillation chapter: the results table and a recorded GPU run."""

from __future__ import annotations

from effdl.distill.experiments import PUBLISHED, summarize

__all__ = ["plot_bench", "plot_recorded"]


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
