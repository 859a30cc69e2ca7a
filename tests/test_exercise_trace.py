"""The exercise "Read a profile" (measuring): its shipped trace, its check, and the grader's path.

The check ``check_read_profile`` grades ``read_profile(events) -> (bottleneck, idle)`` on two synthetic
traces with hand-worked answers and on the trace the library ships (``SLOW_STEP_TRACE``).  Here: the
trace is small, plain data and properly nested; the notebook's stub fails and its solution passes; each
plausible mistake fails with the hint that names it; the library's own answer is refused; and under
``effdl.grade`` (the student's function in its own kernel, fed data only) the verdicts are the same.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nbformat
import pytest
import torch

from effdl.checks import ExerciseFailed
from effdl.measuring import checks, profiling
from effdl.measuring.profiling import SLOW_STEP_TRACE, complete_events, read_profile

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "measuring.ipynb"


def _cells(tag: str) -> str:
    """The source of the measuring notebook's cell tagged ``tag`` for this exercise."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    check = next(i for i, c in enumerate(code) if "checks.check_read_profile(" in c.source)
    return next(c.source for c in reversed(code[:check + 1]) if tag in c.metadata.get("tags", []))


def _defined(source: str):
    ns: dict = {"__name__": "notebook"}
    exec(source, ns)
    return ns["read_profile"]


# ------------------------------------------------------------------------------ the shipped trace
def test_the_shipped_trace_is_small_and_says_how_it_was_recorded():
    assert SLOW_STEP_TRACE.stat().st_size < 200 * 1024
    doc = json.loads(gzip.decompress(SLOW_STEP_TRACE.read_bytes()))
    meta = doc["effdl"]
    assert meta["recorded_by"] == "effdl.measuring.profiling.record_slow_step"
    assert set(meta) >= {"arguments", "what", "torch", "machine", "note"}


def test_the_events_are_plain_data_and_survive_the_graders_transport():
    events = complete_events()
    assert all(set(e) == {"name", "ts", "dur", "tid"} for e in events)
    assert all(isinstance(e["name"], str) and all(type(e[k]) is int for k in ("ts", "dur", "tid"))
               for e in events)
    assert events == sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    buf = io.BytesIO()
    torch.save(tuple([events]), buf)  # what effdl.grade sends to the student's kernel
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == (events,)


def test_the_shipped_trace_nests_without_ambiguity():
    """On every thread two events are either disjoint or one inside the other (so "starts inside" and
    "lies inside" agree), and no two events share both start and duration (so the parent is clear)."""
    events = complete_events()
    for tid in {e["tid"] for e in events}:
        for e, parent in profiling._nest(events, tid):
            assert e["dur"] > 0, e
            if parent is not None:
                p = profiling._nest(events, tid)[parent][0]
                assert p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"], (p, e)
                assert (p["ts"], p["dur"]) != (e["ts"], e["dur"]), (p, e)


def test_the_shipped_trace_tells_the_story_the_solution_tells():
    """By self time ``load_batch``; by total time ``model``; over every thread the logging thread's SVD;
    the main thread idle about a third of the step (waiting for that thread)."""
    events = complete_events()
    main = profiling.main_thread(events)
    name, idle = read_profile(events)
    assert name == "load_batch" and 0.25 < idle < 0.45, (name, idle)
    total: dict = {}
    for e in events:
        if e["tid"] == main:
            total[e["name"]] = total.get(e["name"], 0) + e["dur"]
    assert max(total, key=total.get) == "model"
    every: dict = {}
    for tid in {e["tid"] for e in events}:
        for k, v in profiling.self_times(events, tid).items():
            every[k] = every.get(k, 0) + v
    assert "svd" in max(every, key=every.get)


def test_a_fresh_recording_reads_back(tmp_path):
    path = profiling.record_slow_step(tmp_path / "trace.json.gz", batch=16, width=64, warmup=1,
                                      note="a test")
    doc = json.loads(gzip.decompress(path.read_bytes()))
    assert doc["effdl"]["arguments"]["batch"] == 16 and doc["effdl"]["note"] == "a test"
    events = complete_events(path)
    name, idle = read_profile(events)
    assert name in {e["name"] for e in events} and 0.0 <= idle < 1.0
    assert {"load_batch", "model", "forward", "backward"} <= {e["name"] for e in events}


def test_the_synthetic_answers_are_the_references():
    for what, rows, name, idle in checks._TRACES:
        got = read_profile(checks._trace(rows))
        assert got[0] == name and got[1] == pytest.approx(idle, abs=1e-12), what


# ------------------------------------------------------------------------------ the notebook's cells
def test_the_stub_fails_and_the_solution_passes():
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        checks.check_read_profile(_defined(_cells("exercise")))
    checks.check_read_profile(_defined(_cells("solution")))


# ------------------------------------------------------------------------------ plausible mistakes
def _read(events, *, self_time=True, main_only=True, nested_cover=False, scale=None, percent=False,
          busy=False, per_event=False, main="first"):
    """A student's ``read_profile`` with one mistake switched on (none: a correct answer)."""
    tid = events[0]["tid"] if main == "first" else min(e["tid"] for e in events)
    threads = [tid] if main_only else sorted({e["tid"] for e in events})
    own: dict = {}
    total: dict = {}
    covered, spans = 0, []
    for t in threads:
        mine = [e for e in events if e["tid"] == t]
        stack: list = []
        for e in mine:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                stack[-1][1] -= e["dur"]
            else:
                spans.append((e["ts"], e["ts"] + e["dur"]))
            if nested_cover or not stack:
                covered += e["dur"]
            cell = [e, e["dur"]]
            stack.append(cell)
            total[e["name"]] = total.get(e["name"], 0) + e["dur"]
            own.setdefault(e["name"], []).append(cell)
    score = {n: (max(c[1] for c in cs) if per_event else sum(c[1] for c in cs)) for n, cs in own.items()}
    pick = score if self_time else total
    mine = [e for e in events if e["tid"] == tid]
    span = max(e["ts"] + e["dur"] for e in mine) - mine[0]["ts"]
    if not main_only:  # the union of every thread's top-level events
        union, reach = 0, 0
        for a, b in sorted(spans):
            if b > reach:
                union, reach = union + b - max(a, reach), b
        covered = union
    idle = 1 - covered / span
    if scale is not None:
        idle = (span - covered) / scale
    if percent:
        idle *= 100
    if busy:
        idle = 1 - idle
    return max(pick, key=pick.get), idle


MISTAKES = [
    (dict(self_time=False), "largest total time"),
    (dict(per_event=True), "single event"),
    (dict(main_only=False), "read the main thread only"),
    (dict(main="smallest tid"), "that is the bottleneck of thread 3; the main thread is"),
    (dict(nested_cover=True), "nested ones too"),
    (dict(scale=1), "in nanoseconds, not a fraction"),
    (dict(scale=1e9), "in seconds, not a fraction"),
    (dict(percent=True), "percentage"),
    (dict(busy=True), "busy fraction"),
]


def test_the_mistake_model_is_right_without_a_mistake():
    checks.check_read_profile(lambda events: _read(events))


@pytest.mark.parametrize("mistake, match", MISTAKES, ids=[m for _, m in MISTAKES])
def test_a_plausible_mistake_fails_and_says_which(mistake, match):
    with pytest.raises(ExerciseFailed, match=match):
        checks.check_read_profile(lambda events: _read(events, **mistake))


def test_other_threads_in_the_idle_fraction_alone_say_so():
    def idle_over_all_threads(events):
        name, _ = _read(events)
        return name, _read(events, main_only=False)[1]

    with pytest.raises(ExerciseFailed, match="other threads' events filled the main thread's gaps"):
        checks.check_read_profile(idle_over_all_threads)


def test_a_wrong_shape_of_answer_says_what_to_return():
    with pytest.raises(ExerciseFailed, match=r"return \(bottleneck name, idle fraction\)"):
        checks.check_read_profile(lambda events: _read(events)[0])
    with pytest.raises(ExerciseFailed, match="expected a number"):
        checks.check_read_profile(lambda events: (_read(events)[0], "a third"))


# ------------------------------------------------------------------------------ the library's answer
def test_the_library_answer_is_refused():
    with pytest.raises(ExerciseFailed, match="library's own"):
        checks.check_read_profile(read_profile)

    def calls(events):
        tid = events[0]["tid"]
        own = profiling.self_times(events, tid)
        return max(own, key=own.get), 0.0

    with pytest.raises(ExerciseFailed, match="calls the library's"):
        checks.check_read_profile(calls)


# ------------------------------------------------------------------------------ the grader's path
def _submission(tmp_path: Path, source: str) -> Path:
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("from effdl.measuring import checks"),
                             new_code_cell(source, metadata={"tags": ["exercise"]})])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["effdl"] = {"chapter": "measuring"}
    path = tmp_path / "submission.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_the_grader_feeds_data_and_judges_in_its_own_process(tmp_path):
    from effdl.grade import grade

    report = grade(_submission(tmp_path, _cells("solution")), cell_timeout=60)
    outcome = {c.name: c for c in report.checks}["check_read_profile"]
    assert outcome.passed, report.table()

    wrong = _cells("solution").replace("return max(own, key=own.get), 1 - busy / span",
                                       "return max(own, key=own.get), (span - busy) / 1e9")
    assert wrong != _cells("solution")
    report = grade(_submission(tmp_path, wrong), cell_timeout=60)
    outcome = {c.name: c for c in report.checks}["check_read_profile"]
    assert not outcome.passed and "in seconds, not a fraction" in outcome.message, report.table()
