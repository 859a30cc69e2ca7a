"""Every chapter's exercises, read from the chapter's notebook (``notebooks/<chapter>.ipynb``).

Exercise ``i`` of a chapter is its ``i``-th code cell tagged ``exercise`` (the stub a student starts
from), its ``i``-th tagged ``solution`` and its ``i``-th tagged ``check``.  For every exercise: the
check cell raises :class:`effdl.checks.ExerciseFailed` after the stub, and passes after the solution.
For every chapter: each name in ``effdl.<chapter>.checks.__all__`` (what the grader scores) is called
exactly once by the check cells, as ``checks.<name>(``, and there are at least five exercises.

The namespace a cell runs in is the notebook's own: the top-level ``import`` / ``from`` statements of
the untagged code cells above the exercise (what a student's kernel has imported at that point; no
variables, and nothing from other exercises' cells).  The parametrization is computed from the
notebooks at collection time: adding an exercise to a chapter adds a test, with no count to update.

The second half feeds every check wrong answers a student might plausibly write (not only the stubs)
and expects :class:`ExerciseFailed`; one section per chapter.
"""

from __future__ import annotations

import ast
import functools
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import torch

from effdl import chapters
from effdl.checks import ExerciseFailed

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("exercise", "solution", "check")
MIN_EXERCISES = 5
CHECK_CALL = re.compile(r"\bchecks\.(\w+)\s*\(")


@dataclass(frozen=True)
class Exercise:
    chapter: str
    index: int
    stub: str
    solution: str
    check: str
    imports: str  # the notebook's top-level imports above the stub cell


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _top_level_imports(source: str) -> list[str]:
    """The top-level import statements of a code cell (IPython ``%`` / ``!`` lines are skipped)."""
    def plain(line: str) -> str:  # a magic becomes `pass` at its indentation: the block around it still parses
        body = line.lstrip()
        return line[: len(line) - len(body)] + "pass" if body.startswith(("%", "!")) else line

    lines = [plain(line) for line in source.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


@functools.cache
def exercises(chapter: str) -> tuple[Exercise, ...]:
    """The chapter's exercises, in notebook order (raises if the notebook's tags do not line up)."""
    path = ROOT / "notebooks" / f"{chapter}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate it with `python .ci/sync_notebooks.py`")
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    where = {tag: [i for i, c in enumerate(code) if tag in _tags(c)] for tag in TAGS}
    counts = {tag: len(v) for tag, v in where.items()}
    if len(set(counts.values())) != 1:
        raise AssertionError(f"{path.name}: unequal numbers of tagged cells {counts}")
    out = []
    for i, (s, sol, chk) in enumerate(zip(*(where[t] for t in TAGS))):
        nxt = where["exercise"][i + 1] if i + 1 < counts["exercise"] else len(code)
        if not s < sol < chk < nxt:
            raise AssertionError(f"{path.name}: exercise {i} is not stub, solution, check in that order "
                                 f"(code cells {s}, {sol}, {chk})")
        imports = [stmt for c in code[:s] if not (_tags(c) & set(TAGS)) for stmt in _top_level_imports(c.source)]
        out.append(Exercise(chapter, i, code[s].source, code[sol].source, code[chk].source, "\n".join(imports)))
    return tuple(out)


def _params():
    params = []
    for chapter in chapters.names():
        try:
            n = len(exercises(chapter))
        except Exception:  # reported by test_chapter_exercises_are_well_formed, not at collection
            n = 0
        params += [pytest.param(chapter, i, id=f"{chapter}-{i}") for i in range(n)]
    return params


def _namespace(ex: Exercise) -> dict:
    ns: dict = {"__name__": f"notebook_{ex.chapter}"}
    exec(ex.imports, ns)
    assert ns.get("checks") is chapters.module(ex.chapter, "checks"), (
        f"notebooks/{ex.chapter}.ipynb must import its checks as `from effdl.{ex.chapter} import checks` "
        "before its first exercise")
    return ns


# ------------------------------------------------------------------------------ every chapter
@pytest.mark.parametrize("chapter", chapters.names())
def test_chapter_exercises_are_well_formed(chapter):
    exs = exercises(chapter)
    assert len(exs) >= MIN_EXERCISES, f"{chapter} has {len(exs)} exercises, fewer than {MIN_EXERCISES}"
    called = Counter(name for ex in exs for name in CHECK_CALL.findall(ex.check))
    wanted = chapters.module(chapter, "checks").__all__
    assert called == Counter(wanted), (
        f"every name in effdl.{chapter}.checks.__all__ is called exactly once by the check cells "
        f"(and nothing else): called {dict(called)}, __all__ {wanted}")


@pytest.mark.parametrize("chapter", chapters.names())
def test_no_notebook_calls_checks_the_old_way(chapter):
    text = (ROOT / "notebooks" / f"{chapter}.ipynb").read_text()
    assert "effdl.checks.check_" not in text, (
        "call checks as checks.<name>(...) after `from effdl.<chapter> import checks`")


@pytest.mark.parametrize("chapter, i", _params())
def test_check_fails_on_stub_and_passes_on_solution(chapter, i):
    ex = exercises(chapter)[i]
    ns = _namespace(ex)
    exec(ex.stub, ns)
    with pytest.raises(ExerciseFailed):
        exec(ex.check, ns)
    ns = _namespace(ex)
    exec(ex.solution, ns)
    exec(ex.check, ns)


def test_magic_lines_do_not_hide_imports():
    src = 'import sys\nif "google.colab" in sys.modules:\n    %pip install -q x\nfrom math import pi\n'
    assert _top_level_imports(src) == ["import sys", "from math import pi"]


# ------------------------------------------------------------------------------ attention: mistakes
from effdl.attention import checks as attention_checks  # noqa: E402


def _merge_without_empty_case(m1, l1, a1, m2, l2, a2):  # exp(-inf - -inf) = NaN
    m = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, l1 * w1 + l2 * w2, a1 * w1[..., None] + a2 * w2[..., None]


def _top_left_tile_plan(nq, nk, bq, bk):  # top-left alignment: wrong when nq != nk
    from effdl.attention.tiled import causal_tile_plan

    return causal_tile_plan(nk, nk, bq, bk) if nq == nk else {(0, 0): "partial"}


ATTENTION_MISTAKES = [
    # softmax without the max subtraction overflows on large scores
    ("check_online_softmax", lambda x, block: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), None),
    ("check_merge_states", _merge_without_empty_case, "empty"),
    ("check_causal_tile_plan", _top_left_tile_plan, None),
    # floor instead of ceil: forgets the partial last tile
    ("check_fa2_io_count", lambda N, d, br, bc: (N * d + (N // br) * 2 * N * d, N * d + N), None),
    ("check_tile_sizes", lambda M, d: (M // d, d), "elements on chip"),  # tiles that do not fit
    ("check_split_kv_merge", lambda outs, lses: outs.mean(0), None),  # plain average of the splits
]


@pytest.mark.parametrize("name, wrong, match", ATTENTION_MISTAKES, ids=[m[0] for m in ATTENTION_MISTAKES])
def test_attention_checks_reject_plausible_mistakes(name, wrong, match):
    with pytest.raises(ExerciseFailed, match=match):
        getattr(attention_checks, name)(wrong)


# ------------------------------------------------------------------------------ distill: mistakes
from effdl.distill import checks as distill_checks  # noqa: E402


def _ecf_swapped(f, t):  # real and imaginary parts swapped
    p = t @ f.T
    return p.sin().mean(1), p.cos().mean(1)


def _mmd_no_square(fr, fs):
    return (fr.mean(0) - fs.mean(0)).norm()


def _phase_without_factor(fr, fs, t):
    from effdl.distill.cf import cf_terms

    a, p = cf_terms(fr, fs, t)
    return a, p / 2


def _herding_without_exclusion(features, k):  # may pick the same row twice
    f = features.double()
    target, acc, picked = f.mean(0), torch.zeros(f.shape[1], dtype=f.dtype), []
    for j in range(k):
        i = int((((acc + f) / (j + 1) - target) ** 2).sum(1).argmin())
        picked.append(i)
        acc += f[i]
    return torch.tensor(picked, dtype=torch.long)


def _minmax_descends(sampler, optimizer, f_real, f_syn):  # descent instead of ascent
    import effdl.distill as dd

    noise = sampler.draw_noise()
    optimizer.zero_grad()
    loss = dd.cf_discrepancy(f_real.detach(), f_syn.detach(), sampler(noise))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = dd.cf_discrepancy(f_real, f_syn, sampler(noise))
    return float(loss.detach()), float(after)


DISTILL_MISTAKES = [
    ("check_empirical_cf", _ecf_swapped),
    ("check_mean_embedding_mmd", _mmd_no_square),
    ("check_amplitude_phase", _phase_without_factor),
    ("check_herding", _herding_without_exclusion),
    ("check_minmax_step", _minmax_descends),
]


@pytest.mark.parametrize("name, wrong", DISTILL_MISTAKES, ids=[m[0] for m in DISTILL_MISTAKES])
def test_distill_checks_reject_plausible_mistakes(name, wrong):
    with pytest.raises(ExerciseFailed):
        getattr(distill_checks, name)(wrong)


# ------------------------------------------------------------------------------ measuring: mistakes
from effdl.measuring import checks as measuring_checks  # noqa: E402


def _timer_without_initial_sync(fn, device, repeat=10):  # mean over a loop, sync only at the end
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    device.synchronize()
    return (time.perf_counter() - t0) * 1e3 / repeat


MEASURING_MISTAKES = [
    ("check_async_timer", _timer_without_initial_sync),
    ("check_matmul_intensity", lambda m, n, k, e: 2 * m * n * k / (m * k + k * n + m * n)),  # no element size
    ("check_roofline_time", lambda f, b, p, w: f / p + b / w),                                 # sum, not max
    ("check_attention_layer_flops", lambda b, n, d: 4 * b * n * n * d),                        # no projections
    ("check_find_bottleneck", lambda stages: (next(iter(stages)), 1.0)),
]


@pytest.mark.parametrize("name, wrong", MEASURING_MISTAKES, ids=[m[0] for m in MEASURING_MISTAKES])
def test_measuring_checks_reject_plausible_mistakes(name, wrong):
    with pytest.raises(ExerciseFailed):
        getattr(measuring_checks, name)(wrong)


# ------------------------------------------------------------------------------ tokens: mistakes
from effdl.tokens import checks as tokens_checks  # noqa: E402


def _topk_in_score_order(x, a, k):  # top-k in score order instead of page order
    from effdl.tokens import reducers

    idx = a.topk(k, dim=1).indices
    kept = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return kept, reducers.topk_fuse(x, a, k)[1]


def _tome_unweighted(x, size, metric, r):  # plain mean instead of the size-weighted merge
    from effdl.tokens import reducers

    return reducers.bipartite_merge(x, torch.ones_like(size), metric, r)[0], size[:, r:]


def _vit_flops_attention_once(n, d, depth, r):  # attention's two matmuls counted once
    return depth * (2 * n * d * 4 * d + 4 * n * d * r * d + 2 * n * n * d)


def _delta_against_original_anchor(x, bits, group):  # deltas from the original anchor, not the decoded one
    from effdl.tokens import kvcache

    _, step, _ = kvcache.delta_quantize(x, bits, 1)
    out = x.clone()
    for t in range(x.shape[0]):
        ref = 0.0 if t % group == 0 else x[t - t % group]
        out[t] = ref + torch.round((x[t] - ref) / step[t]) * step[t]
    return out


def _crop_density_counts_self(keys, tokens_per_crop, sim_threshold, redundant_frac):  # a patch resembles itself
    import torch.nn.functional as F

    B, n, d = keys.shape
    T = tokens_per_crop
    kn = F.normalize(keys.reshape(B, n // T, T, d), dim=-1)
    similar = ((kn @ kn.transpose(-2, -1)) > sim_threshold).sum(-1)
    return 1.0 - (similar > redundant_frac * (T - 1)).float().mean(-1)


TOKENS_MISTAKES = [
    ("check_topk_fuse", _topk_in_score_order, "original order"),
    ("check_tome_step", _tome_unweighted, None),
    ("check_vit_flops", _vit_flops_attention_once, None),
    ("check_delta_quantize", _delta_against_original_anchor, None),
    ("check_crop_density", _crop_density_counts_self, None),
]


@pytest.mark.parametrize("name, wrong, match", TOKENS_MISTAKES, ids=[m[0] for m in TOKENS_MISTAKES])
def test_tokens_checks_reject_plausible_mistakes(name, wrong, match):
    with pytest.raises(ExerciseFailed, match=match):
        getattr(tokens_checks, name)(wrong)


MISTAKES = {"attention": ATTENTION_MISTAKES, "distill": DISTILL_MISTAKES, "measuring": MEASURING_MISTAKES,
            "tokens": TOKENS_MISTAKES}


@pytest.mark.parametrize("chapter", sorted(MISTAKES))
def test_every_check_gets_a_plausible_mistake(chapter):
    """A check only ever fed its stub could accept almost anything: each one here gets a wrong answer."""
    assert {m[0] for m in MISTAKES[chapter]} == set(chapters.module(chapter, "checks").__all__)
