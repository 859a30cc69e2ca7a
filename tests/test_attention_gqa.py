"""Grouped-query attention (GQA; multi-query when H_kv = 1) in the decode path.

q has H heads, the K/V cache H_kv (a divisor of H): query head h reads K/V head h // G, G = H / H_kv.
Decode is checked against the fp64 reference with flash-attention's 2x rule (the plain same-dtype
implementation run on the expanded K/V is the baseline); the split-KV path must read the grouped cache
as it is, never a copy of it; decode_intensity is the arithmetic-intensity count of one decode step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from effdl.accuracy import within_baseline
from effdl.attention.decode import (
    decode_attention,
    decode_intensity,
    lean_decode,
    split_chunk,
    split_kv_partials,
)
from effdl.attention.softmax import merge_lse
from effdl.reference import attention_lse, expand_kv, naive_attention, reference_attention

H = 8


def _grouped(B, h, h_kv, nq, L, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, nq, d, generator=g).to(dtype)
    k = torch.randn(B, h_kv, L, d, generator=g).to(dtype)
    v = torch.randn(B, h_kv, L, dv or d, generator=g).to(dtype)
    return q, k, v


# --- the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("h_kv", [1, 2, 4])
def test_reference_maps_query_head_h_to_kv_head_h_div_G(h_kv):
    """Checked head by head, not against expand_kv (which the reference itself uses)."""
    q, k, v = _grouped(2, H, h_kv, 3, 21, 8, torch.float64, dv=5)
    out = reference_attention(q, k, v, causal=True)
    lse = attention_lse(q, k, v, causal=True)
    G = H // h_kv
    for h in range(H):
        kh, vh = k[:, h // G: h // G + 1], v[:, h // G: h // G + 1]
        qh = q[:, h:h + 1]
        torch.testing.assert_close(out[:, h:h + 1], naive_attention(qh, kh, vh, causal=True))
        s = (qh @ kh.transpose(-2, -1)) / 8 ** 0.5
        s = s.masked_fill(torch.ones(3, 21, dtype=torch.bool).triu(21 - 3 + 1), float("-inf"))
        torch.testing.assert_close(lse[:, h:h + 1], torch.logsumexp(s, -1))


def test_reference_ungrouped_unchanged():
    q, k, v = _grouped(1, 3, 3, 4, 9, 8, torch.float32)
    torch.testing.assert_close(reference_attention(q, k, v, causal=True),
                               naive_attention(q.double(), k.double(), v.double(), causal=True))


# --- decode against the fp64 reference (flash-attn's 2x rule) -------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("L", [1, 17, 333, 1000])
@pytest.mark.parametrize("h_kv", [1, 2, 8])
def test_grouped_decode_2x_rule(h_kv, L, nq, splits, dtype):
    """Causal is bottom-right per query position: with Nq = 3 and G > 1 the G·Nq rows of a group
    must take their key limit from the query position (row % Nq), not the row.

    fp64 inputs: the plain fp64 implementation *is* the reference (its error is 0), so the 2x rule
    turns into a fixed tolerance of a few fp64 roundings, as in test_attention_decode_rules."""
    q, k, v = _grouped(2, H, h_kv, nq, L, 40, dtype, seed=L + nq + h_kv)
    ref = reference_attention(q, k, v, causal=True)
    out = decode_attention(q, k, v, num_splits=splits, causal=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any()                 # L = 1, Nq = 3: two rows see no key
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        return
    plain = naive_attention(q, expand_kv(k, H), expand_kv(v, H), causal=True)
    rule = within_baseline(out, plain, ref, factor=2)
    assert rule.passed, f"error {rule.err:.3g} > 2 x plain {rule.err_pt:.3g}"


@pytest.mark.parametrize("h_kv", [1, 2, 8])
def test_grouped_partials_merge_to_the_reference_lse(h_kv):
    q, k, v = _grouped(2, H, h_kv, 3, 100, 16, torch.float64, dv=8)
    outs, lses = split_kv_partials(q, k, v, 7)
    assert outs.shape == (7, 2, H, 3, 8) and lses.shape == (7, 2, H, 3)
    out, lse = merge_lse(outs, lses)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True))
    torch.testing.assert_close(lse, attention_lse(q, k, v, causal=True))


def test_grouped_decode_not_causal_and_three_dims():
    q, k, v = _grouped(1, H, 2, 3, 50, 16, torch.float64)
    torch.testing.assert_close(decode_attention(q, k, v, num_splits=3, causal=False),
                               reference_attention(q, k, v, causal=False))
    out = decode_attention(q[0], k[0], v[0], num_splits=3)                    # (H, Nq, d)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True)[0])


@pytest.mark.parametrize("h_kv", [1, 2, 8])
@pytest.mark.parametrize("workers,block", [(1, 64), (5, 32), (13, 7)])
def test_grouped_lean_decode(h_kv, workers, block):
    q, k, v = _grouped(2, H, h_kv, 1, 333, 16, torch.float64, dv=12)
    out = lean_decode(q, k, v, workers=workers, block=block)
    torch.testing.assert_close(out, reference_attention(q, k, v))


# --- the cache is read as it is ----------------------------------------------------------------------

class NewAllocations(TorchDispatchMode):
    """Records the bytes of every tensor an op creates (outputs that share no input's storage)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((str(func), t.untyped_storage().nbytes()))
        return out

    def largest(self) -> tuple[str, int]:
        return max(self.created, key=lambda r: r[1])


def _largest_allocation(fn):
    with NewAllocations() as seen:
        fn()
    return seen.largest()


@pytest.mark.parametrize("prealloc", [False, True])
@pytest.mark.parametrize("h_kv,L,splits", [(1, 1000, 3), (2, 999, 1), (8, 1000, 7), (2, 1024, 4)])
def test_split_kv_partials_never_copies_the_cache(h_kv, L, splits, prealloc):
    """No tensor as large as one chunk of the K cache is allocated, let alone the expanded cache
    (G times the cache): the largest ones are the scores, G·Nq / d of a chunk.

    Regression: the equal chunks used to be taken as one strided (..., n, c, d) view, which matmul
    copied whole whenever the chunk did not divide L (and always for a cache with spare capacity)."""
    q, k, v = _grouped(2, H, h_kv, 1, L + 100 * prealloc, 64, torch.float32)
    if prealloc:                            # a cache allocated for L + 100 tokens, L of them filled
        k, v = k[..., :L, :], v[..., :L, :]
    cache_bytes = k.numel() * k.element_size()
    chunk_bytes = cache_bytes // L * split_chunk(L, splits)
    op, nbytes = _largest_allocation(lambda: split_kv_partials(q, k, v, splits))
    assert nbytes < chunk_bytes, f"{op} allocated {nbytes} bytes, a chunk of the K cache is {chunk_bytes}"
    if h_kv < H:                            # the watcher sees a copy: the reference expands K/V
        op, nbytes = _largest_allocation(lambda: reference_attention(q, k, v, dtype=torch.float32))
        assert nbytes >= cache_bytes * H // h_kv


# --- Triton: grouped K/V is passed through ------------------------------------------------------------

def test_triton_backend_gets_the_grouped_cache_as_is(monkeypatch):
    pytest.importorskip("triton")
    import effdl.attention.triton_kernels as tk

    seen = {}

    def spy(q, k, v, num_splits, causal=True, scale=None):
        seen.update(q=q, k=k, v=v, num_splits=num_splits, causal=causal)
        return torch.zeros_like(q)

    monkeypatch.setattr(tk, "triton_decode", spy)
    q, k, v = _grouped(2, H, 2, 1, 50, 16, torch.float32)
    decode_attention(q, k, v, num_splits=3, backend="triton")
    assert seen["k"] is k and seen["v"] is v and seen["q"] is q and seen["num_splits"] == 3
    q, k, v = _grouped(1, 6, 4, 1, 50, 16, torch.float32)
    with pytest.raises(ValueError, match="divide"):                # validated before the kernel
        decode_attention(q, k, v, backend="triton")
    assert "k" not in seen or seen["k"].shape[1] == 2


_CHILD = """
import json, sys, torch
from effdl.accuracy import within_baseline
from effdl.attention.decode import decode_attention
from effdl.reference import expand_kv, naive_attention, reference_attention
rows = []
for h_kv, nq, L, d, dt, splits in json.loads(sys.argv[1]):
    dt = getattr(torch, dt)
    g = torch.Generator().manual_seed(L)
    q = torch.randn(2, 8, nq, d, generator=g).to(dt)
    k, v = (torch.randn(2, h_kv, L, d, generator=g).to(dt) for _ in range(2))
    ref = reference_attention(q, k, v, causal=True)
    plain = naive_attention(q, expand_kv(k, 8), expand_kv(v, 8), causal=True)
    out = decode_attention(q, k, v, num_splits=splits, backend="triton")
    r = within_baseline(out, plain, ref, factor=2)
    rows.append(dict(passed=bool(r.passed), err=r.err, err_pt=r.err_pt))
print(json.dumps(rows))
"""


@pytest.mark.interpreter
def test_triton_grouped_decode_interpreted():
    """The Triton decode kernel on grouped K/V under TRITON_INTERPRET=1 (a child process)."""
    pytest.importorskip("triton")
    from effdl.attention.interpret import CHILD_ENV

    cases = [(1, 1, 77, 16, "float32", 3), (2, 3, 130, 24, "float16", 2), (8, 1, 33, 16, "float32", 1)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], env={**os.environ, **CHILD_ENV},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, row in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert row["passed"], f"{case}: error {row['err']:.3g} vs plain {row['err_pt']:.3g}"


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [
    lambda q, k, v: decode_attention(q, k, v, num_splits=2),
    lambda q, k, v: split_kv_partials(q, k, v, 2),
    lambda q, k, v: lean_decode(q, k, v, workers=3),
    reference_attention,
    attention_lse,
], ids=["decode_attention", "split_kv_partials", "lean_decode", "reference_attention", "attention_lse"])
def test_kv_heads_that_do_not_divide_the_query_heads(fn):
    q, k, v = _grouped(1, 6, 4, 1, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="divide"):
        fn(q, k, v)


def test_expand_kv_and_lean_decode_bad_input():
    k = torch.zeros(1, 4, 10, 8)
    with pytest.raises(ValueError, match="divide"):
        expand_kv(k, 6)
    assert expand_kv(k, 8).shape == (1, 8, 10, 8)
    q, k, v = _grouped(1, H, 2, 3, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="Nq > 1"):
        lean_decode(q, k, v, workers=2)


# --- arithmetic intensity --------------------------------------------------------------------------

def test_decode_intensity_worked_example():
    """B = 1, H = 32, H_kv = 8, L = 32768, d = 128, fp16: 4·32·32768·128 FLOPs over
    2·2·128·(8·32768 + 32) bytes."""
    r = decode_intensity(1, 32, 8, 32768, 128)
    assert set(r) == {"flops", "bytes", "intensity"}
    assert r["flops"] == 536_870_912                       # 2^29
    assert r["bytes"] == 134_234_112                       # K, V once per K/V head, plus q and out
    assert r["intensity"] == pytest.approx(536_870_912 / 134_234_112)
    assert r["intensity"] == pytest.approx(4.0, rel=1e-3)   # ≈ G FLOPs per byte in fp16
    mha = decode_intensity(1, 32, 32, 32768, 128)
    assert mha["flops"] == r["flops"] and mha["intensity"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("bytes_per_el", [2, 4, 0.5])
def test_decode_intensity_grows_in_proportion_to_G(bytes_per_el):
    B, h, L, d = 4, 64, 65536, 128
    base = decode_intensity(B, h, h, L, d, bytes_per_el)["intensity"]
    for G in (1, 2, 4, 8, 16, 64):
        r = decode_intensity(B, h, h // G, L, d, bytes_per_el)
        assert r["intensity"] / base == pytest.approx(G * (L + 1) / (L + G), rel=1e-12)   # exact
        assert r["intensity"] == pytest.approx(2 * G / bytes_per_el, rel=1e-3)          # L >> G


@pytest.mark.parametrize("args, match", [
    ((1, 6, 4, 100, 64), "divide"), ((1, 8, 0, 100, 64), "heads_kv"), ((0, 8, 8, 100, 64), "batch"),
    ((1, 8, 8, -1, 64), "L"), ((1, 8, 8, 100, 64.0), "d"), ((1, True, 1, 100, 64), "heads"),
    ((1, 8, 8, 100, 64, 0), "bytes_per_el"), ((1, 8, 8, 100, 64, True), "bytes_per_el"),
    ((1, 8, 8, 100, 64, float("inf")), "bytes_per_el"), ((1, 8, 8, 100, 64, "2"), "bytes_per_el"),
])
def test_decode_intensity_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        decode_intensity(*args)


# --- timing grouped decode (the chapter's sweep) -----------------------------------------------------

def test_decode_rows_with_grouped_kv():
    from effdl.attention import experiments as ax

    impls = ax.decode_impls("cpu", ("naive", "sdpa", "torch_split_kv"), heads_kv=2)
    sdpa = "sdpa" if ax.SDPA_GQA else "sdpa_expanded_kv"
    assert list(impls) == ["naive", sdpa, "torch_split_kv"]
    rows = ax.decode_rows([100], d=16, batch=1, heads=H, heads_kv=2, device="cpu", impls=impls,
                          warmup=0, repeat=1, memory=False, progress=False)
    assert [r["impl"] for r in rows] == list(impls) and all(r["heads_kv"] == 2 for r in rows)
    for r in rows:                                    # bytes of the grouped cache: 2·B·H_kv·L·d·4
        assert r["tbps"] == pytest.approx(2 * 2 * 100 * 16 * 4 / (r["ms"] * 1e-3) / 1e12)
    inputs = ax._Inputs("cpu")
    q, k, v = inputs(dict(rows[0]))
    assert q.shape == (1, H, 1, 16) and k.shape == v.shape == (1, 2, 100, 16)
    ref = reference_attention(q, k, v)
    for name, make in impls.items():                  # every impl computes grouped attention
        torch.testing.assert_close(make(dict(rows[0]))().double(), ref, atol=1e-5, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="divide"):               # before anything is timed
        ax.decode_rows([100], d=16, batch=1, heads=6, heads_kv=4, device="cpu", impls={})
