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


def describe_missing(chapter: str) -> str:
    """The sentence a chapter prints when no GPU run of it has been recorded yet."""
    return (
        f"No recorded GPU run of the {chapter} benchmarks is in book/results/ yet, so this page shows "
        f"CPU measurements only. On a GPU machine, `{REGENERATE}` records one."
    )
