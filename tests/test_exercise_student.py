"""The student version of every chapter: no answer before its exercise, and it runs.

Each chapter's student notebook (``effdl.student.make_student``) is executed top to bottom in the
smoke profile, errors allowed (its check cells fail until the exercises are solved).  Then:

- the source of a library function that answers a check (the chapter's ``REVEALS``) appears in no
  cell, source or output, above that check's cell — it comes back right after the check;
- the only cells that fail are check cells, each with ``ExerciseFailed``; the cells that run an
  experiment with the student's function print one line while the exercise is unsolved.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from effdl import chapters
from effdl.checks import resolve, when_solved
from effdl.student import PLACEHOLDER_TAG, make_student

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = chapters.names()


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


@functools.cache
def _library_lines() -> Counter:
    """How often each stripped line occurs in the library's sources."""
    return Counter(ln.strip() for path in (ROOT / "lib" / "effdl").rglob("*.py")
                   for ln in path.read_text().splitlines())


def _signature_lines(obj) -> list[str]:
    """The lines of ``obj``'s source that give it away: its body's statements and comments, stripped,
    of at least 20 characters, docstring left out, and found nowhere else in the library (argument
    checks shared with other functions give nothing away)."""
    src = textwrap.dedent(inspect.getsource(obj))
    doc = inspect.getdoc(obj) or ""
    body = src.split(":\n", 1)[1] if ":\n" in src else src
    lines = [ln.strip() for ln in body.splitlines()]
    own = Counter(lines)
    return [ln for ln in lines if len(ln) >= 20 and ln not in doc and not ln.startswith(('"""', 'r"""'))
            and _library_lines()[ln] <= own[ln]]


def _text(cell) -> str:
    parts = [cell.get("source", "")]
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") if isinstance(out.get("text", ""), str) else "".join(out["text"]))
        data = out.get("data", {})
        for kind in ("text/plain", "text/markdown"):
            value = data.get(kind, "")
            parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``chapter -> the executed student notebook`` (each executed once, on first use)."""
    done: dict[str, nbformat.NotebookNode] = {}

    def run(chapter: str) -> nbformat.NotebookNode:
        if chapter not in done:
            nb = make_student(nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4))
            work = tmp_path_factory.mktemp(chapter)
            NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                           resources={"metadata": {"path": str(work)}}).execute()
            done[chapter] = nb
        return done[chapter]

    return run


def _check_cell(nb, name: str) -> int:
    hits = [i for i, c in enumerate(nb.cells) if "check" in _tags(c) and f"checks.{name}(" in c.source]
    assert len(hits) == 1, f"{name}: {len(hits)} check cells call it"
    return hits[0]


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_answer_appears_before_its_check(chapter, executed):
    nb = executed(chapter)
    reveals = chapters.module(chapter, "checks").REVEALS
    for name, paths in reveals.items():
        at = _check_cell(nb, name)
        before = "\n".join(_text(c) for c in nb.cells[:at])
        after = "\n".join(_text(c) for c in nb.cells[at:])
        for path in paths:
            lines = _signature_lines(resolve(path))
            leaked = [ln for ln in lines if ln in before]
            assert len(leaked) < max(1, (len(lines) + 1) // 2), (
                f"{chapter}: the source of {path}, the answer to {name}, is shown before that check: "
                f"{leaked[:3]}")
            shown = [ln for ln in lines if ln in after]
            if shown:  # what the full notebook shows comes back after the check, whole
                assert len(shown) == len(lines), (path, sorted(set(lines) - set(shown))[:3])


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_student_version_runs_and_only_its_checks_fail(chapter, executed):
    nb = executed(chapter)
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if "check" in _tags(cell):
            assert all(e["ename"] == "ExerciseFailed" for e in errors), (i, errors[:1])
        else:
            assert not errors, f"{chapter}: cell {i} failed in the student version: " \
                               f"{errors[0]['ename']}: {errors[0]['evalue']}\n{cell.source[:300]}"
    if chapter in ("attention", "distill", "tokens"):
        waiting = [c for c in nb.cells if "checks.when_solved()" in c.source]
        assert waiting, f"{chapter} has no cell that runs the experiment with the student's function"
        said = [c for c in waiting if when_solved.message in _text(c)]
        assert said, f"{chapter}: no experiment cell says '{when_solved.message}' before the exercise is solved"


def test_mixed_show_source_cells_keep_what_is_not_an_answer():
    """A cell showing an answer and other code keeps the rest, in place; the answer moves after its
    check, with a note where it was."""
    nb = make_student(nbformat.read(ROOT / "notebooks" / "attention.ipynb", as_version=4))
    sources = [c.source for c in nb.cells]
    assert "show_source(att.update_state)" in sources                    # merge_states went
    placeholder = next(i for i, c in enumerate(nb.cells) if PLACEHOLDER_TAG in _tags(c)
                       and "att.merge_states" in c.source)
    check = _check_cell(nb, "check_merge_states")
    revealed = [i for i, s in enumerate(sources) if s == "show_source(att.merge_states)"]
    assert placeholder < check < revealed[0] and len(revealed) == 1
    plan = next(s for s in sources if "causal_tile_plan(nq, nk, 128, 128)" in s)
    assert "show_source" not in plan                                      # the demo stays
