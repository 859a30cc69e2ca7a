"""``python -m effdl.bench gpu-suite --json-dir book/results``: the course's recorded GPU results.

One call on an sm_80+ GPU (a few minutes): each chapter's ``gpu_suite(device, S)`` checks correctness of
its GPU paths (the Triton kernels against an fp32 reference, flash-attention's 2× rule) and times the
chapter's GPU-scale sweep.  Each chapter's rows go to ``<json-dir>/<chapter>-<gpu>.json`` with the
device name, compute capability, torch/triton versions and date in ``meta``.  A chapter that fails is
reported and skipped; the others are still recorded.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path

import torch

from effdl import chapters as _chapters
from effdl.bench.core import print_table, write_json
from effdl.profile import sizes


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'Tesla T4' -> 't4'."""
    m = re.search(r"\b(h200|h100|gh200|b200|a100|a10g?|l40s?|l4|t4|v100|rtx\s?\d{4})\b", name.lower())
    if m:
        return m.group(1).replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24] or "gpu"


def main(json_dir: str | Path = "book/results", chapters: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("gpu-suite needs a CUDA GPU; none is available here.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    slug = gpu_slug(torch.cuda.get_device_name(device))
    failures = 0
    for chapter in chapters or _chapters.names():
        t0 = time.perf_counter()
        try:
            rows = _chapters.module(chapter, "bench").gpu_suite(device, sizes(chapter, "gpu"))
        except Exception:
            failures += 1
            print(f"[{chapter}] FAILED:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        path = Path(json_dir) / f"{chapter}-{slug}.json"
        write_json(rows, path, device=device, profile="gpu", chapter=chapter,
                   command="python -m effdl.bench gpu-suite", seconds=time.perf_counter() - t0)
        print(f"\n[{chapter}] {len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {path}")
        print_table(rows)
    return 1 if failures else 0
