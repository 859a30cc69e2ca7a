"""flash-attention's accuracy rule: a tolerance derived from a baseline, not guessed.

A fast kernel computes in low precision, so it cannot match an exact reference to the last bit.  How
far off may it be?  flash-attention's tests answer with a baseline: run the *plain* implementation
in the same low precision, measure its error against a high-precision reference, and require the
kernel to be at most ``factor`` times as far off (2× for outputs, 3× for gradients, which sum more
rounded terms), plus a rounding epsilon of the output's size for results that are exact in both::

    err(out, ref) <= factor · err(out_plain, ref) + 2 · eps(dtype) · max(1, |ref|_max)

The one home of this rule: the tests, the Triton interpreter runs and the GPU suite all call
:func:`within_baseline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RuleResult", "max_abs_error", "within_baseline"]


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one comparison: ``passed`` and the numbers that decided it."""

    passed: bool
    err: float        # max |out - ref|
    err_pt: float     # max |out_plain - ref| (the baseline)
    bound: float      # factor · err_pt + eps

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return (f"error {self.err:.3g} vs baseline {self.err_pt:.3g} "
                f"(bound {self.bound:.3g}): {'ok' if self.passed else 'FAILED'}")


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64 (so the check itself adds no rounding)."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def within_baseline(out: torch.Tensor, out_plain: torch.Tensor, ref: torch.Tensor, *,
                    factor: float = 2.0, dtype: torch.dtype | None = None) -> RuleResult:
    """Is ``out`` at most ``factor`` times as far from ``ref`` as ``out_plain`` is (plus rounding)?

    ``ref``: the high-precision reference (fp32 or fp64); ``out_plain``: the plain implementation run
    in the kernel's precision; ``dtype``: that precision (default ``out_plain.dtype``).  Use
    ``factor=2`` for outputs and ``factor=3`` for gradients, as flash-attention's tests do.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1 (2 for outputs, 3 for gradients), got {factor}")
    dt = dtype or out_plain.dtype
    if not dt.is_floating_point:
        raise TypeError(f"the rule compares floating-point results, got dtype {dt}")
    err, err_pt = max_abs_error(out, ref), max_abs_error(out_plain, ref)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    bound = factor * err_pt + 2 * torch.finfo(dt).eps * scale
    return RuleResult(err <= bound, err, err_pt, bound)
