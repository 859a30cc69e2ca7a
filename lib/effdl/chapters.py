"""The chapter contract: a chapter is found by its name, never by a list in core code.

A chapter ``<name>`` is the package ``effdl.<name>`` with these modules (see the README's "Adding a
chapter" and ``book/_template.md``):

- ``sizes.py``       — ``SIZES = {"smoke": ..., "cpu": ..., "gpu": ...}`` (frozen dataclasses);
- ``bench.py``       — ``run(S, device) -> rows`` and ``gpu_suite(device, S) -> rows``, nothing else;
- ``checks.py``      — its exercise checks, listed in ``__all__``;
- ``plots.py``       — its figures, including ``plot_bench(rows)`` for the benchmark's rows and
  ``plot_recorded(doc)`` for a recorded GPU file;
- ``experiments.py`` — helpers the chapter's notebook calls (optional).

The book's notebook is ``book/<name>.md``, listed once in ``_toc.yml`` (the reading order).  Core
modules (:mod:`effdl.profile`, :mod:`effdl.bench`, :mod:`effdl.grade`, :mod:`effdl.student`) find
chapters with :func:`names` and :func:`module`; a new chapter needs no edit to any of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from types import ModuleType

import effdl

__all__ = ["PARTS", "names", "module", "is_chapter", "require"]

#: the modules of a chapter package (``experiments`` is optional)
PARTS = ("sizes", "bench", "checks", "plots", "experiments")
_REQUIRED = ("sizes", "bench", "checks", "plots")


def _has(pkg: str, part: str) -> bool:
    try:
        return importlib.util.find_spec(f"effdl.{pkg}.{part}") is not None
    except ModuleNotFoundError:  # effdl.<pkg> is a plain module, not a package
        return False


def is_chapter(name: str) -> bool:
    """Is ``effdl.<name>`` a chapter package (it has a ``sizes`` module)?"""
    return name.isidentifier() and _has(name, "sizes")


def names() -> list[str]:
    """Every chapter package, sorted by name (the book's reading order lives in ``_toc.yml``)."""
    found = {m.name for m in pkgutil.iter_modules(effdl.__path__) if m.ispkg and is_chapter(m.name)}
    return sorted(found)


def require(name: str) -> str:
    """``name`` if it is a chapter, else a ``ValueError`` that lists the chapters there are."""
    if not isinstance(name, str) or not is_chapter(name):
        raise ValueError(
            f"unknown chapter {name!r}; chapters: {', '.join(names())} "
            f"(a chapter is a package effdl.<name> with a sizes.py)"
        )
    missing = [p for p in _REQUIRED if not _has(name, p)]
    if missing:
        raise ValueError(
            f"chapter {name!r} lacks the module(s) {', '.join(missing)}; every chapter package has "
            f"{', '.join(_REQUIRED)} (see book/_template.md and the README)"
        )
    return name


def module(name: str, part: str) -> ModuleType:
    """Import ``effdl.<name>.<part>`` (``part`` one of :data:`PARTS`) after checking ``name``."""
    if part not in PARTS:
        raise ValueError(f"unknown chapter part {part!r}; one of {', '.join(PARTS)}")
    return importlib.import_module(f"effdl.{require(name)}.{part}")
