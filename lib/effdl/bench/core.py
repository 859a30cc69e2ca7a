"""The course's one benchmark helper, in the spirit of Triton's ``perf_report``.

A *sweep* is a list of configurations (``x`` values), a set of implementations (one line each) and a
derived unit (TFLOP/s, GB/s, tokens/s).  :func:`run_sweep` times every (config, implementation) pair
with :func:`effdl.measure.benchmark`, optionally measures peak memory, and returns flat rows;
:func:`print_table`, :func:`plot_rows` and :func:`write_json` turn rows into the three outputs.
:func:`oom_guard` turns running out of memory into a row that says so, for every chapter's sweep;
interleaved ratio timing is :func:`effdl.measure.interleaved` (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from effdl.measure import benchmark, interleaved, peak_memory, run_meta

Row = dict[str, Any]
#: An implementation factory: given a config, return a zero-argument callable to time, or ``None``
#: when the implementation does not apply (e.g. an SDPA backend this GPU lacks).
Factory = Callable[[Mapping[str, Any]], "Callable[[], Any] | None"]


__all__ = ["run_sweep", "interleaved", "is_oom", "oom_guard", "free_cached", "print_table",
           "plot_rows", "write_json"]


def is_oom(exc: BaseException) -> bool:
    """Did ``exc`` come from running out of memory (CUDA's allocator, or the host's)?"""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    # why RuntimeError only: older torch and some backends (cuDNN, cuBLAS) raise a plain
    # RuntimeError("... out of memory ..."); any other type is a real error and must propagate
    return type(exc) is RuntimeError and "out of memory" in str(exc).lower()


def free_cached(device=None) -> None:
    """Give the CUDA caching allocator's free blocks back (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def oom_guard(row: dict, device=None):
    """Run a measurement; if it runs out of memory, mark ``row["error"] = "out of memory"``,
    free the cache and carry on (a sweep records why a point is missing instead of stopping).
    Any other error propagates."""
    try:
        yield row
    except Exception as exc:
        if not is_oom(exc):
            raise
        row["error"] = "out of memory"
        free_cached(device)


def run_sweep(
    configs: Iterable[Mapping[str, Any]],
    impls: Mapping[str, Factory],
    *,
    derive: Callable[[Mapping[str, Any], float], Mapping[str, Any]] | None = None,
    warmup: int = 2,
    repeat: int = 5,
    device: str | torch.device | None = None,
    memory: bool = False,
    impl_key: str = "impl",
    progress: bool = True,
) -> list[Row]:
    """Time every implementation on every config; one row per pair.

    ``derive(config, ms)`` adds derived units (e.g. ``{"tflops": ...}``).  An implementation that
    runs out of memory gets a row with ``"error": "out of memory"`` instead of stopping the sweep.
    """
    configs = list(configs)
    rows: list[Row] = []
    pairs = [(c, name, make) for c in configs for name, make in impls.items()]
    for cfg, name, make in tqdm(pairs, desc="benchmark", disable=not progress, leave=False):
        row: Row = {**cfg, impl_key: name}
        with oom_guard(row, device):
            fn = make(cfg)
            if fn is None:  # the implementation does not apply here (e.g. a missing backend)
                continue
            res = benchmark(fn, warmup=warmup, repeat=repeat, device=device)
            row.update(ms=res.median_ms, ms_iqr=res.iqr_ms)
            if derive is not None:
                row.update(derive(cfg, res.median_ms))
            if memory:
                row["peak_mem_bytes"] = peak_memory(fn, device=device)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:g}"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def print_table(rows: Sequence[Row], columns: Sequence[str] | None = None, file=None, width: int = 88) -> str:
    """A plain aligned text table of ``rows`` (all keys, in first-seen order, by default).

    A table wider than ``width`` characters (the site's code column) is printed in parts, each
    repeating the first column so that every line of a part still names its row.
    """
    if not rows:
        text = "(no rows)"
    else:
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        parts, part = [], [0]
        for i in range(1, len(columns)):
            if part and sum(widths[j] + 2 for j in part) + widths[i] > width and len(part) > 1:
                parts.append(part)
                part = [0]
            part.append(i)
        parts.append(part)
        blocks = []
        for part in parts:
            lines = ["  ".join(columns[i].rjust(widths[i]) for i in part)]
            lines.append("  ".join("-" * widths[i] for i in part))
            lines += ["  ".join(row[i].rjust(widths[i]) for i in part) for row in cells]
            blocks.append("\n".join(lines))
        text = "\n\n".join(blocks)
    print(text, file=file)
    return _Printed(text)


class _Printed(str):
    """The text of a table already printed: a notebook cell ending in ``print_table(...)`` shows the
    table once, not again as a quoted string with ``\\n`` in it."""

    def _ipython_display_(self) -> None:
        pass


def plot_rows(
    rows: Sequence[Row],
    *,
    x: str,
    y: str,
    line: str = "impl",
    panel: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
    logx: bool = True,
    logy: bool = False,
    path: str | Path | None = None,
):
    """One line per ``line`` value, ``y`` against ``x``; one panel per ``panel`` value."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if y in r and x in r]
    panels = list(dict.fromkeys(r.get(panel) for r in rows)) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = [r for r in rows if panel is None or r.get(panel) == p]
        for name in dict.fromkeys(r[line] for r in sub):
            pts = sorted((r[x], r[y]) for r in sub if r[line] == name)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=str(name))
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(f"{title} {panel}={p}".strip() if panel else title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def write_json(rows: Sequence[Row], path: str | Path, *, device=None, profile=None, **extra_meta) -> dict:
    """Write ``{"meta": {...}, "results": rows}`` and return it."""
    doc = {"meta": {**run_meta(device, profile), **extra_meta}, "results": list(rows)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc
