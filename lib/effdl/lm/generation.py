"""Greedy generation, two ways: recompute the whole prefix per token, or a KV cache.

Both pick the most likely next byte at every step, so on the same model they must
produce the same bytes; what differs is the work.  The naive loop runs the full forward
on the whole sequence for every new token: O(T) tokens of MLP and projections and
O(T²) of attention per step.  The cached loop runs the prompt once (prefill), then one
token per step (decode), whose keys and values are appended to the cache.
"""

from __future__ import annotations

import torch

from effdl.lm.model import ByteLM, check_tokens

__all__ = ["generate", "generate_naive", "generate_cached", "encode", "decode"]


def encode(text: str | bytes) -> torch.Tensor:
    """Bytes of ``text`` (UTF-8) as token ids, (1, T) int64."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return torch.tensor(list(data), dtype=torch.int64)[None]


def decode(ids) -> str:
    """Token ids (T,) back to text; bytes that are not valid UTF-8 become U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@torch.no_grad()
def generate_naive(model: ByteLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy: the full forward over the whole sequence for each of ``n`` tokens."""
    for _ in range(n):
        logits = model(idx)                                   # (B, T, 256): all again
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)      # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@torch.no_grad()
def generate_cached(model: ByteLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy: prefill the prompt once, then one decode step per new token."""
    logits, cache = model.prefill(idx)                        # (B, T, 256)
    out = [idx]
    for i in range(n):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)      # (B, 1)
        out.append(nxt)
        if i + 1 < n:                   # the last token is returned, never fed
            logits, cache = model.decode_step(nxt, cache)     # (B, 1, 256)
    return torch.cat(out, dim=1)


def generate(model: ByteLM, prompt, n: int, cached: bool = True) -> torch.Tensor:
    """Greedy continuation of ``prompt`` by ``n`` bytes: (B, T + n) ids, prompt first.

    ``prompt``: token ids (T,) or (B, T), or a ``str``/``bytes``.  The sequence fed to
    the model is T + n - 1 long (the last token is only returned), and must fit in
    ``max_len``.
    """
    if isinstance(prompt, (str, bytes)):
        prompt = encode(prompt)
    if isinstance(prompt, torch.Tensor) and prompt.ndim == 1:
        prompt = prompt[None]
    c = model.config
    check_tokens(c, prompt)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (tokens to generate) must be an int >= 0, got {n!r}")
    if prompt.shape[1] + n - 1 > c.max_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + n ({n}) - 1 exceeds "
                         f"max_len={c.max_len}; shorten the prompt, lower n, or use a "
                         "config with a larger max_len")
    if prompt.min() < 0 or prompt.max() >= c.vocab:
        raise ValueError(f"token ids must lie in [0, {c.vocab}); bytes are 0..255")
    prompt = prompt.to(model.embed.weight.device, torch.int64)
    return (generate_cached if cached else generate_naive)(model, prompt, n)
