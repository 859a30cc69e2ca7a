"""The grader and the student versions, on small synthetic notebooks (fast, deterministic)."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from effdl.grade import grade
from effdl.student import make_student

CHECK_DEF = """\
from effdl.checks import exercise_check, require

@exercise_check
def square_check(f):
    for x in (0, 3, -2.5):
        require(f(x) == x * x, f"square({x}) returned {f(x)!r}, expected {x * x!r}")
"""


def _notebook(stub: str, solution: str | None) -> nbformat.NotebookNode:
    cells = [new_code_cell(CHECK_DEF), new_markdown_cell("Write `square`."),
             new_code_cell(stub, metadata={"tags": ["exercise"]})]
    if solution is not None:
        cells.append(new_code_cell(solution, metadata={"tags": ["solution", "hide-input"]}))
        cells.append(new_markdown_cell(":::{solution} ex-square\n:class: dropdown\nMultiply.\n:::"))
    cells.append(new_code_cell("square_check(square)", metadata={"tags": ["check"]}))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


STUB = "def square(x):\n    raise NotImplementedError"
SOLUTION = "def square(x):\n    return x * x"


def _write(tmp_path, nb, name="sub.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_solved_notebook_scores_full_marks(tmp_path):
    report = grade(_write(tmp_path, _notebook(STUB, SOLUTION)), cell_timeout=60)
    assert (report.score, report.max_score) == (1, 1), report.table()
    assert report.errors == []


@pytest.mark.slow
def test_student_version_of_it_scores_zero_and_says_why(tmp_path):
    student = make_student(_notebook(STUB, SOLUTION))
    report = grade(_write(tmp_path, student), cell_timeout=60)
    assert (report.score, report.max_score) == (0, 1)
    assert "not implemented" in report.checks[0].message


@pytest.mark.slow
def test_syntax_error_is_reported_not_crashing(tmp_path):
    report = grade(_write(tmp_path, _notebook("def square(x) return x", None)), cell_timeout=60)
    assert report.score == 0 and report.max_score == 1
    assert any("SyntaxError" in e for e in report.errors), report.errors


@pytest.mark.slow
def test_endless_loop_times_out_and_the_rest_still_runs(tmp_path):
    nb = _notebook("def square(x):\n    while True:\n        pass", None)
    report = grade(_write(tmp_path, nb), cell_timeout=3, total_timeout=120)
    assert report.score == 0
    assert any("timed out" in e or "did not finish" in e for e in report.errors), report.errors
    assert report.checks[0].message.startswith(("your function raised", "never ran")), report.checks


@pytest.mark.slow
def test_cli_json_output(tmp_path):
    path = _write(tmp_path, _notebook(STUB, SOLUTION))
    out = subprocess.run([sys.executable, "-m", "effdl.grade", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["score"] == 1 and doc["percent"] == 100.0


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
