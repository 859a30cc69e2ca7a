"""Exercise checks: the machinery every chapter's checks share.

Each chapter keeps its checks in ``effdl.<chapter>.checks`` (its ``__all__`` lists
them); a notebook calls them as ``checks.check_online_softmax(my_online_softmax)``
after ``from effdl.attention import checks``.  A check is a function
``check(student_fn) -> None`` decorated with :func:`exercise_check`.  It calls the
student's function on random inputs, compares with the library's reference, and either
prints a one-line success or raises :class:`ExerciseFailed` with a message that helps
(what input, what was expected, what came back).

``@exercise_check(student="my_online_softmax")`` names the notebook function the check
grades.  :mod:`effdl.grade` runs the check in its own process with a stand-in for that
function: each call's arguments go to the student's kernel as data, the answer comes
back as data, and every comparison happens in the grader, where the submission cannot
reach.  Arguments that are not data (a fake device, callables, a module and its
optimizer) are built on the student's side by a *driver* (see :func:`observe`), which
returns what it observed, as data, to be judged here.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ExerciseFailed", "StudentCodeError", "exercise_check", "judge", "observe", "assert_close", "require",
           "chapter_checks"]

GRADE_LOG_ENV = "EFFDL_GRADE_LOG"


def chapter_checks(chapter: str) -> list[str]:
    """Names of the checks of one chapter: ``effdl.<chapter>.checks.__all__``."""
    from effdl import chapters

    return list(chapters.module(chapter, "checks").__all__)


class ExerciseFailed(AssertionError):
    """Raised by a check when the student's answer is wrong (or not written yet)."""


def _record(name: str, passed: bool, message: str) -> None:
    """Append the outcome to ``$EFFDL_GRADE_LOG`` when set: feedback for whoever runs the notebook.
    :mod:`effdl.grade` never reads it (the submission could write anything there)."""
    path = os.environ.get(GRADE_LOG_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"check": name, "passed": passed, "message": message, "time": time.time()}) + "\n")


class StudentCodeError(Exception):
    """The student's code could not give an answer (it raised, hung or ended its process); the
    message is ready to show.  Raised by the grader's stand-in for a student's function."""


NOT_IMPLEMENTED = "not implemented yet: replace the `raise NotImplementedError` in the exercise cell"


def judge(check: Callable[..., None], student_fn: Any) -> tuple[bool, str, BaseException | None]:
    """Run the undecorated ``check(student_fn)``: ``(passed, message, exception to chain or None)``."""
    try:
        check(student_fn)
    except NotImplementedError:
        return False, NOT_IMPLEMENTED, None
    except StudentCodeError as exc:
        return False, str(exc), None
    except AssertionError as exc:
        return False, str(exc) or "wrong answer", None
    except Exception as exc:  # the student's code crashed: say where, keep the traceback
        return False, f"your function raised {type(exc).__name__}: {exc}", exc
    return True, "passed", None


def exercise_check(fn: Callable[..., None] | None = None, *, student: str | None = None):
    """Turn ``fn(student_fn)`` (which raises AssertionError on a wrong answer) into a check.

    ``student`` is the name of the notebook function the check grades (``effdl.grade`` looks it
    up by this name, never by what the submission passes).  Use as ``@exercise_check`` or
    ``@exercise_check(student="my_fn")``.
    """
    if fn is None:
        return functools.partial(exercise_check, student=student)
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(student_fn: Any) -> None:
        passed, msg, cause = judge(fn, student_fn)
        _record(name, passed, msg)
        if not passed:
            raise ExerciseFailed(f"✗ {name}: {msg}") from cause
        print(f"✓ {name}: passed")

    wrapper.is_exercise_check = True  # type: ignore[attr-defined]
    wrapper.student = student  # type: ignore[attr-defined]
    wrapper.judge = functools.partial(judge, fn)  # type: ignore[attr-defined]
    return wrapper


def observe(student_fn: Any, driver: Callable[..., Any], *args: Any) -> Any:
    """``driver(student_fn, *args)``, run where the student's code lives; returns what it observed.

    For a check whose student function takes things that are not data (a fake device, callables,
    an ``nn.Module`` and its optimizer): ``driver`` is a module-level function that builds them
    from ``args`` (plain data), calls the student's function and returns its observations as data.
    In a notebook this is a plain call.  Under :mod:`effdl.grade` the stand-in for the student's
    function runs the driver in the student's kernel; only the returned data comes back, and the
    check judges it in the grader.
    """
    remote = getattr(student_fn, "effdl_observe", None)
    if remote is not None and getattr(student_fn, "is_grader_stand_in", False):
        return remote(driver, args)
    return driver(student_fn, *args)


def require(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O`` and carries a helpful message."""
    if not condition:
        raise AssertionError(message)


def assert_close(got: Any, expected: Any, *, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Compare tensors/numbers; the message names ``what``, the shapes and the largest error."""
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected, dtype=torch.float64)
    if got is None:
        raise AssertionError(f"{what}: your function returned None (did you forget `return`?)")
    try:
        # why float64 for Python numbers: torch.as_tensor(0.1) would round it to float32
        got_t = got if isinstance(got, torch.Tensor) else torch.as_tensor(got, dtype=torch.float64)
    except Exception as exc:
        raise AssertionError(f"{what}: expected a tensor or number, got {type(got).__name__}") from exc
    if got_t.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got_t.shape)}, expected {tuple(expected.shape)}")
    g, e = got_t.double(), expected.double()
    if not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=False):
        err = (g - e).abs().max().item()
        raise AssertionError(
            f"{what}: values differ from the reference (max abs error {err:.3g}, "
            f"tolerance rtol={rtol:g}, atol={atol:g})"
        )
