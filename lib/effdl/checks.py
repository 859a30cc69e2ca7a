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

Every check refuses the library's own answer.  A chapter's checks module declares which library
functions answer each check, ``REVEALS = {"check_x": ["effdl.<chapter>.<module>.x"], ...}``
(dotted paths); :func:`judge` fails a student function that *is* one of them, is any
function of ``effdl``, has the same code (a pasted copy) or calls one of them.  The same mapping
tells :mod:`effdl.student` which ``show_source(...)`` cells to hold back until after the check.
"""

from __future__ import annotations

import ast
import builtins
import dis
import functools
import importlib
import inspect
import json
import os
import sys
import textwrap
import time
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ExerciseFailed", "StudentCodeError", "exercise_check", "judge", "observe", "assert_close", "require",
           "chapter_checks", "answer_paths", "resolve", "library_answer", "same", "when_solved"]

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
        refused = observe(student_fn, _library_probe, answer_paths(check))
        if refused:
            raise AssertionError(refused)
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


def assert_close(got: Any, expected: Any, *, what: str, rtol: float = 1e-4, atol: float = 1e-5,
                 hint: str | Callable[[], str] = "") -> None:
    """Compare tensors/numbers; the message names ``what``, the shapes and the largest error.

    ``hint`` (a string, or a function returning one, called only on a mismatch) is added to the
    message: what the mistake probably is, when the check recognises the wrong answer."""
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected, dtype=torch.float64)
    if got is None:
        raise AssertionError(f"{what}: your function returned None (did you forget `return`?)")
    try:
        # why float64 for Python numbers: torch.as_tensor(0.1) would round it to float32
        got_t = got if isinstance(got, torch.Tensor) else torch.as_tensor(got, dtype=torch.float64)
    except Exception as exc:
        raise AssertionError(f"{what}: expected a tensor or number, got {type(got).__name__}") from exc
    def why() -> str:
        try:
            text = hint() if callable(hint) else hint
        except Exception:  # a hint that cannot read this answer says nothing
            text = ""
        return f"; {text}" if text else ""

    if got_t.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got_t.shape)}, expected {tuple(expected.shape)}{why()}")
    g, e = got_t.double(), expected.double()
    if not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=False):
        if not torch.isfinite(g).all() and torch.isfinite(e).all():
            raise AssertionError(f"{what}: your result has NaN or inf where the reference is finite{why()}")
        err = (g - e).abs().max().item()
        raise AssertionError(
            f"{what}: values differ from the reference (max abs error {err:.3g}, "
            f"tolerance rtol={rtol:g}, atol={atol:g}){why()}"
        )


def same(got: Any, expected: Any, *, rtol: float = 1e-6, atol: float = 1e-8) -> bool:
    """Quietly: does ``got`` equal ``expected`` (tensors, numbers, or tuples of them) within the
    tolerances?  For recognising a known wrong answer and naming it in a hint."""
    if isinstance(expected, (tuple, list)):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(same(g, e, rtol=rtol, atol=atol) for g, e in zip(got, expected)))
    try:
        g = got if isinstance(got, torch.Tensor) else torch.as_tensor(got, dtype=torch.float64)
        e = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=torch.float64)
        return g.shape == e.shape and bool(torch.allclose(g.double(), e.double(), rtol=rtol, atol=atol))
    except Exception:
        return False


class when_solved:  # noqa: N801 - used as `with checks.when_solved():`, like a statement
    """``with checks.when_solved(): ...`` around a cell that runs an experiment with an exercise's
    function: until that exercise is solved (its stub raises ``NotImplementedError``) the cell prints
    one line instead of failing.  Any other error goes through."""

    message = "solve the exercise above to run this with your function"

    def __enter__(self) -> when_solved:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, NotImplementedError):
            print(self.message)
            return True
        return False


# ------------------------------------------------------------------ the library's own answers
def answer_paths(check: Callable[..., Any]) -> list[str]:
    """Dotted paths of the library functions that answer ``check`` (its module's ``REVEALS``)."""
    fn = inspect.unwrap(check)
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    return list(getattr(module, "REVEALS", {}).get(getattr(fn, "__name__", ""), ()))


def resolve(path: str) -> Any:
    """The object at a dotted path such as ``effdl.attention.softmax.online_softmax``."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"nothing at {path!r}")


def _plain_function(fn: Any) -> Any:
    """The Python function behind ``fn`` (partials, wrappers and bound methods unwrapped)."""
    for _ in range(10):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            break
    return fn


def _code_key(code: types.CodeType, doc: str | None = None) -> tuple:
    """What makes two functions' code the same: bytecode, constants (the docstring left out,
    nested code compared the same way) and the names it uses.  Names of local variables, comments
    and the function's own name do not count."""
    consts = []
    for i, c in enumerate(code.co_consts):
        if isinstance(c, types.CodeType):
            consts.append(_code_key(c))
        elif i == 0 and (c is None or (doc is not None and c == doc)):
            consts.append(None)  # the docstring slot: a copy without its docstring is the same code
        else:
            consts.append((type(c).__name__, repr(c)))
    return code.co_code, tuple(consts), code.co_names


def _body_lines(fn: Any) -> tuple[str, ...] | None:
    """The lines of ``fn``'s body (comments included, docstring and signature left out), stripped."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        node = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return None
    lines = src.splitlines()[body[0].lineno - 1: body[-1].end_lineno]
    return tuple(ln.strip() for ln in lines if ln.strip())


def _statements(fn: Any) -> int:
    lines = _body_lines(fn)
    try:
        tree = ast.parse("\n".join(lines or ()))
    except SyntaxError:
        return 0
    return sum(1 for _ in ast.walk(tree) if isinstance(_, ast.stmt))


def _referenced(fn: types.FunctionType) -> list[Any]:
    """The objects ``fn``'s code loads by name (globals, closure cells, builtins) and the attribute
    chains it reads from them (``att.online_softmax``), in nested code too."""
    closure = {}
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            try:
                closure[name] = cell.cell_contents
            except ValueError:  # an empty cell
                pass
    found: list[Any] = []

    def walk(code: types.CodeType) -> None:
        obj: Any = None
        local: dict[str, Any] = {}  # names bound by imports inside the function
        top: Any = None  # `import a.b` binds the package a
        for ins in dis.get_instructions(code):
            if ins.opname == "IMPORT_NAME":
                obj, top = sys.modules.get(ins.argval), sys.modules.get(ins.argval.split(".")[0])
            elif ins.opname == "IMPORT_FROM" and obj is not None:
                top = None
                if hasattr(obj, ins.argval):
                    obj = getattr(obj, ins.argval)
                elif ins.argval not in str(getattr(obj, "__name__", "")).split("."):  # `import a.b as c`
                    obj = None
            elif ins.opname in ("SWAP", "POP_TOP", "ROT_TWO") and obj is not None:
                continue
            elif ins.opname in ("STORE_FAST", "STORE_NAME") and obj is not None:
                local[ins.argval] = top if top is not None else obj
                found.append(local[ins.argval])
                obj = top = None
            elif ins.opname == "LOAD_FAST" and ins.argval in local:
                obj = local[ins.argval]
            elif ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"):
                name = ins.argval
                sentinel = object()
                obj = closure.get(name, fn.__globals__.get(name, getattr(builtins, name, sentinel)))
                obj = None if obj is sentinel else obj
                if obj is not None:
                    found.append(obj)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and obj is not None:
                obj = getattr(obj, ins.argval, None)
                if obj is not None:
                    found.append(obj)
            else:
                obj = None
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                walk(c)

    walk(fn.__code__)
    return found


def library_answer(student_fn: Any, answers: list[Any]) -> str | None:
    """Why ``student_fn`` is the library's answer rather than the student's own, or None.

    Refused: one of ``answers`` itself; any function of ``effdl``; a function with the same code as
    an answer (compared as bytecode and constants for answers of three statements or more, as source
    lines, comments included, for shorter ones, which a student may well write the same way); a
    function that calls an answer."""
    fn = _plain_function(student_fn)
    for obj in answers:
        if fn is _plain_function(obj):
            return (f"this is the library's own `{obj.__qualname__}` ({obj.__module__}), not your function: "
                    "pass the function you wrote in the exercise cell")
    module = str(getattr(fn, "__module__", "") or "")
    if module.split(".")[0] == "effdl":
        return (f"`{getattr(fn, '__qualname__', fn)!s}` is a function of the library ({module}), not yours: "
                "pass the function you wrote in the exercise cell")
    if not isinstance(fn, types.FunctionType):
        return None
    mine = _code_key(fn.__code__, fn.__doc__)
    my_lines = _body_lines(fn)
    for obj in answers:
        ref = _plain_function(obj)
        if not isinstance(ref, types.FunctionType):
            continue
        same_code = _statements(ref) >= 3 and mine == _code_key(ref.__code__, ref.__doc__)
        if same_code or (my_lines is not None and my_lines == _body_lines(ref)):
            return (f"your function has the same code as the library's `{ref.__qualname__}` "
                    f"({ref.__module__}): the exercise asks you to write it yourself")
    used = _referenced(fn)
    for obj in answers:
        if any(u is obj or u is _plain_function(obj) for u in used):
            return (f"your function calls the library's `{obj.__qualname__}` ({obj.__module__}), which is "
                    "the answer to this exercise: write it yourself")
    return None


def _library_probe(student_fn: Any, paths: list[str]) -> str | None:
    """Driver (runs where the student's code lives): :func:`library_answer` for the answers at
    ``paths``; returns its message or None."""
    return library_answer(student_fn, [resolve(p) for p in paths])
