"""Student versions of the course notebooks: solutions removed.

    python -m effdl.student notebooks --out dist/student      # what `make student` runs

Removed: code cells tagged ``solution`` and markdown cells holding a ``{solution}`` directive.
Kept: everything else, including the ``exercise`` stubs and the ``check`` cells (which then fail
until the student writes the answer).  Outputs are cleared.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

SOLUTION_TAG = "solution"
SOLUTION_DIRECTIVE = re.compile(r"^\s*(`{3,}|:{3,})\s*\{solution\}", re.MULTILINE)


def is_solution_cell(cell) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    if SOLUTION_TAG in tags:
        return True
    return cell.get("cell_type") == "markdown" and bool(SOLUTION_DIRECTIVE.search(cell.get("source", "")))


def make_student(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without solution cells and without outputs."""
    out = nbformat.from_dict(nb)  # deep copy
    out.cells = [c for c in out.cells if not is_solution_cell(c)]
    for c in out.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    out.metadata.setdefault("effdl", {})["student_version"] = True
    return out


def write_student_versions(src: Path, out_dir: Path) -> list[Path]:
    """Write the student version of ``src`` (a notebook or a folder of them) into ``out_dir``."""
    paths = sorted(src.glob("*.ipynb")) if src.is_dir() else [src]
    if not paths:
        raise FileNotFoundError(f"no notebooks found in {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        target = out_dir / p.name
        nbformat.write(make_student(nb), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.student", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a notebook or a folder of notebooks")
    ap.add_argument("--out", type=Path, default=Path("dist/student"))
    args = ap.parse_args(argv)
    for p in write_student_versions(args.source, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
