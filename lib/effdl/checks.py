"""Exercise checks: the machinery every chapter's checks share.

Each chapter keeps its checks in ``effdl.<chapter>.checks`` (its ``__all__`` lists
them); a notebook calls them as ``checks.check_online_softmax(my_online_softmax)``
after ``from effdl.attention import checks``.  A check is a function
``check(student_fn) -> None`` decorated with :func:`exercise_check`.  It calls the
student's function on random inputs, compares with the library's reference, and either
prints a one-line success or raises :class:`ExerciseFailed` with a message that helps
(what input, what was expected, what came back).  Every outcome is also appended, as
one JSON line, to the file named by ``$EFFDL_GRADE_LOG`` when it is set: that is how
:mod:`effdl.grade` scores a notebook.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ExerciseFailed", "exercise_check", "assert_close", "require", "chapter_checks"]

GRADE_LOG_ENV = "EFFDL_GRADE_LOG"


def chapter_checks(chapter: str) -> list[str]:
    """Names of the checks of one chapter: ``effdl.<chapter>.checks.__all__``."""
    from effdl import chapters

    return list(chapters.module(chapter, "checks").__all__)


class ExerciseFailed(AssertionError):
    """Raised by a check when the student's answer is wrong (or not written yet)."""


def _record(name: str, passed: bool, message: str) -> None:
    path = os.environ.get(GRADE_LOG_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"check": name, "passed": passed, "message": message, "time": time.time()}) + "\n")


def exercise_check(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn ``fn(student_fn, ...)`` (which raises AssertionError on a wrong answer) into a check."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except NotImplementedError:
            msg = "not implemented yet: replace the `raise NotImplementedError` in the exercise cell"
            _record(name, False, msg)
            raise ExerciseFailed(f"✗ {name}: {msg}") from None
        except AssertionError as exc:
            msg = str(exc) or "wrong answer"
            _record(name, False, msg)
            raise ExerciseFailed(f"✗ {name}: {msg}") from None
        except Exception as exc:  # the student's code crashed: say where, keep the traceback
            msg = f"your function raised {type(exc).__name__}: {exc}"
            _record(name, False, msg)
            raise ExerciseFailed(f"✗ {name}: {msg}") from exc
        _record(name, True, "passed")
        print(f"✓ {name}: passed")

    wrapper.is_exercise_check = True  # type: ignore[attr-defined]
    return wrapper


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
