"""Grade a submitted notebook: ``python -m effdl.grade SUBMISSION.ipynb [--json] [--timeout S]``.

The submission runs top to bottom in a fresh kernel, in a temporary directory, with a per-cell and a
whole-notebook timeout.  Then the grader scores it **in its own process**: for each of the chapter's
checks (``effdl.<chapter>.checks.__all__``, the chapter from ``--chapter`` or the notebook's
``effdl.chapter`` metadata) it runs the check's code here, with a stand-in for the student's function.
The function is found in the kernel by the name the check declares (``@exercise_check(student=...)``),
not by anything the submission says.  Each call's arguments go to the kernel as a file of data
(``torch.save``); the kernel calls the student's function and saves the answer; the grader reads it back
with ``torch.load(weights_only=True)`` (tensors, numbers, strings, tuples, lists, dicts: no code) and
the check compares it with the library's reference here.  What the submission prints, writes to files or
monkeypatches in its kernel (``torch.allclose``, the checks themselves) does not reach the comparisons.

**This runs untrusted code.** The verdicts cannot be forged from inside the notebook's Python, but the
kernel runs as your user: it can read and write your files and signal your processes.  Grade inside a
container or a throw-away VM with the library read-only, never on a machine with secrets.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import queue
import re
import secrets
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat

CHECK_CALL = re.compile(r"^\s*(?:[\w.]*checks\.)?(\w+)\s*\(", re.MULTILINE)
MAX_ANSWER_BYTES = 64 * 2**20  # an answer file larger than this is refused unread
NEVER_RAN = "never ran (the kernel could not be started, or the grading time ran out)"


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    message: str


@dataclass
class GradeReport:
    notebook: str
    chapter: str | None
    score: int
    max_score: int
    checks: list[CheckOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.score / self.max_score if self.max_score else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["percent"] = round(self.percent, 1)
        return d

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"{self.notebook}: {self.score}/{self.max_score} ({self.percent:.0f}%)", ""]
        lines += [f"  {'✓' if c.passed else '✗'} {c.name.ljust(width)}  {c.message}" for c in self.checks]
        if self.errors:
            lines += ["", "errors:"] + [f"  - {e}" for e in self.errors]
        return "\n".join(lines)


def expected_checks(nb: nbformat.NotebookNode, chapter: str | None = None) -> tuple[str | None, list[str]]:
    """(chapter, names of the checks a complete notebook passes), from the library.

    ``chapter`` (the instructor's word) wins over the notebook's ``effdl.chapter`` metadata.  Without
    a chapter there is no trusted list of checks: ``(None, [])``.
    """
    chapter = chapter or (nb.metadata.get("effdl") or {}).get("chapter")
    if not chapter:
        return None, []
    from effdl.checks import chapter_checks

    return chapter, chapter_checks(chapter)  # ValueError for an unknown chapter


# ------------------------------------------------------------------------------------ the kernel
#: run in every grading kernel before the notebook: a stray ``exit()`` / ``quit()`` (which ends an
#: IPython kernel after the cell) must not lose the functions defined above it
PREAMBLE = "get_ipython().ask_exit = lambda: print('exit() does nothing while the notebook is graded')"

@dataclass
class Ran:
    """What one execution request came to: ``ok``, ``error`` (with ``detail``), ``timeout`` (the
    kernel was interrupted and is idle again) or ``dead`` (it exited, or ignored the interrupt and was
    stopped; its variables are gone)."""

    status: str
    detail: str = ""


class Kernel:
    """One IPython kernel driven over jupyter_client: run code with a timeout, survive its death."""

    interrupt_grace_s = 10.0  # how long an interrupted cell may take to stop before the kernel is stopped

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.km: Any = None
        self.kc: Any = None

    def start(self) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        # why DEVNULL: the kernel must not write into the grader's stdout (the --json report)
        self.km.start_kernel(cwd=str(self.workdir), env=self.env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.run(PREAMBLE, 60, silent=True)

    def close(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # already gone
                pass
        self.km = self.kc = None

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def run(self, code: str, timeout: float, *, silent: bool = False) -> Ran:
        """Execute ``code``; wait at most ``timeout`` s, then interrupt (and stop it if it ignores that)."""
        if not self.alive():
            return Ran("dead")
        # why stop_on_error=False: otherwise the kernel aborts a request that arrives right after an error
        msg_id = self.kc.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                                 stop_on_error=False)
        reply = self._reply(msg_id, time.monotonic() + timeout)
        if reply is not None:
            return reply
        self.km.interrupt_kernel()  # past its time: interrupt, give it a moment to stop
        reply = self._reply(msg_id, time.monotonic() + self.interrupt_grace_s)
        if reply is None:  # it ignored the interrupt: stop it
            self.close()
            return Ran("dead", "did not stop when interrupted")
        return reply if reply.status == "dead" else Ran("timeout")

    def _reply(self, msg_id: str, deadline: float) -> Ran | None:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 0.5))
            except queue.Empty:
                if not self.alive():
                    return Ran("dead")
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if content.get("status") == "ok":
                return Ran("ok")
            if content.get("status") == "aborted":
                return Ran("error", "the kernel skipped this cell (aborted)")
            return Ran("error", f"{content.get('ename', 'Error')}: {content.get('evalue', '')}")
        return None


class Session:
    """A submission's kernel and the cells that ran in it; after a death, a new kernel replays them."""

    max_revivals = 8  # a notebook that keeps ending its kernel is not replayed forever

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.kernel = Kernel(workdir, env)
        self.history: list[str] = []  # cells that finished (with or without an error), in order
        self.revivals = 0
        self.deadline = float("inf")
        self.cell_timeout = 120.0

    def run_cells(self, sources: list[str], cell_timeout: float, total_timeout: float) -> list[str]:
        """Run every cell, top to bottom; return error summaries.  Never raises for the submission."""
        self.cell_timeout, self.deadline = cell_timeout, time.monotonic() + total_timeout
        errors: list[str] = []
        try:
            self.kernel.start()
        except Exception as exc:
            self.revivals = self.max_revivals  # no point in trying again for every check
            return [f"the kernel could not be started: {type(exc).__name__}: {exc}"[:300]]
        for i, src in enumerate(sources):
            left = self.deadline - time.monotonic()
            if left <= 0:
                errors.append(f"the notebook did not finish within {total_timeout:g} s (endless loop?); "
                              "graded what ran")
                break
            ran = self.kernel.run(src, min(cell_timeout, left))
            if ran.status in ("ok", "error"):
                self.history.append(src)
                if ran.status == "error":
                    errors.append(f"cell {i}: {ran.detail}"[:300])
            elif ran.status == "timeout":
                errors.append(f"cell {i}: timed out after {min(cell_timeout, left):.0f} s (endless loop?)")
            else:
                why = (f"timed out after {min(cell_timeout, left):.0f} s and {ran.detail}" if ran.detail
                       else "the kernel stopped (os._exit, exit(), a crash)")
                errors.append(f"cell {i}: {why}; a new kernel re-ran the cells before it and went on")
                if not self.revive():
                    errors.append("the cells before it could not be re-run; graded what there is")
                    break
        return errors

    def revive(self) -> bool:
        """A new kernel with the cells that ran replayed (each once, within the time left)."""
        self.kernel.close()
        if self.revivals >= self.max_revivals:
            return False
        self.revivals += 1
        try:
            self.kernel.start()
        except Exception:
            return False
        for src in self.history:
            left = self.deadline - time.monotonic()
            if left <= 0 or self.kernel.run(src, min(self.cell_timeout, left)).status not in ("ok", "error"):
                self.kernel.close()
                return False
        return self.kernel.alive()

    def close(self) -> None:
        self.kernel.close()


# ------------------------------------------------------------------ the student's side of a call
def _as_data(x: Any) -> Any:
    """``x`` as plain data ``torch.load(weights_only=True)`` accepts; TypeError for anything else."""
    import numpy as np
    import torch

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x))
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return tuple(_as_data(v) for v in x)  # named tuples become plain ones
    if isinstance(x, list):
        return [_as_data(v) for v in x]
    if isinstance(x, dict):
        return {_as_data(k): _as_data(v) for k, v in x.items()}
    raise TypeError(f"a {type(x).__name__}, which is not plain data (tensors, numbers, strings, "
                    "tuples, lists, dicts)")


def _answer(ns: dict, name: str, driver: str | None, in_path: str, out_path: str) -> None:
    """Runs in the student's kernel: call ``ns[name]`` (through ``driver``) on the saved arguments and
    save the answer.  Whatever happens here only decides what data comes back to the grader."""
    import torch

    try:
        args = torch.load(in_path, weights_only=True)
        fn = ns.get(name)
        if not callable(fn):
            raise LookupError(f"there is no function `{name}` in the notebook (the exercise cell defines it)")
        if str(getattr(fn, "__module__", "")).split(".")[0] == "effdl":
            raise LookupError(f"`{name}` is the library's own function, not yours: the exercise cell that "
                              "defines it is missing")
        if driver:
            module, _, attr = driver.partition(":")
            value = getattr(importlib.import_module(module), attr)(fn, *args)
        else:
            value = fn(*args)
        try:
            doc = {"status": "ok", "value": _as_data(value)}
        except TypeError as exc:
            doc = {"status": "not-data", "message": str(exc)}
    except LookupError as exc:
        doc = {"status": "missing", "message": str(exc)}
    except NotImplementedError:
        doc = {"status": "raised", "kind": "NotImplementedError", "message": ""}
    except (Exception, SystemExit) as exc:
        doc = {"status": "raised", "kind": type(exc).__name__, "message": str(exc)[:500]}
    torch.save(doc, out_path)


# --------------------------------------------------------------------- the grader's side of a call
class StandIn:
    """Stands in, in the grader, for the notebook's function ``name``: a call sends its arguments to
    the kernel as data and returns the data that comes back."""

    is_grader_stand_in = True

    def __init__(self, session: Session, name: str, calls_dir: Path, deadline: float):
        self.session, self.name, self.calls_dir, self.deadline = session, name, calls_dir, deadline

    def __call__(self, *args: Any) -> Any:
        return self.effdl_observe(None, args)

    def effdl_observe(self, driver: Any, args: tuple) -> Any:
        import torch

        from effdl.checks import StudentCodeError

        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StudentCodeError("not graded: the grading time ran out before this check")
        if not self.session.kernel.alive() and not self.session.revive():
            raise StudentCodeError("the notebook's kernel had stopped, so your function could not be called")
        token = secrets.token_hex(8)
        in_path, out_path = self.calls_dir / f"{token}.in.pt", self.calls_dir / f"{token}.out.pt"
        torch.save(tuple(args), in_path)
        ref = f"{driver.__module__}:{driver.__name__}" if driver is not None else None
        code = (f"__import__('effdl.grade', fromlist=['_answer'])._answer(globals(), {self.name!r}, {ref!r}, "
                f"{str(in_path)!r}, {str(out_path)!r})")
        timeout = min(self.session.cell_timeout, left)
        ran = self.session.kernel.run(code, timeout, silent=True)
        if ran.status == "timeout":
            raise StudentCodeError(f"your function did not return within {timeout:.0f} s (endless loop?)")
        if ran.status == "dead":
            self.session.revive()
            raise StudentCodeError("your function ended the notebook's Python process (os._exit, exit(), "
                                   "a crash) or did not stop when interrupted")
        if ran.status == "error" or not out_path.is_file():
            raise StudentCodeError(f"your function could not be called ({ran.detail or 'no answer came back'})")
        if out_path.stat().st_size > MAX_ANSWER_BYTES:
            raise StudentCodeError(f"your function's answer is larger than {MAX_ANSWER_BYTES >> 20} MB")
        try:
            doc = torch.load(out_path, weights_only=True)
            status = doc["status"]
        except Exception as exc:
            raise StudentCodeError(f"your function's answer could not be read as data ({type(exc).__name__})") from None
        finally:
            in_path.unlink(missing_ok=True)
            out_path.unlink(missing_ok=True)
        if status == "ok":
            return doc.get("value")
        message = str(doc.get("message", ""))
        if status == "raised":
            kind = str(doc.get("kind", "Exception"))
            if kind == "NotImplementedError":
                raise NotImplementedError
            if kind == "AssertionError":
                raise AssertionError(message)
            raise StudentCodeError(f"your function raised {kind}: {message}")
        if status == "not-data":
            raise StudentCodeError(f"your function returned {message}")
        raise StudentCodeError(message or "your function gave no answer")


def _preload(module: Any) -> None:
    """Import now every ``effdl`` module the checks import inside their functions, so that nothing the
    kernel writes to disk later can change the grader's code."""
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effdl"):
            importlib.import_module(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("effdl"):
                    importlib.import_module(alias.name)


def _student_name(check: Any, name: str, nb: nbformat.NotebookNode) -> str | None:
    """The function ``check`` grades: declared by the check; for a check that declares none, the name its
    check cell passes (a weaker source: the submission names it)."""
    declared = getattr(check, "student", None)
    if declared:
        return declared
    call = re.compile(rf"\b{re.escape(name)}\s*\(\s*([A-Za-z_]\w*)\s*\)")
    for cell in nb.cells:
        if cell.cell_type == "code" and (m := call.search(cell.source)):
            return m.group(1)
    return None


def grade(path: str | Path, *, cell_timeout: int = 120, total_timeout: int = 900,
          chapter: str | None = None) -> GradeReport:
    """Execute ``path`` in a fresh kernel and score it; never raises for a broken submission.

    ``total_timeout`` bounds the notebook's cells; the checks get their own ``total_timeout`` after
    that, each call of the student's function ``cell_timeout``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such notebook: {path}")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        return GradeReport(str(path), None, 0, 0, errors=[f"not a readable notebook: {exc}"])
    try:
        chapter, expected = expected_checks(nb, chapter)
    except ValueError as exc:
        return GradeReport(str(path), chapter, 0, 0, errors=[str(exc)])
    if not chapter:
        return GradeReport(str(path), None, 0, 0, errors=[
            "no chapter: the notebook has no `effdl.chapter` metadata; pass --chapter NAME"])
    from effdl import chapters

    module = chapters.module(chapter, "checks")
    _preload(module)
    checks = {n: getattr(module, n) for n in expected}
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    env = {k: v for k, v in os.environ.items() if k != "EFFDL_GRADE_LOG"}
    env.setdefault("EFFDL_PROFILE", "smoke")
    outcomes: list[CheckOutcome] = []
    with tempfile.TemporaryDirectory(prefix="effdl-grade-") as tmp:
        workdir, calls = Path(tmp) / "work", Path(tmp) / "calls"
        workdir.mkdir()
        calls.mkdir()
        session = Session(workdir, env)
        try:
            errors = session.run_cells(sources, cell_timeout, total_timeout)
            session.deadline = deadline = time.monotonic() + total_timeout  # the checks' own budget
            for name, check in checks.items():
                student = _student_name(check, name, nb)
                if student is None:
                    outcomes.append(CheckOutcome(name, False, "no function to grade: the check names none "
                                                 "and no check cell calls it"))
                    continue
                passed, message, _ = check.judge(StandIn(session, student, calls, deadline))
                outcomes.append(CheckOutcome(name, passed, message))
        finally:
            session.close()
    score = sum(o.passed for o in outcomes)
    return GradeReport(str(path), chapter, score, len(expected), outcomes, errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.grade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("submissions", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object per submission (for an LMS)")
    ap.add_argument("--chapter", help="grade against this chapter's checks, whatever the notebook's metadata says")
    ap.add_argument("--cell-timeout", type=int, default=120, help="seconds per cell and per check call (default 120)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds for the notebook, then for the checks (900)")
    args = ap.parse_args(argv)
    for p in args.submissions:
        r = grade(p, cell_timeout=args.cell_timeout, total_timeout=args.timeout, chapter=args.chapter)
        print(json.dumps(r.as_dict()) if args.json else r.table(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
