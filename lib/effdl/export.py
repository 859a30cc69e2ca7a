"""Export the chapters' exercises to a grader a course already uses.

    python -m effdl.export otter OUTDIR [CHAPTER ...]     # what `make otter` runs

``otter`` writes, per chapter, an `Otter-Grader <https://otter-grader.readthedocs.io>`_ master notebook
``OUTDIR/<chapter>/<chapter>.ipynb`` (and a ``requirements.txt`` naming the course library) built from
the chapter notebook's own cells: its imports, then one question per exercise.  A question holds the
exercise's statement, one cell with the stub as the students' prompt and the solution between
``# BEGIN SOLUTION NO PROMPT`` / ``# END SOLUTION``, and an exception-based test that calls the
library's check::

    def test_online_softmax(my_online_softmax):
        from effdl.attention import checks
        checks.check_online_softmax(my_online_softmax)

Then ``otter assign OUTDIR/attention/attention.ipynb dist/`` writes the student notebook and the
autograder zip for Gradescope or ``otter grade``.  Otter runs its tests inside the student's
environment (its own design); :mod:`effdl.grade` is the grader that judges outside it.
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

ROOT = Path(__file__).resolve().parents[2]
ROLE = re.compile(r"\{[\w:-]+\}`([^`]*)`")  # a MyST role: {eq}`eq-merge`, {cite:t}`key`, {ref}`text <label>`


@dataclass(frozen=True)
class Exercise:
    """One exercise of a chapter notebook, by its cells."""

    statement: str  # Markdown (the {exercise} block, as plain Markdown)
    stub: str
    solution: str
    check: str      # the check's name in effdl.<chapter>.checks
    student: str    # the function it grades


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _statement(markdown: str) -> str:
    """The ``{exercise}`` block of a Markdown cell as plain Markdown (title in bold, options dropped)."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"^(`{3,}|:{3,})\{exercise\}", ln)), None)
    if start is None:
        return ""
    fence = re.match(r"^(`{3,}|:{3,})", lines[start]).group(1)
    title = lines[start].split("}", 1)[1].strip()
    body = []
    for ln in lines[start + 1:]:
        if ln.strip() == fence:
            break
        if not re.match(r"^:\w+:", ln):
            body.append(ln)
    text = "\n".join(body).strip()
    text = ROLE.sub(lambda m: f"`{re.sub(r' <[^>]*>$', '', m.group(1))}`", text)
    return f"**Exercise: {title}**\n\n{text}" if title else text


def exercises(chapter: str, nb: nbformat.NotebookNode | None = None) -> list[Exercise]:
    """The exercises of ``notebooks/<chapter>.ipynb`` (or ``nb``), in order."""
    from effdl import chapters

    nb = nb or nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    module = chapters.module(chapter, "checks")
    out, statement, stub, solution = [], "", None, None
    for cell in nb.cells:
        tags = _tags(cell)
        if cell.cell_type == "markdown" and "{exercise}" in cell.source:
            statement = _statement(cell.source)
        elif cell.cell_type == "code" and "exercise" in tags:
            stub = cell.source
        elif cell.cell_type == "code" and "solution" in tags:
            solution = cell.source
        elif cell.cell_type == "code" and "check" in tags:
            name = re.search(r"\bchecks\.(\w+)\(", cell.source).group(1)
            check = getattr(module, name)
            student = getattr(check, "student", None) or re.search(r"\((\w+)\)", cell.source).group(1)
            if stub is None or solution is None:
                raise ValueError(f"{chapter}: check cell {name} without an exercise and a solution cell above it")
            out.append(Exercise(statement, stub, solution, name, student))
            statement, stub, solution = "", None, None
    return out


def _imports(nb: nbformat.NotebookNode) -> str:
    """The top-level imports of the notebook's untagged code cells (IPython magics skipped)."""
    found: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code" or _tags(cell) & {"exercise", "solution", "check"}:
            continue
        lines = ["pass" if ln.lstrip().startswith(("%", "!")) else ln for ln in cell.source.splitlines()]
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError:
            continue
        found += [s for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                  if (s := ast.unparse(n)) not in found]
    return "\n".join(found)


def _requirement(nb: nbformat.NotebookNode) -> str:
    """What the chapter's install cell installs (``effdl[...] @ git+URL@tag``), or plain ``effdl``."""
    for cell in nb.cells:
        if m := re.search(r'%pip install[^"\n]*"([^"]*effdl[^"]*)"', cell.source):
            return m.group(1)
    return "effdl"


def _answer_cell(ex: Exercise) -> str:
    """The stub as the students' prompt (in a string the master never runs), then the solution."""
    quote = "'''" if '"""' in ex.stub else '"""'
    if quote in ex.stub:
        raise ValueError(f"the stub of {ex.check} holds both kinds of triple quotes")
    return (f"r{quote}  # BEGIN PROMPT\n{ex.stub.rstrip()}\n{quote}  # END PROMPT\n"
            f"# BEGIN SOLUTION NO PROMPT\n{ex.solution.rstrip()}\n# END SOLUTION")


def _test_cell(chapter: str, ex: Exercise) -> str:
    short = ex.check.removeprefix("check_")
    return (f"def test_{short}({ex.student}):\n"
            f"    from effdl.{chapter} import checks\n"
            f"    checks.{ex.check}({ex.student})")


def otter_master(chapter: str, nb: nbformat.NotebookNode | None = None) -> nbformat.NotebookNode:
    """The Otter Assign master notebook of ``chapter`` (format v1, exception-based tests)."""
    nb = nb or nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    config = (f"# ASSIGNMENT CONFIG\nname: {chapter}\nrequirements: requirements.txt\n"
              "export_cell: false\ncheck_all_cell: false\ngenerate: true\n"
              "tests:\n  files: false\n  ok_format: false\n")
    cells = [new_raw_cell(config),
             new_markdown_cell(f"# Exercises: {chapter}\n\nThe exercises of the chapter `{chapter}` of "
                               "*Naive to Fast*. Write each function where the cell says so; the test "
                               "below it calls the course library's check."),
             new_code_cell(_imports(nb))]
    for ex in exercises(chapter, nb):
        short = ex.check.removeprefix("check_")
        cells += [new_raw_cell(f"# BEGIN QUESTION\nname: {short}\npoints: 1"),
                  new_markdown_cell(ex.statement or f"Write `{ex.student}`."),
                  new_raw_cell("# BEGIN SOLUTION"), new_code_cell(_answer_cell(ex)), new_raw_cell("# END SOLUTION"),
                  new_raw_cell("# BEGIN TESTS"), new_code_cell(_test_cell(chapter, ex)), new_raw_cell("# END TESTS"),
                  new_raw_cell("# END QUESTION")]
    out = new_notebook(cells=cells)
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out.metadata["effdl"] = {"chapter": chapter, "otter_master": True}
    return out


def write_otter(out_dir: Path, chapter_names: list[str] | None = None) -> list[Path]:
    """``out_dir/<chapter>/<chapter>.ipynb`` and ``requirements.txt`` for each chapter."""
    from effdl import chapters

    written = []
    for chapter in chapter_names or chapters.names():
        nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
        folder = out_dir / chapter
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "requirements.txt").write_text(_requirement(nb) + "\n")
        path = folder / f"{chapter}.ipynb"
        nbformat.write(otter_master(chapter, nb), path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("format", choices=["otter"])
    ap.add_argument("out", type=Path)
    ap.add_argument("chapters", nargs="*", help="default: every chapter")
    args = ap.parse_args(argv)
    for p in write_otter(args.out, args.chapters or None):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
