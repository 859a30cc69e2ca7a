"""Figures of the language-model inference chapter."""

from __future__ import annotations

import statistics

import matplotlib.pyplot as plt

from effdl.plot import new_axes

__all__ = ["plot_generation", "plot_steps", "plot_serving", "plot_speculative",
           "plot_kinetics", "plot_bench", "plot_recorded"]


def _err(rows, key="ms"):
    """Lower and upper error bar lengths from the rows' quartiles."""
    return [[r[key] - r[f"{key}_q1"] for r in rows], [r[f"{key}_q3"] - r[key] for r in rows]]


def plot_generation(rows):
    """Milliseconds to generate up to each total length: naive loop vs KV cache."""
    fig, ax = new_axes("total tokens (prompt + generated)", "time to generate (ms)",
                       "Greedy generation, batch 1", logx=True, logy=True)
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = sorted((r for r in rows if r["method"] == method), key=lambda r: r["total"])
        ax.errorbar([r["total"] for r in sub], [r["ms"] for r in sub], yerr=_err(sub),
                    marker="o", capsize=3, label=method)
    ax.legend()
    return fig


def plot_steps(costs, t_fixed: float, t_per_token: float):
    """Measured forwards (prefills and decode steps) against the tokens they process,
    with the fitted line the serving simulator uses."""
    fig, ax = new_axes("tokens processed by one forward", "time (ms)",
                       "One forward of the large model", logx=True)
    for kind, marker in (("prefill", "s"), ("decode", "o")):
        sub = [c for c in costs if c["kind"] == kind]
        ax.errorbar([c["tokens"] for c in sub], [c["ms"] for c in sub], yerr=_err(sub),
                    marker=marker, ls="none", capsize=3,
                    label=f"{kind} ({'prompt length' if kind == 'prefill' else 'batch'})")
    xs = sorted({c["tokens"] for c in costs})
    ax.plot(xs, [1e3 * (t_fixed + t_per_token * x) for x in xs], "k--", lw=1,
            label=f"fit: {1e3 * t_fixed:.2f} ms + {1e3 * t_per_token:.3f} ms/token")
    ax.legend(fontsize=8)
    return fig


def _mean_by(rows, keys, value):
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r[value])
    return {k: (statistics.mean(v), min(v), max(v)) for k, v in groups.items()}


def plot_serving(rows):
    """Throughput and p95 latency against the batch size, static vs continuous."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, value, label in ((axes[0], "tokens_per_s", "throughput (tokens/s)"),
                             (axes[1], "p95_s", "p95 latency (s)")):
        stats = _mean_by(rows, ("method", "batch"), value)
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((b, v) for (m, b), v in stats.items() if m == method)
            ax.errorbar([b for b, _ in pts], [v[0] for _, v in pts],
                        yerr=[[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]],
                        marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (static) / most running sequences (continuous)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Simulated serving, same trace and KV memory (mean, min-max of seeds)")
    fig.tight_layout()
    return fig


def plot_speculative(rows):
    """Measured speed-up over the large model alone against the draft length, with
    the one Leviathan et al.'s formula predicts (when the rows carry it)."""
    fig, ax = new_axes("draft length k", "speed-up over the large model alone",
                       "Speculative decoding, greedy, batch 1")
    sub = [r for r in rows if r.get("k")]
    ax.errorbar([r["k"] for r in sub], [r["speedup"] for r in sub],
                yerr=[[r["speedup"] - r["speedup_q1"] for r in sub],
                      [r["speedup_q3"] - r["speedup"] for r in sub]],
                marker="o", capsize=3, label="measured (median, quartiles)")
    if all(r.get("predicted") is not None for r in sub):
        ax.plot([r["k"] for r in sub], [r["predicted"] for r in sub], "s--",
                label="predicted from alpha and c")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks([r["k"] for r in sub])
    ax.legend(fontsize=8)
    return fig


def plot_kinetics(rows):
    """Share of a decode step's memory traffic that is the KV cache, as context grows:
    one line per (model, batch), solid at batch 1, dashed for larger batches."""
    fig, ax = new_axes("context (tokens)", "KV cache share of bytes read per step",
                       logx=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        sub = sorted((r for r in rows if (r["model"], r["batch"]) == (model, batch)),
                     key=lambda r: r["context"])
        ax.plot([r["context"] for r in sub], [r["kv_share"] for r in sub], marker="o",
                ls="-" if batch == 1 else "--", color=f"C{models.index(model)}",
                label=f"{model}, batch {batch}")
    ax.axhline(0.5, color="gray", lw=1, ls=":")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def plot_bench(rows):
    """The benchmark's rows: tokens/s of each generation method, batch 1."""
    from effdl.bench.core import plot_rows

    sub = [r for r in rows if r.get("tokens_per_s") is not None and r.get("gen_len")]
    for r in sub:
        r.setdefault("total", (r.get("prompt_len") or 0) + r["gen_len"])
    return plot_rows(sub, x="total", y="tokens_per_s", line="method",
                     xlabel="prompt + generated tokens", ylabel="tokens/s (batch 1)")


def plot_recorded(doc: dict):
    """A recorded GPU run: the same rows as :func:`plot_bench`, titled by the device."""
    from effdl.bench.core import print_table
    from effdl.plot import recorded_label

    rows = doc["results"]
    print_table(rows, ["method", "batch", "prompt_len", "gen_len", "ttft_ms", "tpot_ms",
                       "tokens_per_s", "alpha", "speedup"])
    fig = plot_bench(rows)
    fig.axes[0].set_title(recorded_label(doc["meta"]))
    return fig
