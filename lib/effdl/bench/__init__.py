"""Benchmark harness: ``python -m effdl.bench CHAPTER [--profile P] [--json PATH] [--plot PATH]``.

Each chapter ``effdl.<chapter>`` keeps its sweep in ``bench.py`` (``run(S, device) -> rows``) and
the figure of those rows in ``plots.py`` (``plot_bench(rows) -> Figure``); the command finds both
by the chapter's name (:mod:`effdl.chapters`).  The shared pieces every sweep uses live in
:mod:`effdl.bench.core`.
"""

from effdl.bench.core import (
    free_cached,
    interleaved,
    is_oom,
    oom_guard,
    plot_rows,
    print_table,
    run_sweep,
    write_json,
)

__all__ = ["run_sweep", "interleaved", "is_oom", "oom_guard", "free_cached", "print_table",
           "plot_rows", "write_json"]
