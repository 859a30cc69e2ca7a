"""Benchmark harness: ``python -m effdl.bench CHAPTER [--profile P] [--json PATH] [--plot PATH]``.

Each chapter keeps its sweep in ``effdl.<technique>.bench`` with a function
``run(profile: str, device: torch.device) -> list[dict]`` and a dict ``PLOT`` of
:func:`effdl.bench.core.plot_rows` arguments (or a function ``plot(rows, path)``).
The table below maps the command-line name to that module; nothing is registered at import time.
"""

from effdl.bench.core import load_results, plot_rows, print_table, run_sweep, write_json

#: command-line chapter name -> module with ``run`` and ``PLOT``/``plot``
CHAPTERS = {
    "measuring": "effdl.roofline.bench",
    "attention": "effdl.attention.bench",
    "distill": "effdl.distill.bench",
    "tokens": "effdl.tokens.bench",
}

__all__ = ["CHAPTERS", "run_sweep", "print_table", "plot_rows", "write_json", "load_results"]
