"""Softmax three ways, and the online-softmax state that makes tiling possible.

- :func:`naive_softmax`: exp(x) / Σ exp(x) — overflows for large inputs (exp(89) is inf in fp32).
- :func:`safe_softmax`: subtract the row max first — three passes over the row (max, sum, normalize).
- :func:`online_softmax`: max and sum in ONE pass with a running max m and a rescaled running sum ℓ
  (Milakov & Gimelshein), then normalize.

The state of a row after seeing some keys is ``(m, ℓ, acc)``: the running max, the running sum of
exp(s − m), and the running Σ exp(s − m)·v.  :func:`merge_states` combines two states; it is
associative (and commutative), which is what lets FlashAttention process K/V in tiles and
Flash-Decoding process them in parallel splits.

Every PyTorch attention path of the library shares four small pieces: :func:`safe_shift`
and :func:`safe_rescale` (the guard for rows whose max is still -inf), :func:`finalize`
(acc/ℓ) and :func:`state_lse` (m + log ℓ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / Σ exp(x): the textbook formula, which overflows once x > ~88 in fp32."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def safe_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Subtract the row max (pass 1), sum the exponentials (pass 2), divide (pass 3)."""
    m = x.amax(dim=dim, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim=dim, keepdim=True)


def online_softmax(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Softmax over the last dim with the max and the sum found in one pass over blocks
    of ``block``.

    Each block updates the running max m and rescales the running sum:
    ℓ ← ℓ·e^{m_old − m} + Σ e^{x − m}.  A second pass writes exp(x − m) / ℓ.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[-1], block):         # pass 1: max and sum together
        xb = x[..., start:start + block]
        m_new = torch.maximum(m, xb.amax(dim=-1))
        l = l * torch.exp(m - m_new) + torch.exp(xb - m_new[..., None]).sum(dim=-1)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]  # pass 2: normalize


# The -inf guard and the finalisation, each in one place: the state functions below,
# the tiled passes (tiled.py) and split-KV decoding (decode.py) call them.  The Triton
# kernels (triton_kernels.py) cannot call Python: they repeat both inside the kernels.


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics and output accumulators use: fp32 for fp16/bf16 inputs (as a
    GPU kernel keeps them in fp32 registers), else the inputs' own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """The max to subtract before ``exp``: ``m`` (...,) with -inf replaced by 0.

    A row's max is -inf while every score it has seen is -inf (masked), or it saw none.
    """
    # why: exp(s - m) with s = m = -inf is exp(NaN) = NaN; a shift of 0 gives
    # exp(-inf) = 0, so the row keeps ℓ = 0 and acc = 0 (the empty state), not NaN
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def safe_rescale(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """exp(m_old − m_new) (...,): moves sums taken against max m_old to max m_new.

    0, not NaN, where m_new = -inf (then m_old is -inf too: nothing to rescale).
    """
    return torch.exp(m_old - safe_shift(m_new))


def finalize(acc: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """acc / ℓ: ``acc`` (..., dv), ``l`` (...,) -> (..., dv); 0 where ℓ = 0."""
    # why: a row with ℓ = 0 saw no key and has acc = 0: dividing it by 1 gives 0,
    # where 0 / 0 would give NaN
    return acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]


def state_lse(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The logsumexp m + log ℓ: ``m``, ``l`` (...,) -> (...,); -inf where ℓ = 0."""
    return torch.where(l == 0, torch.full_like(m, float("-inf")), m + torch.log(l))


@dataclass
class SoftmaxState:
    """Online-softmax state of a set of rows: running max m (...,), sum ℓ (...,), accumulator acc (..., dv)."""

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(output acc/ℓ, logsumexp m + log ℓ); rows that saw no key give 0 and -inf."""
        return finalize(self.acc, self.l), state_lse(self.m, self.l)


def init_state(shape, dv: int, dtype=torch.float32, device=None) -> SoftmaxState:
    """The empty state (m = -inf, ℓ = 0, acc = 0) for rows of ``shape``."""
    shape = tuple(shape)
    return SoftmaxState(
        m=torch.full(shape, float("-inf"), dtype=dtype, device=device),
        l=torch.zeros(shape, dtype=dtype, device=device),
        acc=torch.zeros((*shape, dv), dtype=dtype, device=device),
    )


def update_state(state: SoftmaxState, s: torch.Tensor, v: torch.Tensor) -> SoftmaxState:
    """Fold one tile of scores ``s`` (..., r, c) and values ``v`` (..., c, dv) into
    ``state`` (rows r)."""
    m_new = torch.maximum(state.m, s.amax(dim=-1))
    shift = safe_shift(m_new)
    alpha = torch.exp(state.m - shift)     # safe_rescale(state.m, m_new)
    p = torch.exp(s - shift[..., None])    # (..., r, c), masked scores give 0
    l = state.l * alpha + p.sum(dim=-1)
    acc = state.acc * alpha[..., None] + p.to(v.dtype) @ v
    return SoftmaxState(m_new, l, acc.to(state.acc.dtype))


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Combine two states of the same rows seen over disjoint key sets; associative and
    commutative.

    m = max(m₁, m₂);  ℓ = ℓ₁e^{m₁−m} + ℓ₂e^{m₂−m};  acc = acc₁e^{m₁−m} + acc₂e^{m₂−m}.
    """
    m = torch.maximum(a.m, b.m)
    wa, wb = safe_rescale(a.m, m), safe_rescale(b.m, m)
    l = a.l * wa + b.l * wb
    acc = a.acc * wa[..., None] + b.acc * wb[..., None]
    return SoftmaxState(m, l, acc)


def merge_lse(
    outs: torch.Tensor, lses: torch.Tensor, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge normalized partial outputs ``outs`` (..., dv) with their logsumexps
    ``lses`` along ``dim``.

    The same merge in the (output, lse) form used by split-KV decoding: weights are
    e^{lse_i − lse}.  Splits that saw no key (lse = -inf) get weight 0.
    """
    lse = torch.logsumexp(lses, dim=dim, keepdim=True)
    w = safe_rescale(lses, lse)                 # e^{lse_i − lse}; 0 where lse_i = -inf
    out = (outs * w.unsqueeze(-1)).sum(dim=dim)
    return out, lse.squeeze(dim)
