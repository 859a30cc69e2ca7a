"""effdl.inference: speculative decoding (greedy and sampled) and the decode-cost helper."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats

from effdl import lm
from effdl.inference import loops, speculative
from effdl.inference.speculative import (
    accept_or_resample,
    speculative_greedy,
    speculative_sample,
)

# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second CPU thread only waits at barriers on a shared machine (see test_lm)."""
    torch.set_num_threads(1)


def _model(seed: int, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_len=64, vocab=256,
           dtype=torch.float64) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = lm.LMConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model,
                    max_len=max_len, vocab=vocab)
    return lm.ByteLM(c).to(dtype).eval()


class _Contrarian(torch.nn.Module):
    """A draft that never proposes the target's greedy token: its logits are the target's with
    the argmax pushed to -inf."""

    def __init__(self, target):
        super().__init__()
        self.target, self.config, self.embed = target, target.config, target.embed

    @staticmethod
    def _flip(logits):
        return logits.scatter(-1, logits.argmax(-1, keepdim=True), float("-inf"))

    def prefill(self, idx):
        logits, cache = self.target.prefill(idx)
        return self._flip(logits), cache

    def decode_step(self, tokens, cache):
        logits, cache = self.target.decode_step(tokens, cache)
        return self._flip(logits), cache


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    """The smoke target and draft, trained once (seconds) into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("lm-cache")
    target = lm.load("target", "smoke", device="cpu", cache_dir=folder, verbose=False)
    draft = lm.load("draft", "smoke", device="cpu", cache_dir=folder, verbose=False)
    return target, draft


# ------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_output_equals_the_targets_own_random_models(k):
    target = _model(0)
    draft = _model(1, n_layer=1, n_head=2, n_kv_head=2, d_model=32)
    prompt = torch.tensor([[5, 9, 5, 9, 5, 9, 5]])
    n = 64 - 7 + 1                       # the last target position is filled
    out, st = speculative_greedy(target, draft, prompt, n, k)
    assert torch.equal(out, loops.generate_greedy(target, prompt, n))
    assert st.new_tokens == n and st.accepted <= st.proposed
    # every round makes accepted + 1 tokens, the prefill one
    assert 1 + st.accepted + (st.target_calls - 1) == n


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_draft_equal_to_target_accepts_everything(k):
    target = _model(0)
    n = 41
    out, st = speculative_greedy(target, target, torch.tensor([[1, 2, 3]]), n, k)
    assert torch.equal(out, lm.generate(target, torch.tensor([[1, 2, 3]]), n))
    assert st.acceptance_rate == 1.0
    # the prefill makes token 1; each round k + 1 more (the last round fewer)
    assert st.target_calls == 1 + -(-(n - 1) // (k + 1))


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_contrarian_draft_is_always_rejected_output_unchanged(k):
    target = _model(2)
    prompt = torch.tensor([[7, 7, 8]])
    out, st = speculative_greedy(target, _Contrarian(target), prompt, 20, k)
    assert torch.equal(out, lm.generate(target, prompt, 20))
    assert st.accepted == 0 and st.proposed > 0
    assert st.target_calls == 20                       # one token per call, as plain decoding


def test_greedy_on_the_trained_smoke_models(smoke_models):
    target, draft = smoke_models
    prompt = lm.encode("    def __init__(self")
    n = target.config.max_len - prompt.shape[1] + 1
    for k in (1, 2, 4):
        out, st = speculative_greedy(target, draft, prompt, n, k)
        assert torch.equal(out, lm.generate(target, prompt, n))
        assert 0 < st.acceptance_rate < 1, st           # trained on one corpus: they agree often
        assert st.target_calls < n


@pytest.mark.parametrize("a_expected", [0, 2, 3])
def test_a_round_crops_both_caches_to_the_kept_tokens(a_expected):
    """After a round on seq (1, L) keeping a drafts: L + a + 1 tokens, the target cache holds all but
    the last, the draft cache no more than that."""
    target, k = _model(3), 3
    seq = torch.tensor([[4, 4, 2, 6, 1]])
    best = lm.generate(target, seq, k + 1)[0, 5:]           # the target's next k + 1 tokens
    # a draft that agrees on the first a_expected tokens, then disagrees
    guesses = best[:k].clone()
    guesses[a_expected:] = (guesses[a_expected:] + 1) % 256

    class Scripted(_Contrarian):
        def decode_step(self, tokens, cache):
            logits, cache = self.target.decode_step(tokens, cache)
            i = cache.length - 5                            # drafts so far, after seq[-1]
            return torch.nn.functional.one_hot(guesses[i:i + 1], 256).double()[None], cache

    draft = Scripted(target)
    _, t_cache = target.prefill(seq[:, :-1])
    _, d_cache = target.prefill(seq[:, :-1])
    out, a = speculative.greedy_round(target, draft, seq, t_cache, d_cache, k)
    assert a == a_expected
    assert torch.equal(out[0, 5:], best[:a + 1])
    assert t_cache.length == out.shape[1] - 1 == 5 + a
    assert d_cache.length == min(5 + a, 5 + k - 1)


# ------------------------------------------------------------------------------------ sampling


def _tv(a, b) -> float:
    return 0.5 * float((a - b).abs().sum())


PAIRS = [  # (p, q): ordinary, q with a zero where p has mass, p with zeros, p == q
    ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]),
    ([0.25, 0.25, 0.0, 0.5, 0.0, 0.0], [0.0, 0.1, 0.3, 0.2, 0.3, 0.1]),
    ([0.05, 0.05, 0.6, 0.1, 0.1, 0.0, 0.05, 0.05], [0.125] * 8),
    ([0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]),
]


@pytest.mark.parametrize("p, q", PAIRS)
def test_accept_or_resample_recovers_the_target_distribution(p, q):
    """200k drafts x ~ q through the rule come out distributed as p (TV < 0.01; the sampling noise is
    ~0.002), and accepted with probability sum min(p, q)."""
    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    N = 200_000
    x = speculative.sample(q, torch.rand(N, generator=g, dtype=torch.float64))
    u, w = torch.rand(2, N, generator=g, dtype=torch.float64)
    ok, y = accept_or_resample(p, q, x, u, w)
    freq = torch.bincount(y, minlength=len(p)).double() / N
    assert _tv(freq, p) < 0.01, (freq, p)
    alpha = float(speculative.acceptance_probability(p, q))
    assert float(ok.double().mean()) == pytest.approx(alpha, abs=0.005)
    assert _tv(p, q) == pytest.approx(1 - alpha)
    if _tv(p, q) > 0:                 # the test has power: keeping every draft would fail it
        assert _tv(torch.bincount(x, minlength=len(p)).double() / N, p) > 0.1


def test_sample_draws_each_index_with_its_probability_and_never_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64)
    w = torch.tensor([0.0, 0.4999, 0.5, 0.7499, 0.75, 1 - 1e-16], dtype=torch.float64)
    assert speculative.sample(probs, w).tolist() == [1, 1, 3, 3, 4, 4]


def _tiny_vocab_pair():
    """A 3-token target and draft with peaked, different distributions (scaled-up heads)."""
    target = _model(4, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_len=16, vocab=3)
    draft = _model(5, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_len=16, vocab=3)
    with torch.no_grad():
        target.head.weight.mul_(10)
        draft.head.weight.mul_(10)
    return target, draft


def _exact_joint(model, prompt, n):
    """P(x_1..x_n | prompt) for every one of V^n continuations, by full forwards: (V^n,)."""
    V = model.config.vocab
    conts = torch.cartesian_prod(*[torch.arange(V)] * n).reshape(-1, n)  # (V^n, n)
    idx = torch.cat([prompt.expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logp = model(idx)[:, prompt.shape[1] - 1:-1].log_softmax(-1)    # (V^n, n, V)
    return logp.gather(-1, conts[..., None]).sum((1, 2)).exp()


def test_speculative_sample_end_to_end_matches_the_target_joint():
    """Whole generations of n = 4 tokens (81 outcomes, k = 2: rejections, resamples and bonus
    tokens all happen) follow the target's exact joint distribution (chi-square, p > 1e-3 with a
    fixed seed), and would not follow the draft's."""
    target, draft = _tiny_vocab_pair()
    prompt, n, runs = torch.tensor([[0, 2, 1]]), 4, 800
    p_joint, q_joint = _exact_joint(target, prompt, n), _exact_joint(draft, prompt, n)
    assert _tv(p_joint, q_joint) > 0.2
    g = torch.Generator().manual_seed(0)
    counts, proposed, accepted = torch.zeros(3 ** n), 0, 0
    for _ in range(runs):
        out, st = speculative_sample(target, draft, prompt, n, 2, generator=g)
        c = out[0, 3:]
        counts[int(((3 ** torch.arange(n - 1, -1, -1)) * c).sum())] += 1
        proposed, accepted = proposed + st.proposed, accepted + st.accepted
    assert 0 < accepted < proposed
    # cells with expected count >= 5 apart, the rest pooled
    for joint, should_pass in ((p_joint, True), (q_joint, False)):
        exp = joint.double() * runs
        big = exp >= 5
        obs_c = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
        exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
        chi2 = float(((obs_c - exp_c) ** 2 / exp_c.clamp_min(1e-12)).sum())
        pval = scipy_stats.chi2.sf(chi2, len(obs_c) - 1)
        assert (pval > 1e-3) == should_pass, (chi2, pval)


def test_speculative_sample_with_draft_equal_to_target_accepts_all():
    target, _ = _tiny_vocab_pair()
    g = torch.Generator().manual_seed(1)
    _, st = speculative_sample(target, target, torch.tensor([[1, 1]]), 13, 3, generator=g)
    assert st.acceptance_rate == 1.0 and st.target_calls == 1 + 3


def test_expected_tokens_per_call():
    assert speculative.expected_tokens_per_call(1.0, 4) == 5
    assert speculative.expected_tokens_per_call(0.0, 4) == 1
    assert speculative.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)


# ------------------------------------------------------------------------------------ decode costs


def test_decode_costs_reports_positive_ttft_and_tpot():
    model = _model(0, dtype=torch.float32)
    out = loops.decode_costs(model, 16, 8, repeat=2, warmup=0)
    assert out["ttft_ms"] > 0 and out["tpot_ms"] > 0
    with pytest.raises(ValueError, match="gen_len"):
        loops.decode_costs(model, 16, 0)
    with pytest.raises(ValueError, match="prompt_len"):
        loops.decode_costs(model, 60, 8)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_value_errors_that_name_the_problem():
    target, draft = _model(0), _model(1, n_layer=1)
    ok = torch.tensor([[1, 2, 3]])
    for fn in (speculative_greedy, speculative_sample):
        with pytest.raises(ValueError, match="k \\(draft tokens"):
            fn(target, draft, ok, 5, 0)
        with pytest.raises(ValueError, match="n \\(tokens to generate"):
            fn(target, draft, ok, -1, 2)
        with pytest.raises(ValueError, match="batch size 1"):
            fn(target, draft, torch.zeros(2, 3, dtype=torch.long), 5, 2)
        with pytest.raises(ValueError, match="empty"):
            fn(target, draft, "", 5, 2)
        with pytest.raises(ValueError, match="max_len=64"):
            fn(target, draft, ok, 63, 2)
        with pytest.raises(ValueError, match="max_len=64"):
            fn(target, draft, torch.zeros(1, 65, dtype=torch.long), 1, 2)
        with pytest.raises(ValueError, match="vocabulary"):
            fn(target, _model(1, n_layer=1, vocab=3), ok, 5, 2)
    with pytest.raises(ValueError, match="temperature"):
        speculative_sample(target, draft, ok, 5, 2, temperature=0)
    # the longest legal request works: prompt + n - 1 = max_len, whatever k
    out, _ = speculative_greedy(target, draft, ok, 62, 8)
    assert out.shape == (1, 65)
    assert speculative_greedy(target, draft, ok, 0, 2)[0].shape == (1, 3)
