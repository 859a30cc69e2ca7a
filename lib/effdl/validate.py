"""Input checks shared by every attention implementation (any chapter): bad input fails early with a
message that names the problem and the fix."""

from __future__ import annotations

import math

import torch


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, grouped: bool = False
) -> float:
    """Validate SDPA-shaped ``q (..., Nq, d)``, ``k (..., Nk, d)``, ``v (..., Nk, dv)``; return the scale.

    ``grouped=True`` also accepts grouped-query K/V: ``q (B, H, Nq, d)`` with ``k, v (B, H_kv, Nk, d)``
    where H_kv divides H (query head h reads K/V head h // (H // H_kv); H_kv = 1 is multi-query).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} has dtype {t.dtype}; attention needs floating-point tensors "
                f"(convert with {name}.float() or {name}.half())"
            )
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., seq, dim), got {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one "
            "device with .to(device)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k, v must have the same number of dimensions, got {q.ndim}, {k.ndim}, {v.ndim}")
    if grouped and q.ndim >= 3 and k.shape[:-2] == v.shape[:-2] and q.shape[:-3] == k.shape[:-3]:
        h, h_kv = q.shape[-3], k.shape[-3]
        if h_kv < 1 or h % h_kv:
            raise ValueError(
                f"q has {h} heads but k and v have {h_kv}: grouped-query attention needs the number of "
                f"K/V heads to divide the number of query heads (e.g. {h} query heads with 1, 2, 4 ... "
                "K/V heads)"
            )
    elif q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            "batch/heads dimensions differ: q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (expected (batch, heads, seq, dim) each, "
            "with the same batch and heads)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ; they must match for q @ k^T")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k has {k.shape[-2]} keys but v has {v.shape[-2]} values; they must match")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def check_block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int (rows per tile), got {value!r}")
    return value


def causal_mask(nq: int, nk: int, q0: int = 0, k0: int = 0, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask of a tile: True where query ``q0+i`` may see key ``k0+j``.

    Query ``i`` of ``nq_total`` sees keys ``j <= i + (Nk_total - Nq_total)``; callers pass ``q0`` already
    shifted by that offset.  With as many queries as keys this is the usual lower triangle.
    """
    qi = torch.arange(q0, q0 + nq, device=device)[:, None]
    kj = torch.arange(k0, k0 + nk, device=device)[None, :]
    return kj <= qi
