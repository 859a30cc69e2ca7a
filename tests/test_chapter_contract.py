"""The chapter contract (effdl.chapters): every chapter has the same modules, and a new chapter is
picked up by the profile, the benchmark command, the grader and the student build by its name alone.

The throw-away chapter ``toy`` is written into a temporary ``effdl/`` folder on the path at run
time; no core module is edited (``effdl/__init__.py`` extends its ``__path__`` over ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

import effdl
from effdl import chapters
from effdl.profile import PROFILES, sizes

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = chapters.names()


def toc_chapters() -> list[str]:
    """The chapter files of _toc.yml's "Chapters" part: the one list of the book's chapters."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    part = next(p for p in toc["parts"] if p.get("caption") == "Chapters")
    return [Path(c["file"]).name for c in part["chapters"]]


def test_the_toc_and_the_library_name_the_same_chapters():
    assert sorted(toc_chapters()) == CHAPTERS
    assert len(CHAPTERS) >= 4


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_has_the_contract_modules(chapter):
    assert chapters.require(chapter) == chapter
    bench = chapters.module(chapter, "bench")
    assert sorted(bench.__all__) == ["gpu_suite", "run"], "bench.py holds run and gpu_suite only"
    assert len(chapters.module(chapter, "checks").__all__) >= 5
    table = chapters.module(chapter, "sizes").SIZES
    assert set(table) == set(PROFILES)
    assert all(type(s) is type(table["smoke"]) for s in table.values())


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_chapter_imports_another(chapter):
    others = [c for c in CHAPTERS if c != chapter]
    for path in (ROOT / "lib" / "effdl" / chapter).glob("*.py"):
        text = path.read_text()
        for other in others:
            assert f"effdl.{other}" not in text.replace(f"effdl.{other}_", ""), (
                f"{path.relative_to(ROOT)} mentions effdl.{other}: shared pieces belong in core")


def test_core_modules_name_no_chapter():
    core = [p for p in (ROOT / "lib" / "effdl").rglob("*.py")
            if p.relative_to(ROOT / "lib" / "effdl").parts[0] not in CHAPTERS]
    for path in core:
        text = path.read_text()
        for chapter in CHAPTERS:
            assert f'"effdl.{chapter}' not in text and f"'effdl.{chapter}" not in text, (
                f"{path.relative_to(ROOT)} names chapter {chapter} in a string: find it by name instead")


def test_unknown_chapter_errors_name_the_known_ones():
    with pytest.raises(ValueError, match="attention"):
        sizes("atention")
    with pytest.raises(ValueError, match="sizes.py"):
        chapters.module("measure", "bench")  # a core module, not a chapter
    with pytest.raises(ValueError, match="unknown chapter part"):
        chapters.module("attention", "figures")


# ------------------------------------------------------------------------------------ throw-away
TOY = {
    "__init__.py": '"""A throw-away chapter written by the contract test."""\n',
    "sizes.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Sizes:
            n: int

        SIZES = {"smoke": Sizes(3), "cpu": Sizes(30), "gpu": Sizes(300)}
        """,
    "bench.py": """
        __all__ = ["run", "gpu_suite"]

        def run(S, device):
            return [{"impl": "toy", "n": S.n, "ms": 1.0}]

        def gpu_suite(device, S):
            return run(S, device)
        """,
    "checks.py": """
        from effdl.checks import exercise_check, require

        __all__ = ["check_double"]

        @exercise_check
        def check_double(student):
            require(student(21) == 42, "double(21) should be 42")
        """,
    "plots.py": """
        import matplotlib.pyplot as plt

        def plot_bench(rows):
            fig, ax = plt.subplots()
            ax.plot([r["n"] for r in rows], [r["ms"] for r in rows], "o")
            return fig

        def plot_recorded(doc):
            return plot_bench(doc["results"])
        """,
}


@pytest.fixture
def toy_chapter(tmp_path, monkeypatch):
    """``effdl.toy`` in a temporary folder on the path (children find it through PYTHONPATH)."""
    pkg = tmp_path / "effdl" / "toy"
    pkg.mkdir(parents=True)
    for name, text in TOY.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    # what effdl/__init__.py's extend_path does at import, for this already-imported process
    monkeypatch.setattr(effdl, "__path__", [*effdl.__path__, str(tmp_path / "effdl")])
    yield tmp_path
    for mod in [m for m in sys.modules if m == "effdl.toy" or m.startswith("effdl.toy.")]:
        del sys.modules[mod]


def _toy_notebook(solution: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["effdl"] = {"chapter": "toy"}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [
        nbformat.v4.new_code_cell("from effdl.toy import checks"),
        nbformat.v4.new_code_cell("def double(x):\n    raise NotImplementedError"),
        nbformat.v4.new_code_cell(solution),
        nbformat.v4.new_code_cell("checks.check_double(double)"),
    ]
    cells[1].metadata["tags"] = ["exercise"]
    cells[2].metadata["tags"] = ["solution"]
    cells[3].metadata["tags"] = ["check"]
    nb.cells = cells
    return nb


def test_a_new_chapter_is_found_by_name(toy_chapter):
    assert "toy" in chapters.names()
    assert sizes("toy", "smoke").n == 3 and sizes("toy", "gpu").n == 300
    from effdl.checks import chapter_checks

    assert chapter_checks("toy") == ["check_double"]


def test_a_new_chapter_runs_in_the_bench_command(toy_chapter, tmp_path, capsys):
    from effdl.bench.__main__ import main

    assert main(["--list"]) == 0
    assert "toy" in capsys.readouterr().out.split()
    # a fresh process finds the chapter through effdl/__init__.py's extend_path alone
    env = {**os.environ, "EFFDL_PROFILE": "smoke", "MPLBACKEND": "Agg"}
    out = tmp_path / "toy.json"
    proc = subprocess.run([sys.executable, "-m", "effdl.bench", "toy", "--device", "cpu", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["results"] == [{"impl": "toy", "n": 3, "ms": 1.0}] and doc["meta"]["chapter"] == "toy"
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_a_new_chapter_is_graded_and_gets_a_student_version(toy_chapter, tmp_path):
    from effdl.grade import grade
    from effdl.student import write_student_versions

    good = tmp_path / "toy.ipynb"
    nbformat.write(_toy_notebook("def double(x):\n    return 2 * x"), good)
    report = grade(good, cell_timeout=120, total_timeout=300)
    assert (report.chapter, report.score, report.max_score) == ("toy", 1, 1), report.table()
    (student,) = write_student_versions(good, tmp_path / "student")
    nb = nbformat.read(student, as_version=4)
    assert not any("return 2 * x" in c.source for c in nb.cells)
    assert any("raise NotImplementedError" in c.source for c in nb.cells)


# ------------------------------------------------------------------------ every chapter's bench
@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_bench_run_and_plot_at_smoke_sizes(chapter, smoke_bench_rows):
    import matplotlib.pyplot as plt

    rows, threads, threads_after = smoke_bench_rows(chapter)
    assert threads_after == threads, "bench.run must restore torch's thread count"
    assert rows and all(isinstance(r, dict) for r in rows)
    json.dumps(rows, default=str)  # rows are what the JSON file holds
    fig = chapters.module(chapter, "plots").plot_bench(rows)
    assert fig.axes
    plt.close(fig)


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_gpu_suite_rows_draw_as_a_recorded_file(chapter, tmp_path):
    """The GPU suite's code paths (all but the CUDA-only ones) at smoke sizes on the CPU, written as
    a recorded file, read back and drawn by the chapter's plot_recorded, as a page would show it."""
    import matplotlib.pyplot as plt

    from effdl.bench.core import write_json
    from effdl.measure import torch_threads

    with torch_threads(1):  # why: smoke sizes, a shared 2-core machine
        rows = chapters.module(chapter, "bench").gpu_suite(torch.device("cpu"), sizes(chapter, "smoke"))
    assert rows and not [r for r in rows if "error" in r]
    path = tmp_path / f"{chapter}-test.json"
    write_json(rows, path, device="cpu", profile="smoke", chapter=chapter)
    doc = json.loads(path.read_text())
    fig = chapters.module(chapter, "plots").plot_recorded(doc)
    assert any(ax.lines or ax.patches for ax in fig.axes), "an empty figure"
    plt.close(fig)


def test_bench_cli_rejects_an_unknown_chapter(capsys):
    from effdl.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["atention"])
    assert exc.value.code == 2 and "unknown chapter 'atention'" in capsys.readouterr().err
