"""Grade a submitted notebook: ``python -m effdl.grade SUBMISSION.ipynb [--json] [--timeout S]``.

The submission runs top to bottom in a fresh kernel, in a subprocess, in a temporary directory,
with a per-cell and a whole-notebook timeout.  Every exercise check the notebook calls appends its
outcome to a log (``$EFFDL_GRADE_LOG``); the score is the number of the chapter's checks that passed.
The chapter's list of checks comes from the library (``effdl.<chapter>.checks.__all__``, chapter from
the notebook's ``effdl.chapter`` metadata), so deleting a check cell cannot raise a score.

**This runs untrusted code.** Grade inside a container or a throw-away VM, never on a machine with
secrets.  The timeouts stop endless loops, not malicious code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

CHECK_CALL = re.compile(r"^\s*(?:[\w.]*checks\.)?(\w+)\s*\(", re.MULTILINE)


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


def expected_checks(nb: nbformat.NotebookNode) -> tuple[str | None, list[str]]:
    """(chapter, names of the checks a complete notebook passes)."""
    chapter = (nb.metadata.get("effdl") or {}).get("chapter")
    if chapter:
        from effdl.checks import chapter_checks

        try:
            return chapter, chapter_checks(chapter)
        except ValueError:  # not (or not yet) a complete chapter: use the check cells below
            pass
    names = []  # no chapter metadata: fall back to the checks its `check` cells call
    for cell in nb.cells:
        if cell.cell_type == "code" and "check" in cell.metadata.get("tags", []):
            names += CHECK_CALL.findall(cell.source)
    return chapter, list(dict.fromkeys(names))


def _execute(path: Path, log: Path, workdir: Path, cell_timeout: int, total_timeout: int) -> list[str]:
    """Run the notebook in a child process (nbclient, fresh kernel); return error summaries."""
    env = {**os.environ, "EFFDL_GRADE_LOG": str(log), "EFFDL_PROFILE": os.environ.get("EFFDL_PROFILE", "smoke")}
    code = (
        "import sys, json, nbformat\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "client = NotebookClient(nb, timeout=int(sys.argv[2]), allow_errors=True, interrupt_on_timeout=True,\n"
        "                        kernel_name='python3', resources={'metadata': {'path': sys.argv[3]}})\n"
        "client.execute()\n"
        "errs = []\n"
        "for i, c in enumerate(nb.cells):\n"
        "    for o in c.get('outputs', []):\n"
        "        if o.get('output_type') == 'error':\n"
        "            errs.append(f\"cell {i}: {o['ename']}: {o['evalue']}\"[:300])\n"
        "print(json.dumps(errs))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path), str(cell_timeout), str(workdir)],
                              env=env, cwd=workdir, capture_output=True, text=True, timeout=total_timeout)
    except subprocess.TimeoutExpired:
        return [f"the notebook did not finish within {total_timeout} s (endless loop?); graded what ran"]
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return ["the notebook could not be executed: " + " | ".join(tail)]
    try:
        errs = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        errs = []
    # nbclient interrupts a cell that runs past its timeout: the kernel reports KeyboardInterrupt
    return [re.sub(r"(KeyboardInterrupt|CellTimeoutError).*", f"timed out after {cell_timeout} s (endless loop?)", e)
            for e in errs]


def grade(path: str | Path, *, cell_timeout: int = 120, total_timeout: int = 900) -> GradeReport:
    """Execute ``path`` in a fresh kernel and score it; never raises for a broken submission."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such notebook: {path}")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        return GradeReport(str(path), None, 0, 0, errors=[f"not a readable notebook: {exc}"])
    chapter, expected = expected_checks(nb)
    with tempfile.TemporaryDirectory(prefix="effdl-grade-") as tmp:
        tmp = Path(tmp)
        copy = tmp / "submission.ipynb"
        nbformat.write(nb, copy)
        log = tmp / "grade-log.jsonl"
        errors = _execute(copy, log, tmp, cell_timeout, total_timeout)
        seen: dict[str, CheckOutcome] = {}
        if log.exists():
            for line in log.read_text().splitlines():
                rec = json.loads(line)
                seen[rec["check"]] = CheckOutcome(rec["check"], bool(rec["passed"]), rec["message"])
    never_ran = "never ran (an earlier error, a timeout, or the check cell was removed)"
    outcomes = [seen.get(n, CheckOutcome(n, False, never_ran)) for n in expected]
    score = sum(o.passed for o in outcomes)
    return GradeReport(str(path), chapter, score, len(expected), outcomes, errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.grade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("submissions", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object per submission (for an LMS)")
    ap.add_argument("--cell-timeout", type=int, default=120, help="seconds per cell (default 120)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per notebook (default 900)")
    args = ap.parse_args(argv)
    reports = [grade(p, cell_timeout=args.cell_timeout, total_timeout=args.timeout) for p in args.submissions]
    for r in reports:
        print(json.dumps(r.as_dict()) if args.json else r.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
