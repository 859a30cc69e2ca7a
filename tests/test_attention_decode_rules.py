"""The shared rules of decoding: the one split-KV chunking rule and the online-softmax guards.

``split_chunk`` is the only place key chunks are cut (the PyTorch split-KV path and the
Triton wrapper both call it; ``even_split`` lists its chunks).  ``safe_shift``,
``safe_rescale``, ``finalize`` and ``state_lse`` are the only -inf guard and finalisation
(the state functions, the tiled passes and decoding call them).  ``default_num_splits`` is the
one rule for how many splits decoding asks for: it counts programs, one per K/V head.
"""

from __future__ import annotations

import math

import pytest
import torch

import effdl.attention.decode as decode
from effdl.attention.decode import decode_attention, default_num_splits, even_split, split_chunk
from effdl.attention.softmax import (
    finalize,
    init_state,
    merge_states,
    safe_rescale,
    safe_shift,
    state_lse,
    update_state,
)
from effdl.reference import naive_attention

LENGTHS = [1, 7, 77, 4099]
SPLITS = [1, 3, 100, "more than keys"]


def _splits(L, s):
    return L + 5 if s == "more than keys" else s


# --- the chunking rule -------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 64])
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("L", LENGTHS)
def test_even_split_covers_every_key_once(L, splits, block):
    n = _splits(L, splits)
    bounds = even_split(L, n, block=block)
    keys = [j for start, end in bounds for j in range(start, end)]
    assert keys == list(range(L))                           # [0, L) exactly once, in order
    assert all(end > start for start, end in bounds)        # no empty chunk
    assert len(bounds) <= min(n, L)                         # never more chunks than keys
    sizes = [end - start for start, end in bounds]
    assert all(c == sizes[0] for c in sizes[:-1]) and sizes[-1] <= sizes[0]
    c = split_chunk(L, n, block=block)
    assert c == math.ceil(L / n) or c % block == 0         # whole tiles once c >= block
    assert sizes[0] == min(c, L) and len(bounds) == math.ceil(L / c)


def test_even_split_examples_and_edges():
    assert even_split(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert even_split(10, 6) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]   # 5 < 6 chunks
    assert even_split(200, 3, block=64) == [(0, 128), (128, 200)]            # 67 -> 128 keys
    assert even_split(100, 3, block=64) == [(0, 34), (34, 68), (68, 100)]    # 34 < 64: kept
    assert even_split(0, 3) == [] and split_chunk(0, 3) == 0                 # no keys
    # one chunk: c stays rounded (the Triton autotuner keys on it), not cut to L
    assert split_chunk(65, 1, block=64) == 128
    assert even_split(65, 1, block=64) == [(0, 65)]


@pytest.mark.parametrize("args, match", [
    ((10, 0), "num_splits"), ((10, 2.0), "num_splits"), ((10, True), "num_splits"),
    ((10, 2, 0), "block"), ((-1, 2), "L"), ((3.5, 2), "L"),
])
def test_split_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        split_chunk(*args)
    with pytest.raises(ValueError, match=match):
        even_split(*args)


# --- how many splits ------------------------------------------------------------------------------

def test_default_splits_count_kv_heads(monkeypatch):
    """Under GQA a group's G query heads (and Nq positions) are rows of one program, so the
    programs that run before splitting are B·H_kv: fewer K/V heads ask for more splits."""
    seen = []
    monkeypatch.setattr(decode, "default_num_splits",
                        lambda rows, L, device: seen.append(rows) or default_num_splits(rows, L, device))
    q, k = torch.randn(3, 8, 2, 16), torch.randn(3, 2, 300, 16)
    decode_attention(q, k, k)
    decode_attention(q, torch.randn(3, 8, 300, 16), torch.randn(3, 8, 300, 16))
    assert seen == [3 * 2, 3 * 8]                              # B·H_kv, not B·H·Nq

    class H100:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    gpu = torch.device("cuda")                                 # 16 programs per SM: 2112
    assert default_num_splits(8 * 32, 32768, gpu) == 9         # ⌈2112 / 256⌉
    assert default_num_splits(8 * 8, 32768, gpu) == 33         # H_kv = H / 4: ⌈2112 / 64⌉
    assert default_num_splits(1, 32768, gpu) == 128            # capped: L / min_chunk
    assert default_num_splits(1, 4096, torch.device("cpu")) == 2


# --- the softmax guards --------------------------------------------------------------------

def test_guard_gives_zero_not_nan_for_a_fully_masked_row():
    m_old = torch.tensor([float("-inf"), 1.0, float("-inf")])
    m_new = torch.tensor([float("-inf"), 3.0, 2.0])
    assert safe_shift(m_new).tolist() == [0.0, 3.0, 2.0]
    alpha = safe_rescale(m_old, m_new)
    assert not alpha.isnan().any()
    assert alpha[0] == 0 and alpha[2] == 0
    assert alpha[1].item() == pytest.approx(math.exp(1.0 - 3.0), rel=1e-6)
    naive = torch.exp(m_old - m_new)                        # what the guard avoids
    assert naive[0].isnan()


def test_finalize_and_lse_of_rows_that_saw_no_key():
    acc = torch.tensor([[2.0, 4.0], [0.0, 0.0]])
    l = torch.tensor([2.0, 0.0])
    m = torch.tensor([0.5, float("-inf")])
    assert finalize(acc, l).tolist() == [[1.0, 2.0], [0.0, 0.0]]
    lse = state_lse(m, l)
    assert lse[0].item() == pytest.approx(0.5 + math.log(2.0)) and lse[1].item() == float("-inf")


def test_fully_masked_tile_keeps_the_empty_state():
    s = torch.full((2, 5), float("-inf"))
    s[1, 2] = 0.3                                            # row 0 fully masked, row 1 not
    v = torch.randn(5, 3)
    st = update_state(init_state((2,), 3), s, v)
    assert not any(t.isnan().any() for t in (st.m, st.l, st.acc))
    assert st.l[0] == 0 and (st.acc[0] == 0).all()
    merged = merge_states(init_state((2,), 3), st)           # empty + empty: still no NaN
    out, lse = merged.finalize()
    assert out[0].tolist() == [0.0] * 3 and lse[0].item() == float("-inf")
    torch.testing.assert_close(out[1], v[2])


# --- decode against the fp64 reference -------------------------------------------------------

@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("L", LENGTHS)
def test_decode_torch_matches_naive_fp64(L, splits, nq):
    g = torch.Generator().manual_seed(L + nq)
    q = torch.randn(2, 3, nq, 24, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, L, 24, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64)
    out = decode_attention(q, k, v, num_splits=_splits(L, splits), backend="torch", causal=True)
    ref = naive_attention(q, k, v, causal=True)              # bottom-right aligned
    assert not out.isnan().any()                             # L = 1, Nq = 3: rows see no key
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_decode_empty_cache_gives_zeros():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k = torch.zeros(1, 2, 0, 8, dtype=torch.float64)
    out = decode_attention(q, k, k, num_splits=4)
    assert out.shape == q.shape and (out == 0).all()
    torch.testing.assert_close(out, naive_attention(q, k, k, causal=True))
