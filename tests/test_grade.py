"""The grader and the student versions, on a tiny throw-away chapter (fast, deterministic).

The chapter ``gradetoy`` (one check, ``check_square``, grading the notebook's ``square``) is written
into a temporary ``effdl/`` folder on the path; kernels find it through ``PYTHONPATH``.  Tampering
with the grader from inside a submission is tested on real chapters in ``test_grade_tamper.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import effdl
from effdl.grade import Kernel, grade
from effdl.student import make_student

TOY = {
    "__init__.py": '"""A throw-away chapter written by the grader tests."""\n',
    "sizes.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Sizes:
            n: int

        SIZES = {"smoke": Sizes(1), "cpu": Sizes(1), "gpu": Sizes(1)}
        """,
    "bench.py": """
        __all__ = ["run", "gpu_suite"]

        def run(S, device):
            return []

        def gpu_suite(device, S):
            return []
        """,
    "checks.py": """
        from effdl.checks import exercise_check, require

        __all__ = ["check_square"]

        @exercise_check(student="square")
        def check_square(f):
            for x in (0, 3, -2.5):
                got = f(x)
                require(got == x * x, f"square({x}) returned {got!r}, expected {x * x!r}")
        """,
    "plots.py": """
        def plot_bench(rows):
            return None

        def plot_recorded(doc):
            return None
        """,
}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """``effdl.gradetoy`` in a temporary folder on the path (kernels find it through PYTHONPATH)."""
    root = tmp_path / "pkgs"
    pkg = root / "effdl" / "gradetoy"
    pkg.mkdir(parents=True)
    for name, text in TOY.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(effdl, "__path__", [*effdl.__path__, str(root / "effdl")])
    yield tmp_path
    for mod in [m for m in sys.modules if m == "effdl.gradetoy" or m.startswith("effdl.gradetoy.")]:
        del sys.modules[mod]


def _notebook(stub: str, solution: str | None, chapter: str | None = "gradetoy") -> nbformat.NotebookNode:
    cells = [new_code_cell("from effdl.gradetoy import checks"), new_markdown_cell("Write `square`."),
             new_code_cell(stub, metadata={"tags": ["exercise"]})]
    if solution is not None:
        cells.append(new_code_cell(solution, metadata={"tags": ["solution", "hide-input"]}))
        cells.append(new_markdown_cell(":::{solution} ex-square\n:class: dropdown\nMultiply.\n:::"))
    cells.append(new_code_cell("checks.check_square(square)", metadata={"tags": ["check"]}))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if chapter:
        nb.metadata["effdl"] = {"chapter": chapter}
    return nb


STUB = "def square(x):\n    raise NotImplementedError"
SOLUTION = "def square(x):\n    return x * x"


def _write(tmp_path, nb, name="sub.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_solved_notebook_scores_full_marks(toy):
    report = grade(_write(toy, _notebook(STUB, SOLUTION)), cell_timeout=60)
    assert (report.chapter, report.score, report.max_score) == ("gradetoy", 1, 1), report.table()
    assert report.errors == []


@pytest.mark.slow
def test_student_version_of_it_scores_zero_and_says_why(toy):
    student = make_student(_notebook(STUB, SOLUTION))
    report = grade(_write(toy, student), cell_timeout=60)
    assert (report.score, report.max_score) == (0, 1)
    assert "not implemented" in report.checks[0].message


@pytest.mark.slow
def test_wrong_answer_and_crash_messages_come_from_the_grader(toy):
    """The check's message names the input; a crash names the exception the student's code raised."""
    wrong = grade(_write(toy, _notebook("def square(x):\n    return 2 * x", None)), cell_timeout=60)
    assert wrong.score == 0 and "square(3) returned 6, expected 9" in wrong.checks[0].message, wrong.table()
    crash = grade(_write(toy, _notebook("def square(x):\n    return 1 / (x - x)", None), "crash.ipynb"),
                  cell_timeout=60)
    assert crash.checks[0].message == "your function raised ZeroDivisionError: division by zero", crash.table()


@pytest.mark.slow
def test_syntax_error_is_reported_not_crashing(toy):
    report = grade(_write(toy, _notebook("def square(x) return x", None)), cell_timeout=60)
    assert report.score == 0 and report.max_score == 1
    assert any("SyntaxError" in e for e in report.errors), report.errors
    assert "no function `square`" in report.checks[0].message


@pytest.mark.slow
def test_endless_loop_in_the_function_times_out(toy):
    nb = _notebook("def square(x):\n    while True:\n        pass", None)
    report = grade(_write(toy, nb), cell_timeout=6, total_timeout=120)
    assert report.score == 0
    assert any("timed out" in e for e in report.errors), report.errors
    assert report.checks[0].message.startswith("your function did not return within 6 s"), report.checks


LOOPS = ["while True:\n    pass",
         "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"]


@pytest.mark.slow
def test_endless_loops_in_cells_cost_only_themselves(toy, monkeypatch):
    """A plain endless loop is interrupted; one that swallows the interrupt gets its kernel stopped, and a
    new kernel re-runs the cells before it: the solution above both still scores."""
    monkeypatch.setattr(Kernel, "interrupt_grace_s", 2.0)
    nb = _notebook(STUB, SOLUTION)
    nb.cells += [new_code_cell(src) for src in LOOPS]
    report = grade(_write(toy, nb), cell_timeout=6, total_timeout=120)
    assert (report.score, report.max_score) == (1, 1), report.table()
    assert sum("timed out after 6 s" in e for e in report.errors) == 2, report.errors
    assert "did not stop when interrupted" in report.errors[-1], report.errors


@pytest.mark.slow
def test_cli_json_output(toy):
    path = _write(toy, _notebook(STUB, SOLUTION))
    out = subprocess.run([sys.executable, "-m", "effdl.grade", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["score"] == 1 and doc["percent"] == 100.0


def test_no_chapter_means_nothing_to_grade(tmp_path):
    """Without the chapter (metadata or --chapter) there is no trusted list of checks: no kernel starts."""
    report = grade(_write(tmp_path, _notebook(STUB, SOLUTION, chapter=None)))
    assert (report.score, report.max_score) == (0, 0) and "--chapter" in report.errors[0]
    report = grade(_write(tmp_path, _notebook(STUB, SOLUTION, chapter="atention")))
    assert report.max_score == 0 and "unknown chapter" in report.errors[0]


def test_unreadable_notebook_gives_a_report(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    report = grade(bad)
    assert report.max_score == 0 and "not a readable notebook" in report.errors[0]


def test_student_version_drops_solution_cells_and_directives():
    student = make_student(_notebook(STUB, SOLUTION))
    text = json.dumps(student)
    assert "return x * x" not in text and "{solution}" not in text
    assert any("exercise" in c.metadata.get("tags", []) for c in student.cells)
