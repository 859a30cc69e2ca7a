"""``python -m effdl.bench CHAPTER``: run a chapter's sweep, print the table, save plot and JSON.

``python -m effdl.bench --list`` names the chapters; ``python -m effdl.bench gpu-suite`` records
every chapter's GPU suite (see :mod:`effdl.bench.gpu_suite`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effdl import chapters
from effdl.bench.core import print_table, write_json
from effdl.profile import PROFILES, current, sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapter", nargs="?", help=f"one of {', '.join(chapters.names())}, or gpu-suite")
    ap.add_argument("--list", action="store_true", help="print the chapters, one per line, and exit")
    ap.add_argument("--profile", choices=PROFILES, default=None,
                    help="default: $EFFDL_PROFILE or detected")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--json", default=None, help="write {meta, results} here")
    ap.add_argument("--plot", default=None, help="save the figure here (default: next to --json)")
    ap.add_argument("--json-dir", default="book/results",
                    help="gpu-suite: where to write one JSON per chapter")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(chapters.names()))
        return 0
    if not args.chapter:
        ap.error("name a chapter (see --list) or gpu-suite")
    if args.chapter == "gpu-suite":
        from effdl.bench.gpu_suite import main as gpu_main

        return gpu_main(json_dir=args.json_dir)
    try:
        chapters.require(args.chapter)
    except ValueError as exc:
        ap.error(str(exc))

    import torch

    profile = current(args.profile)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"# effdl.bench {args.chapter}: profile={profile}, device={device}", file=sys.stderr)
    rows = chapters.module(args.chapter, "bench").run(sizes(args.chapter, profile), device)
    print_table(rows)
    default = Path(args.json).with_suffix(".png") if args.json else f"bench-{args.chapter}.png"
    plot_path = Path(args.plot or default)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    chapters.module(args.chapter, "plots").plot_bench(rows).savefig(plot_path, dpi=120)
    print(f"plot: {plot_path}", file=sys.stderr)
    if args.json:
        write_json(rows, args.json, device=device, profile=profile, chapter=args.chapter)
        print(f"json: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
