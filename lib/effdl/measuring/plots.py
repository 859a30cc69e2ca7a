"""Figures of the measuring chapter: the benchmark's rows and a recorded GPU run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from effdl.measuring.roofline import plot_roofline, roofline_from_rows

__all__ = ["plot_cases", "plot_bench", "plot_recorded", "summarize_recorded"]


def plot_cases(rows: Sequence[dict], ax) -> None:
    """Bars: time relative to the baseline next to FLOPs relative to it, per case."""
    import numpy as np

    sub = [r for r in rows if r.get("case") in ("conv", "fusion")]
    base = {}
    for r in sub:
        base.setdefault(r["case"], r)
    names = [r["kernel"] for r in sub]
    flops = [r["flops"] / base[r["case"]]["flops"] for r in sub]
    times = [r["ms"] / base[r["case"]]["ms"] for r in sub]
    xs = np.arange(len(sub))
    ax.bar(xs - 0.2, flops, 0.4, label="FLOPs (relative)")
    ax.bar(xs + 0.2, times, 0.4, label="time (relative)")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to the first of its group")
    ax.set_title("fewer FLOPs is not faster")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_bench(rows: Sequence[dict], title: str = ""):
    """Two panels: the measured roofline with its kernels, and FLOPs vs time of the cases."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    dtype = next((r["dtype"] for r in rows if r.get("case") == "peak"), "float32")
    roof = roofline_from_rows(rows, dtype=dtype)
    plot_roofline(roof, [r for r in rows if r.get("case") == "roofline"], ax=a, title=title or None)
    plot_cases(rows, b)
    fig.tight_layout()
    return fig


def plot_recorded(doc: dict[str, Any]):
    """Figure of a recorded GPU run: fp16 roofline with kernels, and the async-timing pitfall;
    the numbers behind it are printed (:func:`summarize_recorded`)."""
    import matplotlib.pyplot as plt

    from effdl.plot import recorded_label

    print(summarize_recorded(doc))
    rows = doc["results"]
    label = recorded_label(doc["meta"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    dtype = "float16" if any(r.get("dtype") == "float16" and r.get("case") == "peak" for r in rows) else "float32"
    roof = roofline_from_rows(rows, dtype=dtype, device=doc["meta"].get("device_name", ""))
    plot_roofline(roof, [r for r in rows if r.get("case") == "roofline"], ax=a, unit=1e12, unit_name="TFLOP/s",
                  title=f"roofline, {dtype}")
    asy = [r for r in rows if r.get("case") == "async"]
    b.barh([r["method"] for r in asy], [r["ms"] for r in asy], color=["tab:red", "tab:green", "tab:blue"][:len(asy)])
    b.set_xscale("log")
    b.set_xlabel("measured time per matmul (ms, log)")
    if asy:
        b.set_title(f"timing an async {asy[0]['n']}² {asy[0]['dtype']} matmul")
    b.grid(alpha=0.3, axis="x")
    fig.suptitle(label)
    fig.tight_layout()
    return fig


def summarize_recorded(doc: dict[str, Any]) -> str:
    """Plain-text lines of a recorded GPU run: peaks per dtype, the async pitfall, attention memory,
    and the FLOPs-vs-time cases."""
    rows = doc["results"]
    lines = [f"{doc.get('path', 'recorded run')}: {doc['meta'].get('device_name', '?')}, "
             f"{str(doc['meta'].get('date', '?'))[:10]}, torch {doc['meta'].get('torch', '?')}"]
    for r in rows:
        if r.get("case") == "peak" and "gflops" in r:
            lines.append(f"  peak {r['dtype']:9s} {r['kernel']:12s} {r['gflops'] / 1e3:8.1f} TFLOP/s")
        elif r.get("case") == "peak":
            lines.append(f"  peak {r['kernel']:22s} {r['gbs']:8.0f} GB/s")
    for r in rows:
        if r.get("case") == "async":
            lines.append(f"  timing: {r['method']:40s} {r['ms']:9.4f} ms/matmul  "
                         f"(apparent {r['apparent_tflops']:,.0f} TFLOP/s)")
    for r in rows:
        if r.get("case") == "attention_memory":
            peak = "out of memory" if r.get("peak_bytes") is None else f"peak {r['peak_bytes'] / 2**30:7.2f} GiB"
            lines.append(f"  naive attention N={r['seq']:6d}: {peak}  "
                         f"(one score matrix {r['scores_bytes'] / 2**30:.2f} GiB)")
    for r in rows:
        if r.get("case") in ("conv", "fusion"):
            lines.append(f"  {r['case']:6s} {r['kernel']:20s} {r['flops'] / 1e9:9.2f} GFLOP  {r['ms']:8.3f} ms  "
                         f"{r['gflops'] / 1e3:7.2f} TFLOP/s")
    return "\n".join(lines)
