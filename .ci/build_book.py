#!/usr/bin/env python
"""Build the book without executing notebooks (what `make test` checks), warnings as errors.

    python .ci/build_book.py [--out DIR] [--only CHAPTER ...]

`--only attention` builds the front page plus that chapter (a quick check while writing it).
Execution is off here because nbmake already executes every notebook in the test suite; `make book`
is the build that executes (cpu profile) for the site.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "_build" / "noexec"))
    ap.add_argument("--only", nargs="*", default=None, help="chapter stems to keep in the TOC")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    cfg["execute"]["execute_notebooks"] = "off"
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    if args.only:
        keep = {f"book/{c}" for c in args.only}
        for part in toc["parts"]:
            part["chapters"] = [c for c in part["chapters"] if c["file"] in keep or c["file"] == "book/bibliography"]
        toc["parts"] = [p for p in toc["parts"] if p["chapters"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, toc_path = Path(tmp, "_config.yml"), Path(tmp, "_toc.yml")
        cfg_path.write_text(yaml.safe_dump(cfg))
        toc_path.write_text(yaml.safe_dump(toc))
        cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--config", str(cfg_path),
               "--toc", str(toc_path), "--path-output", args.out, "-W", "-n", "--keep-going"]
        return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
