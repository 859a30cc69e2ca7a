"""Export to Otter-Grader: each chapter's master notebook goes through ``otter assign`` (offline), and
Otter's own runner gives the solved notebook full marks and the student notebook zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from effdl import chapters
from effdl.export import _statement, exercises, otter_master, write_otter

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = chapters.names()


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_master_notebook_holds_every_exercise(chapter):
    """One question per check of the chapter, in order; the stub is the prompt, the solution is fenced,
    the test calls the library's check on the function the check declares."""
    master = otter_master(chapter)
    raw = [c.source for c in master.cells if c.cell_type == "raw"]
    assert raw[0].startswith("# ASSIGNMENT CONFIG") and "ok_format: false" in raw[0]
    names = [s.split("name: ")[1].split("\n")[0] for s in raw if s.startswith("# BEGIN QUESTION")]
    assert names == [n.removeprefix("check_") for n in chapters.module(chapter, "checks").__all__]
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    stubs = [c.source for c in nb.cells if "exercise" in _tags(c)]
    answers = [c.source for c in master.cells if "# BEGIN PROMPT" in c.source]
    assert len(answers) == len(stubs)
    for stub, answer in zip(stubs, answers):
        assert stub.rstrip() in answer and "# BEGIN SOLUTION NO PROMPT" in answer
    for ex in exercises(chapter, nb):
        test = next(c.source for c in master.cells if c.source.startswith(f"def test_{ex.check[6:]}("))
        assert f"checks.{ex.check}({ex.student})" in test


def test_statement_drops_myst_syntax():
    md = ("Intro.\n\n```{exercise} Online softmax\n:label: ex-x\n\nWrite `f`, see {eq}`eq-merge` and "
          "{ref}`the section <sec-a>`.\n```\n")
    assert _statement(md) == "**Exercise: Online softmax**\n\nWrite `f`, see `eq-merge` and `the section`."


def test_cli_writes_every_chapter(tmp_path):
    out = subprocess.run([sys.executable, "-m", "effdl.export", "otter", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert sorted(Path(p).parent.name for p in out) == CHAPTERS
    req = (tmp_path / CHAPTERS[0] / "requirements.txt").read_text()
    assert "effdl" in req and "git+" in req  # the release the chapter's install cell pins


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside Otter's runner (pandas 3.1)
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_otter_round_trip(chapter, tmp_path):
    """``otter assign`` writes the student notebook and the autograder zip; Otter's runner
    (``otter.api.grade_submission``) scores the autograder notebook (solutions) full, the student one 0."""
    pytest.importorskip("otter")
    from otter.api import grade_submission

    (master,) = write_otter(tmp_path / "src", [chapter])
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "otter", "assign", "--no-pdfs", "--no-run-tests",
                           master.name, str(dist)], cwd=master.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (zip_path,) = (dist / "autograder").glob("*.zip")
    n = len(chapters.module(chapter, "checks").__all__)
    solved = grade_submission(str(dist / "autograder" / f"{chapter}.ipynb"), str(zip_path), quiet=True)
    assert (solved.total, solved.possible) == (n, n), solved.summary()
    student = grade_submission(str(dist / "student" / f"{chapter}.ipynb"), str(zip_path), quiet=True)
    assert (student.total, student.possible) == (0, n), student.summary()
