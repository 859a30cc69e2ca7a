"""Parallel prompt decoding (PPD): learned prompt tokens guess the next bytes.

Speculative decoding (:mod:`effdl.inference.speculative`) guesses with a second model:
its weights and its own KV cache.  PPD keeps one model, frozen, and trains only m
input embeddings, the *prompt tokens* (Hao Mark Chen, Wayne Luk, Ka Fai Cedric Yiu,
Rui Li, Konstantin Mishchenko, Stylianos I. Venieris, Hongxiang Fan, 2024,
"Hardware-Aware Parallel Prompt Decoding for Memory-Efficient Acceleration of LLM
Inference", arXiv:2405.18628).  Appended after the last real token x_p, at RoPE
positions p + 1 .. p + m, prompt token i's output is trained to predict x_(p+1+i):
the token i + 1 places ahead, whereas x_p's own output predicts x_(p+1).  Here the
m · d_model numbers are the whole draft: a few hundred bytes beside a draft model's MBs.

Training (:func:`train_prompt_tokens`), as the paper's distillation trainer: the
target of prompt i after x_c is the frozen model's own next-byte distribution at
position c + i (soft cross-entropy, the KL divergence up to a constant), so the
prompt tokens learn what the model would say, which is what greedy verification
checks.  Unlike the paper, the text is by default the model's own greedy output
(after a piece of corpus): a small model's greedy text is full of repetitions the
corpus rarely shows.  One forward serves many cuts: a window is run once without
gradients (its K/V cached), then a group of m prompt tokens after each of G random
cuts runs against that cache with a mask (each group sees the window up to its cut
and its own group).

Generation (:func:`ppd_greedy`), one model call per step, batch 1.  With ``seq``
(1, L) the tokens so far, the cache holding all but the last, and guesses g_1..g_k
from the previous step, one forward runs

- the real chain seq[-1], g_1..g_k at positions L - 1 .. L - 1 + k (causal), and
- k + 1 groups of m prompt tokens, group j after g_j (after seq[-1] for j = 0),
  seeing the cache, seq[-1], g_1..g_j and its own earlier prompt tokens, at the
  positions that follow g_j.

The chain verifies greedily, as speculative decoding does: keep g_1..g_a while they
equal the model's argmax, then the model's own token at a (correction or bonus).  The
group after g_a hangs exactly where the accepted text ends, so its outputs are the
next step's guesses.  The chain's K/V are written to the cache and cropped to the kept
tokens; prompt tokens' K/V live for one call only.  The output is the model's own
greedy generation; good prompt tokens only make fewer calls.  Kept simpler than the
paper: one candidate chain (the top-1 guesses) rather than its hardware-aware sparse
tree of top-k candidates, and one embedding per prompt token (no ensemble).

Why a step costs about one decode step: (k + 1)(m + 1) tokens (16 for k = m = 3) in
one call read every weight once, as a single token does; where decoding is bound by
memory or by per-call overhead the extra tokens are nearly free.  Their arithmetic is
not: on one CPU thread a 16-token step of the cpu-profile target costs about 1.4x a
1-token one, so PPD gains only where more than ~1.4 tokens per call are accepted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effdl.lm.data import Corpus, load_corpus, random_windows
from effdl.lm.generation import encode, generate_cached
from effdl.lm.model import ByteLM, KVCache, apply_rope, check_tokens

__all__ = ["PPDStats", "PromptTokens", "load_prompt_tokens", "masked_forward",
           "ppd_greedy", "train_prompt_tokens", "tree_layout"]


# ---------------------------------------------------------------- the masked forward


def masked_forward(model: ByteLM, x, pos, mask, cache: KVCache | None = None,
                   write: int = 0):
    """The frozen model on embeddings x (B, T, d_model): logits (B, T, V).

    ``pos`` (T,): each token's RoPE position; ``mask`` (T, P + T) bool: query t sees
    key s where True, keys being the P cached positions first (P = cache.length, 0
    without a cache), then the T new tokens.  The first ``write`` new tokens' K/V are
    stored at [P, P + write) and cache.length becomes P + write; the others (prompt
    tokens) serve this call only.  The model's own modules do the work; only the
    attention pattern and the positions are free, which ``model(idx)`` hides.
    """
    c = model.config
    B, T, _ = x.shape
    H, Hkv, d = c.n_head, c.n_kv_head, c.head_dim
    P = 0 if cache is None else cache.length
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]             # (T, d/2)
    for i, block in enumerate(model.blocks):
        attn, h = block.attn, block.norm1(x)
        q = attn.wq(h).view(B, T, H, d).transpose(1, 2)             # (B, H, T, d)
        kv = attn.wkv(h).view(B, T, 2, Hkv, d).permute(2, 0, 3, 1, 4)
        q, k, v = apply_rope(q, cos, sin), apply_rope(kv[0], cos, sin), kv[1]
        if cache is not None:
            if write:     # (why the if: an empty write would still join autograd)
                cache.k[i][:, :, P:P + write] = k[:, :, :write]
                cache.v[i][:, :, P:P + write] = v[:, :, :write]
            # why cat, not the cache's view: prompt tokens must not land in the cache,
            # and near max_len they would not fit in it
            k = torch.cat([cache.k[i][:, :, :P], k], dim=2)         # (B, Hkv, P+T, d)
            v = torch.cat([cache.v[i][:, :, :P], v], dim=2)
        g = H // Hkv
        if g > 1:                                   # grouped K/V: one per query head
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, d)
        x = x + attn.wo(y.transpose(1, 2).reshape(B, T, H * d))
        x = x + block.mlp(block.norm2(x))
    if cache is not None:
        cache.length = P + write            # once, after every layer has written
    return model.head(model.norm(x))


def tree_layout(n_real: int, cuts, m: int, n_cached: int = 0):
    """Positions and mask of a real chain with prompt-token groups hung on it.

    Tokens: n_real real ones (a causal chain, positions 0 .. n_real - 1), then one
    group of m prompt tokens after each real index in ``cuts`` (group g's token i at
    position cuts[g] + i).  The first ``n_cached`` real tokens are in the cache: they
    are keys only.  Returns ``(pos (T,), mask (T, n_cached + T))`` with
    T = n_real - n_cached + len(cuts) · m; shift pos by the chain's first position.
    """
    cuts = torch.as_tensor(cuts, dtype=torch.int64).reshape(-1)
    G = cuts.numel()
    anchor = torch.cat([torch.arange(n_real), cuts.repeat_interleave(m)])
    depth = torch.cat([torch.zeros(n_real, dtype=torch.int64),
                       torch.arange(1, m + 1).repeat(G)])           # 0: real token
    group = torch.cat([torch.full((n_real,), -1), torch.arange(G).repeat_interleave(m)])
    real = group < 0
    # key s visible to query t: a real token at or before t's anchor (the causal
    # chain), or an earlier-or-same prompt token of t's own group
    sees = (real[None] & (anchor[None] <= anchor[:, None])) | (
        ~real[None] & (group[None] == group[:, None]) & (depth[None] <= depth[:, None]))
    return (anchor + depth)[n_cached:], sees[n_cached:]


# ---------------------------------------------------------------- the prompt tokens


class PromptTokens(nn.Module):
    """m learned input embeddings, (m, d_model): the only trained parameters of PPD."""

    def __init__(self, m: int, d_model: int):
        super().__init__()
        _check_m(m)
        self.weight = nn.Parameter(torch.zeros(m, d_model))

    @classmethod
    def for_model(cls, model: ByteLM, m: int, seed: int = 0) -> PromptTokens:
        """Initialized as the mean token embedding plus noise of the embeddings' own
        spread (why: a plausible input for the frozen model, and m distinct tokens)."""
        E = model.embed.weight.detach()                             # (V, d)
        new = cls(m, E.shape[1]).to(E.device, E.dtype)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(m, E.shape[1], generator=g, dtype=E.dtype).to(E.device)
        with torch.no_grad():
            new.weight.copy_(E.mean(0) + noise * E.std(0))
        return new

    @property
    def m(self) -> int:
        return self.weight.shape[0]

    def nbytes(self) -> int:
        """Extra parameter bytes PPD adds (a draft model adds all of its weights)."""
        return self.weight.numel() * self.weight.element_size()


def _check_m(m):
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m (prompt tokens) must be an int >= 1, got {m!r}; each "
                         "prompt token guesses one more byte ahead")


# ---------------------------------------------------------------- training


def _prompt_loss(model, pt: PromptTokens, x, y, cuts, target: str):
    """Mean soft cross-entropy of the prompt tokens after ``cuts`` of windows x (B, L).

    Returns ``(loss, agree (m,))``: agree[i] is how often prompt i's argmax equals the
    model's own (teacher) argmax, a proxy for greedy acceptance.
    """
    B, L = x.shape
    m, G = pt.m, len(cuts)
    with torch.no_grad():
        teacher, cache = model.prefill(x)                           # (B, L, V)
    pos, mask = tree_layout(L, cuts, m, n_cached=L)     # (G·m,), (G·m, L + G·m)
    emb = pt.weight.repeat(G, 1).expand(B, G * m, -1)               # (B, G·m, d)
    logits = masked_forward(model, emb, pos.to(x.device), mask.to(x.device), cache)
    # prompt i after x_c predicts x_(c+1+i): what the model itself says at c + i
    at = (torch.as_tensor(cuts)[:, None] + torch.arange(1, m + 1)).reshape(-1)
    at = at.to(x.device)                                            # (G·m,)
    logp = logits.float().log_softmax(-1)                           # (B, G·m, V)
    if target == "model":
        p = teacher[:, at].float().softmax(-1)
        loss = -(p * logp).sum(-1).mean()
    else:                                                           # the corpus bytes
        loss = F.nll_loss(logp.flatten(0, 1), y[:, at].flatten())
    agree = (logits.argmax(-1) == teacher[:, at].argmax(-1)).double()
    return loss, agree.view(B, G, m).mean((0, 1))


def _texts(model, text: str, data, rows: int, seq_len: int, gen):
    """The texts windows come from: ``data`` itself, or ``rows`` greedy texts of
    seq_len + 1 bytes, (rows, seq_len + 1), a quarter of corpus then the model's."""
    if text == "corpus":
        return data
    start = max(1, seq_len // 4)
    x, _ = random_windows(data, rows, start, gen)
    # why one batched generation: a decode step of 64 rows costs about one of 1 row
    return generate_cached(model, x.to(model.embed.weight.device), seq_len + 1 - start)


def _windows(model, text: str, batch: int, seq_len: int, texts, gen):
    """``batch`` windows of ``texts``: inputs and next bytes, (batch, seq_len) each."""
    if text == "corpus":
        x, y = random_windows(texts, batch, seq_len, gen)
    else:
        w = texts[torch.randint(0, texts.shape[0], (batch,), generator=gen)]
        x, y = w[:, :-1], w[:, 1:]
    dev = model.embed.weight.device
    return x.to(dev), y.to(dev)


def train_prompt_tokens(model: ByteLM, m: int = 3, steps: int = 150, batch: int = 4,
                        seq_len: int = 256, lr: float = 0.02, corpus: Corpus = None,
                        seed: int = 0, cuts: int | None = None, target: str = "model",
                        text: str = "greedy", pool: int = 256):
    """Train m prompt tokens on ``model`` (frozen): ``(PromptTokens, log)``.

    Each step: ``batch`` windows of ``seq_len`` bytes, and ``cuts`` random cut
    positions (default seq_len // 4) shared by the batch, a group of m prompt tokens
    after each (see the module docstring).  ``text``: ``"corpus"``, random windows of
    ``corpus.train``; or ``"greedy"`` (default), windows drawn from ``pool`` texts made
    once of a quarter window of corpus and the model's greedy continuation.  Why
    greedy text: it is what the guesses are checked against, and a small model's
    greedy text (repetitions: ``"____"``, runs of blanks) is unlike the corpus, where
    prompt tokens learn mostly "a blank comes next".  ``target``: ``"model"`` (distill
    the model's own distributions, default) or ``"data"`` (the next bytes).  Adam,
    cosine decay from ``lr`` to lr / 10.  ``log``: ``loss`` (per step), ``seconds``
    (``pool_seconds`` of them making the texts), and ``agree`` / ``held_out_agree``:
    per prompt index, how often its argmax is the model's, on the last batch and on
    held-out windows (of the same ``text`` kind).
    """
    _check_m(m)
    if corpus is None:
        from effdl.lm.profiles import sizes
        corpus = load_corpus(sizes().corpus_bytes)
    if target not in ("model", "data"):
        raise ValueError(f"target must be 'model' or 'data', got {target!r}")
    if text not in ("greedy", "corpus"):
        raise ValueError(f"text must be 'greedy' or 'corpus', got {text!r}")
    if not m + 1 < seq_len <= model.config.max_len:
        raise ValueError(f"seq_len must lie in ({m + 1}, {model.config.max_len}] (more "
                         f"than m + 1 bytes, within max_len), got {seq_len}")
    G = cuts if cuts is not None else max(1, seq_len // 4)
    if not 1 <= G <= seq_len - m:
        raise ValueError(f"cuts must lie in [1, {seq_len - m}], got {G}")
    pt = PromptTokens.for_model(model, m, seed)
    opt = torch.optim.Adam(pt.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)        # frozen: no gradient into the base model
    losses, t0 = [], time.perf_counter()
    draw = functools.partial(_windows, model, text, batch, seq_len)
    try:
        texts = _texts(model, text, corpus.train, pool, seq_len, gen)
        pool_seconds = time.perf_counter() - t0
        for step in range(steps):
            for group in opt.param_groups:
                cosine = 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
                group["lr"] = lr * (0.1 + 0.9 * cosine)
            x, y = draw(texts, gen)
            # cut c in [0, seq_len - m - 1]: the teacher at c + m is inside the window
            cut = torch.randperm(seq_len - m, generator=gen)[:G].sort().values
            loss, agree = _prompt_loss(model, pt, x, y, cut.tolist(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t0
        # why a generator of its own: the same held-out batch whatever ``steps``, so
        # logs of short and long runs compare
        held_gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            held_texts = _texts(model, text, corpus.held_out, batch, seq_len, held_gen)
            x, y = draw(held_texts, held_gen)
            cut = torch.randperm(seq_len - m, generator=held_gen)[:G].sort().values
            held_loss, held = _prompt_loss(model, pt, x, y, cut.tolist(), target)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    pt.requires_grad_(False)
    log = {"loss": losses, "seconds": seconds, "pool_seconds": pool_seconds,
           "steps": steps, "text": text,
           "agree": agree.tolist() if steps else [], "held_out_loss": held_loss.item(),
           "held_out_agree": held.tolist()}
    return pt, log


def _digest(model: ByteLM) -> str:
    """sha256 of the model's config and weights (what the prompt tokens fit)."""
    h = hashlib.sha256(json.dumps(model.config.as_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_prompt_tokens(model: ByteLM, m: int = 3, steps: int = 150, batch: int = 4,
                       seq_len: int = 256, lr: float = 0.02, seed: int = 0,
                       text: str = "greedy", pool: int = 256, corpus: Corpus = None,
                       cache_dir: str | os.PathLike = None,
                       verbose: bool = True) -> PromptTokens:
    """Prompt tokens for ``model``: trained on first use, then read from disk.

    The file sits beside the cached models (:func:`effdl.lm.store.cache_dir`), keyed
    by a hash of the model's weights, the training arguments, the corpus and this
    module's source, as :func:`effdl.lm.load` keys its models.  ``.train_log`` holds
    the training log.
    """
    from effdl.lm.store import cache_dir as lm_cache_dir

    _check_m(m)
    if corpus is None:
        from effdl.lm.profiles import sizes
        corpus = load_corpus(sizes().corpus_bytes)
    args = {"m": m, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
            "seed": seed, "text": text, "pool": pool}
    what = {"format": 1, "model": _digest(model), "train": args,
            "corpus": corpus.digest,
            "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    path = lm_cache_dir(cache_dir) / f"ppd-m{m}-{key[:16]}.pt"
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        if doc.get("key") == key:
            pt = PromptTokens(m, model.config.d_model)
            pt.load_state_dict(doc["state_dict"])
            pt = pt.to(dev, dtype).requires_grad_(False)
            pt.train_log = doc["log"]
            return pt
    except Exception:       # missing, unreadable or stale: all mean "train"
        pass
    if verbose:
        print(f"training {m} prompt tokens; they will be cached in {path}")
    pt, log = train_prompt_tokens(model, corpus=corpus, **args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu() for k, v in pt.state_dict().items()}
    torch.save({"key": key, "state_dict": state, "log": log}, tmp)
    os.replace(tmp, path)                   # readers see the old file or the new one
    pt.train_log = log
    return pt


# ---------------------------------------------------------------- generation


@dataclass
class PPDStats:
    """What a PPD generation cost: model calls (prefill included) and guesses."""

    forwards: int = 0
    proposed: int = 0              # guessed tokens the model checked
    accepted: int = 0              # of which it kept
    rejected: int = 0              # steps that ended at a disagreement
    new_tokens: int = 0
    extra_param_bytes: int = 0     # the prompt tokens (a draft model: all its weights)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def alpha(self) -> float:
        """Per-guess acceptance rate: kept / (kept + rejected)."""
        seen = self.accepted + self.rejected
        return self.accepted / seen if seen else float("nan")

    @property
    def calls_per_token(self) -> float:
        """1.0 for plain decoding; 1 / (k + 1) at best."""
        return self.forwards / self.new_tokens if self.new_tokens else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else float("nan")


@functools.lru_cache(maxsize=64)
def _step_layout(k: int, m: int):
    """tree_layout of one step: chain of k + 1 tokens, a group after each."""
    return tree_layout(k + 1, tuple(range(k + 1)) if m else (), m)


def _leading_true(mask) -> int:
    return int(mask.int().cumprod(0).sum())


def _check(model: ByteLM, pt, prompt, n, k):
    """Validated prompt (1, T) and k; ValueErrors name the fix."""
    if not isinstance(pt, PromptTokens):
        raise ValueError("prompt_tokens must be a PromptTokens; train them with "
                         "train_prompt_tokens(model, m) or load_prompt_tokens(model)")
    if pt.weight.shape[1] != model.config.d_model:
        raise ValueError(f"prompt tokens have width {pt.weight.shape[1]}, the model "
                         f"d_model={model.config.d_model}; train them on this model")
    k = pt.m if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= pt.m:
        raise ValueError(f"k (guesses checked per step) must be an int in [1, m={pt.m}]"
                         f", got {k!r}; m prompt tokens make at most m guesses")
    if isinstance(prompt, (str, bytes)):
        prompt = encode(prompt)
    if isinstance(prompt, torch.Tensor) and prompt.ndim == 1:
        prompt = prompt[None]
    check_tokens(model.config, prompt)
    if prompt.shape[0] != 1:
        raise ValueError(f"PPD here takes batch size 1, got {prompt.shape[0]} "
                         "prompts; run them one at a time")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (tokens to generate) must be an int >= 0, got {n!r}")
    if prompt.shape[1] + max(n - 1, 0) > model.config.max_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + n ({n}) - 1 exceeds "
                         f"max_len={model.config.max_len}; shorten the prompt or "
                         "lower n")
    if prompt.min() < 0 or prompt.max() >= model.config.vocab:
        raise ValueError(f"token ids must lie in [0, {model.config.vocab})")
    return prompt.to(model.embed.weight.device, torch.int64), k


def _call(model, pt, cache, chain, cuts_pos, m):
    """One forward: the real ``chain`` (1, R) after the cache, a group of m prompt
    tokens after each chain index in ``cuts_pos``.  Returns the chain's logits
    (R, V) and the groups' (len(cuts_pos), m, V); the chain's K/V stay cached."""
    R, P = chain.shape[1], cache.length
    if R == len(cuts_pos) or not cuts_pos:                # a step (or a plain one)
        pos, mask = _step_layout(R - 1, m)
    else:                                                 # the prefill: one group
        pos, mask = tree_layout(R, cuts_pos, m)
    dev = chain.device
    x = torch.cat([model.embed(chain), pt.weight[:m].repeat(len(cuts_pos), 1)[None]], 1)
    # why all True before the chain: every new token sees the whole cached prefix
    mask = torch.cat([torch.ones(mask.shape[0], P, dtype=torch.bool), mask], 1)
    logits = masked_forward(model, x, (P + pos).to(dev), mask.to(dev), cache, write=R)
    V = logits.shape[-1]
    return logits[0, :R], logits[0, R:].view(len(cuts_pos), m, V)


@torch.no_grad()
def ppd_greedy(model: ByteLM, prompt_tokens: PromptTokens, prompt, n: int,
               k: int | None = None):
    """Greedy parallel prompt decoding: ``(ids (1, T + n), PPDStats)``.

    ``k`` (default m): guesses checked per step, 1 <= k <= m.  The ids equal
    ``effdl.lm.generate(model, prompt, n)`` (the model's own greedy output) whatever
    the prompt tokens; good ones only make fewer model calls.
    """
    pt = prompt_tokens
    prompt, k = _check(model, pt, prompt, n, k)
    T = prompt.shape[1]
    stats = PPDStats(extra_param_bytes=pt.nbytes())
    if n == 0:
        return prompt, stats
    last = T + n - 2        # the last position ever fed as a real token
    cache = model.new_cache(1)
    # prefill: the prompt, one group after its last token (guesses for T + 1 ..)
    m0 = min(pt.m, last - (T - 1))    # why: no guess past the n-th token or max_len
    best, groups = _call(model, pt, cache, prompt, [T - 1] if m0 else [], m0)
    seq = torch.cat([prompt, best[-1:].argmax(-1)[None]], dim=1)  # (1, T + 1)
    guesses = groups[0].argmax(-1) if m0 else seq[0, :0]          # (m0,)
    stats.forwards = 1
    while seq.shape[1] - T < n:
        L = seq.shape[1]
        # why min: a step yields up to k + 1 tokens; never guess past the n-th
        k_now = min(k, guesses.numel(), T + n - L - 1)
        m_now = min(pt.m, last - (L - 1 + k_now))     # prompt positions <= last
        chain = torch.cat([seq[0, -1:], guesses[:k_now]])[None]   # (1, k_now + 1)
        cuts = list(range(k_now + 1)) if m_now else []
        logits, groups = _call(model, pt, cache, chain, cuts, m_now)
        best = logits.argmax(-1)                                  # (k_now + 1,)
        a = _leading_true(guesses[:k_now] == best[:k_now])
        seq = torch.cat([seq, guesses[None, :a], best[a].view(1, 1)], dim=1)
        cache.crop(L + a)   # seq[-1] of before and the a kept guesses; not the bonus
        # the group after the last kept token guesses the tokens after the bonus
        guesses = groups[a].argmax(-1) if m_now else seq[0, :0]
        stats.forwards += 1
        stats.proposed += k_now
        stats.accepted += a
        stats.rejected += a < k_now
    stats.new_tokens = n
    return seq, stats
