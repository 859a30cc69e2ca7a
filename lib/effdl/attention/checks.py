"""Exercise checks of the attention chapter: each compares the student's function with the library's,
and checks what the exercise is about (one pass over the blocks, empty splits, whole tiles)."""

from __future__ import annotations

import math

import torch

from effdl.checks import assert_close, exercise_check, observe, require, same, when_solved  # noqa: F401

__all__ = [
    "check_online_softmax",
    "check_merge_states",
    "check_causal_tile_plan",
    "check_fa2_io_count",
    "check_tile_sizes",
    "check_split_kv_merge",
]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_online_softmax": ["effdl.attention.softmax.online_softmax"],
    "check_merge_states": ["effdl.attention.softmax.merge_states"],
    "check_causal_tile_plan": ["effdl.attention.tiled.causal_tile_plan"],
    "check_fa2_io_count": ["effdl.attention.iosim._run_fa2", "effdl.attention.iosim.io_count",
                           "effdl.attention.iosim.closed_form"],
    "check_tile_sizes": ["effdl.attention.iosim.block_sizes"],
    "check_split_kv_merge": ["effdl.attention.softmax.merge_lse"],
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ online softmax
#: operations that reduce along a dimension: (name, dimension argument's position)
_REDUCE = {"sum", "nansum", "mean", "nanmean", "amax", "amin", "max", "min", "logsumexp", "softmax",
           "log_softmax", "prod", "norm", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
           "logcumsumexp", "sort", "topk", "var", "std", "median", "nanmedian", "quantile", "all", "any",
           "count_nonzero", "aminmax", "max_values"}
_CONTRACT = {"matmul", "mm", "bmm", "mv", "dot", "inner", "einsum", "tensordot", "__matmul__", "__rmatmul__"}
_LEAVE = {"numpy", "tolist", "item", "__array__"}
#: operations that move elements without computing: the column ids follow the same moves
_MOVE = {"__getitem__", "split", "split_with_sizes", "chunk", "tensor_split", "unbind", "narrow", "select",
         "reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
         "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "expand", "expand_as",
         "broadcast_to", "flip", "fliplr", "roll", "cat", "concat", "concatenate", "stack", "hstack",
         "vstack", "pad", "unfold", "repeat", "tile", "repeat_interleave", "take_along_dim", "gather",
         "index_select", "masked_select", "diagonal", "__get__", "as_strided", "__setitem__"}


class _Watched(torch.Tensor):
    """A tensor that remembers, for each element, which column of the original rows it came from
    (``_cols``: id + 1, 0 for values that are not one column's, such as a running max), and logs
    every reduction that reads columns: ``(first, last, columns reduced at once, operation)``."""

    _log: list | None = None  # set by _softmax_trial for the duration of one call

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _LEAVE and isinstance(args[0], _Watched) and name != "item":
            _note(args[0], None, name)
        if name == "__setitem__" and isinstance(args[0], _Watched):
            args[0]._cols = _replay(func, name, args, kwargs)
        if not _is_tensors(out):
            return out
        watched = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, _Watched)]
        if name in _MOVE:
            probe = _replay(func, name, args, kwargs)
        elif name in _REDUCE and not (name in ("max", "min") and len(args) > 1 and torch.is_tensor(args[1])):
            _note(args[0], _dims(args, kwargs, args[0].ndim if torch.is_tensor(args[0]) else 0, name), name)
            probe = None
        elif name in _CONTRACT:
            for pos, a in enumerate(args[:2]):
                if isinstance(a, _Watched) and a.ndim:
                    _note(a, [a.ndim - 1] if pos == 0 or a.ndim == 1 else [a.ndim - 2], name)
            probe = None
        else:
            probe = _broadcast_max(watched, out)
        return _wrap(out, probe)


def _flat(xs) -> list:
    out = []
    for x in xs:
        out.extend(_flat(x) if isinstance(x, (list, tuple)) else [x])
    return out


def _is_tensors(x) -> bool:
    return torch.is_tensor(x) or (isinstance(x, (list, tuple)) and bool(x) and all(torch.is_tensor(t) for t in x))


def _cols(t) -> torch.Tensor:
    cols = getattr(t, "_cols", None)
    if cols is None or cols.shape != t.shape:
        return torch.zeros(t.shape, dtype=torch.long)
    return cols


def _dims(args, kwargs, ndim: int, name: str = "") -> list[int]:
    if name in ("topk", "kthvalue", "norm", "quantile", "nanquantile"):  # args[1] is k, p or q
        dim = kwargs.get("dim", args[2] if len(args) > 2 else (-1 if name in ("topk", "kthvalue") else None))
    else:
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not torch.is_tensor(args[1]) else None)
    if dim is None or isinstance(dim, str):
        return list(range(ndim))
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return [d % ndim for d in dims if isinstance(d, int)] if ndim else []


def _note(t, dims, name) -> None:
    """Log a reduction of ``t`` along ``dims`` (None: it left torch) if it reads any column."""
    log = _Watched._log
    if log is None:
        return
    cols = _cols(t)
    ids = cols[cols > 0]
    if ids.numel() == 0:
        return
    width = math.prod(t.shape[d] for d in dims) if dims is not None else -1
    log.append([int(ids.min()) - 1, int(ids.max()) - 1, int(width), name])


def _replay(func, name, args, kwargs):
    """The same move applied to the column ids (plain tensors where the move takes indices)."""
    def data(a):
        return a.as_subclass(torch.Tensor) if isinstance(a, _Watched) else a

    def ids(a):
        if isinstance(a, (list, tuple)):
            return type(a)(ids(x) for x in a)
        return _cols(a) if torch.is_tensor(a) else a

    new = list(args)
    if new:
        new[0] = ids(new[0])
    if name == "__setitem__" and len(new) > 2:
        new[2] = _cols(new[2]) if torch.is_tensor(new[2]) else 0
    new = [a if i == 0 or (name == "__setitem__" and i == 2) else data(a) for i, a in enumerate(new)]
    kw = {k: data(v) for k, v in kwargs.items()}
    if name == "pad":
        kw["value"] = 0
        new = new[:2]
    try:
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*new, **kw)
        return new[0] if name == "__setitem__" else result
    except Exception:
        return None


def _broadcast_max(watched, out):
    if not torch.is_tensor(out):
        return None
    probe = None
    for w in watched:
        try:
            c = torch.broadcast_to(_cols(w), out.shape)
        except RuntimeError:
            continue
        probe = c if probe is None else torch.maximum(probe, c)
    return probe


def _wrap(out, probe):
    if type(out) in (list, tuple):
        probes = probe if isinstance(probe, (list, tuple)) and len(probe) == len(out) else [None] * len(out)
        return type(out)(_wrap(o, p) for o, p in zip(out, probes))
    if not torch.is_tensor(out):
        return out
    w = out if isinstance(out, _Watched) else out.as_subclass(_Watched)
    w._cols = probe if torch.is_tensor(probe) and probe.shape == out.shape else torch.zeros(out.shape, dtype=torch.long)
    return w


def _softmax_trial(online_softmax, x, block):
    """Driver (runs where the student's code lives): call ``online_softmax`` on ``x`` watched column
    by column.  Returns the output and every reduction that read columns of ``x``:
    ``[first column, last column, columns reduced at once (-1: left torch), operation]``."""
    w = x.as_subclass(_Watched)
    w._cols = torch.arange(1, x.shape[-1] + 1).expand(x.shape).clone()
    _Watched._log = log = []
    try:
        out = online_softmax(w, block)
    finally:
        _Watched._log = None
    if torch.is_tensor(out):
        out = out.as_subclass(torch.Tensor).detach().clone()
    return {"out": out, "reads": log}


def _passes(reads: list, block: int, n: int) -> tuple[int, str | None]:
    """(passes over the blocks, the first operation that reduced more than a block at once or left
    torch).  A new pass starts when a reduction reads a column read before, in this pass, by a block
    other than the current one."""
    passes, seen, current = 1, set(), set()
    for first, last, width, name in reads:
        if width == -1 or (width > block and n > block):
            return passes, name
        cols = set(range(first, last + 1))
        if cols & (seen - current):
            passes, seen = passes + 1, set()
        seen |= cols
        current = cols
    return passes, None


def _softmax_variant(x, block, *, rescale=True, last_block=True):
    """The online softmax with one known mistake (for the hints)."""
    n = x.shape[-1]
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    stop = n if last_block else n - n % block
    for s in range(0, stop, block):
        xb = x[..., s:s + block]
        m_new = torch.maximum(m, xb.amax(-1))
        l = (l * torch.exp(m - m_new) if rescale else l) + torch.exp(xb - m_new[..., None]).sum(-1)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]


def _softmax_hint(got, x, block) -> str:
    blocks = torch.cat([torch.softmax(b, -1) for b in x.split(block, -1)], -1)
    known = [
        (_softmax_variant(x, block, rescale=False),
         "the running sum was not rescaled when the max grew: multiply it by exp(m_old - m_new) first"),
        (_softmax_variant(x, block, last_block=False),
         "the last, shorter block is missing from the sum: loop with range(0, n, block)"),
        (blocks, "each block was normalized on its own: the sum must run over the whole row"),
        (torch.exp(x - x.amax(-1, keepdim=True)), "the output is not divided by the row sum"),
    ]
    for wrong, hint in known:
        if same(got, wrong, rtol=1e-9, atol=1e-12):
            return hint
    if torch.is_tensor(got) and not torch.isfinite(got.double()).all():
        return "exp overflowed: subtract the running max before exp"
    return ""


@exercise_check(student="my_online_softmax")
def check_online_softmax(online_softmax):
    """``online_softmax(x, block)``: softmax over the last dim, max and sum found in one blocked pass."""
    g = _gen(1)
    cases = [((3, 77), 16, 1.0), ((2, 5, 130), 32, 30.0), ((1, 1), 4, 1.0), ((4, 513), 100, 1000.0),
             ((2, 64), 16, 5.0)]
    for shape, block, scale in cases:
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        seen = observe(online_softmax, _softmax_trial, x, block)
        got = seen["out"]
        where = f"shape {shape}, block {block}, scores of size ~{scale:g}"
        assert_close(got, torch.softmax(x, dim=-1), what=f"online_softmax on {where}",
                     rtol=1e-9, atol=1e-12, hint=lambda: _softmax_hint(got, x, block))
        n = shape[-1]
        passes, whole = _passes(seen["reads"], block, n)
        if whole == "softmax" or whole == "log_softmax":
            raise AssertionError(f"{where}: your function calls torch.{whole} on whole rows of {n} columns; "
                                 f"the exercise is to compute it yourself, one block of {block} columns at a time")
        require(whole is None,
                f"{where}: `{whole}` read whole rows of {n} columns at once (a separate pass for the max, "
                f"like safe_softmax); read the row in blocks of {block} columns and update a running max "
                "and sum with each block"
                if whole not in ("numpy", "tolist", "__array__") else
                f"{where}: the rows left torch (`.{whole}()`); the check follows torch operations only")
        require(passes == 1,
                f"{where}: your function went over the blocks {passes} times (a block was read again after "
                "later blocks): find the max and the sum in the same pass, rescaling the running sum by "
                "exp(m_old - m_new) whenever a block raises the max")


# ------------------------------------------------------------------------------ merging states
def _merge_hint(got, a, b) -> str:
    (m1, l1, c1), (m2, l2, c2) = a, b
    m = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
    known = [
        ((m, l1 + l2, c1 * w1[..., None] + c2 * w2[..., None]),
         "l was added without rescaling: weight each sum by exp(m_i - m) like acc"),
        ((m, l1 * w1 + l2 * w2, c1 + c2), "acc was added without rescaling: weight it by exp(m_i - m) like l"),
        ((m, l1 * w2 + l2 * w1, c1 * w2[..., None] + c2 * w1[..., None]),
         "the weights are swapped: state 1 gets exp(m1 - m)"),
        ((m1, l1 + l2 * torch.exp(m2 - m1), c1 + c2 * torch.exp(m2 - m1)[..., None]),
         "the merged max must be max(m1, m2), not m1"),
    ]
    for wrong, hint in known:
        if same(tuple(got), wrong, rtol=1e-9, atol=1e-12):
            return hint
    return ""


@exercise_check(student="my_merge")
def check_merge_states(merge):
    """``merge(m1, l1, acc1, m2, l2, acc2) -> (m, l, acc)`` for two online-softmax states of the same rows."""
    from effdl.attention.softmax import SoftmaxState, merge_states

    g = _gen(2)
    for rows, dv in [(5, 3), (17, 40)]:
        st = []
        for _ in range(2):
            m = torch.randn(rows, generator=g, dtype=torch.float64) * 5
            l = torch.rand(rows, generator=g, dtype=torch.float64) * 10 + 0.5
            acc = torch.randn(rows, dv, generator=g, dtype=torch.float64)
            st.append((m, l, acc))
        ref = merge_states(SoftmaxState(*st[0]), SoftmaxState(*st[1]))
        got = merge(*st[0], *st[1])
        require(isinstance(got, (tuple, list)) and len(got) == 3, "return a tuple (m, l, acc)")
        for name, a, b in zip(("m", "l", "acc"), got, (ref.m, ref.l, ref.acc)):
            assert_close(a, b, what=f"merged {name} ({rows} rows)", rtol=1e-9, atol=1e-12,
                         hint=lambda: _merge_hint(got, st[0], st[1]))
    # an empty state (no keys seen yet: m = -inf, l = 0, acc = 0) must be the identity of the merge
    m, l, acc = st[0]
    empty = (torch.full_like(m, -math.inf), torch.zeros_like(l), torch.zeros_like(acc))
    for order, got in (("empty first", merge(*empty, m, l, acc)), ("empty second", merge(m, l, acc, *empty))):
        for name, a, b in zip(("m", "l", "acc"), got, (m, l, acc)):
            require(not torch.isnan(torch.as_tensor(a)).any(),
                    f"merging with an empty state (m=-inf, l=0, {order}) gave NaN in {name}: "
                    "exp(-inf - (-inf)) is NaN; shift by a finite value where the new max is -inf")
            assert_close(a, b, what=f"{name} after merging with an empty state ({order})", rtol=1e-9, atol=1e-12)
    # two empty states: still empty, and no NaN
    got = merge(*empty, *empty)
    for name, a in zip(("l", "acc"), got[1:]):
        require(not torch.isnan(torch.as_tensor(a)).any(),
                f"merging two empty states (m=-inf, l=0) gave NaN in {name}: exp(-inf - (-inf)) is NaN; "
                "shift by a finite value where the new max is -inf")
        require(bool((torch.as_tensor(a) == 0).all()), f"merging two empty states must leave {name} = 0")


# ------------------------------------------------------------------------------ causal tiles
def _plan_hint(got, nq, nk, bq, bk) -> str:
    from effdl.attention.tiled import causal_tile_plan

    if not isinstance(got, dict):
        return ""
    if nq != nk and got == _plan_variant(nq, nk, bq, bk, off=0):
        return "the mask is aligned top-left; align it bottom-right (query i sees keys j <= i + nk - nq)"
    if got == {(j, i): v for (i, j), v in causal_tile_plan(nq, nk, bq, bk).items()}:
        return "the keys are (key tile, query tile); use (query tile i, key tile j)"
    if got == _plan_variant(nq, nk, bq, bk, ceil=False):
        return "the last, shorter tile of a dimension is missing: count tiles with range(0, n, block)"
    return ""


def _plan_variant(nq, nk, bq, bk, *, off=None, ceil=True):
    off = nk - nq if off is None else off
    plan = {}
    for i, i0 in enumerate(range(0, nq if ceil else nq - nq % bq, bq)):
        i1 = min(i0 + bq, nq)
        for j, j0 in enumerate(range(0, nk if ceil else nk - nk % bk, bk)):
            j1 = min(j0 + bk, nk)
            if j0 <= i1 - 1 + off:
                plan[(i, j)] = "full" if j1 - 1 <= i0 + off else "partial"
    return plan


@exercise_check(student="my_tile_plan")
def check_causal_tile_plan(plan_fn):
    """``plan_fn(nq, nk, block_q, block_k) -> {(i, j): "full" | "partial"}`` (bottom-right causal)."""
    from effdl.attention.tiled import causal_tile_plan

    cases = [
        (8, 8, 4, 4),
        (77, 77, 16, 32),
        (130, 130, 64, 16),
        (5, 70, 4, 8),
        (1, 513, 1, 128),
        (33, 20, 8, 8),
        (1, 1, 4, 4),
    ]
    for nq, nk, bq, bk in cases:
        got = plan_fn(nq, nk, bq, bk)
        ref = causal_tile_plan(nq, nk, bq, bk)
        where = f"nq={nq}, nk={nk}, tiles {bq}x{bk}"
        require(isinstance(got, dict), f"return a dict {{(i, j): 'full' | 'partial'}}, got {type(got).__name__}")
        hint = _plan_hint(got, nq, nk, bq, bk)
        hint = f" ({hint})" if hint else ""
        bad_keys = [t for t in got if not (isinstance(t, tuple) and len(t) == 2
                                           and all(isinstance(i, int) and not isinstance(i, bool) for i in t))]
        require(not bad_keys, f"{where}: keys must be (query tile, key tile) pairs of ints, got {bad_keys[:2]}")
        missing = sorted(set(ref) - set(got))
        extra = sorted(set(got) - set(ref))
        require(not missing, f"{where}: tiles {missing[:4]} have visible keys but are missing{hint}")
        require(not extra, f"{where}: tiles {extra[:4]} are fully masked (or outside the grid) and should be "
                f"skipped{hint}")
        wrong = sorted(t for t in ref if got[t] != ref[t])
        if wrong:
            t = wrong[0]
            raise AssertionError(f"{where}: tile {t} should be {ref[t]!r}, got {got[t]!r} "
                                 "('full' when even the tile's first query sees its last key)" + hint)


# ------------------------------------------------------------------------------ FA2's I/O
def _whole(x, what: str) -> int:
    """``x`` as an int; an error (no silent truncation) for a float or anything else."""
    if isinstance(x, bool) or not isinstance(x, int):
        if isinstance(x, float) or (torch.is_tensor(x) and x.is_floating_point()):
            raise AssertionError(f"{what}: got the float {float(x)!r}; counts and tile sizes are whole numbers "
                                 "(use // or math.ceil where you divide, and return ints)")
        raise AssertionError(f"{what}: expected an int, got {type(x).__name__} {x!r}")
    return x


@exercise_check(student="my_fa2_io")
def check_fa2_io_count(io_fn):
    """``io_fn(N, d, Br, Bc) -> (reads, writes)`` of FlashAttention-2's loop order (non-causal)."""
    from effdl.attention.iosim import io_count

    for N, d, br, bc in [(64, 8, 16, 8), (100, 16, 30, 7), (513, 32, 40, 32), (1, 4, 1, 1), (50, 4, 64, 64)]:
        ref = io_count("fa2", N, d, M=10 ** 9, Br=br, Bc=bc)
        got = io_fn(N, d, br, bc)
        where = f"N={N}, d={d}, Br={br}, Bc={bc}"
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (reads, writes)")
        reads, writes = _whole(got[0], f"{where}: reads"), _whole(got[1], f"{where}: writes")
        hint = ""
        if reads == N * d + (N // br) * 2 * N * d:
            hint = " (⌈N/Br⌉ query tiles: the last, shorter one counts too)"
        elif reads == N * d + -(-N // br) * 2 * (-(-N // bc) * bc) * d:
            hint = " (a partial last K/V tile holds fewer rows: summing the tiles gives exactly N rows)"
        elif reads == N * d + -(-N // bc) * 2 * N * d:
            hint = " (K and V are re-read once per *query* tile: ⌈N/Br⌉ times)"
        require(reads == ref.reads, f"{where}: reads {reads}, expected {ref.reads} "
                "(Q once; every K and V tile once per query tile; partial last tiles count what they hold)" + hint)
        hint = " (one logsumexp per row is written too)" if writes == N * d else ""
        require(writes == ref.writes, f"{where}: writes {writes}, expected {ref.writes} "
                "(O once, plus one logsumexp per row)" + hint)


# ------------------------------------------------------------------------------ tile sizes
@exercise_check(student="my_tile_sizes")
def check_tile_sizes(choose):
    """``choose(M, d) -> (Br, Bc)`` for FA2: fits in M and moves at most 10% more than the library's choice."""
    from effdl.attention.iosim import block_sizes, closed_form

    N = 4096
    for M, d in [(4096, 16), (16384, 64), (65536, 64), (100_000, 128), (1000, 8)]:
        got = choose(M, d)
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (Br, Bc) of ints")
        br, bc = (_whole(t, f"M={M}, d={d}: {n}") for t, n in zip(got, ("Br", "Bc")))
        require(br >= 1 and bc >= 1, f"M={M}, d={d}: tiles must be at least 1 x 1, got {br} x {bc}")
        ws = 2 * br * d + 2 * br + 2 * bc * d + br * bc
        hint = " (S_ij, Br x Bc, and m_i, l_i live on chip too)" if 2 * br * d + 2 * bc * d <= M else ""
        require(ws <= M, f"M={M}, d={d}: Br={br}, Bc={bc} need {ws} elements on chip "
                "(Q_i, O_i, m_i, l_i, K_j, V_j and S_ij) but only M fit" + hint)
        # why the closed form: the same count as simulating io_count, without stepping
        # through every tile (a 1 x 1 tiling of N = 4096 would take a minute)
        lib = block_sizes("fa2", N, d, M)
        ours = closed_form("fa2", N, d, M, **lib).total
        theirs = closed_form("fa2", N, d, M, Br=br, Bc=bc).total
        hint = " (Br and Bc swapped? the query tile is the one to make large)" if br < bc else ""
        require(theirs <= 1.1 * ours, f"M={M}, d={d}: your tiles {br} x {bc} move {theirs} elements, the "
                f"library's {lib['Br']} x {lib['Bc']} {ours}: FA2 reads K and V once per query tile, so make Br "
                "as large as fits" + hint)


# ------------------------------------------------------------------------------ split-KV merge
def _split_hint(got, outs, lses) -> str:
    m = lses.amax(0, keepdim=True)
    finite = torch.where(torch.isneginf(lses), torch.zeros_like(lses), lses)
    known = [
        (outs.mean(0), "a plain average: weight each split by exp(lse_s - lse), its share of the row's sum"),
        ((outs * torch.exp(lses - m)[..., None]).sum(0),
         "the weights exp(lse_s - max) must be divided by their sum: use exp(lse_s - logsumexp(lses))"),
        ((outs * torch.softmax(finite, 0)[..., None]).sum(0),
         "an empty split (lse = -inf) got a weight: it must get weight 0, exp(-inf) = 0"),
        (outs[lses.argmax(0, keepdim=True)[..., None].expand(1, *outs.shape[1:])][0] if lses.numel() else outs,
         "only the split with the largest lse was kept: every split contributes, weighted"),
    ]
    for wrong, hint in known:
        if same(got, wrong, rtol=1e-9, atol=1e-12):
            return hint
    if torch.is_tensor(got) and not torch.isfinite(got.double()).all():
        if torch.isinf(lses).all(0).any():
            return ("a row where every split is empty (all lse = -inf) must give 0, not NaN: shift by 0 where "
                    "the merged lse is -inf")
        return "exp(lse) overflowed: subtract the merged lse (torch.logsumexp) before exp"
    return ""


@exercise_check(student="my_split_merge")
def check_split_kv_merge(merge):
    """``merge(outs (S, ..., dv), lses (S, ...)) -> out (..., dv)``: combine per-split normalized outputs."""
    from effdl.attention.decode import split_kv_partials
    from effdl.attention.softmax import merge_lse
    from effdl.reference import reference_attention

    g = _gen(3)
    for S, L, nq, scale in [(1, 50, 1, 1.0), (4, 513, 1, 1.0), (7, 130, 3, 1.0), (3, 40, 2, 400.0)]:
        q = torch.randn(2, 3, nq, 16, generator=g, dtype=torch.float64) * scale
        k = torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64)
        outs, lses = split_kv_partials(q, k, v, S)
        got = merge(outs, lses)
        big = f" (large scores: lse up to {float(lses.max()):.0f})" if scale > 1 else ""
        assert_close(got, reference_attention(q, k, v, causal=True),
                     what=f"merged output of {S} splits, L={L}, Nq={nq}{big}", rtol=1e-9, atol=1e-12,
                     hint=lambda: _split_hint(got, outs, lses))
    # a split that saw no keys (lse = -inf, out = 0) gets weight 0: the others merge as if it were absent
    outs, lses = split_kv_partials(q[..., :1, :] / scale, k, v, 5)
    lses, outs = lses.clone(), outs.clone()
    lses[1], outs[1] = -math.inf, 0.0
    # and a row where every split is empty: no key at all, output 0
    lses[:, 0, 0, 0], outs[:, 0, 0, 0] = -math.inf, 0.0
    expected, _ = merge_lse(torch.cat([outs[:1], outs[2:]]), torch.cat([lses[:1], lses[2:]]))
    got = merge(outs, lses)
    require(got is not None and tuple(torch.as_tensor(got).shape) == tuple(expected.shape),
            f"return the merged output of shape {tuple(expected.shape)}")
    require(not torch.isnan(torch.as_tensor(got)[0, 0, 0]).any(),
            "a row where every split is empty (all lse = -inf) gave NaN: it saw no key, its output is 0 "
            "(shift by 0 where the merged lse is -inf)")
    assert_close(got, expected, what="merged output with an empty split (lse = -inf, out = 0) and a row "
                 "where every split is empty", rtol=1e-9, atol=1e-12, hint=lambda: _split_hint(got, outs, lses))
