"""Figures of the attention chapter (kept here so the notebook cells stay small)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from effdl.attention import iosim


def prefill_time_memory(rows, title: str = ""):
    """Left: forward time against N; right: peak extra memory against N (one line per impl)."""
    rows = [r for r in rows if r.get("name") == "prefill" and not r.get("causal") and "ms" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["N"], r["ms"], r.get("peak_mem_bytes", 0)) for r in rows if r["impl"] == impl)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        b.plot([p[0] for p in pts], [max(p[2], 1) / 2**20 for p in pts], marker="o", label=impl)
    a.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="forward time (ms)")
    b.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="peak extra memory (MiB)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def tile_sweep(tile_rows, mm_rows):
    """Left: tiled forward time against tile size; right: matmul GFLOP/s and µs per call against tile side."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode in dict.fromkeys(r.get("mode", "tiled forward") for r in tile_rows):
        sub = [r for r in tile_rows if r.get("mode", "tiled forward") == mode]
        a.plot([r["tile_elems"] for r in sub], [r["ms"] for r in sub], marker="o", label=mode)
    for r in tile_rows:
        if r.get("mode", "tiles across cores") == "tiles across cores":
            a.annotate(f'{r["block_q"]}x{r["block_k"]}', (r["tile_elems"], r["ms"]), fontsize=7,
                       textcoords="offset points", xytext=(3, 3))
    a.set(xscale="log", yscale="log", xlabel="tile size block_q x block_k (elements)", ylabel="forward time (ms)")
    a.set_xscale("log", base=2)
    sides = [r["side"] for r in mm_rows]
    b.plot(sides, [r["matmul_gflops"] for r in mm_rows], marker="o", color="C1", label="S-tile matmul (b x d @ d x b)")
    b.set(xscale="log", xlabel="square tile side b", ylabel="GFLOP/s", title="same total work, split into tiles")
    b.set_xscale("log", base=2)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tile_plan(plan: dict, nq: int, nk: int, block_q: int, block_k: int, ax=None):
    """Draw which tiles a causal pass visits: full (no mask), partial (masked), skipped."""
    import numpy as np

    ti, tj = -(-nq // block_q), -(-nk // block_k)
    grid = np.zeros((ti, tj))
    for (i, j), kind in plan.items():
        grid[i, j] = 2 if kind == "full" else 1
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=2.4)
    for (i, j), kind in plan.items():
        ax.text(j, i, "F" if kind == "full" else "P", ha="center", va="center", fontsize=7)
    ax.set(xlabel=f"key tile j ({block_k} keys)", ylabel=f"query tile i ({block_q} queries)",
           title=f"causal tiles, Nq={nq}, Nk={nk}")
    return ax


def io_curves(N_list, d_list, M_list, N0: int, d0: int, M0: int):
    """Element I/Os against N, M and d for every algorithm (dots: its Θ law), with the lower bound (dashed)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    sweeps = [("N", N_list, lambda x: (x, d0, M0)), ("M", M_list, lambda x: (N0, d0, x)),
              ("d", d_list, lambda x: (N0, x, M0))]
    for ax, (name, xs, args) in zip(axes, sweeps):
        for alg in iosim.ALGORITHMS:
            pts = []
            for x in xs:
                try:
                    pts.append((x, iosim.io_count(alg, *args(x)).total))
                except ValueError:                                        # tiles do not fit in this M
                    pass
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=alg)
                # the Θ(·) law, scaled to meet the count at the largest x: compare slopes
                x1, c1 = pts[-1]
                k = c1 / iosim.asymptotic(alg, *args(x1))
                ax.plot([x for x, _ in pts], [k * iosim.asymptotic(alg, *args(x)) for x, _ in pts], ":",
                        color=line.get_color())
        ax.plot(xs, [iosim.lower_bound(*args(x)) for x in xs], "k--", label="lower bound (no constant)")
        ax.set(xscale="log", yscale="log", xlabel=name, ylabel="slow-memory element I/Os")
        ax.set_xscale("log", base=2)
        fixed = {"N": N0, "d": d0, "M": M0}
        ax.set_title(", ".join(f"{k}={v}" for k, v in fixed.items() if k != name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_recorded(doc):
    """A recorded GPU run: prefill TFLOP/s against N (fp16, the largest head dim), causal and
    not, and decode TB/s against L."""
    from effdl.plot import recorded_label

    rows = doc["results"]
    pre = [r for r in rows if r.get("name") == "prefill" and r.get("dtype") == "float16"
           and "tflops" in r]
    d = max((r["d"] for r in pre), default=None)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, causal in zip(axes[:2], (False, True)):
        sub = [r for r in pre if r["d"] == d and r.get("causal") == causal]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["N"], r["tflops"]) for r in sub if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xlabel="N", ylabel="TFLOP/s", title=f"prefill fp16, d={d}, causal={causal}")
        ax.set_xscale("log", base=2)
    dec = [r for r in rows if r.get("name") == "decode" and "tbps" in r]
    for impl in dict.fromkeys(r["impl"] for r in dec):
        pts = sorted((r["L"], r["tbps"]) for r in dec if r["impl"] == impl)
        axes[2].plot(*zip(*pts), marker="o", label=impl)
    if dec:
        r = dec[0]
        title = f"decode B={r['batch']}, H={r['heads']}, d={r['d']}"
    else:
        title = "decode"
    axes[2].set(xlabel="KV cache length L", ylabel="TB/s (K and V read)", title=title)
    axes[2].set_xscale("log", base=2)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # a panel can be empty (e.g. a run without that dtype)
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(recorded_label(doc["meta"]))
    fig.tight_layout()
    return fig


def _size_ticks(ax, sizes) -> None:
    """Ticks at the measured sizes only, written 512, 4k, 128k: a log axis's default minor
    labels overlap when the sizes span a few octaves."""
    from matplotlib.ticker import NullFormatter, NullLocator

    if not sizes:
        return
    ax.set_xticks(sizes, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_bench(rows):
    """Prefill time against N (non-causal) and decode bandwidth against L: one panel for each
    kind of row present (the decode section draws its rows alone)."""
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r.get("name") == "prefill" and not r.get("causal") and "ms" in r]
    dec = [r for r in rows if r.get("name") == "decode" and "tbps" in r]
    panels = [p for p in ("prefill", "decode") if (pre if p == "prefill" else dec)] or ["prefill"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "prefill":
            for impl in dict.fromkeys(r["impl"] for r in pre):
                pts = sorted((r["N"], r["ms"]) for r in pre if r["impl"] == impl)
                ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set(xscale="log", yscale="log", xlabel="sequence length N",
                   ylabel="forward time (ms)", title="prefill")
        else:
            for impl in dict.fromkeys(r["impl"] for r in dec):
                pts = sorted((r["L"], r["tbps"] * 1e3) for r in dec if r["impl"] == impl)
                ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set(xscale="log", xlabel="KV cache length L", ylabel="K/V read bandwidth (GB/s)",
                   title="decode (1 query token)")
        _size_ticks(ax, sorted({r["N"] for r in pre} if panel == "prefill" else {r["L"] for r in dec}))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # no rows at all
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def tile_optimum(rows):
    """FA2's I/O-optimal tiles against the fast-memory size M (``iosim.optimum_rows``):
    left the tile sides Br and Bc, right the traffic over the lower bound."""
    if not rows:
        raise ValueError("rows is empty: pass iosim.optimum_rows(N, d, Ms)")
    Ms = [r["M"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(Ms, [r["Br"] for r in rows], marker="o", label="Br (query rows)")
    a.plot(Ms, [r["Bc"] for r in rows], marker="s", label="Bc (keys)")
    a.set(ylabel="tile side", title="I/O-optimal FA2 tile")
    a.set_yscale("log", base=2)
    a.legend(fontsize=8)
    b.plot(Ms, [r["over_lower_bound"] for r in rows], marker="o", color="C2")
    b.set(ylabel="traffic / lower bound", title="the optimum's traffic")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fast memory M (elements)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def makespan_gantt(sim_results, max_legend: int = 10):
    """One panel per ``makespan.simulate`` result: SM on y, time on x, one colour per
    request, overheads (launch, merge) in grey; a shared time axis."""
    if not sim_results:
        raise ValueError("sim_results is empty: pass makespan.simulate(...) results")
    n = len(sim_results)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n + 0.6), sharex=True,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, sim in zip(axes[:, 0], sim_results):
        bars = [(sm, s, e - s, r) for sm, g in enumerate(sim["gantt"]) for s, e, r in g]
        ax.barh([b[0] for b in bars], [b[2] for b in bars], left=[b[1] for b in bars],
                height=1.0, linewidth=0,
                color=["0.55" if b[3] is None else cmap(b[3] % 10) for b in bars])
        ax.set(ylabel="SM", ylim=(-0.5, sim["sms"] - 0.5),
               title=f'{sim["schedule"]}: makespan {sim["makespan"]:.3g}, '
                     f'utilization {sim["utilization"]:.0%}')
        ax.invert_yaxis()
    B = len(sim_results[0]["contexts"])
    if B <= max_legend:
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(r % 10)) for r in range(B)]
        contexts = sim_results[0]["contexts"]
        labels = [f"request {r} (L={L})" for r, L in enumerate(contexts)]
        handles.append(plt.Rectangle((0, 0), 1, 1, color="0.55"))
        axes[0, 0].legend(handles, labels + ["overhead"], fontsize=7, loc="upper left",
                          bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("time (one key tile = 1)")
    fig.tight_layout()
    return fig


def makespan_bars(rows):
    """``makespan.rows``: utilization (left) and makespan (right) per batch, one bar
    per schedule."""
    import numpy as np

    if not rows:
        raise ValueError("rows is empty: pass makespan.rows(...)")
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    width = 0.8 / len(schedules)
    x = np.arange(len(batches))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, schedule in enumerate(schedules):
        at = {r["batch"]: r for r in rows if r["schedule"] == schedule}
        util = [at[n]["utilization"] if n in at else 0 for n in batches]
        span = [at[n]["makespan"] if n in at else 0 for n in batches]
        a.bar(x + k * width, util, width, label=schedule)
        b.bar(x + k * width, span, width, label=schedule)
    a.set(ylabel="SM utilization", ylim=(0, 1.05), title="busy fraction of the SMs")
    b.set(ylabel="makespan (one key tile = 1)", yscale="log", title="time to finish")
    for ax in (a, b):
        ax.set_xticks(x + 0.4 - width / 2, batches, rotation=15, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    a.legend(fontsize=8)
    fig.tight_layout()
    return fig
