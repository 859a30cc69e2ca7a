"""Render the library's own source in a notebook or book page, so chapters never retype code.

``show_source(effdl.attention.naive_attention)`` displays the function's source, syntax-highlighted
(Markdown code block in Jupyter and on the site, plain text elsewhere), with the file it comes from.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any


def source_of(obj: Any) -> str:
    """Source text of a function, class or module; a clear error for builtins."""
    try:
        return inspect.getsource(obj)
    except (TypeError, OSError) as exc:
        raise TypeError(
            f"cannot show the source of {obj!r}: only Python functions, classes and modules of the "
            "library have source to show"
        ) from exc


def _origin(obj: Any) -> str:
    # why unwrap: a decorated function (torch.no_grad()) would name the decorator's file
    obj = inspect.unwrap(obj) if callable(obj) else obj
    try:
        file = Path(inspect.getsourcefile(obj) or "")
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return ""
    parts = file.parts
    rel = "/".join(parts[parts.index("effdl"):]) if "effdl" in parts else file.name
    return f"{rel}:{line}"


class _Source:
    def __init__(self, code: str, origin: str):
        self.code, self.origin = code, origin

    def _repr_markdown_(self) -> str:
        head = f"*`{self.origin}`*\n\n" if self.origin else ""
        return f"{head}```python\n{self.code.rstrip()}\n```"

    def __repr__(self) -> str:
        return (f"# {self.origin}\n" if self.origin else "") + self.code


def show_source(*objs: Any):
    """Display the source of each object (functions, classes, modules) of the library."""
    from IPython.display import display

    shown = [_Source(source_of(o), _origin(o)) for o in objs]
    for s in shown:
        display(s)


class _Table:
    """Rows shown as a Markdown table in Jupyter and on the site, as aligned text elsewhere."""

    def __init__(self, header: list[str], cells: list[list[str]], numeric: list[bool]):
        self.header, self.cells, self.numeric = header, cells, numeric

    def _repr_markdown_(self) -> str:
        align = ["---:" if n else "---" for n in self.numeric]
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.cells)) if self.cells else len(h)
                  for i, h in enumerate(self.header)]
        fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
        return "\n".join([fmt(self.header)] + [fmt(r) for r in self.cells])


def show_table(rows: list[dict], columns: list[str] | None = None, *, precision: int = 2,
               labels: dict[str, str] | None = None, missing: str = "—"):
    """A table of ``rows`` (dicts) for a page: floats with ``precision`` decimals, ``None`` as
    ``missing``, column titles from ``labels``.  Plain Markdown, so no extra dependency."""
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("show_table expects a list of dicts (one per row)")
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    labels = labels or {}

    def cell(v) -> str:
        if v is None:
            return missing
        if isinstance(v, float):
            return f"{v:.{precision}f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]
    return _Table([labels.get(c, c) for c in columns], cells, numeric)
