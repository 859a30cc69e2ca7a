"""Exercise checks of the attention chapter: each compares the student's function with the library's
(or with autograd of plain attention), and checks what the exercise is about (one pass over the blocks,
empty splits, whole tiles, a tile loop in FA2's order that never holds the whole score matrix, float32
accuracy by flash-attention's 2x rule, the tiles causal masking skips)."""

from __future__ import annotations

import math
import numbers

import torch
from torch.overrides import TorchFunctionMode

from effdl.checks import assert_close, exercise_check, observe, require, same, when_solved  # noqa: F401

__all__ = [                                  # in the order of the chapter's exercises
    "check_online_softmax",
    "check_merge_states",
    "check_fa2_forward",
    "check_causal_tile_plan",
    "check_backward_tile",
    "check_fa2_causal_io",
    "check_tile_sizes",
    "check_decode_intensity",
    "check_split_kv_merge",
]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_online_softmax": ["effdl.attention.softmax.online_softmax"],
    "check_merge_states": ["effdl.attention.softmax.merge_states"],
    "check_causal_tile_plan": ["effdl.attention.tiled.causal_tile_plan"],
    "check_fa2_causal_io": ["effdl.attention.iosim._run_fa2", "effdl.attention.iosim.io_count",
                           "effdl.attention.iosim.closed_form"],
    "check_tile_sizes": ["effdl.attention.iosim.block_sizes", "effdl.attention.iosim.best_tiles",
                         "effdl.attention.iosim.optimum_rows"],
    "check_split_kv_merge": ["effdl.attention.softmax.merge_lse"],
    "check_fa2_forward": ["effdl.attention.textbook.fa2_forward", "effdl.attention.tiled.flash2_forward",
                          "effdl.attention.tiled.flash1_forward"],
    "check_backward_tile": ["effdl.attention.textbook.backward_key_tile", "effdl.attention.textbook.fa2_backward",
                            "effdl.attention.tiled.flash2_backward"],
    "check_decode_intensity": ["effdl.attention.decode.decode_intensity"],
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
    (``_cols``: id + 1, 0 for values that are not one column's, such as a running max) and the last
    column its value depends on (``_ahead``: id + 1, 0 for none; a running max after block b depends
    on every column up to b's last), and logs every reduction that reads columns:
    ``(first, last, columns reduced at once, operation, whether it used a later column)``."""

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
            args[0]._ahead = _replay(func, name, args, kwargs, "_ahead")
        if not _is_tensors(out):
            return out
        watched = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, _Watched)]
        if name in _MOVE:
            probe, ahead = _replay(func, name, args, kwargs), _replay(func, name, args, kwargs, "_ahead")
        elif name in _REDUCE and not (name in ("max", "min") and len(args) > 1 and torch.is_tensor(args[1])):
            dims = _dims(args, kwargs, args[0].ndim if torch.is_tensor(args[0]) else 0, name)
            _note(args[0], dims, name)
            probe, ahead = None, _reduced_ahead(args[0], dims, out)
        elif name in _CONTRACT:
            for pos, a in enumerate(args[:2]):
                if isinstance(a, _Watched) and a.ndim:
                    _note(a, [a.ndim - 1] if pos == 0 or a.ndim == 1 else [a.ndim - 2], name)
            probe, ahead = None, _reduced_ahead(None, None, out, watched)
        else:
            probe, ahead = _broadcast_max(watched, out), _broadcast_max(watched, out, "_ahead")
        return _wrap(out, probe, ahead)


def _flat(xs) -> list:
    out = []
    for x in xs:
        out.extend(_flat(x) if isinstance(x, (list, tuple)) else [x])
    return out


def _is_tensors(x) -> bool:
    return torch.is_tensor(x) or (isinstance(x, (list, tuple)) and bool(x) and all(torch.is_tensor(t) for t in x))


def _cols(t, label: str = "_cols") -> torch.Tensor:
    cols = getattr(t, label, None)
    if cols is None or cols.shape != t.shape:
        return torch.zeros(t.shape, dtype=torch.long)
    return cols


def _reduced_ahead(t, dims, out, watched=()):
    """``_ahead`` of a reduction's output: the latest column each output element depends on (the
    reduced elements' latest), or, where the shapes do not say which elements went where, the
    latest of all inputs."""
    first = out[0] if isinstance(out, (list, tuple)) else out
    probe = None
    if t is not None and torch.is_tensor(t) and dims and t.ndim:
        ahead = _cols(t, "_ahead")
        for keep in (True, False):
            r = ahead.amax(dim=dims, keepdim=keep)
            if r.shape == first.shape:
                probe = r
                break
    if probe is None:
        latest = max([int(_cols(w, "_ahead").max()) for w in (*watched, t) if torch.is_tensor(w) and w.numel()]
                     or [0])
        probe = torch.full(first.shape, latest, dtype=torch.long)
    return [probe] * len(out) if isinstance(out, (list, tuple)) else probe


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
    later = False  # does a reduced value depend on a column after the last one it reduces?
    if dims:
        last_read = cols.amax(dim=dims, keepdim=True)
        later = bool(((_cols(t, "_ahead") > last_read) & (cols > 0)).any())
    log.append([int(ids.min()) - 1, int(ids.max()) - 1, int(width), name, later])


def _replay(func, name, args, kwargs, label: str = "_cols"):
    """The same move applied to the column ids, or to ``label`` (plain tensors where the move takes
    indices)."""
    def data(a):
        return a.as_subclass(torch.Tensor) if isinstance(a, _Watched) else a

    def ids(a):
        if isinstance(a, (list, tuple)):
            return type(a)(ids(x) for x in a)
        return _cols(a, label) if torch.is_tensor(a) else a

    new = list(args)
    if new:
        new[0] = ids(new[0])
    if name == "__setitem__" and len(new) > 2:
        new[2] = _cols(new[2], label) if torch.is_tensor(new[2]) else 0
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


def _broadcast_max(watched, out, label: str = "_cols"):
    if not torch.is_tensor(out):
        return None
    probe = None
    for w in watched:
        try:
            c = torch.broadcast_to(_cols(w, label), out.shape)
        except RuntimeError:
            continue
        probe = c if probe is None else torch.maximum(probe, c)
    return probe


def _wrap(out, probe, ahead=None):
    if type(out) in (list, tuple):
        def each(p):
            return p if isinstance(p, (list, tuple)) and len(p) == len(out) else [None] * len(out)
        return type(out)(_wrap(o, p, a) for o, p, a in zip(out, each(probe), each(ahead)))
    if not torch.is_tensor(out):
        return out
    w = out if isinstance(out, _Watched) else out.as_subclass(_Watched)
    def fits(label):
        return torch.is_tensor(label) and label.shape == out.shape

    w._cols = probe if fits(probe) else torch.zeros(out.shape, dtype=torch.long)
    w._ahead = ahead if fits(ahead) else torch.zeros(out.shape, dtype=torch.long)
    return w


def _softmax_trial(online_softmax, x, block):
    """Driver (runs where the student's code lives): call ``online_softmax`` on ``x`` watched column
    by column.  Returns the output and every reduction that read columns of ``x``:
    ``[first column, last column, columns reduced at once (-1: left torch), operation, whether a
    reduced value depended on a later column]``."""
    w = x.as_subclass(_Watched)
    w._cols = torch.arange(1, x.shape[-1] + 1).expand(x.shape).clone()
    w._ahead = w._cols.clone()
    _Watched._log = log = []
    try:
        out = online_softmax(w, block)
    finally:
        _Watched._log = None
    if torch.is_tensor(out):
        out = out.as_subclass(torch.Tensor).detach().clone()
    return {"out": out, "reads": log}


def _passes(reads: list, block: int, n: int) -> tuple[int, str | None, str | None]:
    """(passes over the blocks, the first operation that reduced more than a block at once or left
    torch, the first that reduced a block with a value computed from later columns).  A new pass
    starts when a reduction reads a column read before, in this pass, by a block other than the
    current one, or when it needs a later column (the max of the whole row, found before)."""
    passes, seen, current, later = 1, set(), set(), None
    for first, last, width, name, ahead in reads:
        if width == -1 or (width > block and n > block):
            return passes, name, later
        cols = set(range(first, last + 1))
        if cols & (seen - current):
            passes, seen = passes + 1, set()
        if ahead and later is None:
            later = name
        seen |= cols
        current = cols
    return passes, None, later


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
        passes, whole, later = _passes(seen["reads"], block, n)
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
        require(later is None,
                f"{where}: `{later}` reduced a block with a value computed from later blocks (such as "
                "the maximum of the whole row): that is a second pass over the blocks; fold each block "
                "into a running max and sum before reading the next")


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


def _causal_io_hint(reads, N, d, Br, Bc) -> str:
    """What the mistake behind a wrong causal read count probably is."""
    def total(keys, kv=2):
        return N * d + kv * d * sum(keys(i0, min(i0 + Br, N)) for i0 in range(0, N, Br))

    def tiles(i1):                                    # key tiles whose first key <= i1 - 1
        return (i1 - 1) // Bc + 1

    known = [
        (total(lambda i0, i1: N), "every key tile was counted for every query tile, as without the "
         "mask: causal FA2 skips the key tiles right of the diagonal, those whose first key is after "
         "the query tile's last query"),
        *((total(keys), "the diagonal tiles are missing: a key tile that holds any key <= the query "
           "tile's last query is read, whole, and masked on chip")
          for keys in (lambda i0, i1: i0 // Bc * Bc,            # tiles left of the first query
                       lambda i0, i1: (i0 + 1) // Bc * Bc)),    # tiles that need no mask
        (total(lambda i0, i1: tiles(i1) * Bc), "the last key tile was counted as Bc keys: a partial "
         "last K/V tile holds only the keys left, N - (T_c - 1)·Bc"),
        (total(lambda i0, i1: i1), "only the visible keys of the diagonal tile were counted: K_j and V_j "
         "are read as whole tiles (all their keys up to N), the mask is applied on chip"),
        (total(lambda i0, i1: min(N, (i0 // Br + 1) * Bc)), "query tile i does not visit i + 1 key "
         "tiles unless Br = Bc: it visits the key tiles up to the one holding its last query, "
         "⌊(i1 - 1)/Bc⌋ + 1 of them"),
        (total(lambda i0, i1: min(N, tiles(i1) * Bc), kv=1), "only K was counted: V_j is read with "
         "K_j, 2·d elements per key"),
    ]
    return next((hint for wrong, hint in known if reads == wrong), "")


_CAUSAL_IO_CASES = [
    # N, d, Br, Bc
    (64, 8, 16, 8),          # Br = 2 Bc: every tile boundary on the diagonal
    (100, 16, 30, 7),        # nothing divides: partial last tiles on both sides
    (77, 8, 16, 32),         # Br < Bc: several query tiles share a diagonal key tile
    (45, 8, 13, 13),         # square tiles, N not a multiple
    (513, 32, 40, 32),
    (130, 16, 64, 24),
    (50, 4, 64, 64),         # one tile larger than the sequence
    (1, 4, 1, 1),
]


@exercise_check(student="my_fa2_causal_io")
def check_fa2_causal_io(io_fn):
    """``io_fn(N, d, Br, Bc) -> (reads, writes)`` of FlashAttention-2's loop with causal tile
    skipping (Nq = Nk = N), in the model of :func:`effdl.attention.iosim.io_count` (``mma=1``)."""
    from effdl.attention.iosim import io_count

    for N, d, br, bc in _CAUSAL_IO_CASES:
        ref = io_count("fa2", N, d, M=10 ** 9, causal=True, mma=1, Br=br, Bc=bc)
        got = io_fn(N, d, br, bc)
        where = f"N={N}, d={d}, Br={br}, Bc={bc}"
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (reads, writes)")
        reads, writes = _whole(got[0], f"{where}: reads"), _whole(got[1], f"{where}: writes")
        hint = _causal_io_hint(reads, N, d, br, bc)
        require(reads == ref.reads, f"{where}: reads {reads}, expected {ref.reads} (Q once; for each "
                "query tile, K_j and V_j of every key tile whose first key <= the tile's last query; a "
                "partial tile counts what it holds)" + (f"; {hint}" if hint else ""))
        hint = {N * d: "; one logsumexp per row is written too, for the backward pass",
                N * d + 2 * N: "; only the logsumexp L = m + log ℓ is written, one per row, not m and ℓ"
                }.get(writes, "")
        require(writes == ref.writes, f"{where}: writes {writes}, expected {ref.writes} "
                "(O once, plus one logsumexp per row)" + hint)


# ------------------------------------------------------------------------------ tile sizes
@exercise_check(student="my_tile_sizes")
def check_tile_sizes(choose):
    """``choose(M, d) -> (Br, Bc)`` for FA2: whole 16-wide tiles that fit in M and move at most 10% more
    than the best legal tiles of the model (:func:`effdl.attention.iosim.best_tiles`)."""
    from effdl.attention.iosim import best_tiles, closed_form, working_set

    N, mma = 4096, 16
    for M, d in [(8192, 16), (16384, 64), (65536, 64), (100_000, 128), (32768, 32)]:
        got = choose(M, d)
        require(isinstance(got, (tuple, list)) and len(got) == 2, "return a tuple (Br, Bc) of ints")
        br, bc = (_whole(t, f"M={M}, d={d}: {n}") for t, n in zip(got, ("Br", "Bc")))
        require(br >= 1 and bc >= 1, f"M={M}, d={d}: tiles must be at least 1 x 1, got {br} x {bc}")
        require(br % mma == 0 and bc % mma == 0,
                f"M={M}, d={d}: {br} x {bc} is not made of whole {mma} x {mma} blocks; tensor-core "
                f"instructions work on {mma}-wide tiles, so round Br and Bc to multiples of {mma}")
        ws = sum(working_set(br, bc, d, mma))
        hint = " (S_ij, Br x Bc, and m_i, l_i live on chip too)" if 2 * br * d + 2 * bc * d <= M else ""
        require(ws <= M, f"M={M}, d={d}: Br={br}, Bc={bc} need {ws} elements on chip "
                "(Q_i, O_i, m_i, l_i, K_j, V_j and S_ij) but only M fit" + hint)
        # why the closed form: the same count as simulating io_count, without stepping
        # through every tile
        best = best_tiles("fa2", N, d, M, mma=mma)
        theirs = closed_form("fa2", N, d, M, mma=mma, Br=br, Bc=bc).total
        hint = " (Br and Bc swapped? the query tile is the one to make large)" if br < bc else ""
        require(theirs <= 1.1 * best["total"],
                f"M={M}, d={d}: your tiles {br} x {bc} move {theirs} elements, the best legal tiles "
                f"{best['Br']} x {best['Bc']} move {best['total']}: FA2 reads K and V once per query tile, "
                "so make Br as large as fits; Bc does not appear in the count" + hint)


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


# ------------------------------------------------------------------------------ FA2 forward loop
#: operations that make a view or a broadcast, not a new tensor
_VIEWS = {"__getitem__", "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "expand",
          "expand_as", "broadcast_to", "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select",
          "split", "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "as_strided", "diagonal",
          "__get__", "detach"}


#: operations whose result does not depend on the values of their tensor arguments (only on
#: their shape, dtype or device): a row of q or k does not flow into it
_FRESH = {"zeros", "ones", "full", "empty", "empty_strided", "arange", "rand", "randn", "randint", "tensor",
          "as_tensor", "scalar_tensor", "linspace", "logspace", "eye", "size", "dim", "numel"}
#: operations that multiply q's rows with k's rows when given one of each (matmul and friends)
_PRODUCT = _CONTRACT | {"linear", "addmm", "baddbmm", "addbmm", "chain_matmul", "multi_dot"}
_INPLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__"}
_ROWS = ("_effdl_q_rows", "_effdl_k_rows")   # where the rows of q and of k are kept on a tensor


def _rows(t, label):
    """The row ids of q or k (``label``) a tensor's elements carry, or None: ``(b·H + h)·N + row + 1``
    for an element that came from that row of head ``h`` of sequence ``b``, 0 for any other."""
    rows = getattr(t, label, None)
    return rows if rows is not None and rows.shape == t.shape else None


class _Follow(TorchFunctionMode):
    """Under it, the student's forward loop: notes every tensor the torch functions called return,
    views left out (``made``: ``{(function, shape, floating point)}``), and follows the rows of q
    and k through slices, views, casts and elementwise ops (the scale, ``.double()``), so that every
    product of q's rows with k's rows is logged with the tiles it multiplies: ``["S", heads,
    query tiles, key tiles]``, a head being ``b·H + h``.  A write into a tensor as tall as the whole
    query sequence (``["W", op, shape]``, consecutive writes noted once) shows where the running
    state lives."""

    def __init__(self, nq, nk, block_q, block_k):
        super().__init__()
        self.made: dict = {}
        self.events: list = []
        self.n = (nq, nk)
        self.blocks = (block_q, block_k)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name not in _VIEWS:
            for t in out if isinstance(out, (list, tuple)) else (out,):
                if torch.is_tensor(t):
                    self.made.setdefault((name, tuple(t.shape), t.is_floating_point()), None)
        try:
            self._follow(func, name, args, kwargs, out)
        except Exception:  # following is best effort: it never breaks the student's code
            pass
        return out

    def _follow(self, func, name, args, kwargs, out):
        tensors = [a for a in _flat(list(args) + list(kwargs.values())) if torch.is_tensor(a)]
        inplace = name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("_"))
        if inplace and args and torch.is_tensor(args[0]):
            self._write(args[0], name)
        carried = [label for label in _ROWS if any(_rows(t, label) is not None for t in tensors)]
        if not carried:
            return
        if name in _PRODUCT:
            self._product(tensors)
            return
        if name in _FRESH or name.startswith("new_") or name.endswith("_like") or name in _REDUCE:
            return
        for label in carried:
            if name == "__setitem__":
                target = args[0]
                rows = _rows(target, label)
                rows = rows.clone() if rows is not None else torch.zeros(target.shape, dtype=torch.long)
                value = args[2] if len(args) > 2 else None
                rows[args[1]] = _rows(value, label) if torch.is_tensor(value) and _rows(value, label) is not None \
                    else 0
                setattr(target, label, rows)
            elif name in _MOVE:
                _label(out, self._moved(func, name, args, kwargs, label), label)
            elif torch.is_tensor(out):
                _label(out, _broadcast_rows(tensors, out, label), label)

    @staticmethod
    def _moved(func, name, args, kwargs, label):
        """The same move applied to the row ids."""
        def ids(a):
            if isinstance(a, (list, tuple)):
                return type(a)(ids(x) for x in a)
            if torch.is_tensor(a):
                rows = _rows(a, label)
                return rows if rows is not None else torch.zeros(a.shape, dtype=torch.long)
            return a

        new, kw = [ids(args[0]), *args[1:]], dict(kwargs)
        if name == "pad":
            new, kw = new[:2], {"value": 0}
        return func(*new, **kw)

    def _product(self, tensors):
        nq, nk = self.n
        bq, bk = self.blocks
        found = []
        for label, n, b in ((_ROWS[0], nq, bq), (_ROWS[1], nk, bk)):
            ids = [r[r > 0] for r in (_rows(t, label) for t in tensors) if r is not None]
            ids = torch.unique(torch.cat(ids)) - 1 if ids else torch.zeros(0, dtype=torch.long)
            if not ids.numel():
                return  # not a product of q's rows with k's rows
            found.append((set((ids // n).tolist()), sorted(set((ids % n // b).tolist()))))
        (q_heads, q_tiles), (k_heads, k_tiles) = found
        heads = sorted(q_heads & k_heads) or sorted(q_heads)
        self.events.append(["S", heads, q_tiles, k_tiles])

    def _write(self, target, name):
        base = target._base if target._base is not None else target
        nq, bq = self.n[0], self.blocks[0]
        if nq > bq and base.ndim and nq in tuple(base.shape[-2:]):
            if not self.events or self.events[-1][0] != "W":
                self.events.append(["W", name, list(base.shape)])


def _label(out, rows, label):
    """Give ``out`` (a tensor or a tuple of them) the row ids ``rows`` where they fit."""
    if isinstance(out, (list, tuple)):
        for o, r in zip(out, rows if isinstance(rows, (list, tuple)) else [None] * len(out)):
            _label(o, r, label)
    elif torch.is_tensor(out) and torch.is_tensor(rows) and rows.shape == out.shape and bool((rows > 0).any()):
        setattr(out, label, rows)


def _broadcast_rows(tensors, out, label):
    """The row ids of an elementwise result: each input's, broadcast to the result's shape."""
    found = None
    for t in tensors:
        rows = _rows(t, label)
        if rows is None:
            continue
        try:
            rows = torch.broadcast_to(rows, out.shape)
        except RuntimeError:
            continue
        found = rows if found is None else torch.maximum(found, rows)
    return found


def _row_ids(t):
    """Row ids ``(b·H + h)·N + row + 1`` for every element of a ``(B, H, N, d)`` tensor."""
    B, H, N, d = t.shape
    ids = torch.arange(1, B * H * N + 1).view(B, H, N, 1)
    return ids.expand(B, H, N, d).contiguous()


def _fa2_trial(fa2, q, k, v, causal, block_q, block_k):
    """Driver (runs where the student's code lives): call ``fa2`` and note every tensor the torch
    functions it calls create, and every product of q's rows with k's rows (see :class:`_Follow`).
    Returns ``{"got": what it returned, "made": [[op, shape, floating], ...], "order": [event, ...]}``."""
    probe = _Follow(q.shape[-2], k.shape[-2], block_q, block_k)
    q, k = q.detach(), k.detach()           # new tensor objects, to carry the row ids
    setattr(q, _ROWS[0], _row_ids(q))
    setattr(k, _ROWS[1], _row_ids(k))
    with probe:
        got = fa2(q, k, v, causal, block_q, block_k)
    if isinstance(got, (tuple, list)):
        got = tuple(g.detach().clone() if torch.is_tensor(g) else g for g in got)
    return {"got": got, "made": [[op, list(shape), fl] for op, shape, fl in probe.made],
            "order": probe.events}


def _loop_order(events, nq, nk, bq, bk) -> str | None:
    """Why the products logged by :func:`_fa2_trial` are not FA2's loop, or None: a (query tile,
    key tile) product made twice (two passes over the keys), a query tile whose products resume
    after another query tile's (FA1's order), or a write into a tensor of all ``nq`` query rows
    between two key tiles of the same query tile (the running state kept in slow memory)."""
    def rows(t, b, n):
        return f"{t * b}..{min(t * b + b, n) - 1}"

    count: dict = {}
    current: dict = {}        # head -> the query tile of its last product
    finished: dict = {}       # head -> the query tiles it has left
    written: set = set()      # heads with a full-size write since their last product
    twice = resumed = state = None
    write = None
    for event in events:
        if event[0] == "W":
            written |= set(current)
            write = event
            continue
        _, heads, q_tiles, k_tiles = event
        qt = tuple(q_tiles)
        for h in heads:
            for i in q_tiles:
                for j in k_tiles:
                    count[(h, i, j)] = count.get((h, i, j), 0) + 1
                    if count[(h, i, j)] == 2 and twice is None:
                        twice = (i, j)
            if h in current and current[h] != qt:
                finished.setdefault(h, set()).add(current[h])
            if qt in finished.get(h, ()) and resumed is None:
                resumed = (qt[0], current[h][0])
            if h in written and current.get(h) == qt and state is None:
                state = (write, qt[0])
            current[h] = qt
            written.discard(h)
    if twice:
        i, j = twice
        return (f"query tile {i} (rows {rows(i, bq, nq)}) was multiplied with key tile {j} (keys "
                f"{rows(j, bk, nk)}) twice: two passes over the keys: FA2 finds the max, the sum and the "
                "output in one pass over the key tiles, rescaling ℓ and the accumulator by "
                "exp(m_old - m_new) whenever a tile raises the max")
    if resumed:
        i, other = resumed
        return (f"the products of query tile {i} resume after those of query tile {other}: key tiles "
                "outside, query tiles inside is FlashAttention-1's order, which sends every query "
                "tile's m, ℓ and output back to slow memory after each key tile; FA2 swaps the loops: "
                "for each query tile, every key tile once, its state kept on chip until the last one")
    if state is not None:
        (_, op, shape), i = state
        return (f"`{op}` wrote into a tensor of shape {tuple(shape)} (all {nq} query rows) between two "
                f"key tiles of query tile {i}: that keeps the running state in slow memory; FA2 keeps "
                "m, ℓ and the accumulator of the current query tile in tensors of its size and writes "
                "the output and lse once, after its last key tile")
    return None


_FUSED = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


def _fused(made) -> str | None:
    """The fused attention operation among those noted by :func:`_fa2_trial`, or None."""
    return next((op for op, _, _ in made if any(f in op for f in _FUSED)), None)


def _untiled(made, lead, nq, nk, d, bq, bk) -> str | None:
    """Why the tensors noted by :func:`_fa2_trial` are not those of a tile loop, or None.

    Any two adjacent dimensions (neither the head dim ``d``: those are q, k, v, the output
    and their tiles) spanning a whole ``nq x nk`` score matrix of a head; or, for floats,
    more than a tile whose one side spans all ``nk`` keys (``lead``: batch x heads, which
    may lead a row of statistics)."""
    for op, shape, floating in made:
        for a, b in zip(shape, shape[1:]):
            if d in (a, b):
                continue
            if a * b >= nq * nk:
                fix = ("build each tile's mask from its row and column indices" if not floating
                       else "loop over query tiles and, inside, over key tiles")
                return (f"`{op}` made a tensor of shape {tuple(shape)}: "
                        f"{'a causal mask of ' if not floating else ''}the whole {nq} x {nk} score "
                        f"matrix of a head; FlashAttention never holds more than one {bq} x {bk} "
                        f"tile of it: {fix}")
            if floating and a * b > bq * bk and max(a, b) >= nk and min(a, b) > lead:
                return (f"`{op}` made a tensor of shape {tuple(shape)}: a query tile against all "
                        f"{nk} keys at once; loop over key tiles of {bk} keys too, updating a "
                        "running max, sum and output with each (the online softmax)")
    return None


def _fa2_loop(q, k, v, causal, bq, bk, *, rescale=True, each_step=False, top_left=False, drop_k=False,
              scale=None):
    """FA2's forward loop in float64 with one known mistake switched on (for the hints)."""
    nq, nk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    off = 0 if top_left else nk - nq
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    lse = q.new_full(q.shape[:-1], -math.inf)
    for i0 in range(0, nq, bq):
        i1 = min(i0 + bq, nq)
        m = q.new_full((*q.shape[:-2], i1 - i0), -math.inf)
        l = torch.zeros_like(m)
        acc = q.new_zeros(*m.shape, v.shape[-1])
        for j0 in range(0, nk - nk % bk if drop_k else nk, bk):
            j1 = min(j0 + bk, nk)
            s = q[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-2, -1) * scale
            if causal:
                rows = torch.arange(i0, i1)[:, None]
                s = s.masked_fill(torch.arange(j0, j1)[None, :] > rows + off, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - shift[..., None])
            alpha = torch.exp(m - shift)
            l_new = alpha * l + p.sum(-1)
            if each_step:
                acc = (alpha[..., None] * acc + p @ v[..., j0:j1, :]) / l_new.clamp_min(1e-300)[..., None]
            else:
                acc = (alpha[..., None] * acc if rescale else acc) + p @ v[..., j0:j1, :]
            m, l = m_new, l_new
        out[..., i0:i1, :] = acc if each_step else acc / l.clamp_min(1e-300)[..., None]
        lse[..., i0:i1] = m + torch.log(l)
    return out, lse


def _fa2_hint(got, q, k, v, causal, bq, bk, part) -> str:
    """What the mistake in ``got`` (out or lse, ``part`` 0 or 1) probably is."""
    nq, nk = q.shape[-2], k.shape[-2]
    close = dict(rtol=1e-3, atol=1e-4)
    known = [
        (dict(rescale=False), "the output accumulator was not rescaled when the max grew: multiply "
         "it by exp(m_old - m_new), as you do the running sum ℓ"),
        (dict(each_step=True), "the output was divided by ℓ at every key tile without undoing the "
         "previous division: keep the accumulator unnormalized and divide by ℓ once, after the "
         "last key tile"),
        (dict(scale=1.0), "the scores are not scaled: S = Q Kᵀ / sqrt(d)"),
    ]
    if causal and nq != nk:
        known.append((dict(top_left=True), "the causal mask is aligned top-left (key j <= query i); "
                      "align it bottom-right: query i sees key j iff j <= i + Nk - Nq"))
    for mistake, hint in known:
        if same(got, _fa2_loop(q, k, v, causal, bq, bk, **mistake)[part], **close):
            return hint
    exact = _fa2_loop(q, k, v, causal, bq, bk)[part]
    if part == 1:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + nk - nq, -math.inf)
        m = s.amax(-1)
        if same(got, m, **close):
            return "lse is the running max m: the logsumexp is m + log ℓ"
        if same(got, exact - m, **close):
            return "lse is log ℓ: add the running max, lse = m + log ℓ"
    # the last, shorter tiles: compare the rows of the whole query tiles only
    whole = nq - nq % bq
    rows = (lambda t: t[..., :whole, :]) if part == 0 else (lambda t: t[..., :whole])
    if torch.is_tensor(got) and got.shape == exact.shape and whole:
        short_k = _fa2_loop(q, k, v, causal, bq, bk, drop_k=True)[part]
        if nk % bk and same(got, short_k, **close):
            return "the last, shorter key tile is missing: loop with range(0, Nk, block_k)"
        if nk % bk and whole < nq and same(rows(got), rows(short_k), **close):
            return ("the last, shorter tiles are missing: loop with range(0, Nq, block_q) and "
                    "range(0, Nk, block_k)")
        if whole < nq and same(rows(got), rows(exact), **close):
            return (f"the rows of the last, shorter query tile ({whole}..{nq - 1}) are wrong: loop "
                    "with range(0, Nq, block_q)")
    if torch.is_tensor(got) and not torch.isfinite(got.double()).all():
        return "exp overflowed: subtract the running max before exp"
    return ""


_FA2_CASES = [
    # batch, heads, Nq, Nk, d, causal, block_q, block_k, size of q (large: large scores)
    (1, 2, 200, 230, 24, True, 32, 48, 1.0),     # Nq != Nk, partial last tiles
    (1, 2, 200, 230, 24, False, 32, 48, 1.0),
    (2, 1, 77, 77, 40, True, 16, 16, 1.0),
    (1, 2, 50, 30, 40, True, 16, 8, 1.0),        # Nq > Nk: 20 rows see no key
    (1, 1, 33, 20, 24, False, 64, 64, 1.0),      # one tile larger than the sequence
    (1, 2, 1, 100, 24, True, 16, 32, 1.0),       # one query, as in decoding
    (1, 2, 90, 130, 40, False, 32, 32, 30.0),    # scores up to ~100: exp(100) overflows fp32
]


@exercise_check(student="my_fa2_forward")
def check_fa2_forward(fa2):
    """``fa2(q, k, v, causal, block_q, block_k) -> (out, lse)``: FA2's forward loop, in tiles, as
    accurate in float32 as plain float32 attention (flash-attention's 2x rule), in FA2's order: query
    tiles outside; for each, every key tile once (one product Q_i K_jᵀ per pair, invisible causal
    tiles may be skipped), the running state in tensors of the query tile's size."""
    from effdl.accuracy import within_baseline
    from effdl.reference import attention_lse, naive_attention

    g = _gen(4)
    for B, H, nq, nk, d, causal, bq, bk, size in _FA2_CASES:
        q = torch.randn(B, H, nq, d, generator=g) * size                # float32
        k, v = (torch.randn(B, H, nk, d, generator=g) for _ in range(2))
        where = (f"q {tuple(q.shape)}, k and v {tuple(k.shape)}, causal={causal}, "
                 f"tiles {bq} x {bk}")
        seen = observe(fa2, _fa2_trial, q, k, v, causal, bq, bk)
        got = seen["got"]
        fused = _fused(seen["made"])
        require(fused is None, f"{where}: your function calls PyTorch's fused attention "
                f"(`{fused}`); the exercise is to write the loop over tiles yourself")
        require(isinstance(got, tuple) and len(got) == 2 and all(torch.is_tensor(t) for t in got),
                f"{where}: return a tuple (out, lse) of two tensors, got {type(got).__name__}")
        out, lse = got
        q64, k64, v64 = q.double(), k.double(), v.double()          # the exact inputs
        ref, ref_lse = naive_attention(q64, k64, v64, causal), attention_lse(q64, k64, v64, causal)
        plain, plain_lse = naive_attention(q, k, v, causal), attention_lse(q, k, v, causal)
        require(tuple(out.shape) == tuple(ref.shape), f"{where}: out has shape {tuple(out.shape)}, "
                f"expected {tuple(ref.shape)}")
        require(tuple(lse.shape) == tuple(ref_lse.shape), f"{where}: lse has shape "
                f"{tuple(lse.shape)}, expected {tuple(ref_lse.shape)} (one logsumexp per query row)")
        empty = torch.isneginf(ref_lse)                                # rows that see no key
        if empty.any():
            rows = f"the first {nq - nk} query rows see no key (Nq > Nk, causal)"
            require(not torch.isnan(out[empty]).any() and not torch.isnan(lse[empty]).any(),
                    f"{where}: {rows} and your output is NaN there: exp(-inf - (-inf)) is NaN; "
                    "subtract 0 instead of the max where the max is still -inf")
            require(bool((out[empty] == 0).all()), f"{where}: {rows}; their output must be 0")
            require(bool(torch.isneginf(lse[empty]).all()),
                    f"{where}: {rows}; their lse must be -inf (the log of an empty sum)")
        for part, name, mine, exact, base in ((0, "out", out, ref, plain), (1, "lse", lse, ref_lse, plain_lse)):
            rule = within_baseline(mine[~empty], base[~empty], exact[~empty])
            hint = "" if rule else _fa2_hint(mine.double(), q64, k64, v64, causal, bq, bk, part)
            require(bool(rule), f"{where}: {name} is {rule.err:.2g} from exact attention (float64), "
                    f"more than twice plain float32 attention's error {rule.err_pt:.2g} "
                    f"(bound {rule.bound:.2g})" + (f"; {hint}" if hint else ""))
        if nq > bq and nk > bk:
            why = _untiled(seen["made"], B * H, nq, nk, d, bq, bk)
            require(why is None, f"{where}: {why}")
        why = _loop_order(seen.get("order", []), nq, nk, bq, bk)
        require(why is None, f"{where}: {why}")


# ------------------------------------------------------------------------------ one backward tile
def _tile_reference(Q, dO, K, V, scale, visible, j0, j1):
    """By autograd of plain attention (float64): ``(L, D, (dQ_i, dK_j, dV_j))`` for the query rows
    ``Q`` against all keys ``K``, where ``(dQ_i, dK_j, dV_j)`` is what flows through the scores of
    keys ``j0:j1`` alone: the loss is ⟨dO, softmax(S) V⟩ and only that tile's scores see a Q that
    requires grad."""
    Qt = Q.clone().requires_grad_(True)
    Kg, Vg = K.clone().requires_grad_(True), V.clone().requires_grad_(True)
    s = torch.cat([Q @ Kg[..., :j0, :].transpose(-2, -1), Qt @ Kg[..., j0:j1, :].transpose(-2, -1),
                   Q @ Kg[..., j1:, :].transpose(-2, -1)], -1) * scale
    s = s.masked_fill(~visible, -math.inf)
    O = torch.softmax(s, -1) @ Vg
    (O * dO).sum().backward()
    L, D = torch.logsumexp(s, -1).detach(), (dO * O).sum(-1).detach()
    return L, D, (Qt.grad, Kg.grad[..., j0:j1, :], Vg.grad[..., j0:j1, :])


def _tile_variant(Q, dO, L, D, K, V, scale, mask, mistake):
    """One backward tile with a known mistake (for the hints)."""
    s = Q @ K.transpose(-2, -1) * scale
    if mask is not None and mistake != "no_mask":
        s = s.masked_fill(mask if mistake == "inverted" else ~mask, -math.inf)
    if mistake == "no_L":
        p = torch.exp(s)
    elif mistake == "tile_softmax":
        p = torch.softmax(s, -1)
    else:
        p = torch.exp(s - L[..., None])
    dp = dO @ V.transpose(-2, -1)
    if mistake == "tile_D":
        D = (p * dp).sum(-1)
    ds = p * dp if mistake == "no_D" else p * (dp - D[..., None])
    c = 1.0 if mistake == "no_scale" else scale
    square = p.shape[-1] == p.shape[-2]
    dq = (ds.transpose(-2, -1) if mistake == "dQ_T" and square else ds) @ K * c
    dk = (ds if mistake == "dK_T" and square else ds.transpose(-2, -1)) @ Q * c
    dv = (p if mistake == "dV_T" and square else p.transpose(-2, -1)) @ dO
    return dq, dk, dv


_TILE_HINTS = {
    "no_D": "dS = P ∘ dP leaves out D: dS = P ∘ (dP - D_i), with the given D_i = rowsum(dO_i ∘ O_i)",
    "tile_D": ("D was summed over this tile's P ∘ dP only: softmax's Jacobian needs the whole row, "
               "which is the given D_i = rowsum(dO_i ∘ O_i)"),
    "dK_T": "dK must be dSᵀ Q · scale, (Bc, Br) @ (Br, d): dS is transposed for the keys",
    "dQ_T": "dQ must be dS K · scale, (Br, Bc) @ (Bc, d): dS is not transposed for the queries",
    "dV_T": "dV must be Pᵀ dO, (Bc, Br) @ (Br, d): P is transposed for the values",
    "no_scale": "dQ and dK miss the factor scale: S = Q Kᵀ · scale, so dQ = dS K · scale, dK = dSᵀ Q · scale",
    "no_L": "P was recomputed as exp(S): subtract the saved logsumexp, P = exp(S - L_i)",
    "tile_softmax": ("P was normalized over this tile only: P = exp(S - L_i), with L_i the logsumexp "
                     "of the whole row"),
    "no_mask": "the mask was ignored: set the masked scores to -inf before exp (P = 0 there)",
    "inverted": "the mask is inverted: True means the query sees the key",
}


def _tile_hint(got, args) -> str:
    for mistake, hint in _TILE_HINTS.items():
        if same(tuple(got), _tile_variant(*args, mistake), rtol=1e-7, atol=1e-9):
            return hint
    return ""


_TILE_CASES = [
    # batch, heads, Br, Bc, d, keys in the row, first key of the tile, mask, scale
    (1, 2, 16, 16, 24, 64, 16, None, 24 ** -0.5),      # square: a transposition shows
    (2, 1, 13, 7, 40, 35, 14, "causal", 0.3),          # the tile crosses the diagonal
    (1, 2, 5, 33, 8, 50, 10, "random", 0.5),           # row 2 sees no key of this tile
]


@exercise_check(student="my_backward_tile")
def check_backward_tile(tile):
    """``tile(Qi, dOi, Li, Di, Kj, Vj, scale, mask) -> (dQi, dKj, dVj)``: one key tile's share of
    the gradients, against autograd of plain attention."""
    g = _gen(5)
    for B, H, br, bc, d, nk, j0, kind, scale in _TILE_CASES:
        j1 = j0 + bc
        Q, dO = (torch.randn(B, H, br, d, generator=g, dtype=torch.float64) for _ in range(2))
        K, V = (torch.randn(B, H, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
        visible = torch.ones(br, nk, dtype=torch.bool)
        if kind == "causal":          # query r sees keys up to j0 + 3 + r
            visible = torch.arange(nk)[None, :] <= torch.arange(br)[:, None] + j0 + 3
        elif kind == "random":
            visible[:, j0:j1] = torch.rand(br, bc, generator=g) < 0.6
            visible[2, j0:j1] = False
        L, D, ref = _tile_reference(Q, dO, K, V, scale, visible, j0, j1)
        mask = None if kind is None else visible[:, j0:j1].clone()
        args = (Q, dO, L, D, K[..., j0:j1, :], V[..., j0:j1, :], scale, mask)
        got = tile(*(a.clone() if torch.is_tensor(a) else a for a in args))
        where = (f"Qi {tuple(Q.shape)}, Kj {tuple(args[4].shape)} (keys {j0}..{j1 - 1} of {nk}), "
                 f"mask {'None' if mask is None else kind}")
        require(isinstance(got, (tuple, list)) and len(got) == 3, f"{where}: return a tuple (dQi, dKj, dVj)")
        for i in (2, 1, 0):
            assert_close(got[i], ref[i], what=f"{where}: {('dQi', 'dKj', 'dVj')[i]}", rtol=1e-7,
                         atol=1e-9, hint=lambda: _tile_hint(got, args))


# ------------------------------------------------------------------------------ decode intensity
def _intensity_variants(B, H, Hkv, L, d, b):
    flops = 4 * B * H * L * d
    kv, qo = 2 * B * Hkv * L * d, 2 * B * H * d
    return [
        (flops / ((2 * B * H * L * d + qo) * b), "K and V were counted once per query head: the "
         "heads / heads_kv query heads of a group share one K/V head, whose cache is read once"),
        (flops / ((kv / 2 + qo) * b), "only K was counted: the V cache is read too"),
        (flops / 2 / ((kv + qo) * b), "count 2 FLOPs per multiply-add: q·kᵀ takes 2·L·d FLOPs "
         "per query head and P·v another 2·L·d"),
        (flops / (kv + qo), "bytes_per_el was ignored: bytes = elements x bytes_per_el"),
        (flops / (kv * b), "q (read) and the output (written), d elements per query head each, "
         "are missing from the bytes: next to a short cache they count"),
        (flops / ((kv + qo / 2) * b), "q or the output is missing from the bytes: q is read and the "
         "output written, d elements per query head each"),
        (flops / ((kv + qo) / B * b), "the bytes are for one sequence, the FLOPs for the batch"),
    ]


_DECODE_CASES = [
    # batch, heads, heads_kv, L, d, bytes_per_el
    (2, 32, 8, 64, 128, 2),          # GQA, a short cache
    (1, 32, 32, 4096, 128, 2),       # MHA
    (4, 32, 1, 16, 64, 2),           # MQA, a very short cache
    (1, 8, 2, 100, 64, 1),           # 8-bit cache
    (3, 16, 4, 32768, 128, 2),
    (2, 12, 12, 40, 64, 4),          # float32
]


@exercise_check(student="my_decode_intensity")
def check_decode_intensity(intensity):
    """``intensity(batch, heads, heads_kv, L, d, bytes_per_el) -> float``: FLOPs per byte of one
    decode step (within 0.1%)."""
    from effdl.attention.decode import decode_intensity

    for case in _DECODE_CASES:
        got = intensity(*case)
        where = "batch={}, heads={}, heads_kv={}, L={}, d={}, bytes_per_el={}".format(*case)
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.item()
        require(isinstance(got, numbers.Real) and not isinstance(got, bool),
                f"{where}: return the intensity, one number (FLOPs / bytes), got {type(got).__name__}")
        ref = decode_intensity(*case)["intensity"]
        if not math.isclose(got, ref, rel_tol=1e-3):
            hint = next((h for wrong, h in _intensity_variants(*case)
                         if math.isclose(got, wrong, rel_tol=1e-6)), "")
            raise AssertionError(f"{where}: intensity {got:.4g}, expected {ref:.4g} FLOP/byte"
                                 + (f"; {hint}" if hint else ""))
