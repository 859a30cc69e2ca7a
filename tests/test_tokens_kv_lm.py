"""The token chapter's KV section on a language model: sensitivity, bit allocation, TTFT, codec.

Tiny random :class:`effdl.lm.ByteLM` models in float64 (grouped K/V heads, RoPE), so the tests
run in seconds and do not depend on the trained model on disk.
"""

from __future__ import annotations

import math

import pytest
import torch

from effdl import lm
from effdl.tokens import experiments as tx
from effdl.tokens import kvcache


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed=0, layers=2):
    """A random ByteLM with confident predictions (weights scaled up), float64."""
    torch.manual_seed(seed)
    m = lm.ByteLM(lm.LMConfig(n_layer=layers, n_head=4, n_kv_head=2, d_model=32,
                              max_len=48)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _windows(m, n=3, T=40, cont=8, seed=0):
    """Random contexts, then the model's own greedy continuation: the exact cache predicts it
    well, so a damaged cache has something to lose."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, 256, (n, T - cont), generator=g)
    with torch.no_grad():
        seq = ctx
        for _ in range(cont):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        _, cache = m.prefill(ctx)
    return ctx, seq[:, T - cont:], cache


def test_sensitivity_is_zero_when_lossless_and_positive_at_2_bits():
    m = _model()
    _, cont, cache = _windows(m)
    assert tx.layer_sensitivity(m, cache, cont, None) == [0.0, 0.0]
    assert max(abs(x) for x in tx.layer_sensitivity(m, cache, cont, 16)) < 1e-4
    assert all(x > 0 for x in tx.layer_sensitivity(m, cache, cont, 2))


def test_continuation_loss_leaves_the_cache_alone_and_matches_the_full_forward():
    m = _model()
    ctx, cont, cache = _windows(m)
    before = [t.clone() for t in cache.k]
    loss = tx.continuation_loss(m, cache, cont)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k)) and cache.length == ctx.shape[1]
    with torch.no_grad():
        logits = m(torch.cat([ctx, cont], 1))[:, ctx.shape[1]:-1]  # predicts cont[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cont[:, 1:].flatten())
    assert loss == pytest.approx(float(ref), rel=1e-9)


def test_allocate_bits_hand_worked_and_budget():
    # gains of one more bit: layer 0 at 2 -> 1.0 - 0.25; at 3 -> 0.25 - 0.0625; at 4 -> 0.047;
    # layer 1 at 2 -> 0.1 - 0.025 = 0.075: bits go 0, 0, then 1
    table = {2: [1.0, 0.1]}
    assert tx.allocate_bits(table, 5) == [3, 2]
    assert tx.allocate_bits(table, 6) == [4, 2]
    assert tx.allocate_bits(table, 7) == [4, 3]
    with pytest.raises(ValueError, match="budget"):
        tx.allocate_bits(table, 3)


@pytest.mark.parametrize("budget", [8, 10, 11, 14, 20])
def test_allocate_bits_spends_the_budget_and_favours_the_sensitive_layer(budget):
    table = {2: [0.05, 0.40, 0.05, 0.01], 3: [0.01, 0.10, 0.01, 0.002]}
    bits = tx.allocate_bits(table, budget)
    assert sum(bits) == budget and min(bits) >= 2
    assert bits[1] == max(bits) and bits[3] == min(bits)
    # measured values are used where they exist: a 3rd bit that the table says buys nothing
    # (0.40 -> 0.39) loses to one that removes the whole increase, though both start at 0.40
    assert tx.allocate_bits({2: [0.40, 0.40], 3: [0.39, 0.0]}, 5) == [2, 3]


def test_even_bits():
    assert tx.even_bits(10, 4) == [3, 3, 2, 2]
    assert tx.even_bits(12, 4) == [3, 3, 3, 3]


def test_ttft_arithmetic():
    # 1 MB over 8 Gbit/s is 1 ms, plus 2 ms of decoding
    assert tx.ttft_s(1e6, 8.0, 0.002) == pytest.approx(0.003)
    assert list(tx.ttft_s(1e6, [1.0, 8.0])) == pytest.approx([0.008, 0.001])
    # a 5 ms prefill, 1 ms decode: the transfer may take 4 ms, so 8e6 bits / 4 ms = 2 Gbit/s
    assert tx.crossover_gbps(1e6, 0.005, 0.001) == pytest.approx(2.0)
    assert tx.crossover_gbps(1e6, 0.005) == pytest.approx(1.6)
    assert tx.crossover_gbps(1e6, 0.005, 0.005) == math.inf


@pytest.mark.parametrize("bits,group", [(4, 1), ([6, 3], 8)])
def test_codec_round_trip_on_the_lm_cache(bits, group):
    m = _model()
    ctx, cont, cache = _windows(m)
    k, v = tx.cache_tensors(cache)
    assert k.shape == (3, 2, 2, ctx.shape[1], 8)          # (B, L, H_kv, T, d)
    assert torch.equal(k[:, 1], cache.k[1][:, :, :ctx.shape[1]])
    assert torch.equal(v[:, 1], cache.v[1][:, :, :ctx.shape[1]])
    per_layer = [bits] * 2 if isinstance(bits, int) else bits
    for b in range(k.shape[0]):
        k2, v2 = kvcache.decompress(kvcache.compress(k[b], v[b], bits=bits, group=group))
        assert k2.shape == k[b].shape
        for t, t2 in ((k[b], k2), (v[b], v2)):
            for layer, nb in enumerate(per_layer):
                x = t[layer].float().permute(1, 0, 2).reshape(t.shape[2], -1)
                x2 = t2[layer].permute(1, 0, 2).reshape(t.shape[2], -1)
                step = (x.abs().amax(1) / (2 ** (nb - 1) - 1)).half().float()
                assert bool(((x - x2).abs().amax(1) <= step / 2 * (1 + 1e-3) + 1e-6).all())
    row = tx.codec_row(m, cache, cont, bits, group=group, q0=tx.query_tensors(m, ctx[:1]))
    assert row["ratio_vs_fp16"] > 1 and row["bytes"] > 0 and row["attn_rel_err"] > 0
    assert row["layer_bits"] == per_layer
    # what quantize_cache predicts is what the codec delivers
    kq, vq = tx.quantize_cache(k, v, per_layer, group)
    k2, _ = kvcache.decompress(kvcache.compress(k[0], v[0], bits=bits, group=group))
    assert torch.allclose(kq[0].float(), k2, atol=1e-5)


def test_queries_and_gqa_attention_reproduce_the_model():
    """query_tensors with the cache's K/V give the model's own attention output (GQA)."""
    m = _model()
    ctx, _, cache = _windows(m)
    seen = []
    h = m.blocks[1].attn.wo.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
    with torch.no_grad():
        m(ctx[:1])
    h.remove()
    q = tx.query_tensors(m, ctx[:1])
    k, v = (t[0] for t in tx.cache_tensors(cache))
    out = kvcache.attention_output(q.double(), k, v)            # (L, H, T, d)
    T = ctx.shape[1]
    ref = seen[0].view(1, T, 4, 8).transpose(1, 2)[0]
    assert torch.allclose(out[1].double(), ref, atol=1e-5)


def test_premises_undo_rope():
    """Keys with RoPE undone are the projections before rotation: rotating them again gives
    the cache back; the table has one row per layer and tensor."""
    from effdl.lm.model import apply_rope

    m = _model()
    _, _, cache = _windows(m)
    k = tx.cache_tensors(cache)[0][0]                            # (L, H_kv, T, d)
    cos, sin = m.rope_cos[:k.shape[2]], m.rope_sin[:k.shape[2]]
    assert torch.allclose(apply_rope(apply_rope(k, cos, -sin), cos, sin), k, atol=1e-5)
    rows = tx.kv_premises(m, cache, bits=4)
    assert [(r["layer"], r["tensor"]) for r in rows] == [
        (layer, t) for layer in range(2) for t in ("K", "K before RoPE", "V")]
    assert all(r["ch_spread"] >= 1 and -1 <= r["neighbour_cos"] <= 1 for r in rows)
