"""Exercise checks of the chapter "Language-model inference"."""

from __future__ import annotations

import torch

from effdl.checks import assert_close, exercise_check, require, same

__all__ = ["check_kv_cache_bytes", "check_append_kv", "check_gather_kv",
           "check_greedy_accept", "check_accept_or_resample"]

#: the library functions that answer each check: refused as answers, and held back in the
#: student version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_kv_cache_bytes": ["effdl.inference.experiments.kv_per_token",
                             "effdl.lm.model.kv_bytes_per_token"],
    "check_append_kv": ["effdl.lm.model.KVCache.write"],
    "check_gather_kv": ["effdl.inference.paged.gather_kv"],
    "check_greedy_accept": ["effdl.inference.speculative.greedy_accept"],
    "check_accept_or_resample": ["effdl.inference.speculative.accept_or_resample",
                                 "effdl.inference.speculative.sample"],
}

# (n_layer, n_head, n_kv_head, d_model, tokens, batch, bytes per value): GQA and not,
# irregular token counts
_CONFIGS = [(2, 4, 2, 48, 7, 1, 4), (32, 32, 8, 4096, 4096, 1, 2),
            (80, 64, 8, 8192, 1000, 3, 2), (1, 1, 1, 8, 1, 1, 1), (12, 12, 12, 768, 33, 5, 4)]


@exercise_check(student="kv_cache_bytes")
def check_kv_cache_bytes(kv_cache_bytes) -> None:
    """``kv_cache_bytes(config, tokens, batch, bytes_per_value) -> int``."""
    for L, H, Hkv, D, T, B, b in _CONFIGS:
        config = {"n_layer": L, "n_head": H, "n_kv_head": Hkv, "d_model": D}
        got = kv_cache_bytes(dict(config), T, B, b)
        d = D // H
        want = 2 * L * Hkv * d * T * B * b
        known = [(L * Hkv * d * T * B * b, "count both K and V: a factor 2"),
                 (2 * L * H * d * T * B * b,
                  "with grouped-query attention only n_kv_head heads are cached, "
                  "not n_head"),
                 (2 * Hkv * d * T * B * b, "every layer has its own cache: times n_layer"),
                 (2 * L * Hkv * D * T * B * b,
                  "a head's dimension is d_model // n_head, not d_model"),
                 (2 * L * Hkv * d * T * B, "times the bytes of one value"),
                 (2 * L * Hkv * d * T * b, "every sequence of the batch has its own cache")]
        hint = next((h for wrong, h in known if got == wrong and wrong != want), "")
        require(isinstance(got, (int, float)) and got == want,
                f"config {config}, {T} tokens, batch {B}, {b} bytes per value: expected "
                f"{want} bytes, got {got!r}" + (f" — {hint}" if hint else ""))


def _cache(B, H, M, d, length, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, M, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, M, d, generator=g, dtype=torch.float64)
    k[:, :, length:] = v[:, :, length:] = 0.0           # a preallocated, partly filled cache
    return k, v


def _new_kv(B, H, T, d, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(B, H, T, d, generator=g, dtype=torch.float64),
            torch.randn(B, H, T, d, generator=g, dtype=torch.float64))


def _append_driver(append_kv, B, H, M, d, n, T, seed):
    """Runs where the student's code lives: builds the cache, calls append_kv, and
    returns what it gave back and whether it wrote into the buffers it was given."""
    kc, vc = _cache(B, H, M, d, n, seed)
    kn, vn = _new_kv(B, H, T, d, seed)
    out = append_kv(kc, vc, n, kn, vn)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        return {"pair": False, "type": type(out).__name__}
    k, v = out
    tensors = isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    # in place: the buffers now hold the new positions, and k, v are views of them
    written = bool(torch.equal(kc[:, :, n:n + T], kn) and torch.equal(vc[:, :, n:n + T], vn))
    views = tensors and k.data_ptr() == kc.data_ptr() and v.data_ptr() == vc.data_ptr()
    return {"pair": True, "k": k, "v": v, "written": written, "views": bool(views)}


@exercise_check(student="append_kv")
def check_append_kv(append_kv) -> None:
    """``append_kv(k_cache, v_cache, length, k_new, v_new) -> (k, v)``: the valid prefix
    after writing T new positions at ``length``, in place."""
    from effdl.checks import observe

    # (B, H_kv, max_len, d, length, T): T = 1 (decode) and T > 1 (drafts), full at the end
    for i, (B, H, M, d, n, T) in enumerate([(1, 2, 16, 8, 5, 1), (3, 1, 9, 4, 1, 3),
                                            (2, 4, 33, 5, 30, 3), (1, 1, 4, 2, 0, 4)]):
        kc, vc = _cache(B, H, M, d, n, i)
        kn, vn = _new_kv(B, H, T, d, i)
        got = observe(append_kv, _append_driver, B, H, M, d, n, T, i)
        require(got["pair"], f"return a pair (k, v), got {got.get('type')}")
        k, v = got["k"], got["v"]
        want_k = torch.cat([kc[:, :, :n], kn], dim=2)
        want_v = torch.cat([vc[:, :, :n], vn], dim=2)
        what = f"cache {(B, H, M, d)} holding {n} positions, {T} new"
        require(isinstance(k, torch.Tensor) and k.shape == want_k.shape,
                f"{what}: k must have shape {tuple(want_k.shape)} (the {n + T} valid "
                f"positions), got {tuple(getattr(k, 'shape', ()))}"
                + (" — return only the valid prefix, not the whole preallocated buffer"
                   if getattr(k, "shape", None) == kc.shape else ""))

        def hint():
            if n and same(k[:, :, n - 1:n - 1 + T], kn):
                return "the new positions start at index length, not length - 1"
            if same(k, v) or same(v, want_k):
                return "keys and values are swapped or the same tensor"
            return ""

        assert_close(k, want_k, what=f"{what}: keys", rtol=0, atol=0, hint=hint)
        assert_close(v, want_v, what=f"{what}: values", rtol=0, atol=0, hint=hint)
        require(got["written"] and got["views"],
                f"{what}: the values are right but the cache was copied — write the new "
                "positions into k_cache and v_cache (slice assignment) and return views "
                "of them; torch.cat copies the whole cache at every decode step")


@exercise_check(student="gather_kv")
def check_gather_kv(gather_kv) -> None:
    """``gather_kv(pool, block_table, length) -> (length, d)``: one sequence's keys."""
    g = torch.Generator().manual_seed(0)
    for bs, nb, d, table, length in [(4, 8, 3, [5, 0, 7], 9), (4, 8, 3, [2], 1),
                                     (16, 6, 2, [3, 1, 4, 0, 5], 65),
                                     (3, 5, 1, [4, 2], 6), (8, 4, 5, [1, 3, 0], 16)]:
        pool = torch.randn(nb, bs, d, generator=g, dtype=torch.float64)
        want = torch.cat([pool[b] for b in table])[:length]
        got = gather_kv(pool.clone(), list(table), length)
        what = f"block size {bs}, table {table}, length {length}"
        require(isinstance(got, torch.Tensor) and got.shape == want.shape,
                f"{what}: expected shape {tuple(want.shape)}, got "
                f"{tuple(getattr(got, 'shape', ()))}" + (
                    " — keep only the first `length` tokens: the last block is partly "
                    "filled" if getattr(got, "shape", (0,))[0] == len(table) * bs else ""))

        def hint():
            if same(got, pool.reshape(-1, d)[:length]):
                return ("read the blocks the table names, in its order: logical block i "
                        "is physical block table[i], not block i")
            if same(got, torch.cat([pool[b] for b in sorted(table)])[:length]):
                return "keep the table's order: it is not sorted"
            return ""

        assert_close(got, want, what=what, rtol=0, atol=0, hint=hint)


@exercise_check(student="greedy_accept")
def check_greedy_accept(greedy_accept) -> None:
    """``greedy_accept(drafted (k,), best (k + 1,)) -> list of the tokens to append``."""
    cases = [([5, 7, 9], [5, 7, 9, 2]), ([5, 7, 9], [5, 1, 9, 2]), ([5, 7, 9], [4, 7, 9, 2]),
             ([], [3]), ([1], [1, 8]), ([2, 2, 2, 2], [2, 2, 3, 2, 2]),
             ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0])]
    for drafted, best in cases:
        a = 0
        while a < len(drafted) and drafted[a] == best[a]:
            a += 1
        want = drafted[:a] + [best[a]]
        got = greedy_accept(torch.tensor(drafted, dtype=torch.long),
                            torch.tensor(best, dtype=torch.long))
        got = [int(t) for t in got] if isinstance(got, (list, tuple, torch.Tensor)) else got
        matches = sum(x == y for x, y in zip(drafted, best))
        n_got = len(got) if isinstance(got, list) else -1
        known = [(got == drafted[:a], "append the target's own token after the accepted "
                  "drafts: its correction, or the bonus token when every draft is "
                  "accepted"),
                 (a < len(drafted) and got == drafted[:a + 1],
                  "at the first disagreement append the target's token, not the draft's"),
                 (matches > a and n_got in (matches, matches + 1),
                  "stop at the first disagreement: a draft after it was guessed from a "
                  "wrong prefix, so its match is luck")]
        hint = next((h for bad, h in known if bad and got != want), "")
        require(got == want, f"drafted {drafted}, target's argmax {best}: expected "
                             f"{want}, got {got!r}" + (f" — {hint}" if hint else ""))


def _probs(n, V, g, zeros=False):
    p = torch.rand(n, V, generator=g, dtype=torch.float64) ** 3
    if zeros:                          # some tokens the model never emits
        p[:, ::3] = 0.0
    return p / p.sum(-1, keepdim=True)


@exercise_check(student="accept_or_resample")
def check_accept_or_resample(accept_or_resample) -> None:
    """``accept_or_resample(p, q, x, u, w) -> tokens (N,)``: the speculative sampling
    rule, vectorized over N drafted tokens, the residual drawn by inverse CDF with w."""
    from effdl.inference.speculative import accept_or_resample as ref
    from effdl.inference.speculative import sample

    g = torch.Generator().manual_seed(0)
    for n, V, zp, zq in [(4000, 5, False, False), (3000, 37, True, False),
                         (3000, 11, False, True), (500, 2, False, False)]:
        p, q = _probs(n, V, g, zp), _probs(n, V, g, zq)
        q[: n // 10] = p[: n // 10]                      # rows where the models agree
        u, w = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(
            n, generator=g, dtype=torch.float64)
        x = sample(q, torch.rand(n, generator=g, dtype=torch.float64))
        got = accept_or_resample(p.clone(), q.clone(), x.clone(), u.clone(), w.clone())
        want = ref(p, q, x, u, w)[1]
        what = f"N={n} rows, vocabulary {V}"
        require(isinstance(got, torch.Tensor) and got.shape == want.shape,
                f"{what}: return the tokens, a tensor of shape ({n},), got "
                f"{tuple(getattr(got, 'shape', ())) or type(got).__name__}")

        def hint():
            accept = u * q.gather(1, x[:, None])[:, 0] < p.gather(1, x[:, None])[:, 0]
            res = (p - q).clamp_min(0)
            redraw = sample(torch.where(res.sum(1, keepdim=True) > 0, res, p), w)
            known = [(torch.where(accept, x, sample(p, w)),
                      "on rejection draw from the residual max(0, p - q), not from p: "
                      "p would count the accepted mass twice"),
                     (torch.where(~accept, x, redraw),
                      "the acceptance test is inverted: accept when u < p(x) / q(x)"),
                     (torch.where(u < 0.5, x, redraw),
                      "accept with probability min(1, p(x) / q(x)), not a fixed one")]
            # why "mostly": a wrong rule still agrees with the right one on some rows
            return next((h for wrong, h in known
                         if float((got == wrong).double().mean()) > 0.85), "")

        wrong = int((got != want).sum())
        if wrong:
            # the output must be distributed as p: the empirical frequencies tell how far
            freq = torch.bincount(got.long().clamp(0, V - 1), minlength=V) / n
            tv = 0.5 * float((freq - p.mean(0)).abs().sum())
            h = hint()
            require(False, f"{what}: {wrong} of {n} tokens differ from the rule's "
                           f"(total variation of your output's frequencies from the "
                           f"target's: {tv:.3f})" + (f" — {h}" if h else ""))
