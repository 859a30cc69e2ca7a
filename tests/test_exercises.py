"""Every chapter's exercises, read from the chapter's notebook (``notebooks/<chapter>.ipynb``).

Exercise ``i`` of a chapter is its ``i``-th code cell tagged ``exercise`` (the stub a student starts
from), its ``i``-th tagged ``solution`` and its ``i``-th tagged ``check``.  For every exercise: the
check cell raises :class:`effdl.checks.ExerciseFailed` after the stub, and passes after the solution.
For every chapter: each name in ``effdl.<chapter>.checks.__all__`` (what the grader scores) is called
exactly once by the check cells, as ``checks.<name>(``, and there are at least five exercises.

The namespace a cell runs in is the notebook's own: the top-level ``import`` / ``from`` statements of
the untagged code cells above the exercise (what a student's kernel has imported at that point; no
variables, and nothing from other exercises' cells).  The parametrization is computed from the
notebooks at collection time: adding an exercise to a chapter adds a test, with no count to update.

The wrong answers a student might plausibly write (not only the stubs), and the library's own answer,
are fed to every check in ``tests/test_exercise_mistakes.py``.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from effdl import chapters
from effdl.checks import ExerciseFailed

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("exercise", "solution", "check")
MIN_EXERCISES = 5
CHECK_CALL = re.compile(r"\bchecks\.(\w+)\s*\(")


@dataclass(frozen=True)
class Exercise:
    chapter: str
    index: int
    stub: str
    solution: str
    check: str
    imports: str  # the notebook's top-level imports above the stub cell


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _top_level_imports(source: str) -> list[str]:
    """The top-level import statements of a code cell (IPython ``%`` / ``!`` lines are skipped)."""
    def plain(line: str) -> str:  # a magic becomes `pass` at its indentation: the block around it still parses
        body = line.lstrip()
        return line[: len(line) - len(body)] + "pass" if body.startswith(("%", "!")) else line

    lines = [plain(line) for line in source.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


@functools.cache
def exercises(chapter: str) -> tuple[Exercise, ...]:
    """The chapter's exercises, in notebook order (raises if the notebook's tags do not line up)."""
    path = ROOT / "notebooks" / f"{chapter}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate it with `python .ci/sync_notebooks.py`")
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    where = {tag: [i for i, c in enumerate(code) if tag in _tags(c)] for tag in TAGS}
    counts = {tag: len(v) for tag, v in where.items()}
    if len(set(counts.values())) != 1:
        raise AssertionError(f"{path.name}: unequal numbers of tagged cells {counts}")
    out = []
    for i, (s, sol, chk) in enumerate(zip(*(where[t] for t in TAGS))):
        nxt = where["exercise"][i + 1] if i + 1 < counts["exercise"] else len(code)
        if not s < sol < chk < nxt:
            raise AssertionError(f"{path.name}: exercise {i} is not stub, solution, check in that order "
                                 f"(code cells {s}, {sol}, {chk})")
        imports = [stmt for c in code[:s] if not (_tags(c) & set(TAGS)) for stmt in _top_level_imports(c.source)]
        out.append(Exercise(chapter, i, code[s].source, code[sol].source, code[chk].source, "\n".join(imports)))
    return tuple(out)


def _params():
    params = []
    for chapter in chapters.names():
        try:
            n = len(exercises(chapter))
        except Exception:  # reported by test_chapter_exercises_are_well_formed, not at collection
            n = 0
        params += [pytest.param(chapter, i, id=f"{chapter}-{i}") for i in range(n)]
    return params


def _namespace(ex: Exercise) -> dict:
    ns: dict = {"__name__": f"notebook_{ex.chapter}"}
    exec(ex.imports, ns)
    assert ns.get("checks") is chapters.module(ex.chapter, "checks"), (
        f"notebooks/{ex.chapter}.ipynb must import its checks as `from effdl.{ex.chapter} import checks` "
        "before its first exercise")
    return ns


# ------------------------------------------------------------------------------ every chapter
@pytest.mark.parametrize("chapter", chapters.names())
def test_chapter_exercises_are_well_formed(chapter):
    exs = exercises(chapter)
    assert len(exs) >= MIN_EXERCISES, f"{chapter} has {len(exs)} exercises, fewer than {MIN_EXERCISES}"
    called = Counter(name for ex in exs for name in CHECK_CALL.findall(ex.check))
    wanted = chapters.module(chapter, "checks").__all__
    assert called == Counter(wanted), (
        f"every name in effdl.{chapter}.checks.__all__ is called exactly once by the check cells "
        f"(and nothing else): called {dict(called)}, __all__ {wanted}")


@pytest.mark.parametrize("chapter", chapters.names())
def test_no_notebook_calls_checks_the_old_way(chapter):
    text = (ROOT / "notebooks" / f"{chapter}.ipynb").read_text()
    assert "effdl.checks.check_" not in text, (
        "call checks as checks.<name>(...) after `from effdl.<chapter> import checks`")


@pytest.mark.parametrize("chapter, i", _params())
def test_check_fails_on_stub_and_passes_on_solution(chapter, i):
    ex = exercises(chapter)[i]
    ns = _namespace(ex)
    exec(ex.stub, ns)
    with pytest.raises(ExerciseFailed):
        exec(ex.check, ns)
    ns = _namespace(ex)
    exec(ex.solution, ns)
    exec(ex.check, ns)


def test_magic_lines_do_not_hide_imports():
    src = 'import sys\nif "google.colab" in sys.modules:\n    %pip install -q x\nfrom math import pi\n'
    assert _top_level_imports(src) == ["import sys", "from math import pi"]
