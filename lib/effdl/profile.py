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
    """The sizes dataclass of ``chapter`` for ``profile`` (default: :func:`current`)."""
    from effdl import chapters

    table = chapters.module(chapter, "sizes").SIZES
    name = current(profile)
    if name not in table:
        raise ValueError(f"effdl.{chapter}.sizes.SIZES has no {name!r} entry; give it one per profile "
                         f"({', '.join(PROFILES)})")
    return table[name]
