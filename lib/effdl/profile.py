"""Run profiles: one place where every chapter reads its sizes.

Three profiles:

- ``smoke`` — the test suite: every code path, tiny sizes, seconds per notebook;
- ``cpu``   — the rendered site: results worth reading on a 2-core machine;
- ``gpu``   — Colab / GPU scale.

The profile comes from the ``EFFDL_PROFILE`` environment variable or, when it is unset, is
detected: ``gpu`` when CUDA is usable, else ``cpu``.  Each chapter keeps a typed table of its sizes
(a frozen dataclass per profile) in ``effdl.<chapter>.sizes`` and reads it through :func:`sizes`::

    from effdl.profile import sizes
    S = sizes("attention")          # -> effdl.attention.sizes.Sizes for the current profile
    S.seq_lens, S.head_dim
"""

from __future__ import annotations

import os
from typing import Literal, get_args

ProfileName = Literal["smoke", "cpu", "gpu"]
PROFILES: tuple[str, ...] = get_args(ProfileName)

def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def current(explicit: str | None = None) -> ProfileName:
    """The active profile: ``explicit`` if given, else ``$EFFDL_PROFILE``, else detected."""
    name = explicit or os.environ.get("EFFDL_PROFILE", "").strip().lower()
    if not name:
        return "gpu" if _cuda_usable() else "cpu"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from EFFDL_PROFILE or an argument); "
            f"use one of {', '.join(PROFILES)}, e.g. `export EFFDL_PROFILE=cpu`"
        )
    return name  # type: ignore[return-value]


def sizes(chapter: str, profile: str | None = None):
    """The sizes dataclass of ``chapter`` for ``profile`` (default: :func:`current`).

    Under ``EFFDL_SIMULATE_GPU`` (see :mod:`effdl.device`) the ``smoke`` profile is *gpu-shaped*:
    the ``gpu`` entry's settings with the ``smoke`` entry's sizes (:func:`gpu_shaped`).
    """
    from effdl import chapters
    from effdl.device import simulated_gpu

    table = chapters.module(chapter, "sizes").SIZES
    name = current(profile)
    missing = [n for n in ([name, "gpu"] if name == "smoke" else [name]) if n not in table]
    if missing:
        raise ValueError(f"effdl.{chapter}.sizes.SIZES has no {missing[0]!r} entry; give it one per profile "
                         f"({', '.join(PROFILES)})")
    S = gpu_shaped(table["gpu"], table["smoke"]) if name == "smoke" and simulated_gpu() else table[name]
    _show_wrapped(type(S))
    return S


def format_sizes(S, width: int = 88) -> str:
    """``S`` as its dataclass repr, wrapped to ``width`` columns (the page's code column)."""
    import textwrap
    from dataclasses import fields

    text = ", ".join(f"{f.name}={getattr(S, f.name)!r}" for f in fields(S))
    return textwrap.fill(f"{type(S).__name__}({text})", width, subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


def _show_wrapped(cls) -> None:
    """In IPython, display a sizes table wrapped (a bare ``S`` at the end of a cell)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return
    ip = get_ipython()
    if ip is not None:
        ip.display_formatter.formatters["text/plain"].for_type(
            cls, lambda obj, p, cycle: p.text(format_sizes(obj)))


def gpu_shaped(gpu, smoke):
    """``gpu``'s settings (text, flags, ``None``) with ``smoke``'s sizes (numbers, tuples).

    Why: a test without a GPU can then take every branch a GPU run takes (which dataset, which
    thread policy, which cache) in seconds.
    """
    from dataclasses import fields, replace

    def is_setting(v) -> bool:
        return v is None or isinstance(v, (str, bool))

    return replace(gpu, **{f.name: getattr(smoke, f.name) for f in fields(gpu)
                           if not is_setting(getattr(gpu, f.name))})
