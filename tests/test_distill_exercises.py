"""Every exercise check of the distill chapter fails on its stub and passes on its solution, and
every check in effdl.checks.distill.__all__ is called by the notebook."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

import effdl.checks
from effdl.checks.distill import __all__ as CHECKS

NB = Path(__file__).resolve().parents[1] / "notebooks" / "distill.ipynb"


def _cells():
    nb = nbformat.read(NB, as_version=4)
    return [(set(c.metadata.get("tags", [])), c.source) for c in nb.cells if c.cell_type == "code"]


def _exercises():
    """(stub source, solution source, check source) triples in notebook order."""
    out, stub, sol = [], None, None
    for tags, src in _cells():
        if "exercise" in tags:
            stub, sol = src, None
        elif "solution" in tags:
            sol = src
        elif "check" in tags:
            out.append((stub, sol, src))
    return out


PRELUDE = "import torch\nimport effdl.checks\nimport effdl.distill as dd\n"


def test_every_check_is_called_once():
    called = " ".join(chk for _, _, chk in _exercises())
    assert len(_exercises()) >= 5
    for name in CHECKS:
        assert f"effdl.checks.{name}(" in called, f"{name} is never called in the notebook"


@pytest.mark.parametrize("i", range(5))
def test_check_fails_on_stub_and_passes_on_solution(i):
    stub, sol, chk = _exercises()[i]
    ns: dict = {}
    exec(PRELUDE + stub, ns)
    with pytest.raises(effdl.checks.ExerciseFailed):
        exec(chk, ns)
    ns = {}
    exec(PRELUDE + sol, ns)
    exec(chk, ns)


def test_checks_reject_plausible_mistakes():
    """Wrong answers a student might write are caught, not only the stubs."""
    import torch

    from effdl.checks import distill as C

    def ecf_swapped(f, t):  # real and imaginary parts swapped
        p = t @ f.T
        return p.sin().mean(1), p.cos().mean(1)

    def mmd_no_square(fr, fs):
        return (fr.mean(0) - fs.mean(0)).norm()

    def phase_without_factor(fr, fs, t):
        from effdl.distill.cf import cf_terms
        a, p = cf_terms(fr, fs, t)
        return a, p / 2

    for check, fn in [(C.check_empirical_cf, ecf_swapped), (C.check_mean_embedding_mmd, mmd_no_square),
                      (C.check_amplitude_phase, phase_without_factor)]:
        with pytest.raises(effdl.checks.ExerciseFailed):
            check(fn)

    def minmax_descends(sampler, optimizer, f_real, f_syn):  # descent instead of ascent
        import effdl.distill as dd
        noise = sampler.draw_noise()
        optimizer.zero_grad()
        loss = dd.cf_discrepancy(f_real.detach(), f_syn.detach(), sampler(noise))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            after = dd.cf_discrepancy(f_real, f_syn, sampler(noise))
        return float(loss.detach()), float(after)

    with pytest.raises(effdl.checks.ExerciseFailed):
        C.check_minmax_step(minmax_descends)
