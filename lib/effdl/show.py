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
