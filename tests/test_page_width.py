"""Code on the site fits its column: 88 characters, the width the theme shows without cutting.

The library code a page shows (show_source) is held to the same width by test_gpu_shaped.py, which
executes every chapter; this test reads the chapters' own code cells.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from effdl import chapters

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 88
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.S | re.M)


def wide_lines(text: str) -> list[str]:
    out = []
    for block in CELL.findall(text):
        for line in block.splitlines():
            if len(line) > WIDTH and not line.startswith(":"):    # ":tags: [...]" is not shown
                out.append(f"({len(line)}) {line.strip()[:70]}")
    return out


@pytest.mark.parametrize("page", [*chapters.names(), "_template"])
def test_code_cells_fit_the_column(page):
    wide = wide_lines((ROOT / "book" / f"{page}.md").read_text())
    assert not wide, f"book/{page}.md: {len(wide)} code lines wider than {WIDTH}:\n" + "\n".join(wide)


def test_width_rule_sees_a_wide_line():
    assert wide_lines("```{code-cell} ipython3\nx = 1" + " " * 90 + "# c\n```\n")
    assert not wide_lines("```{code-cell} ipython3\n:tags: [" + "x" * 90 + "]\nx = 1\n```\n")
