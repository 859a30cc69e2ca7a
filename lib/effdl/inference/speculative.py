"""Speculative decoding: a small draft model guesses, the target checks k at once.

Decoding one token runs the whole target for a single position: memory-bound work that
reads every weight for one token.  Scoring k + 1 tokens in one call costs about the
same, so if a cheap draft model guesses the next k tokens, one target call can confirm
several of them (Leviathan, Kalman & Matias, ICML 2023; Chen et al., 2023).

A round, with ``seq`` (1, L) the tokens so far and the target's cache holding all but
the last of them:

1. the draft proposes d_1..d_k autoregressively, with its own KV cache;
2. the target scores [seq[-1], d_1..d_k] in one ``decode_step``: its logits at fed
   position i predict the token after d_i (after seq[-1] for i = 0), k + 1 in all;
3. keep the longest prefix of drafts the target agrees with, then one token of the
   target's own: a correction at the first disagreement, a bonus when all k agree;
4. crop both caches to the kept tokens (:meth:`effdl.lm.KVCache.crop`).

Every round yields between 1 and k + 1 tokens for one target call.  The agreement rule
decides what "agrees" means.  Greedy: the draft token equals the target's argmax, so the
output is exactly the target's own greedy generation.  Sampling: accept x with
probability min(1, p(x) / q(x)) and on rejection draw from normalize(max(0, p - q));
every output token is then distributed exactly as the target alone would sample it
(:func:`accept_or_resample`).

Batch size 1 only: with a batch, each sequence accepts a different number of tokens, and
the caches (one length for every sequence) would need per-sequence lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effdl.lm.generation import encode
from effdl.lm.model import ByteLM, KVCache, check_tokens

__all__ = ["SpecStats", "accept_or_resample", "acceptance_probability",
           "expected_tokens_per_call", "greedy_accept", "greedy_round", "propose", "sample",
           "sample_round", "speculative_greedy", "speculative_sample"]


@dataclass
class SpecStats:
    """What a speculative generation cost: model calls (prefill included) and drafts."""

    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0              # draft tokens the target checked
    accepted: int = 0              # of which it kept
    rejected: int = 0              # rounds that ended at a disagreement
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of the drafted tokens kept: falls with k even at a constant per-guess
        rate, since a round stops at its first rejection."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def alpha(self) -> float:
        """Per-guess acceptance rate, the alpha of Leviathan et al.: kept / (kept +
        rejected), each round's guesses being checked until the first rejection."""
        seen = self.accepted + self.rejected
        return self.accepted / seen if seen else float("nan")

    @property
    def target_calls_per_token(self) -> float:
        """1.0 for plain decoding (one call per token); 1 / (k + 1) at best."""
        return self.target_calls / self.new_tokens if self.new_tokens else float("nan")


# ---------------------------------------------------------------- the acceptance rules


def sample(probs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (..., V), uniforms w (...) in [0, 1) -> ids (...).

    Index i is drawn when cdf[i - 1] <= w < cdf[i]: with probability probs[i].
    """
    shape = torch.broadcast_shapes(probs.shape[:-1], w.shape)
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]      # why: last entry exactly 1.0, so every w < 1 lands
    cdf = cdf.expand(*shape, cdf.shape[-1]).contiguous()          # (..., V)
    w = w.to(cdf.dtype).expand(shape)[..., None]                  # (..., 1)
    # why right=True: an index of zero mass (cdf[i] == cdf[i - 1]) is never drawn
    return torch.searchsorted(cdf, w, right=True).squeeze(-1)


def accept_or_resample(p, q, x, u, w):
    """The speculative sampling rule for one drafted token, vectorized.

    p, q (..., V): target and draft probabilities; x (...): the token drafted from q;
    u, w (...): independent uniforms in [0, 1).  Returns ``(accepted, token)`` (...).

    Accept x with probability min(1, p(x) / q(x)), else draw from
    r = max(0, p - q) / sum(max(0, p - q)).  The output is distributed as p:
    P(y) = q(y) min(1, p(y)/q(y)) + (1 - sum min(p, q)) r(y)
         = min(p, q)(y) + max(0, p - q)(y) = p(y).
    """
    shape = torch.broadcast_shapes(p.shape[:-1], q.shape[:-1], x.shape, u.shape,
                                   w.shape)
    V = p.shape[-1]
    p, q = p.expand(*shape, V), q.expand(*shape, V)               # (..., V)
    x = x.expand(shape)
    px = p.gather(-1, x[..., None]).squeeze(-1)                   # (...)
    qx = q.gather(-1, x[..., None]).squeeze(-1)
    accepted = u.expand(shape) * qx < px     # why u·q < p: no division when q(x) = 0
    residual = (p - q).clamp_min(0)                               # (..., V)
    # why fall back to p: p == q leaves no residual, but then every x is accepted
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return accepted, torch.where(accepted, x, sample(residual, w))


def acceptance_probability(p, q) -> torch.Tensor:
    """alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q): the chance a draft is accepted."""
    return torch.minimum(p, q).sum(-1)


def expected_tokens_per_call(alpha: float, k: int) -> float:
    """Tokens per target call with k drafts each accepted with probability alpha
    (independently): 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    return float(sum(alpha ** i for i in range(k + 1)))


# ---------------------------------------------------------------- one round


def propose(draft: ByteLM, seq, cache: KVCache, k: int, pick):
    """The draft's k guesses after seq (1, L): ``(drafted (1, k), logits (k, V))``.

    ``pick(logits (1, V)) -> (1, 1)`` chooses each token.  The cache is fed the tokens
    of seq it lacks, then d_1..d_(k-1): it ends at L + k - 1 (d_k is never fed).
    """
    new, tokens, logits = seq[:, cache.length:], [], []
    for _ in range(k):
        out, _ = draft.decode_step(new, cache)                    # (1, T, V)
        new = pick(out[:, -1])                                    # (1, 1)
        tokens.append(new)
        logits.append(out[0, -1])
    if not tokens:
        return seq[:, :0], None
    return torch.cat(tokens, dim=1), torch.stack(logits)


def _score(target: ByteLM, seq, drafted, cache: KVCache):
    """Target logits (k + 1, V) after seq[-1], d_1, .., d_k: one decode_step call."""
    fed = torch.cat([seq[:, -1:], drafted], dim=1)                # (1, k + 1)
    logits, _ = target.decode_step(fed, cache)                    # (1, k + 1, V)
    return logits[0]


def _commit(seq, drafted, a: int, token, t_cache: KVCache, d_cache: KVCache):
    """Append d_1..d_a and the target's token; crop the caches to what was kept."""
    L = seq.shape[1]
    seq = torch.cat([seq, drafted[:, :a], token.view(1, 1)], dim=1)  # (1, L + a + 1)
    # why L + a: prefix, seq[-1] and the a kept drafts; the new last token is not fed
    t_cache.crop(L + a)
    d_cache.crop(min(d_cache.length, L + a))
    return seq


def _leading_true(mask) -> int:
    """How many entries of the bool vector mask are True before the first False."""
    return int(mask.int().cumprod(0).sum())


def greedy_accept(drafted: torch.Tensor, best: torch.Tensor) -> tuple[int, int]:
    """The greedy rule: drafted (k,), the target's argmax best (k + 1,) after each fed
    token.  Returns ``(a, token)``: keep d_1..d_a, the longest prefix on which the
    target agrees, then the target's own best[a] (a correction, or a bonus if a = k)."""
    a = _leading_true(drafted == best[:drafted.shape[0]])
    return a, int(best[a])


def greedy_round(target, draft, seq, t_cache, d_cache, k: int):
    """One greedy round on seq (1, L): ``(seq (1, L + a + 1), a accepted)``."""
    drafted, _ = propose(draft, seq, d_cache, k, lambda z: z.argmax(-1, keepdim=True))
    best = _score(target, seq, drafted, t_cache).argmax(-1)       # (k + 1,)
    a, token = greedy_accept(drafted[0], best)
    return _commit(seq, drafted, a, best[a], t_cache, d_cache), a


def _probs(logits, temperature: float):
    # why fp64: p - q of two close distributions cancels; fp64 keeps the residual exact
    return (logits.double() / temperature).softmax(-1)


def sample_round(target, draft, seq, t_cache, d_cache, k: int, temperature, generator):
    """One sampling round on seq (1, L): ``(seq (1, L + a + 1), a accepted)``."""
    dev = seq.device
    f64 = torch.float64
    rand = lambda *s: torch.rand(s, generator=generator, device=dev, dtype=f64)
    pick = lambda z: sample(_probs(z, temperature), rand(1))[:, None]     # (1, 1)
    drafted, q_logits = propose(draft, seq, d_cache, k, pick)
    p = _probs(_score(target, seq, drafted, t_cache), temperature)        # (k + 1, V)
    u, w = rand(k), rand(k + 1)
    if k:
        ok, fixed = accept_or_resample(p[:k], _probs(q_logits, temperature),
                                       drafted[0], u, w[:k])              # (k,) each
        a = _leading_true(ok)
    else:
        a = 0
    # all k accepted: the bonus token comes from p after d_k
    token = fixed[a] if a < k else sample(p[k], w[k])
    return _commit(seq, drafted, a, token, t_cache, d_cache), a


# ---------------------------------------------------------------- the generation loop


def _check(target: ByteLM, draft: ByteLM, prompt, n, k):
    """Validated prompt (1, T) on the target's device; ValueErrors name the fix."""
    if isinstance(prompt, (str, bytes)):
        prompt = encode(prompt)
    if isinstance(prompt, torch.Tensor) and prompt.ndim == 1:
        prompt = prompt[None]
    check_tokens(target.config, prompt)
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding here takes batch size 1, got "
                         f"{prompt.shape[0]} prompts; run them one at a time")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an int >= 1, got {k!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (tokens to generate) must be an int >= 0, got {n!r}")
    if draft.config.vocab != target.config.vocab:
        raise ValueError(f"draft vocabulary ({draft.config.vocab}) differs from the "
                         f"target's ({target.config.vocab}); use a draft of the family")
    # why n - 1 and no k: the last token is never fed, and the final rounds draft only
    # as many tokens as remain, so no round reaches past position T + n - 1
    max_len = min(target.config.max_len, draft.config.max_len)
    if prompt.shape[1] + max(n - 1, 0) > max_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + n ({n}) - 1 exceeds "
                         f"max_len={max_len}; shorten the prompt or lower n")
    if prompt.min() < 0 or prompt.max() >= target.config.vocab:
        raise ValueError(f"token ids must lie in [0, {target.config.vocab})")
    return prompt.to(target.embed.weight.device, torch.int64)


@torch.no_grad()
def _generate(target, draft, prompt, n, k, round_fn, first_token):
    prompt = _check(target, draft, prompt, n, k)
    T, stats = prompt.shape[1], SpecStats()
    if n == 0:
        return prompt, stats
    logits, t_cache = target.prefill(prompt)                      # (1, T, V)
    _, d_cache = draft.prefill(prompt)
    seq = torch.cat([prompt, first_token(logits[:, -1])], dim=1)  # (1, T + 1)
    stats.target_calls = stats.draft_calls = 1
    while seq.shape[1] - T < n:
        # why min: a round yields up to k + 1 tokens; never draft past the n-th
        k_now = min(k, n - (seq.shape[1] - T) - 1)
        seq, a = round_fn(seq, t_cache, d_cache, k_now)
        stats.target_calls += 1
        stats.draft_calls += k_now
        stats.proposed += k_now
        stats.accepted += a
        stats.rejected += a < k_now
    stats.new_tokens = n
    return seq, stats


def speculative_greedy(target: ByteLM, draft: ByteLM, prompt, n: int, k: int):
    """Greedy speculative decoding: ``(ids (1, T + n), SpecStats)``.

    The ids equal ``effdl.lm.generate(target, prompt, n)`` (the target's own greedy
    output) whatever the draft; a good draft only makes fewer target calls.
    """
    def round_fn(seq, t_cache, d_cache, k_now):
        return greedy_round(target, draft, seq, t_cache, d_cache, k_now)

    first = lambda z: z.argmax(-1, keepdim=True)                  # (1, 1)
    return _generate(target, draft, prompt, n, k, round_fn, first)


def speculative_sample(target: ByteLM, draft: ByteLM, prompt, n: int, k: int,
                       temperature: float = 1.0, generator=None):
    """Speculative sampling: ``(ids (1, T + n), SpecStats)``, distributed as sampling
    the target alone at ``temperature`` (softmax(logits / temperature))."""
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}; "
                         "for temperature 0 use speculative_greedy")

    def round_fn(seq, t_cache, d_cache, k_now):
        return sample_round(target, draft, seq, t_cache, d_cache, k_now, temperature,
                            generator)

    def first(z):                                                 # z (1, V)
        dev = z.device
        w = torch.rand(1, generator=generator, device=dev, dtype=torch.float64)
        return sample(_probs(z, temperature), w)[:, None]         # (1, 1)

    return _generate(target, draft, prompt, n, k, round_fn, first)
