"""The library core: profiles, the benchmark harness, checks, source display, data loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effdl import chapters, profile
from effdl.bench.core import free_cached, is_oom, oom_guard, print_table, run_sweep, write_json
from effdl.checks import ExerciseFailed, assert_close, exercise_check, require


# --- profiles ---------------------------------------------------------------------------------
def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("EFFDL_PROFILE", "cpu")
    assert profile.current() == "cpu"
    assert profile.current("gpu") == "gpu"


def test_profile_detected_when_unset(monkeypatch):
    monkeypatch.delenv("EFFDL_PROFILE", raising=False)
    assert profile.current() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_unknown_profile_names_the_fix(monkeypatch):
    monkeypatch.setenv("EFFDL_PROFILE", "fast")
    with pytest.raises(ValueError, match="EFFDL_PROFILE"):
        profile.current()


def test_unknown_chapter_sizes():
    with pytest.raises(ValueError, match="unknown chapter"):
        profile.sizes("cooking")


# --- benchmark harness ------------------------------------------------------------------------
def test_run_sweep_rows_and_derived_units():
    def matmul(c):
        a = torch.ones(c["n"], c["n"])
        return lambda: a @ a

    rows = run_sweep([{"n": 8}, {"n": 16}],
                     {"mm": matmul, "skip": lambda c: None},
                     derive=lambda c, ms: {"gflops": 2 * c["n"] ** 3 / (ms * 1e6)},
                     warmup=1, repeat=3, memory=True, progress=False)
    assert [r["n"] for r in rows] == [8, 16]  # the skipped implementation adds no rows
    assert all(r["impl"] == "mm" and r["ms"] > 0 and r["gflops"] > 0 for r in rows)
    assert all(r["peak_mem_bytes"] >= 4 * r["n"] ** 2 for r in rows)


def test_run_sweep_records_out_of_memory_and_goes_on():
    def boom(c):
        def f():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return f

    rows = run_sweep([{"n": 1}], {"oom": boom, "ok": lambda c: (lambda: None)}, repeat=1, progress=False)
    assert rows[0]["error"] == "out of memory" and "ms" in rows[1]


def test_run_sweep_does_not_hide_real_bugs():
    with pytest.raises(ZeroDivisionError):
        run_sweep([{"n": 1}], {"bad": lambda c: (lambda: 1 / 0)}, repeat=1, progress=False)


def test_table_json_roundtrip(tmp_path, capsys):
    rows = [{"impl": "a", "ms": 1.5}, {"impl": "bb", "ms": 20.25, "extra": 3}]
    text = print_table(rows)
    assert "impl" in text.splitlines()[0] and "bb" in text
    doc = write_json(rows, tmp_path / "r.json", chapter="test")
    assert doc["meta"]["torch"] == torch.__version__ and doc["meta"]["chapter"] == "test"
    assert {"device", "date", "profile", "triton"} <= set(doc["meta"])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(doc))


def test_a_cell_ending_in_print_table_shows_the_table_once(capsys):
    """The returned text must not be displayed again as a quoted repr with literal \\n."""
    from IPython.core.interactiveshell import InteractiveShell

    text = print_table([{"impl": "a", "ms": 1.5}])
    data, _ = InteractiveShell.instance().display_formatter.format(text)
    assert data == {}, data
    assert text == capsys.readouterr().out.rstrip("\n")     # still the table's text


def test_wide_table_is_printed_in_parts_that_fit_the_page():
    """A table wider than the site's 88 columns comes in parts, each repeating the row's name."""
    rows = [{"impl": f"impl-{i}", **{f"column_{c}": 123456.789 * c for c in range(12)}} for i in range(3)]
    text = print_table(rows)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 88
    assert sum(line.split()[0] == "impl" for line in lines if line.strip()) >= 2
    for c in range(12):                                     # every column is still printed once
        assert sum(f"column_{c}" in line.split() for line in lines) == 1
    assert all(f"impl-{i}" in text for i in range(3))
    narrow = print_table(rows, ["impl", "column_1"])
    assert "\n\n" not in narrow                                # a table that fits stays one block


@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: not enough memory: out of memory"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("bad size"), False),
])
def test_is_oom(exc, oom):
    assert is_oom(exc) is oom


def test_oom_guard_records_out_of_memory_and_lets_other_errors_through():
    row = {"impl": "naive", "N": 1 << 20}
    with oom_guard(row, "cpu") as r:
        assert r is row
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")
    assert row == {"impl": "naive", "N": 1 << 20, "error": "out of memory"}
    row = {"impl": "ok"}
    with oom_guard(row):
        row["ms"] = 1.0
    assert row == {"impl": "ok", "ms": 1.0}  # no error: the row is untouched
    with pytest.raises(ValueError, match="not memory"):
        with oom_guard({}, "cpu"):
            raise ValueError("not memory")
    free_cached("cpu")  # a no-op off CUDA
    free_cached(None)


# --- exercise checks --------------------------------------------------------------------------
@exercise_check
def _double_check(f):
    require(f(2) == 4, f"f(2) returned {f(2)!r}, expected 4")


def test_check_passes_and_logs(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("EFFDL_GRADE_LOG", str(log))
    _double_check(lambda x: 2 * x)
    assert "passed" in capsys.readouterr().out
    rec = json.loads(log.read_text())
    assert rec["check"] == "_double_check" and rec["passed"] is True


@pytest.mark.parametrize("student, hint", [
    (lambda x: x, "expected 4"),
    (lambda x: (_ for _ in ()).throw(NotImplementedError()), "not implemented"),
    (lambda x: 1 / 0, "ZeroDivisionError"),
])
def test_check_failures_are_helpful(student, hint, tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("EFFDL_GRADE_LOG", str(log))
    with pytest.raises(ExerciseFailed, match=hint):
        _double_check(student)
    assert json.loads(log.read_text())["passed"] is False


def test_assert_close_messages():
    assert_close(torch.ones(3), torch.ones(3), what="x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.ones(2), torch.ones(3), what="x")
    with pytest.raises(AssertionError, match="returned None"):
        assert_close(None, torch.ones(3), what="x")
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(torch.zeros(3), torch.ones(3), what="x")


def test_chapter_checks_lists_a_chapters_checks():
    from effdl.checks import chapter_checks

    assert chapter_checks("measuring") == list(chapters.module("measuring", "checks").__all__)
    with pytest.raises(ValueError, match="unknown chapter"):
        chapter_checks("cooking")


# --- show --------------------------------------------------------------------------------------
def test_show_source_renders_markdown():
    from effdl.measure import benchmark
    from effdl.show import _origin, _Source, source_of

    src = _Source(source_of(benchmark), _origin(benchmark))
    md = src._repr_markdown_()
    assert md.count("```") == 2 and "def benchmark(" in md and "effdl/measure.py" in md
    with pytest.raises(TypeError, match="source"):
        source_of(len)


# --- device ------------------------------------------------------------------------------------
def test_device_report(capsys):
    from effdl.device import report

    caps = report()
    out = capsys.readouterr().out
    assert "device:" in out and "size setting" in out
    if not torch.cuda.is_available():
        assert caps.device == "cpu" and not caps.triton_gpu and not caps.bf16


# --- data --------------------------------------------------------------------------------------
def test_digits_offline_split():
    from effdl.data import load_images

    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert len(train.y) + len(test.y) == 1797 and float(train.x.max()) == 1.0
    assert sorted(torch.unique(test.y).tolist()) == list(range(10))


def test_hub_schema_conversion():
    """The conversion code runs on a local dataset with the hub's schema (no hub reachable here)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from effdl.data import HUB_DATASETS, hub_to_tensors

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    ds = datasets.Dataset.from_dict({"img": imgs, "label": [0, 3, 3, 9, 1]}, features=features)
    data = hub_to_tensors(ds, HUB_DATASETS["cifar10"])
    assert data.x.shape == (5, 3, 32, 32) and data.y.tolist() == [0, 3, 3, 9, 1]
    assert data.classes[9] == "c9"
    np.testing.assert_allclose(data.x[2].permute(1, 2, 0).numpy() * 255, np.asarray(imgs[2]), atol=1e-3)
    with pytest.raises(ValueError, match="lacks column"):
        hub_to_tensors(ds, HUB_DATASETS["mnist"])


def test_offline_hub_gives_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    from effdl.data import DatasetUnavailable, load_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable, match="digits"):
        load_images("cifar10", cache_dir=str(tmp_path))


def test_data_bad_input():
    from effdl.data import class_balanced_subset, load_images

    with pytest.raises(ValueError, match="unknown dataset"):
        load_images("imagenet-99")
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "validation")
    x, y = torch.zeros(6, 1, 2, 2), torch.tensor([0, 0, 1, 1, 1, 2])
    with pytest.raises(ValueError, match="class 0 has only 2"):
        class_balanced_subset(x, y, 3)
    with pytest.raises(ValueError, match="disagree"):
        class_balanced_subset(x, y[:5], 1)
    xs, ys = class_balanced_subset(x, y, 1, seed=1)
    assert ys.tolist() == [0, 1, 2]


# --- explorer ----------------------------------------------------------------------------------
def test_explorer_always_draws_static_figures(monkeypatch):
    import matplotlib.pyplot as plt

    from effdl.plot import explorer

    drawn = []

    def draw(k):
        drawn.append(k)
        fig, ax = plt.subplots()
        ax.plot([0, k])
        return fig

    monkeypatch.setenv("EFFDL_SITE_BUILD", "1")
    assert explorer(draw, static=[{"k": 1}, {"k": 2}], k=(1, 5)) is None
    assert drawn == [1, 2]
    monkeypatch.delenv("EFFDL_SITE_BUILD")
    widget = explorer(draw, static=[{"k": 3}], k=(1, 5))
    assert drawn[:3] == [1, 2, 3] and widget is not None


def test_show_table_markdown_and_text():
    from effdl.show import show_table

    t = show_table([{"method": "dm", "acc": 85.123, "pub": None}, {"method": "ncfm", "acc": 83.7, "pub": 49.5}],
                   labels={"pub": "published"}, precision=1)
    md = t._repr_markdown_().splitlines()
    assert md[0] == "| method | acc | published |" and md[1] == "|---|---:|---:|"
    assert md[2] == "| dm | 85.1 | — |" and md[3] == "| ncfm | 83.7 | 49.5 |"
    assert repr(t).splitlines()[1].split() == ["dm", "85.1", "—"]
    with pytest.raises(TypeError, match="list of dicts"):
        show_table({"a": 1})


def test_runtime_dependencies_are_what_the_library_imports(root):
    """nbformat is imported by effdl.student/effdl.grade at import time; pandas is not used."""
    import tomllib

    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert "nbformat" in names and not names & {"pandas", "jinja2"}
    user = {line.strip() for line in (root / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert "nbformat" in user and not user & {"torch", "numpy", "ipywidgets", "pandas", "jinja2"}


def test_colab_runtime_is_within_the_declared_versions(root):
    """Colab's published stack (2026-08: Python 3.13, torch 2.11, ipywidgets 7.7.1) satisfies the
    package metadata, so installing the course there never replaces Colab's torch."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert Version("3.13") in Requirement(f"python{meta['requires-python'].split('#')[0]}").specifier
    colab = {"torch": "2.11.0", "ipywidgets": "7.7.1"}
    for dep in meta["dependencies"]:
        req = Requirement(dep)
        if req.name in colab:
            assert Version(colab[req.name]) in req.specifier, (dep, colab[req.name])
    # the oldest versions are declared, and the pinned set (what the tests run) is inside them
    floors = {Requirement(d).name: Requirement(d).specifier for d in meta["dependencies"]}
    for name in ("torch", "numpy", "matplotlib"):
        assert str(floors[name]).startswith(">="), f"{name}: declare the oldest supported version"
    pins = dict(line.split("==") for line in (root / "lib" / "requirements-lock.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("torch", "numpy", "matplotlib"):
        assert Version(pins[name].split()[0].split("+")[0]) in floors[name], (name, pins[name])
