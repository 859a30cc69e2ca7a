#!/usr/bin/env python
"""Regenerate notebooks/X.ipynb from book/X.md (the text twin authors edit).

Also derives, from _config.yml's `repository` (the one place the address lives), each chapter's
Colab badge (the branch) and the install line of its setup cell (pinned to `repository.release`).

    python .ci/sync_notebooks.py          # rewrite what differs (what `make notebooks` runs)
    python .ci/sync_notebooks.py --check  # exit 1 and list what differs (what `make test` runs)

`jupytext --sync` decides by timestamps, which mean nothing in a fresh clone: this compares content.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jupytext
import yaml

ROOT = Path(__file__).resolve().parents[1]
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*colab-badge\.svg\)\]\([^)]*\)")
#: the badge image: the site ships its own (it shows offline); the notebooks, opened on Colab or
#: GitHub where book/images is not beside them, use Colab's
LOCAL_BADGE = "images/colab-badge.svg"
REMOTE_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
PIP_RE = re.compile(r"git\+https://github\.com/[^\s\"'@]+(@[\w.\-/]+)?")


def repository() -> tuple[str, str]:
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = cfg["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def release() -> str:
    """The tag the install cell pins (``repository.release`` in _config.yml)."""
    ref = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"].get("release")
    if not ref:
        raise SystemExit("_config.yml: set repository.release to the tag the install cell pins")
    return ref


def colab_url(stem: str) -> str:
    url, branch = repository()
    slug = url.split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{stem}.ipynb"


def chapter_sources() -> list[Path]:
    """Chapters: book/*.md notebooks whose front matter names an `effdl: chapter:`."""
    out = []
    for md in sorted((ROOT / "book").glob("*.md")):
        text = md.read_text()
        if not text.startswith("---"):
            continue
        front = yaml.safe_load(text.split("\n---", 1)[0][3:]) or {}
        if "kernelspec" in front and (front.get("effdl") or {}).get("chapter"):
            out.append(md)
    return out


def derived_markdown(md: Path) -> str:
    url, _ = repository()
    text = md.read_text()
    badge = f"[![Open In Colab]({LOCAL_BADGE})]({colab_url(md.stem)})"
    text = BADGE_RE.sub(lambda m: badge, text)
    text = PIP_RE.sub(lambda m: f"git+{url}@{release()}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report differences and exit 1 instead of writing")
    args = ap.parse_args(argv)
    stale: list[str] = []
    for md in chapter_sources():
        text = derived_markdown(md)
        if "colab-badge.svg" not in text:
            stale.append(f"{md.relative_to(ROOT)}: no Colab badge line (add the badge markdown under the title)")
        if text != md.read_text():
            stale.append(f"{md.relative_to(ROOT)}: badge or install URL not derived from _config.yml")
            if not args.check:
                md.write_text(text)
        nb = jupytext.reads(text.replace(f"]({LOCAL_BADGE})]", f"]({REMOTE_BADGE})]"), fmt="md:myst")
        for i, cell in enumerate(nb.cells):  # why: jupytext makes random ids; a check needs stable ones
            cell["id"] = f"{md.stem}-{i:03d}"
        ipynb = jupytext.writes(nb, fmt="ipynb")
        target = ROOT / "notebooks" / f"{md.stem}.ipynb"
        if not target.exists() or target.read_text() != ipynb:
            stale.append(f"{target.relative_to(ROOT)}: differs from what {md.relative_to(ROOT)} generates")
            if not args.check:
                target.parent.mkdir(exist_ok=True)
                target.write_text(ipynb)
    if stale:
        print("\n".join(stale))
        if args.check:
            print("\nrun `make notebooks` and commit the result", file=sys.stderr)
            return 1
        print(f"updated {len(stale)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
