"""The plain decoding loop and what each token costs.

Generation has two phases with different costs.  Prefill runs the whole prompt at once
(compute-bound; its time is the time to first token, TTFT).  Decode runs one token per
step against the KV cache (memory-bound: every weight is read for a single token; its
time per step is the time per output token, TPOT).  Speculative decoding attacks TPOT.
"""

from __future__ import annotations

import torch

from effdl.lm.generation import generate
from effdl.lm.model import ByteLM
from effdl.measure import benchmark

__all__ = ["decode_costs", "generate_greedy"]


def generate_greedy(model: ByteLM, prompt, n: int) -> torch.Tensor:
    """The target's own greedy output, (B, T + n): :func:`effdl.lm.generate` with the
    KV cache (the reference speculative decoding must reproduce)."""
    return generate(model, prompt, n, cached=True)


@torch.no_grad()
def decode_costs(model: ByteLM, prompt_len: int, gen_len: int, *, repeat: int = 5,
                 warmup: int = 1, seed: int = 0) -> dict:
    """TTFT and TPOT in ms for a random prompt of ``prompt_len`` tokens, batch 1.

    TTFT: the median prefill.  TPOT: (median generation of gen_len + 1 tokens - median
    prefill) / gen_len, the mean decode step over positions prompt_len..+gen_len.
    """
    if not isinstance(gen_len, int) or gen_len < 1:
        raise ValueError(f"gen_len must be an int >= 1, got {gen_len!r}")
    c, dev = model.config, model.embed.weight.device
    if not isinstance(prompt_len, int) or not 1 <= prompt_len <= c.max_len - gen_len:
        raise ValueError(f"prompt_len must lie in [1, max_len - gen_len = "
                         f"{c.max_len - gen_len}], got {prompt_len!r}; lower gen_len "
                         "or prompt_len")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, c.vocab, (1, prompt_len), generator=g).to(dev)
    kw = dict(repeat=repeat, warmup=warmup, device=dev)
    pre = benchmark(lambda: model.prefill(prompt), label="prefill", **kw)
    gen = benchmark(lambda: generate(model, prompt, gen_len + 1), label="generate",
                    **kw)
    ttft = pre.median_ms
    return {"ttft_ms": ttft, "tpot_ms": (gen.median_ms - ttft) / gen_len,
            "prefill": pre, "generate": gen}
