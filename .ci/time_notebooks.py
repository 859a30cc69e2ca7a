#!/usr/bin/env python
"""Execute every chapter notebook in a fresh kernel and record how long it takes.

    python .ci/time_notebooks.py --profile cpu      # -> book/results/notebook-timings-cpu.json

The instructors' page shows the recorded table (device, date, versions included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def time_notebook(path: Path, timeout: int) -> dict:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's cwd
    )
    t0 = time.perf_counter()
    status = "ok"
    try:
        client.execute()
    except Exception as exc:  # record the failure, keep timing the others
        status = f"failed: {type(exc).__name__}"
    total = time.perf_counter() - t0
    slowest = 0.0
    for cell in nb.cells:
        ex = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            a = datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))
            b = datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
            slowest = max(slowest, (b - a).total_seconds())
    return {"notebook": path.stem, "seconds": total, "slowest_cell_seconds": slowest, "status": status}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ap.add_argument("notebooks", nargs="*", type=Path)
    args = ap.parse_args(argv)
    os.environ["EFFDL_PROFILE"] = args.profile
    from effdl.bench.core import write_json
    from effdl.estimate import measure_machine

    machine = measure_machine()          # the peaks effdl.estimate calibrates its model against
    print(f"this machine: {machine}", flush=True)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    rows = []
    for p in paths:
        row = time_notebook(p, args.timeout)
        print(
            f"{row['notebook']:>12}: {row['seconds']:7.1f} s"
            f"  (slowest cell {row['slowest_cell_seconds']:.1f} s)  {row['status']}",
            flush=True,
        )
        rows.append(row)
    out = ROOT / "book" / "results" / f"notebook-timings-{args.profile}.json"
    write_json(rows, out, profile=args.profile, command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               machine=machine, load_average_1min_at_end=os.getloadavg()[0])  # others sharing the cores
    print(out)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
