"""Recorded results (GPU runs stored as JSON under ``book/results/``) and how chapters find them.

A recorded file is ``{"meta": {device_name, compute_capability, torch, triton, date, ...},
"results": [rows]}``, named ``<chapter>-<gpu>.json`` (e.g. ``attention-h100.json``).  Regenerate with
``python -m effdl.bench gpu-suite --json-dir book/results`` on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

REGENERATE = "python -m effdl.bench gpu-suite --json-dir book/results"


def repo_root(start: str | Path | None = None) -> Path | None:
    """The course checkout containing ``start`` (default: the working directory), or ``None``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_config.yml").exists() and (d / "book").is_dir():
            return d
    pkg = Path(__file__).resolve().parents[2]  # lib/effdl/results.py -> repo root (editable install)
    if (pkg / "_config.yml").exists():
        return pkg
    return None


def results_dir() -> Path | None:
    root = repo_root()
    return (root / "book" / "results") if root else None


def find_recorded(chapter: str) -> list[dict]:
    """All recorded result files of ``chapter``, each loaded as a dict with an added ``"path"``."""
    d = results_dir()
    if d is None or not d.is_dir():
        return []
    docs = []
    for path in sorted(d.glob(f"{chapter}-*.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "meta" not in doc or "results" not in doc:
            raise ValueError(f"{path} is not an effdl result file (expected keys 'meta' and 'results')")
        doc["path"] = str(path.relative_to(d.parent.parent))
        docs.append(doc)
    return docs


def show_recorded(chapter: str) -> list[dict]:
    """Every chapter shows its recorded GPU runs the same way: for each file, where it came from and
    the chapter's figure of it (``effdl.<chapter>.plots.plot_recorded``, which may also print the
    numbers); when there is none, the sentence that says how to record one."""
    import matplotlib.pyplot as plt

    from effdl import chapters

    plots = chapters.module(chapter, "plots")
    docs = find_recorded(chapter)
    if not docs:
        print(describe_missing(chapter))
    for doc in docs:
        meta = doc["meta"]
        print(f"{doc['path']}: {meta.get('device_name', '?')}, {str(meta.get('date', '?'))[:10]}, "
              f"torch {meta.get('torch', '?')}")
        plots.plot_recorded(doc)
        plt.show()
    return docs


def describe_missing(chapter: str) -> str:
    """The sentence a chapter prints when no GPU run of it has been recorded yet (wrapped to the
    page's code column, 88 characters)."""
    import textwrap

    return textwrap.fill(
        f"No recorded GPU run of the {chapter} benchmarks comes with this page: its numbers are "
        f"the CPU's. Open the notebook on a GPU (the Colab badge at the top) to measure them "
        f"there; `{REGENERATE}` records the whole suite on a GPU machine.",
        width=88, break_on_hyphens=False, break_long_words=False)


TIMINGS_GLOB = "notebook-timings-*.json"


def notebook_timings_table():
    """A Markdown table of recorded chapter execution times (``.ci/time_notebooks.py`` writes them)."""
    from IPython.display import Markdown

    d = results_dir()
    files = sorted(d.glob(TIMINGS_GLOB)) if d is not None and d.is_dir() else []
    if not files:
        return Markdown(
            "*No recorded chapter timings yet.* Record them with "
            "`python .ci/time_notebooks.py --profile cpu` (writes `book/results/notebook-timings-cpu.json`)."
        )
    parts = []
    for path in files:
        doc = json.loads(path.read_text())
        meta = doc["meta"]
        lines = [f"**profile `{meta.get('profile')}`** — {meta.get('device_name')} "
                 f"({meta.get('cpu_count', '?')} cores), torch {meta.get('torch')}, {str(meta.get('date'))[:10]} "
                 f"(`{path.name}`)", "", "| chapter | total (s) | slowest cell (s) | status |", "|---|---:|---:|---|"]
        for r in doc["results"]:
            lines.append(f"| {r['notebook']} | {r['seconds']:.0f} | {r['slowest_cell_seconds']:.0f} | {r['status']} |")
        parts.append("\n".join(lines))
    return Markdown("\n\n".join(parts))
