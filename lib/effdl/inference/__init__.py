"""effdl.inference — the chapter "Language-model inference".

- :mod:`effdl.inference.loops`       — greedy generation and its per-token costs
  (time to first token, time per output token)
- :mod:`effdl.inference.paged`       — a paged KV cache allocator (block tables) and
  the contiguous max-length baseline
- :mod:`effdl.inference.serving`     — a static vs continuous batching simulator
- :mod:`effdl.inference.speculative` — speculative decoding, greedy and sampled, on the
  shared models of :mod:`effdl.lm` (a ``target`` and a smaller ``draft``)
- :mod:`effdl.inference.ppd`         — parallel prompt decoding (trained prompt tokens)
- :mod:`effdl.inference.kvpred`      — KV prediction for a shorter time to first token
- :mod:`effdl.inference.experiments` — the chapter's measurements
"""

from effdl.inference.loops import decode_costs, generate_greedy
from effdl.inference.speculative import (
    SpecStats,
    accept_or_resample,
    acceptance_probability,
    expected_tokens_per_call,
    speculative_greedy,
    speculative_sample,
)

__all__ = ["SpecStats", "accept_or_resample", "acceptance_probability", "decode_costs",
           "expected_tokens_per_call", "generate_greedy", "speculative_greedy",
           "speculative_sample"]

# Serving: a paged KV cache allocator and a static-vs-continuous batching simulator.
from effdl.inference.paged import (  # noqa: E402
    BlockAllocator,
    ContiguousAllocator,
    OutOfBlocks,
    PagedSequence,
)
from effdl.inference.serving import Request, make_trace  # noqa: E402

__all__ += ["BlockAllocator", "ContiguousAllocator", "OutOfBlocks", "PagedSequence",
            "Request", "make_trace"]

# Guesses without a draft model, and a predicted KV cache for the first token.
from effdl.inference import kvpred, ppd  # noqa: E402
from effdl.inference.paged import gather_kv  # noqa: E402
from effdl.inference.speculative import greedy_accept  # noqa: E402

__all__ += ["gather_kv", "greedy_accept", "kvpred", "ppd"]
