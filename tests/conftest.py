"""Shared test set-up: the smoke profile, the repository root, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EFFDL_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smoke_bench_rows():
    """``rows(chapter) -> (rows, threads_before, threads_after)``: each chapter's ``bench.run`` at
    smoke sizes on the CPU, run once per session and shared by the contract test and the chapter's
    own row tests (a bench run is the slowest thing a library test does).  Callers get a copy."""
    import copy

    import torch

    from effdl import chapters
    from effdl.profile import sizes

    cache: dict[str, tuple] = {}

    def rows(chapter: str):
        if chapter not in cache:
            before = torch.get_num_threads()
            out = chapters.module(chapter, "bench").run(sizes(chapter, "smoke"), torch.device("cpu"))
            cache[chapter] = (out, before, torch.get_num_threads())
        out, before, after = cache[chapter]
        return copy.deepcopy(out), before, after

    return rows


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, whatever ran before it (no order-dependent flakes),
    and leaves torch's thread count and the global random states as it found them."""
    import random

    import numpy as np
    import torch

    threads = torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    # why is_initialized: asking for the CUDA states would initialize CUDA in every test process
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.random.set_rng_state(torch_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
