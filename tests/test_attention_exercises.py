"""Every exercise check of the attention chapter fails on its stub and passes on its solution."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

import effdl.checks
from effdl.checks import attention as checks
from effdl.checks import ExerciseFailed

NB = Path(__file__).resolve().parents[1] / "notebooks" / "attention.ipynb"


def _cells(tag):
    nb = nbformat.read(NB, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _pairs():
    return list(zip(_cells("exercise"), _cells("solution"), _cells("check")))


def _namespace():
    import torch

    return {"torch": torch, "effdl": effdl}


def test_every_check_is_called_once():
    called = "\n".join(_cells("check"))
    assert len(checks.__all__) >= 5
    for name in checks.__all__:
        assert f"effdl.checks.{name}(" in called, f"{name} is never called in the notebook"
    assert len(_pairs()) == len(checks.__all__)


@pytest.mark.parametrize("i", range(len(checks.__all__)))
def test_check_fails_on_stub_and_passes_on_solution(i):
    stub, solution, check = _pairs()[i]
    ns = _namespace()
    exec(stub, ns)
    with pytest.raises(ExerciseFailed):
        exec(check, ns)
    ns = _namespace()
    exec(solution, ns)
    exec(check, ns)


def test_checks_reject_plausible_mistakes():
    import math

    import torch

    # online softmax without the max subtraction overflows on large scores
    with pytest.raises(ExerciseFailed):
        checks.check_online_softmax(lambda x, block: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True))
    # merge that forgets the empty-state case gives NaN
    def naive_merge(m1, l1, a1, m2, l2, a2):
        m = torch.maximum(m1, m2)
        w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
        return m, l1 * w1 + l2 * w2, a1 * w1[..., None] + a2 * w2[..., None]
    with pytest.raises(ExerciseFailed, match="empty"):
        checks.check_merge_states(naive_merge)
    # top-left alignment is wrong when nq != nk
    def top_left(nq, nk, bq, bk):
        from effdl.attention.tiled import causal_tile_plan
        return causal_tile_plan(nk, nk, bq, bk) if nq == nk else {(0, 0): "partial"}
    with pytest.raises(ExerciseFailed):
        checks.check_causal_tile_plan(top_left)
    # forgetting the partial last tile (floor instead of ceil)
    with pytest.raises(ExerciseFailed):
        checks.check_fa2_io_count(lambda N, d, br, bc: (N * d + (N // br) * 2 * N * d, N * d + N))
    # tiles that do not fit
    with pytest.raises(ExerciseFailed, match="elements on chip"):
        checks.check_tile_sizes(lambda M, d: (M // d, d))
    # plain average of the splits
    with pytest.raises(ExerciseFailed):
        checks.check_split_kv_merge(lambda outs, lses: outs.mean(0))
    assert math.isfinite(1.0)
