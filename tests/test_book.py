"""The book as a whole: pairing, Colab badges and install cells, exercise anatomy, student versions,
a warning-free build, and the grader on every chapter's student version."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
BRANCH = CONFIG["repository"].get("branch", "main")
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
BADGE_LINK = re.compile(r"\(https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/([^/]+)/([^)]+)\)")


def _nb(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def test_every_chapter_is_paired_and_listed():
    toc_files = {c["file"] for part in TOC["parts"] for c in part["chapters"]} | {TOC["root"]}
    for stem in CHAPTERS:
        assert (ROOT / "book" / f"{stem}.md").exists(), f"notebooks/{stem}.ipynb has no text twin book/{stem}.md"
        assert f"book/{stem}" in toc_files, f"book/{stem}.md is not in _toc.yml"
    for f in toc_files:
        assert (ROOT / f"{f}.md").exists(), f"_toc.yml lists {f} but {f}.md does not exist"
    assert len(CHAPTERS) >= 4


def test_notebooks_match_their_text_twins():
    """Regenerating each .ipynb from its .md must change nothing (`make notebooks` fixes it)."""
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "sync_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stem", CHAPTERS)
def test_notebooks_are_committed_without_outputs(stem):
    for cell in _nb(stem).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("stem", CHAPTERS)
def test_colab_badge_opens_this_chapters_notebook(stem):
    text = (ROOT / "book" / f"{stem}.md").read_text()
    links = BADGE_LINK.findall(text)
    assert len(links) == 1, f"book/{stem}.md needs exactly one Colab badge"
    slug, branch, path = links[0]
    assert f"https://github.com/{slug}" == REPO_URL and branch == BRANCH, "badge not derived from _config.yml"
    assert path == f"notebooks/{stem}.ipynb" and (ROOT / path).exists()


@pytest.mark.parametrize("stem", CHAPTERS)
def test_setup_cell_installs_the_course_and_leaves_colab_alone(stem):
    cells = [c for c in _nb(stem).cells if c.cell_type == "code"]
    pip_lines = [ln for c in cells for ln in c.source.splitlines() if "%pip install" in ln]
    assert pip_lines, "the first code cell must %pip install the course library on Colab"
    assert "google.colab" in cells[0].source and "%pip install" in cells[0].source
    for line in pip_lines:
        assert f"git+{REPO_URL}@{BRANCH}" in line
        pkgs = re.findall(r'"([^"]+)"|(\S+)', line.split("install", 1)[1])
        names = {re.split(r"[<>=@\[ ]", a or b)[0].lower() for a, b in pkgs if not (a or b).startswith("-")}
        assert not names & {"torch", "numpy", "ipywidgets"}, f"never (re)install Colab's {names}"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_exercise_anatomy(stem):
    """Each exercise: stub (exercise) -> solution -> check; the checks are the chapter's checks."""
    from effdl.checks import chapter_checks
    from effdl.grade import CHECK_CALL

    nb = _nb(stem)
    chapter = nb.metadata.get("effdl", {}).get("chapter")
    assert chapter == stem, f"book/{stem}.md front matter needs `effdl: {{chapter: {stem}}}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    kinds = [t for c in code for t in _tags(c) if t in ("exercise", "solution", "check")]
    assert kinds.count("exercise") >= 5, "at least five exercises per chapter"
    assert "".join(k[0] for k in kinds) == "esc" * kinds.count("exercise"), kinds
    called = [n for c in code if "check" in _tags(c) for n in CHECK_CALL.findall(c.source)]
    assert sorted(called) == sorted(chapter_checks(chapter)), "every check of the chapter is called once"
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert md.count("{exercise}") == kinds.count("exercise") == len(re.findall(r"\{solution\}", md))


@pytest.mark.parametrize("stem", CHAPTERS)
def test_student_version_has_no_solutions(stem, tmp_path):
    from effdl.student import write_student_versions

    (path,) = write_student_versions(ROOT / "notebooks" / f"{stem}.ipynb", tmp_path)
    student = nbformat.read(path, as_version=4)
    text = json.dumps(student.cells)
    assert not any("solution" in _tags(c) for c in student.cells)
    assert "{solution}" not in text
    full = _nb(stem)
    shared = "\n".join(c.source for c in full.cells if "solution" not in _tags(c))
    student_text = "\n".join(c.source for c in student.cells)
    for cell in full.cells:
        if "solution" in _tags(cell):
            # lines only a solution has (not the stub's signature, not an import used elsewhere)
            own = [ln for ln in cell.source.splitlines() if len(ln.strip()) > 15 and ln not in shared]
            leaked = [ln for ln in own if ln in student_text]
            assert not leaked, f"solution code leaked into the student version: {leaked[:2]}"
    assert sum("exercise" in _tags(c) for c in student.cells) >= 5


def test_make_student_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "effdl.student", str(ROOT / "notebooks"), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert sorted(Path(p).name for p in out.split()) == sorted(f"{s}.ipynb" for s in CHAPTERS)


@pytest.mark.slow
@pytest.mark.parametrize("stem", CHAPTERS)
def test_grader_gives_zero_to_the_student_version(stem, tmp_path):
    """Every check fails on the unmodified stubs, and the grader says so without crashing."""
    from effdl.grade import grade
    from effdl.student import write_student_versions

    (path,) = write_student_versions(ROOT / "notebooks" / f"{stem}.ipynb", tmp_path)
    report = grade(path, cell_timeout=600, total_timeout=1200)
    assert report.max_score >= 5
    assert report.score == 0, report.table()
    assert not any("never ran" in c.message for c in report.checks), report.table()


@pytest.mark.slow
def test_book_builds_without_warnings(tmp_path):
    """`jupyter-book build -W -n --keep-going` with execution off (nbmake executes the notebooks)."""
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "build_book.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    html = tmp_path / "_build" / "html"
    for stem in CHAPTERS:
        page = (html / "book" / f"{stem}.html").read_text()
        links = set(re.findall(r'href="https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/([^/]+)/([^"]+)"', page))
        assert links == {(REPO_URL.split("github.com/")[1], BRANCH, f"notebooks/{stem}.ipynb")}, links
        assert "colab.research.google.com/github" not in page.split('<main', 1)[0], "JB's own Colab button is back"
    assert "bibliography" in (html / "book" / "bibliography.html").read_text().lower()
