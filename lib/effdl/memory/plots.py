"""Figures of the chapter "Fitting in memory"."""

from __future__ import annotations

import statistics

from effdl.plot import new_axes

__all__ = ["plot_sweep", "plot_steps", "plot_quant", "plot_finetune", "plot_offload",
           "plot_bench", "plot_recorded"]

MIB = 2 ** 20
_PARTS = ("weights", "gradients", "optimizer", "activations")


def plot_sweep(rows):
    """The four parts of a full fp32 training step by formula (stacked), and the
    measured peak (a dot), for each batch and sequence length."""
    fig, ax = new_axes("batch × sequence", "memory (MiB)",
                       "One training step, full fp32", figsize=(6.5, 3.6))
    labels = [f"{r['batch']}×{r['seq']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in _PARTS:
        h = [r[part] / MIB for r in rows]
        ax.bar(labels, h, bottom=bottom, label=part)
        bottom = [b + x for b, x in zip(bottom, h)]
    ax.plot(labels, [r["peak_mem_bytes"] / MIB for r in rows], "ko", label="measured peak")
    ax.legend(fontsize=8)
    return fig


def plot_steps(rows):
    """Peak memory of one training step of each configuration, with its time
    relative to full fp32 written on the bar."""
    fig, ax = new_axes("peak memory of one step (MiB)", "", "One training step",
                       figsize=(6.5, 3.2))
    names = [r["method"] for r in rows][::-1]
    vals = [r["peak_mem_bytes"] / MIB for r in rows][::-1]
    ax.barh(names, vals, color="tab:blue")
    for y, r in enumerate(rows[::-1]):
        ax.text(r["peak_mem_bytes"] / MIB, y, f" {r['time_ratio']:.2f}× time",
                va="center", fontsize=8)
    ax.set_xlim(0, max(vals) * 1.35)
    return fig


def plot_quant(rows):
    """RMS quantization error per weight against the bits each weight costs."""
    fig, ax = new_axes("bits per weight (scales included)", "RMS error per weight",
                       "Quantizing the model's weights")
    for r in rows:
        ax.plot(r["bits"], r["rms_error"], "o")
        ax.annotate(r["method"], (r["bits"], r["rms_error"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlim(3.5, 9.5)
    return fig


def _by_method(rows, key):
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r[key])
    return out


def plot_finetune(rows, peaks: dict):
    """Held-out accuracy of each method (mean, and every seed as a dot) against the
    peak memory of its training step (``peaks``: method -> bytes)."""
    fig, ax = new_axes("peak memory of one training step (MiB)",
                       "held-out next-byte accuracy (%)", "Fine-tuning on C++ headers")
    for method, accs in _by_method(rows, "accuracy").items():
        x = peaks[method] / MIB
        ax.plot([x] * len(accs), accs, ".", color="gray")
        ax.plot(x, statistics.mean(accs), "o", label=method)
    ax.legend(fontsize=8)
    return fig


def plot_offload(rows):
    """Time against device-resident layer memory, both relative to the all-resident
    stack, for each k: synchronous and prefetching copies."""
    fig, ax = new_axes("resident layer memory / all resident",
                       "time / all resident", "Offloading layers")
    for mode in ("sync", "prefetch"):
        sub = sorted((r for r in rows if r["method"] == f"offload, {mode}"),
                     key=lambda r: r["k"])
        ax.plot([r["memory_ratio"] for r in sub], [r["time_ratio"] for r in sub],
                "o-", label=mode)
        for r in sub:
            ax.annotate(f"k={r['k']}", (r["memory_ratio"], r["time_ratio"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend(fontsize=8)
    return fig


def plot_bench(rows):
    """The benchmark's rows: the step comparison (peak memory and relative time)."""
    return plot_steps([r for r in rows if r.get("section") == "step"])


def plot_recorded(doc: dict):
    """A recorded GPU run: its step comparison, titled by the device."""
    from effdl.bench.core import print_table
    from effdl.plot import recorded_label

    rows = doc["results"]
    print_table([r for r in rows if r.get("section") == "step"],
                ["method", "bits", "batch", "seq", "peak_mem_bytes", "ms_per_step",
                 "time_ratio"])
    fig = plot_bench(rows)
    fig.axes[0].set_title(recorded_label(doc["meta"]))
    return fig
