"""effdl.inference.kvpred: KV prediction (a small model predicts the base's cache)."""

from __future__ import annotations

import pytest
import torch

from effdl import lm
from effdl.inference import kvpred
from effdl.inference.kvpred import (
    KVPredictor,
    continuation_loss,
    default_layer_map,
    load_kv_predictor,
    predict_cache,
    train_kv_predictor,
)

# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second CPU thread only waits at barriers on a shared machine."""
    torch.set_num_threads(1)


def _model(seed: int, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_len=64,
           vocab=256, dtype=torch.float64) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = lm.LMConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                    d_model=d_model, max_len=max_len, vocab=vocab)
    return lm.ByteLM(c).to(dtype).eval()


def _oracle(base) -> KVPredictor:
    """aux == base, every map the identity: the predicted cache is the base's own."""
    return KVPredictor(base.config, base.config).to(torch.float64).set_identity()


def _prompt(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus(lm.sizes("smoke").corpus_bytes)


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    """The smoke target (base) and draft (aux), trained once (seconds), fresh folder."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("lm-cache")
    base = lm.load("target", "smoke", device="cpu", cache_dir=folder, verbose=False)
    aux = lm.load("draft", "smoke", device="cpu", cache_dir=folder, verbose=False)
    return base, aux


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("T", [2, 3, 17, 63, 64])
def test_oracle_predictor_reproduces_the_base_prefill(T):
    base = _model(0)
    prompt = _prompt(3, T)
    with torch.no_grad():
        ref, ref_cache = base.prefill(prompt)
        first, cache = predict_cache(base, base, _oracle(base), prompt)
        # baseline: the same numbers by another exact route (prefill T-1, decode 1)
        alt = base.decode_step(prompt[:, -1:], base.prefill(prompt[:, :-1])[1])[0]
    alt = alt[:, -1]
    scale = ref.abs().max().item()
    tol = 10 * max((alt - ref[:, -1]).abs().max().item(), 64 * 2.2e-16 * scale)
    assert first.shape == (3, 256)
    assert (first - ref[:, -1]).abs().max().item() <= tol
    assert cache.length == ref_cache.length == T
    for i in range(base.config.n_layer):
        for mine, true in ((cache.k[i], ref_cache.k[i]), (cache.v[i], ref_cache.v[i])):
            err = (mine[:, :, :T] - true[:, :, :T]).abs().max().item()
            assert err <= 64 * 2.2e-16 * true.abs().max().item()


def test_oracle_cache_then_decodes_like_the_base():
    """The completed cache serves ordinary decode steps: the base's own logits."""
    base = _model(0)
    prompt, nxt = _prompt(2, 20), _prompt(2, 5, seed=1)
    with torch.no_grad():
        _, cache = predict_cache(base, base, _oracle(base), prompt)
        _, ref_cache = base.prefill(prompt)
        mine = base.decode_step(nxt, cache)[0]
        ref = base.decode_step(nxt, ref_cache)[0]
    assert cache.length == 25
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_oracle_continuation_loss_equals_the_base():
    base = _model(0)
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2),
                         dtype=torch.int64).to(torch.uint8)
    out = continuation_loss(base, base, _oracle(base), data, prompt_len=30, cont_len=9,
                            windows=5, batch=2)
    assert out["kv_predicted"] == pytest.approx(out["base"], abs=1e-9)
    assert out["aux"] == pytest.approx(out["base"], abs=1e-9)
    assert out["first_token"]["kv_predicted"] == pytest.approx(
        out["first_token"]["base"], abs=1e-9)
    assert 7.0 < out["base"] < 9.0            # a random model: about log2(256) = 8 bits
    # one window starts at 0: byte j (P <= j < P + C) scored by the logits at j - 1
    one = continuation_loss(base, base, _oracle(base), data, prompt_len=30, cont_len=9,
                            windows=1, unit="nats")
    with torch.no_grad():
        logp = base(data[None, :38].long())[0].log_softmax(-1)         # (38, 256)
    want = -sum(logp[j - 1, int(data[j])].item() for j in range(30, 39)) / 9
    assert one["base"] == pytest.approx(want, abs=1e-9)
    assert one["first_token"]["base"] == pytest.approx(-logp[29, int(data[30])].item())


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("aux_shape", [
    dict(n_layer=1, n_head=2, n_kv_head=2, d_model=32),     # same head_dim as the base
    dict(n_layer=3, n_head=2, n_kv_head=1, d_model=48),     # other head_dim, MQA
])
@pytest.mark.parametrize("T", [2, 5, 33])
def test_shapes_with_gqa_and_irregular_prompts(aux_shape, T):
    base = _model(0)                                      # 4 heads, 2 K/V heads, d = 16
    aux = _model(1, **aux_shape)
    pred = KVPredictor(base.config, aux.config).to(torch.float64)
    a = aux.config
    assert pred.k_maps[0].weight.shape == (2 * 16, a.n_kv_head * a.head_dim)
    prompt = _prompt(3, T)
    with torch.no_grad():
        first, cache = predict_cache(base, aux, pred, prompt)
        ks, vs = pred(aux.prefill(prompt[:, :-1])[1])
    assert first.shape == (3, 256) and torch.isfinite(first).all()
    assert cache.length == T and len(cache.k) == base.config.n_layer
    assert cache.k[0].shape == (3, 2, 64, 16)
    assert len(ks) == len(vs) == 2 and ks[1].shape == vs[1].shape == (3, 2, T - 1, 16)
    # the predicted positions went into the cache, untouched
    torch.testing.assert_close(cache.k[1][:, :, :T - 1], ks[1], rtol=0, atol=0)


def test_default_layer_map():
    assert default_layer_map(4, 2) == (0, 0, 1, 1)
    assert default_layer_map(3, 2) == (0, 0, 1)
    assert default_layer_map(2, 2) == (0, 1)
    assert default_layer_map(28, 16)[:4] == (0, 0, 1, 1)


def test_keys_are_mapped_before_rope():
    """One position's key does not depend on where it sits: shift the auxiliary cache's
    content by one position, and the predicted pre-RoPE keys shift with it."""
    base, aux = _model(0), _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=48)
    pred = KVPredictor(base.config, aux.config).to(torch.float64)
    x = torch.randn(1, 2, 6, 24, dtype=torch.float64)          # pre-RoPE aux keys
    cache = aux.new_cache(1)
    c, s = aux.rope_cos[:7], aux.rope_sin[:7]
    cache.write(0, lm.model.apply_rope(torch.cat([x[:, :, :1], x], 2), c, s),
                torch.zeros(1, 2, 7, 24, dtype=torch.float64))
    cache.length = 7
    with torch.no_grad():
        k = pred(cache)[0][0]                                   # (1, 2, 7, 16)
    unrot = kvpred._unrope(k, base.rope_cos[:7], base.rope_sin[:7])
    torch.testing.assert_close(unrot[:, :, 0], unrot[:, :, 1], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- training


def test_training_reduces_the_loss_on_the_smoke_corpus(smoke_models, corpus):
    base, aux = smoke_models
    kw = dict(prompt_len=24, cont_len=8, windows=16, batch=8)
    fresh = continuation_loss(base, aux, KVPredictor(base.config, aux.config),
                              corpus, **kw)
    pred, log = train_kv_predictor(base, aux, steps=30, batch=8, prompt_len=24,
                                   cont_len=8, lr=1e-2, corpus=corpus, warmup=3)
    after = continuation_loss(base, aux, pred, corpus, **kw)
    first, last = sum(log["loss"][:5]) / 5, sum(log["loss"][-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert after["kv_predicted"] < fresh["kv_predicted"] - 0.02, (fresh, after)
    assert after["first_token"]["kv_predicted"] < fresh["first_token"]["kv_predicted"]
    # the scoring itself: the base's continuation loss is its held-out bits per byte
    assert after["base"] == pytest.approx(base.train_log["held_out_bpb"], abs=0.5)
    assert len(log["ce"]) == 30 and log["seconds"] > 0


def test_gradients_do_not_reach_the_base_model():
    base, aux = _model(0), _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    aux_before = {k: v.clone() for k, v in aux.state_dict().items()}
    data = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int64).to(torch.uint8)
    for train_aux in (False, True):
        pred, _ = train_kv_predictor(base, aux, steps=3, batch=2, prompt_len=10,
                                     cont_len=4, lr=1e-2, corpus=data,
                                     train_aux=train_aux)
        assert all(p.grad is None for p in base.parameters())
        assert all(p.grad is None for p in aux.parameters())
        assert all(p.requires_grad for p in base.parameters())     # flags restored
        for k, v in base.state_dict().items():
            assert torch.equal(v, before[k]), k
        for k, v in aux.state_dict().items():                     # aux: never in place
            assert torch.equal(v, aux_before[k]), k
        assert (pred.aux is not None) == train_aux
        assert pred.k_maps[0].weight.grad is not None         # the predictor trained
    tuned = pred.aux.state_dict()
    assert any(not torch.equal(v, aux_before[k]) for k, v in tuned.items())  # the copy


def test_load_kv_predictor_trains_once_then_reads(tmp_path, corpus):
    base, aux = _model(0), _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=32)
    kw = dict(steps=2, batch=2, prompt_len=8, cont_len=3, cache_dir=tmp_path,
              verbose=False, corpus=corpus)
    p1 = load_kv_predictor(base, aux, **kw)
    assert p1.cache_file.exists() and p1.cache_file.parent == tmp_path / "lm"
    p2 = load_kv_predictor(base, aux, **kw)
    assert p2.train_log == p1.train_log
    for k, v in p1.state_dict().items():
        assert torch.equal(v, p2.state_dict()[k])
    p1.cache_file.write_bytes(b"not a checkpoint")                  # corrupt: retrained
    p3 = load_kv_predictor(base, aux, **kw)
    torch.testing.assert_close(p3.state_dict(), p1.state_dict())


# ----------------------------------------------------------------------------- errors


def test_bad_input_raises_value_errors_naming_the_fix():
    base, aux = _model(0), _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=32)
    pred = KVPredictor(base.config, aux.config).to(torch.float64)
    with pytest.raises(ValueError, match="at least 2"):
        predict_cache(base, aux, pred, _prompt(1, 1))
    with pytest.raises(ValueError, match="shorten the prompt"):
        predict_cache(base, aux, pred, _prompt(1, 65))
    for other in (dict(vocab=128), dict(max_len=32)):
        odd = _model(2, n_layer=1, n_head=2, n_kv_head=2, d_model=32, **other)
        name = next(iter(other))
        with pytest.raises(ValueError, match=f"different {name}"):
            KVPredictor(base.config, odd.config)
        with pytest.raises(ValueError, match=f"different {name}"):
            predict_cache(base, odd, pred, _prompt(1, 4))
        with pytest.raises(ValueError, match=f"different {name}"):
            train_kv_predictor(base, odd, steps=1, corpus=torch.zeros(99).byte())
    data = torch.zeros(500, dtype=torch.uint8)
    for steps in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            train_kv_predictor(base, aux, steps=steps, corpus=data)
    with pytest.raises(ValueError, match="exceeds max_len"):
        train_kv_predictor(base, aux, steps=1, prompt_len=60, cont_len=10, corpus=data)
    with pytest.raises(ValueError, match="prompt_len must be an int >= 2"):
        train_kv_predictor(base, aux, steps=1, prompt_len=1, corpus=data)
    with pytest.raises(ValueError, match="layer_map"):
        KVPredictor(base.config, aux.config, layer_map=(0, 1))
    wide = _model(3, n_layer=1, n_head=2, n_kv_head=2, d_model=48)
    with pytest.raises(ValueError, match="equal in both"):
        KVPredictor(base.config, wide.config).set_identity()


def test_ttft_reports_both_ways_in_ms():
    base, aux = _model(0), _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=32)
    pred = KVPredictor(base.config, aux.config).to(torch.float64)
    out = kvpred.ttft(base, aux, pred, prompt_len=40, repeat=2, warmup=0)
    assert out["base_ms"] > 0 and out["kvp_ms"] > 0 and out["aux_ms"] > 0
    assert out["speedup"] == pytest.approx(out["base_ms"] / out["kvp_ms"])
    with pytest.raises(ValueError, match="shorten the prompt"):
        kvpred.ttft(base, aux, pred, prompt_len=65, repeat=1)
