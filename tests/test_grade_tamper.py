"""A submission cannot raise its own score from inside its kernel.

Each test grades a small notebook built from a chapter's notebook (``notebooks/<chapter>.ipynb``):
the imports of its untagged cells, then its exercise, solution and check cells.  The student version
(stubs) is the baseline; every tampered stub must score no more than it, and a correct solution keeps
full marks.  One kernel per graded notebook (a few seconds each), in the smoke profile.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from effdl import chapters
from effdl.grade import _answer, grade
from effdl.student import make_student

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = chapters.names()


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _imports(source: str) -> list[str]:
    lines = ["pass" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    return [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def chapter_notebook(chapter: str, *, solved: bool, before=(), after=(), head: str | None = None
                     ) -> nbformat.NotebookNode:
    """The chapter's imports (or ``head``), ``before`` cells, its exercise (+ solution) and check cells,
    ``after`` cells."""
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    imports: list[str] = []
    cells = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        if _tags(c) & {"exercise", "solution", "check"}:
            cells.append(c)
        else:
            imports += [i for i in _imports(c.source) if i not in imports]
    out = new_notebook(cells=[new_code_cell("\n".join(imports) if head is None else head),
                              *map(new_code_cell, before), *cells,
                              *map(new_code_cell, after)])
    out.metadata["effdl"] = {"chapter": chapter}
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return out if solved else make_student(out)


def _grade(tmp_path, nb, name="sub.ipynb", **kw):
    path = tmp_path / name
    nbformat.write(nb, path)
    kw.setdefault("cell_timeout", 120)
    return grade(path, **kw)


@pytest.fixture(scope="module")
def stub_score(tmp_path_factory) -> int:
    """What the untouched student version of the attention chapter scores (the baseline: 0)."""
    report = _grade(tmp_path_factory.mktemp("stub"), chapter_notebook("attention", solved=False))
    assert report.max_score == len(chapters.module("attention", "checks").__all__), report.table()
    return report.score


# -------------------------------------------------------------------- names come from the library
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_check_names_the_function_it_grades(chapter):
    """Each check declares its student function; the chapter's check cell passes exactly that name and
    its exercise cell defines it."""
    module = chapters.module(chapter, "checks")
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    calls = {m.group(1): m.group(2) for c in nb.cells if "check" in _tags(c)
             for m in re.finditer(r"\bchecks\.(\w+)\(\s*(\w+)\s*\)", c.source)}
    defined = {n.name for c in nb.cells if "exercise" in _tags(c)
               for n in ast.parse(c.source).body if isinstance(n, ast.FunctionDef)}
    for name in module.__all__:
        student = getattr(module, name).student
        assert student, f"{chapter}.checks.{name} needs @exercise_check(student=...)"
        assert calls.get(name) == student, (name, calls.get(name), student)
        assert student in defined, f"no exercise cell of {chapter} defines {student}"


def test_the_kernel_side_returns_data_only(tmp_path):
    """What the kernel sends back: data (numpy made tensors), or a status the grader turns into a message."""
    import numpy as np

    inp, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save((torch.arange(3.0),), inp)

    def answer(ns):
        _answer(ns, "f", None, str(inp), str(out))
        return torch.load(out, weights_only=True)

    got = answer({"f": lambda x: (x.numpy() * 2, np.float32(1.5), {"k": [x.requires_grad_()]})})
    assert got["status"] == "ok" and isinstance(got["value"], tuple)
    assert torch.equal(got["value"][0], torch.tensor([0.0, 2.0, 4.0], dtype=torch.float32))
    assert got["value"][1] == 1.5 and not got["value"][2]["k"][0].requires_grad
    assert answer({"f": lambda x: object()})["status"] == "not-data"
    assert answer({})["status"] == "missing"
    from effdl.reference import reference_attention

    assert "library's own" in answer({"f": reference_attention})["message"]
    raised = answer({"f": lambda x: 1 / 0})
    assert (raised["status"], raised["kind"]) == ("raised", "ZeroDivisionError")


# ----------------------------------------------------------------------------- correct solutions
@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_solved_chapter_scores_full_marks(chapter, tmp_path):
    """Every check judged in the grader, including those whose arguments are built on the student's
    side by a driver (the fake device, the pipeline stages, the sampler and its optimizer)."""
    report = _grade(tmp_path, chapter_notebook(chapter, solved=True))
    assert report.score == report.max_score >= 5, report.table()
    assert report.errors == [], report.errors


# ------------------------------------------------------------------------------------- tampering
WRONG_ANSWERS = """\
def my_online_softmax(x, block):
    return torch.softmax(x, -1) * 1.01
def my_merge(m1, l1, acc1, m2, l2, acc2):
    return m1, l1, acc1
def my_tile_plan(nq, nk, block_q, block_k):
    return {}
def my_fa2_forward(q, k, v, causal, block_q, block_k):
    return q, q[..., 0]
def my_backward_tile(Qi, dOi, Li, Di, Kj, Vj, scale, mask):
    return Qi, Kj, Vj
def my_fa2_causal_io(N, d, Br, Bc):
    return 0, 0
def my_decode_intensity(batch, heads, heads_kv, L, d, bytes_per_el):
    return 1.0
def my_tile_sizes(M, d):
    return 1, 1
def my_split_merge(outs, lses):
    return outs[0]
"""

FORGE = """\
import json, os, sys
import numpy as np
import torch
import effdl.checks
from effdl.attention import checks
names = list(checks.__all__)
# pass lines in every log a grader might read, and on every output there is
for p in [os.environ.get("EFFDL_GRADE_LOG") or "grade-log.jsonl", "../grade-log.jsonl", "../calls/log.jsonl"]:
    try:
        with open(p, "a") as fh:
            fh.writelines(json.dumps({"check": n, "passed": True, "message": "passed"}) + "\\n" for n in names)
    except OSError:
        pass
for n in names:
    print(f"✓ {n}: passed")
    sys.__stdout__.write(f"✓ {n}: passed\\n")
os.write(1, b'{"score": 6, "max_score": 6, "percent": 100.0}\\n')
# the checks, their helpers and every comparison replaced
for n in names:
    setattr(checks, n, lambda f, n=n: print(f"✓ {n}: passed"))
effdl.checks.require = effdl.checks.assert_close = lambda *a, **k: None
effdl.checks.judge = lambda *a, **k: (True, "passed", None)
effdl.checks.exercise_check = lambda fn=None, **k: fn
torch.allclose = torch.equal = lambda *a, **k: True
torch.isclose = lambda a, b, **k: torch.ones_like(torch.as_tensor(a), dtype=torch.bool)
torch.testing.assert_close = lambda *a, **k: None
torch.Tensor.__eq__ = lambda self, other: torch.ones_like(self, dtype=torch.bool)
np.allclose = np.array_equal = lambda *a, **k: True
np.testing.assert_allclose = np.testing.assert_array_equal = lambda *a, **k: None
"""


@pytest.mark.slow
def test_forged_lines_and_patched_checks_and_comparisons_score_nothing(tmp_path, stub_score):
    """Pass lines in logs and on stdout, checks and comparison functions replaced, wrong answers: the
    notebook's own check cells now print ✓, the grader (CLI, --json) still scores the stub's score."""
    nb = chapter_notebook("attention", solved=False, before=[FORGE], after=[WRONG_ANSWERS, FORGE])
    path = tmp_path / "forged.ipynb"
    nbformat.write(nb, path)
    proc = subprocess.run([sys.executable, "-m", "effdl.grade", str(path), "--json", "--cell-timeout", "60"],
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # nothing the kernel wrote reached the grader's stdout
    doc = json.loads(lines[0])
    assert doc["score"] <= stub_score == 0, doc
    assert "values differ" in doc["checks"][0]["message"], doc["checks"][0]


@pytest.mark.slow
def test_a_forged_answer_file_is_refused(tmp_path, stub_score):
    """The kernel-side helper replaced: it saves objects that compare equal to anything, or run code
    when unpickled.  The grader reads answers as data only and refuses both."""
    canary = tmp_path / "unpickled-code-ran"
    exploit = f"""\
import os, torch
import effdl.grade

class Equal:
    def __eq__(self, other):
        return True

class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch {canary}",))

def fake_answer(ns, name, driver, in_path, out_path):
    value = Equal() if name == "my_online_softmax" else RunsCode()
    torch.save({{"status": "ok", "value": value}}, out_path)

effdl.grade._answer = fake_answer
"""
    report = _grade(tmp_path, chapter_notebook("attention", solved=False, after=[WRONG_ANSWERS, exploit]))
    assert report.score <= stub_score == 0, report.table()
    assert all("could not be read as data" in c.message for c in report.checks), report.table()
    assert not canary.exists()


@pytest.mark.slow
def test_deleted_and_reordered_check_cells(tmp_path, stub_score):
    """Check cells deleted or moved above the exercises: the stub still scores the stub's score, and a
    solution keeps full marks (the grader does not need the notebook's check cells at all)."""
    def shuffle(nb):
        checks = [c for c in nb.cells if "check" in _tags(c)]
        rest = [c for c in nb.cells if "check" not in _tags(c)]
        nb.cells = [rest[0], *checks[:2], *rest[1:]]  # two moved to the top, the others deleted
        return nb

    stub = _grade(tmp_path, shuffle(chapter_notebook("attention", solved=False)), "stub.ipynb")
    assert stub.score <= stub_score == 0, stub.table()
    solved = _grade(tmp_path, shuffle(chapter_notebook("attention", solved=True)), "solved.ipynb")
    assert solved.score == solved.max_score, solved.table()


@pytest.mark.slow
def test_a_deleted_exercise_cell_does_not_grade_the_library(tmp_path):
    """The distill chapter imports the library's ``herding_indices`` to show it; deleting the exercise
    cell would leave that name to the library's own function.  The grader refuses it."""
    nb = chapter_notebook("distill", solved=False)
    nb.cells = [c for c in nb.cells if not ("def herding_indices" in c.source and "exercise" in _tags(c))]
    assert "herding_indices" in nb.cells[0].source  # the chapter's import is there
    report = _grade(tmp_path, nb)
    assert report.score == 0, report.table()
    herding = next(c for c in report.checks if c.name == "check_herding")
    assert "library's own function" in herding.message, herding


EXITS = ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "exit()",
         "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"]
KILLER = "def my_merge(m1, l1, acc1, m2, l2, acc2):\n    import os\n    os._exit(3)"


@pytest.mark.slow
@pytest.mark.parametrize("solved", [False, True], ids=["stub", "solved"])
def test_ending_the_kernel_early(tmp_path, stub_score, solved):
    """os._exit, sys.exit, exit() and SIGKILL in cells, and a student function that ends the process
    when the grader calls it.  The stub scores the stub's score; a solution loses only the check of
    the function that ends the process (a new kernel re-runs the cells that ran before each exit)."""
    lean = "import torch\nfrom effdl.attention import checks"  # what the cells need: quick to re-run
    report = _grade(tmp_path, chapter_notebook("attention", solved=solved, before=EXITS[:1],
                                               after=[*EXITS, KILLER], head=lean))
    if not solved:
        assert report.score <= stub_score == 0, report.table()
        return
    assert report.score == report.max_score - 1, report.table()
    merge = next(c for c in report.checks if c.name == "check_merge_states")
    assert "ended the notebook's Python process" in merge.message, merge
    assert sum("kernel stopped" in e for e in report.errors) == 3, report.errors  # exit() is ignored
