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
        assert f"git+{REPO_URL}@{CONFIG['repository']['release']}" in line, "install pins the release tag"
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


@pytest.fixture(scope="module")
def noexec_site(tmp_path_factory):
    """The site built once with `jupyter-book build -W -n --keep-going`, execution off (nbmake
    executes the notebooks): ``(returncode, log, html folder)``."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "build_book.py"), "--out", str(out)],
                          capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:], out / "_build" / "html"


@pytest.mark.slow
def test_book_builds_without_warnings(noexec_site):
    """`jupyter-book build -W -n --keep-going` with execution off (nbmake executes the notebooks)."""
    returncode, log, html = noexec_site
    assert returncode == 0, log
    for stem in CHAPTERS:
        page = (html / "book" / f"{stem}.html").read_text()
        colab = r'href="https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/([^/]+)/([^"]+)"'
        links = set(re.findall(colab, page))
        assert links == {(REPO_URL.split("github.com/")[1], BRANCH, f"notebooks/{stem}.ipynb")}, links
        assert "colab.research.google.com/github" not in page.split('<main', 1)[0], "JB's own Colab button is back"
    assert "bibliography" in (html / "book" / "bibliography.html").read_text().lower()


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.parametrize("stem", CHAPTERS)
def test_site_works_offline(noexec_site, stem, tmp_path):
    """A chapter opened with the network blocked: MathJax (served by the site, see _config.yml)
    typesets the math, and every image is a file of the site (no image needs the network).
    Seen failing (0 typeset formulas) on a build that loads MathJax from its CDN."""
    returncode, log, html = noexec_site
    assert returncode == 0, log
    page = html / "book" / f"{stem}.html"
    text = page.read_text()
    for src in re.findall(r'<img[^>]*\ssrc="([^"]+)"', text):
        assert not src.startswith(("http:", "https:", "//")), f"{stem}: image from the network: {src}"
        assert (page.parent / src.split("?")[0]).resolve().is_file(), f"{stem}: broken image {src}"
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on this machine (make test installs Debian's chromium)")
    blocked = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]
    quiet = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    dom = subprocess.run([exe, *quiet, *blocked, f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    n_math = len(re.findall(r'class="math[^"]*"', text))
    typeset = dom.count("<mjx-container")
    assert n_math == 0 or typeset >= n_math, f"{stem}: {typeset} of {n_math} formulas typeset offline"


# ------------------------------------------------------------------ one anatomy for every chapter
# book/_template.md is the anatomy a new chapter copies (STYLE.md: "One anatomy everywhere"):
# goals and prerequisites on top, the naive version -> its cost -> the idea -> the optimized version
# -> the same measurement, then every exercise in one section, a summary and further reading.
ANATOMY = ("The naive version", "What it costs", "The idea", "The optimized version",
           "The same measurement again", "Exercises", "Summary", "Further reading")
END = ("Exercises", "Summary", "Further reading")
TEMPLATE = ROOT / "book" / "_template.md"
BIB_KEYS = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "book" / "references.bib").read_text(), re.M))
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
FENCE = re.compile(r"^(`{3,}|:{3,})\s*(.*)$")
# Words of the project's process, never of a lesson (STYLE.md: "A lesson, not a lab report").
PROCESS_WORDS = re.compile(r"\b(issues?|targets?|met|acceptance|tasks?|todo)\b", re.IGNORECASE)
# Legitimate lesson uses of those words, matched against the line: none needed today. Keep it short.
PROCESS_WORDS_ALLOWED: tuple[str, ...] = ()


def _anatomy_chapters() -> list[str]:
    from effdl import chapters

    return chapters.names()


def _parse(text: str) -> dict:
    """A MyST notebook's outline: `## ` headings, directives and code cells (with their line numbers),
    its prose (markdown and directive bodies) and its code, fences and front matter understood."""
    lines = text.splitlines()
    start = 0
    if lines and lines[0] == "---":  # front matter
        start = lines.index("---", 1) + 1
    out = {"headings": [], "directives": [], "cells": [], "prose": [], "code": []}
    fence = None  # (marker, is_code_cell) while inside a fenced block
    for no, line in enumerate(lines[start:], start + 1):
        m = FENCE.match(line)
        if fence is None and m and m.group(2):
            info = m.group(2)
            fence = (m.group(1), info.startswith("{code-cell}"))
            if fence[1]:
                out["cells"].append({"line": no, "tags": [], "source": []})
            elif info.startswith("{"):
                out["directives"].append((no, info.split("}", 1)[0] + "}"))
            continue
        if fence is not None and line.strip() == fence[0]:
            fence = None
            continue
        if fence is not None and fence[1]:
            cell = out["cells"][-1]
            if line.startswith(":tags:"):
                cell["tags"] = re.findall(r"[\w-]+", line.split(":", 2)[2])
            else:
                cell["source"].append(line)
            continue
        if fence is None and line.startswith("## "):
            out["headings"].append((no, line[3:].strip()))
        if not line.startswith("%"):  # MyST comments never reach the page
            out["prose"].append((no, line))
    for cell in out["cells"]:
        cell["source"] = "\n".join(cell["source"])
    return out


def _code_strings(source: str) -> list[str]:
    """What a code cell shows as text: its string literals (printed messages, labels, figure titles)
    and its comments. Dictionary look-ups such as `row["target"]` are names, not text."""
    import ast
    import io
    import tokenize

    code = "\n".join(ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("%", "!")) else ln
                     for ln in source.splitlines())  # IPython magics: not Python, and not shown text
    tree = ast.parse(code)
    keys = {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    found = [n.value for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in keys]
    found += [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.COMMENT]
    return found


def _check_anatomy(path: Path) -> dict:
    text = path.read_text()
    doc = _parse(text)
    name = path.relative_to(ROOT)
    headings = [h for _, h in doc["headings"]]
    assert headings, f"{name} has no `## ` sections"
    first = doc["headings"][0][0]
    top = "\n".join(line for no, line in doc["prose"] if no < first)
    assert "**You will**" in top, f"{name}: a **You will** list of learning goals belongs before the first section"
    assert "**Prerequisites:**" in top, f"{name}: a **Prerequisites:** line belongs before the first section"
    assert re.search(r"\*\*You will\*\*\s*\n\s*\n- ", top), f"{name}: **You will** is followed by a list"
    assert tuple(headings[-3:]) == END, f"{name}: the last sections must be {END}, not {headings[-3:]}"
    (ex_line, sum_line, read_line) = [no for no, h in doc["headings"][-3:]]
    exercises = [no for no, d in doc["directives"] if d == "{exercise}"]
    solutions = [no for no, d in doc["directives"] if d == "{solution}"]
    assert exercises, f"{name} has no {{exercise}}"
    outside = [no for no in exercises + solutions if not ex_line < no < sum_line]
    assert not outside, f"{name}: exercises go in the `## Exercises` section only (lines {outside})"
    tagged = [c for c in doc["cells"] if {"exercise", "solution", "check"} & set(c["tags"])]
    outside = [c["line"] for c in tagged if not ex_line < c["line"] < sum_line]
    assert not outside, f"{name}: exercise, solution and check cells go in `## Exercises` (lines {outside})"
    reading = "\n".join(line for no, line in doc["prose"] if no > read_line)
    assert CITE.search(reading), f"{name}: `## Further reading` cites the bibliography ({{cite:t}}`key`)"
    return doc


def test_template_has_the_anatomy_and_is_never_built():
    doc = _check_anatomy(TEMPLATE)
    assert tuple(h for _, h in doc["headings"]) == ANATOMY
    tags = [c["tags"] for c in doc["cells"] if {"exercise", "solution", "check"} & set(c["tags"])]
    assert tags == [["exercise"], ["solution", "hide-input"], ["check"]], tags
    check = next(c["source"] for c in doc["cells"] if "check" in c["tags"])
    assert re.match(r"checks\.\w+\(", check)
    assert "from effdl.NAME import checks" in TEMPLATE.read_text()
    assert [d for _, d in doc["directives"] if d in ("{exercise}", "{solution}")] == ["{exercise}", "{solution}"]
    # never a page, never a chapter notebook
    toc_files = {c["file"] for part in TOC["parts"] for c in part["chapters"]} | {TOC["root"]}
    assert "book/_template" not in toc_files
    assert "book/_template.md" in CONFIG["exclude_patterns"]
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import sync_notebooks
    finally:
        sys.path.remove(str(ROOT / ".ci"))
    assert TEMPLATE not in sync_notebooks.chapter_sources()
    assert not (ROOT / "notebooks" / "_template.ipynb").exists()


@pytest.mark.parametrize("stem", _anatomy_chapters())
def test_chapter_follows_the_anatomy(stem):
    path = ROOT / "book" / f"{stem}.md"
    _check_anatomy(path)
    text = path.read_text()
    assert "FILL IN" not in text, f"book/{stem}.md still has a placeholder of the template"
    missing = sorted({k.strip() for keys in CITE.findall(text) for k in keys.split(",")} - BIB_KEYS)
    assert not missing, f"book/{stem}.md cites keys missing from book/references.bib: {missing}"


@pytest.mark.parametrize("stem", _anatomy_chapters())
def test_chapter_has_no_process_words(stem):
    """What the page shows (prose, and the strings and comments of code) teaches; it never reports on
    the project ("target met", "the issue", "acceptance")."""
    doc = _parse((ROOT / "book" / f"{stem}.md").read_text())
    shown = [(f"line {no}", line) for no, line in doc["prose"]]
    shown += [(f"cell at line {c['line']}", s) for c in doc["cells"] for s in _code_strings(c["source"])]
    hits = [(where, s.strip()) for where, s in shown
            if PROCESS_WORDS.search(s) and not any(a in s for a in PROCESS_WORDS_ALLOWED)]
    assert not hits, f"book/{stem}.md: words of the project's process, not of the lesson: {hits[:5]}"


def test_process_word_rule_sees_prose_strings_and_comments():
    """Regression guard for the rule above: each place a word can hide is seen; look-ups are not."""
    doc = _parse("# T\n\nThe target point.\n\n```{code-cell} ipython3\nprint(f'the issue: {x}')  # TODO\n"
                 "y = row['target']\n```\n")
    assert [line for _, line in doc["prose"] if PROCESS_WORDS.search(line)] == ["The target point."]
    assert [s for s in _code_strings(doc["cells"][0]["source"]) if PROCESS_WORDS.search(s)] == ["the issue: ", "# TODO"]


def test_publishing_workflow_builds_the_book_and_deploys_pages(root, tmp_path):
    """The Pages workflow validates against GitHub's workflow schema (the check `make lint` runs,
    seen failing on a broken copy) and builds with `make book`, caching the execution cache."""
    import shutil

    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is in the lock: run make setup"
    wf = root / ".github" / "workflows" / "book.yml"
    run = lambda p: subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(p)],
                                   capture_output=True, text=True, timeout=120)
    assert run(wf).returncode == 0
    broken = tmp_path / "broken.yml"
    broken.write_text(wf.read_text().replace("runs-on:", "runs_on:"))
    assert run(broken).returncode != 0
    doc = yaml.safe_load(wf.read_text())
    steps = doc["jobs"]["build"]["steps"]
    assert any("make book" in s.get("run", "") for s in steps)
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache"))
    assert cache["with"]["path"] == "_build/.jupyter_cache" and "lib/effdl" in cache["with"]["key"]
    assert any(str(s.get("uses", "")).startswith("actions/upload-pages-artifact") for s in steps)
    assert doc["jobs"]["deploy"]["steps"][0]["uses"].startswith("actions/deploy-pages")
