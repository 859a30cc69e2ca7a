"""Student versions of the course notebooks: solutions removed, answers held back.

    python -m effdl.student notebooks --out dist/student      # what `make student` runs

Removed: code cells tagged ``solution`` and markdown cells holding a ``{solution}`` directive.
Held back: a ``show_source(...)`` that displays the library's implementation of a function an
exercise asks for (a function its check lists in the chapter's ``REVEALS``, see
:mod:`effdl.checks`).  In its place the student version says where it went; it comes back, in a
cell of its own, right after that exercise's check.  Kept: everything else, including the
``exercise`` stubs and the ``check`` cells (which then fail until the student writes the answer).
Outputs are cleared.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Any

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell

SOLUTION_TAG = "solution"
SOLUTION_DIRECTIVE = re.compile(r"^\s*(`{3,}|:{3,})\s*\{solution\}", re.MULTILINE)
CHECK_CALL = re.compile(r"\bchecks\.(\w+)\s*\(")
#: tags of the cells the student version adds
PLACEHOLDER_TAG, REVEALED_TAG = "answer-held-back", "answer-revealed"


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def is_solution_cell(cell) -> bool:
    if SOLUTION_TAG in _tags(cell):
        return True
    return cell.get("cell_type") == "markdown" and bool(SOLUTION_DIRECTIVE.search(cell.get("source", "")))


def _parse(source: str) -> ast.Module | None:
    """The cell's code, IPython ``%`` / ``!`` lines read as ``pass`` (lines keep their numbers)."""
    lines = [ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("%", "!")) else ln
             for ln in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _answers(chapter: str | None) -> dict[int, str]:
    """``id(library object) -> the check it answers``, from the chapter's ``REVEALS``."""
    if not chapter:
        return {}
    from effdl import chapters
    from effdl.checks import resolve

    try:
        reveals = getattr(chapters.module(chapter, "checks"), "REVEALS", {})
    except (ValueError, ImportError):
        return {}
    out = {}
    for check, paths in reveals.items():
        for path in paths:
            try:
                out[id(resolve(path))] = check
            except (ImportError, AttributeError):
                continue
    return out


def _shown(call: ast.Call, namespace: dict, answers: dict[int, str]) -> list[str | None]:
    """For each argument of a ``show_source(...)`` call: the check whose answer it shows, or None."""
    out = []
    for arg in call.args:
        try:
            obj = eval(compile(ast.Expression(arg), "<show_source>", "eval"), namespace)  # noqa: S307
        except Exception:  # a name the imports alone do not define: not an answer we know
            out.append(None)
            continue
        out.append(answers.get(id(obj)))
    return out


def _is_show_source(node: ast.stmt) -> ast.Call | None:
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        if (isinstance(f, ast.Name) and f.id == "show_source") or (isinstance(f, ast.Attribute)
                                                                   and f.attr == "show_source"):
            return node.value
    return None


def _hold_back(cells: list, chapter: str | None) -> list:
    """``cells`` with every ``show_source`` of an answer moved after that answer's check."""
    answers = _answers(chapter)
    if not answers:
        return cells
    check_at = {}
    for i, c in enumerate(cells):
        if c.cell_type == "code" and "check" in _tags(c):
            for name in CHECK_CALL.findall(c.source):
                check_at.setdefault(name, i)
    namespace: dict[str, Any] = {"__name__": "student_build"}
    out: list = []
    after: dict[int, list] = {}  # index of a check cell -> cells to add after it
    for i, cell in enumerate(cells):
        if cell.cell_type != "code" or set(_tags(cell)) & {"exercise", "solution", "check"}:
            out.append(cell)
            continue
        tree = _parse(cell.source)
        if tree is None:
            out.append(cell)
            continue
        for node in tree.body:  # what the cell imports is what show_source's arguments can name
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                try:
                    exec(compile(ast.Module([node], []), "<imports>", "exec"), namespace)  # noqa: S102
                except Exception:
                    pass
        lines = cell.source.splitlines()
        keep = list(lines)
        held: list[tuple[str, str]] = []  # (check, the show_source call that goes after it)
        for node in tree.body:
            call = _is_show_source(node)
            if call is None:
                continue
            checks = _shown(call, namespace, answers)
            late = [(c, a) for c, a in zip(checks, call.args) if c is not None and check_at.get(c, -1) > i]
            if not late:
                continue
            rest = [ast.get_source_segment(cell.source, a) for c, a in zip(checks, call.args)
                    if not (c is not None and check_at.get(c, -1) > i)]
            func = ast.get_source_segment(cell.source, call.func)
            for n in range(node.lineno - 1, node.end_lineno):
                keep[n] = None
            if rest:
                keep[node.lineno - 1] = f"{func}({', '.join(rest)})"
            for check, arg in late:
                held.append((check, f"{func}({ast.get_source_segment(cell.source, arg)})"))
        if not held:
            out.append(cell)
            continue
        names = ", ".join(f"`{code[code.index('(') + 1:-1]}`" for _, code in held)
        out.append(new_markdown_cell(
            f"*Student version:* the library's {names} would be shown here. It is the answer to an exercise "
            "at the end of the chapter, so it is shown right after that exercise's check.",
            metadata={"tags": [PLACEHOLDER_TAG]}))
        rest_source = "\n".join(ln for ln in keep if ln is not None).strip("\n")
        if rest_source.strip():
            kept = nbformat.from_dict(cell)
            kept.source = rest_source
            out.append(kept)
        for check, code in held:
            after.setdefault(check_at[check], []).append((check, code))
    # the held-back sources come back right after their check cells (kept as they were, in order)
    origin = {id(c): i for i, c in enumerate(cells)}
    result: list = []
    for cell in out:
        result.append(cell)
        codes = [code for _, code in after.get(origin.get(id(cell), -1), [])]
        if codes:
            result.append(new_markdown_cell(
                "The library's version, held back above in the student version "
                f"({', '.join(f'`{c}`' for c in codes)}):", metadata={"tags": [REVEALED_TAG]}))
            result.append(new_code_cell("\n".join(codes), metadata={"tags": [REVEALED_TAG]}))
    return result


def make_student(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without solution cells, with answers held back until their checks, and
    without outputs."""
    out = nbformat.from_dict(nb)  # deep copy
    chapter = (out.metadata.get("effdl") or {}).get("chapter")
    out.cells = _hold_back([c for c in out.cells if not is_solution_cell(c)], chapter)
    for c in out.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    out.metadata.setdefault("effdl", {})["student_version"] = True
    return out


def write_student_versions(src: Path, out_dir: Path) -> list[Path]:
    """Write the student version of ``src`` (a notebook or a folder of them) into ``out_dir``."""
    paths = sorted(src.glob("*.ipynb")) if src.is_dir() else [src]
    if not paths:
        raise FileNotFoundError(f"no notebooks found in {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        target = out_dir / p.name
        nbformat.write(make_student(nb), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.student", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a notebook or a folder of notebooks")
    ap.add_argument("--out", type=Path, default=Path("dist/student"))
    args = ap.parse_args(argv)
    for p in write_student_versions(args.source, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
