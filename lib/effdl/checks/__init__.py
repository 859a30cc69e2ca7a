"""Exercise checks, one submodule per chapter; ``effdl.checks.<name>(student_fn)`` in notebooks.

Chapter submodules are loaded on first use (``effdl.checks.online_softmax`` imports
``effdl.checks.attention``), so importing one chapter's checks never pulls in another's.
:data:`CHAPTER_MODULES` lists them; each submodule's ``__all__`` is the list of its checks, which is
also what :mod:`effdl.grade` expects a notebook of that chapter to pass.
"""

from __future__ import annotations

import importlib

from effdl.checks.core import ExerciseFailed, assert_close, exercise_check, require

CHAPTER_MODULES = {
    "measuring": "effdl.checks.measuring",
    "attention": "effdl.checks.attention",
    "distill": "effdl.checks.distill",
    "tokens": "effdl.checks.tokens",
}


def chapter_checks(chapter: str) -> list[str]:
    """Names of the checks of one chapter (its module's ``__all__``)."""
    if chapter not in CHAPTER_MODULES:
        raise ValueError(f"unknown chapter {chapter!r}; known: {', '.join(CHAPTER_MODULES)}")
    return list(importlib.import_module(CHAPTER_MODULES[chapter]).__all__)


def __getattr__(name: str):
    for module_name in CHAPTER_MODULES.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that chapter has no checks yet
                continue
            raise
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"effdl.checks has no check named {name!r}")


__all__ = ["ExerciseFailed", "exercise_check", "assert_close", "require", "chapter_checks", "CHAPTER_MODULES"]
