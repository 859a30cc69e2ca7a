"""effdl.inference.ppd: parallel prompt decoding (masked forward, training, greedy)."""

from __future__ import annotations

import pytest
import torch

from effdl import lm
from effdl.inference import ppd
from effdl.inference.ppd import PromptTokens, masked_forward, ppd_greedy, tree_layout

# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second CPU thread only waits at barriers on a shared machine."""
    torch.set_num_threads(1)


def _model(seed: int, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_len=64,
           dtype=torch.float64) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = lm.LMConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                    d_model=d_model, max_len=max_len)
    return lm.ByteLM(c).to(dtype).eval()


def _scripted(monkeypatch, ref, wrong) -> list:
    """Make every prompt group guess ref's bytes, off by one where ``wrong(position)``:
    ``lambda t: False`` is an oracle whose guesses are all right, ``lambda t: True`` a
    contrarian whose guesses are all wrong.  Group j after chain index c sits after
    position P + c; its token i guesses the byte at P + c + 1 + i.  Returns the list
    of the caches seen, filled as the calls come."""
    real, caches = ppd._call, []

    def call(model, pt, cache, chain, cuts, m):
        P = cache.length
        logits, groups = real(model, pt, cache, chain, cuts, m)
        for g, c in enumerate(cuts):
            for i in range(1, m + 1):
                t = P + c + 1 + i
                byte = (int(ref[0, t]) + wrong(t)) % 256
                groups[g, i - 1] = torch.nn.functional.one_hot(
                    torch.tensor(byte), 256).to(groups.dtype)
        caches.append(cache)
        return logits, groups

    monkeypatch.setattr(ppd, "_call", call)
    return caches


@pytest.fixture(scope="module")
def smoke_target(tmp_path_factory):
    """The smoke target model, trained once (seconds) into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("lm-cache")
    return lm.load("target", "smoke", device="cpu", cache_dir=folder, verbose=False)


# ---------------------------------------------------------------------- the forward


def test_masked_forward_with_a_causal_mask_is_the_plain_forward():
    model = _model(0)
    idx = torch.randint(0, 256, (2, 23))
    pos, mask = tree_layout(23, [], 0)
    assert torch.equal(pos, torch.arange(23))
    assert torch.equal(mask, torch.ones(23, 23, dtype=torch.bool).tril())
    out = masked_forward(model, model.embed(idx), pos, mask)
    # fp64 on both sides: differences are rounding, ~1e-15
    torch.testing.assert_close(out, model(idx), rtol=0, atol=1e-10)


def test_masked_forward_with_a_cache_matches_prefill_then_decode():
    model = _model(1)
    idx = torch.randint(0, 256, (1, 30))
    ref, _ = model.prefill(idx)                                  # (1, 30, V)
    cache = model.new_cache(1)
    pos, mask = tree_layout(20, [], 0)
    first = masked_forward(model, model.embed(idx[:, :20]), pos, mask, cache, write=20)
    assert cache.length == 20
    pos, mask = tree_layout(30, [], 0, n_cached=20)              # (10,), (10, 30)
    rest = masked_forward(model, model.embed(idx[:, 20:]), pos, mask, cache, write=10)
    assert cache.length == 30
    torch.testing.assert_close(torch.cat([first, rest], 1), ref, rtol=0, atol=1e-10)


def test_a_prompt_group_sees_its_prefix_only():
    """A group hung after real index c gives the same outputs as the same group after
    the first c + 1 tokens alone: later real tokens and other groups are masked."""
    model, pt = _model(2), PromptTokens.for_model(_model(2), 3).double()
    idx = torch.randint(0, 256, (1, 12))
    x = torch.cat([model.embed(idx), pt.weight.repeat(2, 1)[None]], 1)
    pos, mask = tree_layout(12, [4, 9], 3)
    assert pos.tolist()[12:] == [5, 6, 7, 10, 11, 12]
    both = masked_forward(model, x, pos, mask)[0, 12:]           # (6, V)
    for g, c in enumerate([4, 9]):
        x1 = torch.cat([model.embed(idx[:, :c + 1]), pt.weight[None]], 1)
        pos1, mask1 = tree_layout(c + 1, [c], 3)
        alone = masked_forward(model, x1, pos1, mask1)[0, c + 1:]
        torch.testing.assert_close(both[3 * g:3 * g + 3], alone, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------- greedy


@pytest.mark.parametrize("m, k", [(1, 1), (2, 1), (3, 2), (3, 3), (4, 4)])
@pytest.mark.parametrize("T", [1, 6, 17])
def test_greedy_output_equals_the_models_own_random_models(m, k, T):
    model = _model(3)
    pt = PromptTokens.for_model(model, m, seed=T).double()
    prompt = torch.randint(0, 256, (1, T))
    for n in (1, 2, 7, 64 - T + 1):          # the last: the final position is filled
        out, st = ppd_greedy(model, pt, prompt, n, k)
        assert torch.equal(out, lm.generate(model, prompt, n)), (n, st)
        assert st.new_tokens == n and st.accepted <= st.proposed
        # every step makes accepted + 1 tokens, the prefill one
        assert 1 + st.accepted + (st.forwards - 1) == n
        assert st.extra_param_bytes == m * 64 * 8


@pytest.mark.parametrize("m, k", [(1, 1), (3, 2), (3, 3), (5, 4)])
def test_oracle_prompt_tokens_are_always_accepted(monkeypatch, m, k):
    model, prompt, n = _model(4), torch.tensor([[3, 1, 4, 1, 5]]), 52
    ref = lm.generate(model, prompt, n)
    _scripted(monkeypatch, ref, lambda t: False)
    out, st = ppd_greedy(model, PromptTokens.for_model(model, m).double(), prompt, n, k)
    assert torch.equal(out, ref)
    assert st.acceptance_rate == 1.0 and st.proposed > 0
    # the prefill makes token 1; each step k + 1 more (the last step fewer)
    assert st.forwards == 1 + -(-(n - 1) // (k + 1))
    assert st.tokens_per_forward > k


@pytest.mark.parametrize("k", [1, 3])
def test_contrarian_prompt_tokens_are_always_rejected_output_unchanged(monkeypatch, k):
    model, prompt, n = _model(5), torch.tensor([[7, 7, 8]]), 30
    ref = lm.generate(model, prompt, n)
    _scripted(monkeypatch, ref, lambda t: True)
    out, st = ppd_greedy(model, PromptTokens.for_model(model, 3).double(), prompt, n, k)
    assert torch.equal(out, ref)
    assert st.accepted == 0 and st.proposed > 0
    assert st.forwards == n                   # one token per call, as plain decoding


def test_the_cache_keeps_only_the_accepted_real_tokens(monkeypatch):
    """With guesses right and wrong in turn, the cache ends holding every token but
    the last, equal to a plain prefill of them: rejected guesses and prompt tokens
    left nothing behind."""
    model, prompt, n = _model(6), torch.tensor([[9, 8, 7, 6]]), 40
    ref = lm.generate(model, prompt, n)
    caches = _scripted(monkeypatch, ref, lambda t: t % 3 == 0)
    out, st = ppd_greedy(model, PromptTokens.for_model(model, 3).double(), prompt, n)
    assert torch.equal(out, ref)
    assert 0 < st.accepted < st.proposed                 # some kept, some rejected
    cache = caches[-1]
    assert cache.length == out.shape[1] - 1
    _, plain = model.prefill(out[:, :-1])
    L = cache.length
    for layer in range(model.config.n_layer):
        for mine, theirs in ((cache.k, plain.k), (cache.v, plain.v)):
            torch.testing.assert_close(mine[layer][:, :, :L], theirs[layer][:, :, :L],
                                       rtol=0, atol=1e-10)


def test_greedy_on_the_trained_smoke_model(smoke_target):
    pt, log = ppd.train_prompt_tokens(smoke_target, m=3, steps=20, batch=4, seq_len=64,
                                      pool=32, corpus=lm.load_corpus(262_144))
    prompt = lm.encode("    def __init__(self")
    n = smoke_target.config.max_len - prompt.shape[1] + 1
    for k in (1, 3):
        out, st = ppd_greedy(smoke_target, pt, prompt, n, k)
        assert torch.equal(out, lm.generate(smoke_target, prompt, n))
        assert 0 < st.acceptance_rate <= 1, st
        assert st.forwards < n


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("text, target", [("greedy", "model"), ("corpus", "data")])
def test_training_lowers_the_prompt_token_loss_and_freezes_the_model(smoke_target, text,
                                                                     target):
    corpus = lm.load_corpus(262_144)
    before = {k: v.clone() for k, v in smoke_target.state_dict().items()}
    flags = [p.requires_grad for p in smoke_target.parameters()]
    kw = dict(m=2, batch=8, seq_len=64, lr=0.05, corpus=corpus, seed=3, text=text,
              target=target, pool=32)
    _, log0 = ppd.train_prompt_tokens(smoke_target, steps=0, **kw)
    pt, log = ppd.train_prompt_tokens(smoke_target, steps=25, **kw)
    # the same held-out batch (its own generator): the loss fell
    assert log["held_out_loss"] < log0["held_out_loss"] - 0.02, (log0, log)
    assert len(log["loss"]) == 25 and pt.m == 2 and not pt.weight.requires_grad
    for k, v in smoke_target.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in smoke_target.parameters()] == flags


def test_load_prompt_tokens_trains_once_then_reads_the_file(smoke_target, tmp_path):
    corpus = lm.load_corpus(262_144)
    kw = dict(m=2, steps=3, batch=2, seq_len=32, pool=8, corpus=corpus,
              cache_dir=tmp_path, verbose=False)
    first = ppd.load_prompt_tokens(smoke_target, **kw)
    files = list((tmp_path / "lm").glob("ppd-*.pt"))
    assert len(files) == 1
    again = ppd.load_prompt_tokens(smoke_target, **kw)
    assert torch.equal(first.weight, again.weight)
    assert again.train_log["steps"] == 3
    ppd.load_prompt_tokens(smoke_target, **{**kw, "steps": 4})   # a new key, a new file
    assert len(list((tmp_path / "lm").glob("ppd-*.pt"))) == 2


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors_that_name_the_problem():
    model = _model(0)
    pt = PromptTokens.for_model(model, 3).double()
    ok = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="m \\(prompt tokens\\)"):
        PromptTokens(0, 64)
    with pytest.raises(ValueError, match="m \\(prompt tokens\\)"):
        ppd.train_prompt_tokens(model, m=0, corpus=lm.load_corpus(262_144))
    with pytest.raises(ValueError, match="k \\(guesses"):
        ppd_greedy(model, pt, ok, 5, 0)
    with pytest.raises(ValueError, match="k \\(guesses.*m=3"):
        ppd_greedy(model, pt, ok, 5, 4)
    with pytest.raises(ValueError, match="n \\(tokens to generate"):
        ppd_greedy(model, pt, ok, -1)
    with pytest.raises(ValueError, match="batch size 1"):
        ppd_greedy(model, pt, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty"):
        ppd_greedy(model, pt, "", 5)
    with pytest.raises(ValueError, match="max_len=64"):
        ppd_greedy(model, pt, ok, 63)
    with pytest.raises(ValueError, match="max_len=64"):
        ppd_greedy(model, pt, torch.zeros(1, 65, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="d_model=64"):
        ppd_greedy(model, PromptTokens(3, 32), ok, 5)
    with pytest.raises(ValueError, match="PromptTokens"):
        ppd_greedy(model, torch.zeros(3, 64), ok, 5)
    # the longest legal request works: prompt + n - 1 = max_len
    assert ppd_greedy(model, pt, ok, 62)[0].shape == (1, 65)
    assert ppd_greedy(model, pt, ok, 0)[0].shape == (1, 3)
