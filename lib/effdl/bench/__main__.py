"""``python -m effdl.bench CHAPTER``: run a chapter's sweep, print the table, save plot and JSON."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from effdl.bench import CHAPTERS
from effdl.bench.core import plot_rows, print_table, write_json
from effdl.profile import PROFILES, current


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effdl.bench", description=__doc__)
    ap.add_argument("chapter", choices=sorted([*CHAPTERS, "gpu-suite"]))
    ap.add_argument("--profile", choices=PROFILES, default=None, help="default: $EFFDL_PROFILE or detected")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--json", default=None, help="write {meta, results} here")
    ap.add_argument("--plot", default=None, help="save the figure here (default: next to --json)")
    ap.add_argument("--json-dir", default="book/results", help="gpu-suite: where to write one JSON per chapter")
    args = ap.parse_args(argv)

    profile = current(args.profile)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.chapter == "gpu-suite":
        from effdl.bench.gpu_suite import main as gpu_main

        return gpu_main(json_dir=args.json_dir)
    module = importlib.import_module(CHAPTERS[args.chapter])
    print(f"# effdl.bench {args.chapter}: profile={profile}, device={device}", file=sys.stderr)
    rows = module.run(profile, device)
    print_table(rows)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else f"bench-{args.chapter}.png")
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)  # chapter plot functions just save
    if hasattr(module, "plot"):
        module.plot(rows, plot_path)
    else:
        plot_rows(rows, path=plot_path, **module.PLOT)
    print(f"plot: {plot_path}", file=sys.stderr)
    if args.json:
        write_json(rows, args.json, device=device, profile=profile, chapter=args.chapter)
        print(f"json: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
