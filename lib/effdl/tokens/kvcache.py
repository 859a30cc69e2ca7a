"""KV-cache compression in the style of CacheGen: quantize, delta-encode, entropy-code, measure bytes.

A decoder's KV cache is ``(layers, heads, tokens, head_dim)`` keys and values per layer.  Shipping or
storing it in fp16 costs 2 bytes per element.  :func:`compress` turns it into a byte string:

1. **per-token quantization**: each token's vector (all heads of one layer) gets a step
   ``absmax / (2**(bits-1) - 1)``, with ``bits`` chosen per layer (CacheGen gives early layers
   more, on its premise that errors there hurt most); the reconstruction error of every
   element is at most half a step;
2. **delta against anchors**: tokens form groups of ``group``; the first is an anchor, the others
   are coded as the difference to the *reconstructed* anchor on their own step (CacheGen's
   premise is that neighbouring tokens' KV are similar, so the integers are small);
3. **entropy coding**: the integers are range-coded (``constriction``) under a quantized Laplace
   model whose scale is fitted per (layer, K/V, anchor/delta, channel) and stored in the header.

Both premises are CacheGen's, observed on large trained models; the chapter tests them on
the cache of the course's trained byte-level model
(:mod:`effdl.lm`, see :mod:`effdl.tokens.experiments`); :class:`CausalLM` is an untrained
stand-in of the same shape for fast tests.

The blob carries a header (magic, version, shape, bits, group) and a CRC32 of everything, so a
corrupt or truncated blob raises :class:`ValueError` instead of decoding garbage.
:func:`decompress` inverts it exactly (up to the quantization error).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["compress", "decompress", "layer_bits", "quantize_tokens", "delta_quantize", "attention_output",
           "relative_error", "CausalLM", "corpus_tokens", "fp16_bytes"]

MAGIC = b"EDKV"
VERSION = 1
_HEAD = struct.Struct("<4sBBIIIIHI")  # magic, version, flags, L, H, T, d, group, crc32


# ----------------------------------------------------------------------------------------------
# a small causal transformer whose cache we compress


def corpus_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` byte tokens of English text: docstrings of Python's standard library, offline."""
    import collections  # noqa: E401
    import functools
    import inspect
    import itertools
    import json
    import string
    import textwrap

    text = " ".join(inspect.getdoc(m) or "" for m in (json, textwrap, functools, collections, itertools, string,
                                                      inspect, math, struct, zlib))
    data = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8)
    start = int(np.random.default_rng(seed).integers(0, max(1, len(data) - n)))
    out = np.resize(data[start:], n)  # wraps around if n is longer than the text
    return torch.from_numpy(out.astype(np.int64))


class CausalLM(nn.Module):
    """A tiny GPT-style byte model; :meth:`kv_cache` returns its keys, values and queries."""

    def __init__(self, dim=128, depth=4, heads=4, vocab=256, max_len=4096, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads, self.hd = heads, dim // heads
        self.emb = nn.Embedding(vocab, dim)
        pos = torch.arange(max_len)[:, None] / (10000 ** (torch.arange(0, dim, 2) / dim))
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], 1), persistent=False)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
            n2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim))) for _ in range(depth))
        self.norm, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, tokens, return_kv=False):
        """tokens (T,) or (B, T) -> logits (B, T, vocab) [, list of (q, k, v) per layer, each (B, h, T, hd)]."""
        x = tokens if tokens.ndim == 2 else tokens[None]
        B, T = x.shape
        h = self.emb(x) + self.pos[:T]
        cache = []
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](h)).view(B, T, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
            cache.append((q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["proj"](a.transpose(1, 2).reshape(B, T, -1))
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["n2"](h))))
        logits = self.out(self.norm(h))
        return (logits, cache) if return_kv else logits

    @torch.no_grad()
    def kv_cache(self, tokens):
        """``(q, k, v)`` each ``(layers, heads, T, head_dim)`` for a 1-D token sequence."""
        _, cache = self(tokens, return_kv=True)
        q, k, v = (torch.stack([c[i][0] for c in cache]) for i in range(3))
        return q, k, v


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention per layer: q ``(L, H, T, d)``, k, v ``(L, H_kv, T, d)`` -> ``(L, H, T, d)``.

    With fewer K/V heads than query heads (grouped-query attention), each K/V head
    serves ``H / H_kv`` consecutive query heads.
    """
    g = q.shape[-3] // k.shape[-3]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖a‖`` (Frobenius), as a float."""
    return float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))


def fp16_bytes(k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes of the cache stored plainly in fp16."""
    return 2 * (k.numel() + v.numel())


# ----------------------------------------------------------------------------------------------
# quantization


def layer_bits(n_layers: int, early: int = 6, late: int = 5, early_frac: float = 0.25) -> list[int]:
    """Bits per layer: ``early`` for the first ``early_frac`` of the layers, ``late`` after."""
    n_early = max(1, round(early_frac * n_layers)) if n_layers > 1 else 1
    return [early if i < n_early else late for i in range(n_layers)]


def quantize_tokens(x: torch.Tensor, bits: int):
    """Per-token symmetric quantization of ``x`` ``(T, C)``: returns
    ``(q int, step (T,))``.

    ``step = absmax / (2**(bits-1) - 1)`` is rounded to fp16 (that is what the blob
    stores) so the decoder reconstructs ``q * step`` exactly as the encoder did;
    ``|x - q*step| <= step/2``.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    step = (x.abs().amax(-1) / qmax).clamp_min(1e-8)
    # why: the stored value; fp16 has no smaller subnormal
    step = step.half().float().clamp_min(2 ** -24)
    q = torch.round(x / step[:, None])
    return q.long(), step


def delta_quantize(x: torch.Tensor, bits: int, group: int):
    """Quantize ``x`` ``(T, C)`` with anchors every ``group`` tokens; deltas vs
    reconstructed anchors.

    Returns ``(q (T, C) int, step (T,), x_hat (T, C))``.  Row ``t`` with
    ``t % group == 0`` is an anchor coded as is; every other row codes
    ``x[t] - x_hat[anchor]`` on its own per-token step.
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    T = x.shape[0]
    _, step = quantize_tokens(x, bits)  # each token's own step, from its own range
    anchors = torch.arange(T) - torch.arange(T) % group
    is_anchor = torch.arange(T) % group == 0
    q = torch.empty(x.shape, dtype=torch.long)
    q[is_anchor] = torch.round(x[is_anchor] / step[is_anchor, None]).long()
    anchor_hat = q[is_anchor].float() * step[is_anchor, None]  # (n_groups, C)
    ref = torch.zeros_like(x)
    ref[~is_anchor] = anchor_hat[anchors[~is_anchor] // group]
    q[~is_anchor] = torch.round(
        (x[~is_anchor] - ref[~is_anchor]) / step[~is_anchor, None]
    ).long()
    x_hat = ref + q.float() * step[:, None]
    return q, step, x_hat


def _reconstruct(q: torch.Tensor, step: torch.Tensor, group: int) -> torch.Tensor:
    T = q.shape[0]
    is_anchor = torch.arange(T) % group == 0
    anchors = torch.arange(T) - torch.arange(T) % group
    anchor_hat = q[is_anchor].float() * step[is_anchor, None]
    ref = torch.zeros(q.shape, dtype=torch.float32)
    ref[~is_anchor] = anchor_hat[anchors[~is_anchor] // group]
    return ref + q.float() * step[:, None]


# ----------------------------------------------------------------------------------------------
# the codec


def _laplace_scales(q: np.ndarray) -> np.ndarray:
    """Maximum-likelihood Laplace scale per column (mean |q|), floored, as stored (fp16)."""
    b = np.abs(q).mean(0).astype(np.float32) + 0.05
    return b.astype(np.float16)


def compress(k: torch.Tensor, v: torch.Tensor, *, bits=None, group: int = 8) -> bytes:
    """Compress a KV cache ``k, v`` of shape ``(layers, heads, tokens, head_dim)`` into
    bytes.

    bits: an int for every layer, a list (one per layer), or ``None`` for
    :func:`layer_bits`.
    group: anchor interval (1 = no delta coding).
    """
    import constriction

    if (
        not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor))
        or k.ndim != 4
        or k.shape != v.shape
    ):
        raise ValueError(
            "k and v must be tensors of the same shape "
            "(layers, heads, tokens, head_dim); got "
            f"{tuple(getattr(k, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}"
        )
    L, H, T, d = k.shape
    if T < 1:
        raise ValueError("the cache has no tokens")
    if not torch.isfinite(k).all() or not torch.isfinite(v).all():
        raise ValueError("the cache contains inf or NaN; compress finite values only")
    if bits is None:
        bits = layer_bits(L)
    bits = (
        [int(bits)] * L
        if isinstance(bits, (int, np.integer))
        else [int(b) for b in bits]
    )
    if len(bits) != L or not all(2 <= b <= 16 for b in bits):
        raise ValueError(
            f"bits must be one int or {L} ints in [2, 16] (one per layer), "
            f"got {bits}"
        )
    if not 1 <= group <= 65535:
        raise ValueError(f"group must be in [1, 65535], got {group}")
    C = H * d
    is_anchor = (np.arange(T) % group) == 0
    steps, scales, symbols, lo_hi = [], [], [], []
    for layer in range(L):
        for t in (k, v):
            # (T, C): one row per token, all heads
            x = t[layer].float().permute(1, 0, 2).reshape(T, C)
            q, step, _ = delta_quantize(x, bits[layer], group)
            qn = q.numpy().astype(np.int32)
            steps.append(step.half().numpy())
            for rows in (is_anchor, ~is_anchor):
                part = qn[rows]
                sc = _laplace_scales(part) if part.size else np.zeros(C, np.float16)
                scales.append(sc)
                symbols.append((part, sc))
                if part.size:
                    lo_hi.append((int(part.min()), int(part.max())))
    lo = min(a for a, _ in lo_hi)
    hi = max(b for _, b in lo_hi)
    family = constriction.stream.model.QuantizedLaplace(lo, hi)
    enc = constriction.stream.queue.RangeEncoder()
    for part, sc in symbols:
        if part.size:
            s = np.broadcast_to(sc.astype(np.float64), part.shape).reshape(-1)
            enc.encode(part.reshape(-1), family, np.zeros_like(s), s)
    stream = enc.get_compressed().tobytes()
    body = b"".join([
        struct.pack("<ii", lo, hi), bytes(bits),
        np.concatenate(steps).astype("<f2").tobytes(),
        np.concatenate(scales).astype("<f2").tobytes(),
        struct.pack("<I", len(stream)), stream,
    ])
    head_wo_crc = _HEAD.pack(MAGIC, VERSION, 0, L, H, T, d, group, 0)
    crc = zlib.crc32(head_wo_crc[:-4] + body)
    return _HEAD.pack(MAGIC, VERSION, 0, L, H, T, d, group, crc) + body


def decompress(blob: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`compress`: ``(k, v)`` float32 ``(layers, heads, tokens, head_dim)``.

    Raises ValueError when the blob is not ours, of another version, truncated or corrupt.
    """
    import constriction

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"decompress expects bytes from compress(), got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _HEAD.size:
        raise ValueError(f"KV blob too short ({len(blob)} bytes): truncated or not made by compress()")
    magic, version, _flags, L, H, T, d, group, crc = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError(f"not a KV blob (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"KV blob version {version}, this library reads version {VERSION}")
    body = blob[_HEAD.size:]
    if zlib.crc32(blob[:_HEAD.size - 4] + body) != crc:
        raise ValueError("KV blob checksum mismatch: the data is corrupt or truncated")
    C = H * d
    try:
        off = 0
        lo, hi = struct.unpack_from("<ii", body, off)
        off += 8
        off += L  # the per-layer bit widths: the quantizer steps below already encode them
        n_steps = 2 * L * T
        steps = np.frombuffer(body, "<f2", n_steps, off).astype(np.float32).reshape(2 * L, T)
        off += 2 * n_steps
        n_sc = 2 * L * 2 * C
        scales = np.frombuffer(body, "<f2", n_sc, off).astype(np.float64).reshape(2 * L, 2, C)
        off += 2 * n_sc
        (n_stream,) = struct.unpack_from("<I", body, off)
        off += 4
        stream = np.frombuffer(body, np.uint32, n_stream // 4, off)
    except (struct.error, ValueError) as exc:
        raise ValueError(f"KV blob is malformed: {exc}") from None
    family = constriction.stream.model.QuantizedLaplace(lo, hi)
    dec = constriction.stream.queue.RangeDecoder(stream)
    is_anchor = (np.arange(T) % group) == 0
    out = torch.empty(2, L, H, T, d)
    for i in range(2 * L):
        q = np.empty((T, C), np.int64)
        for j, rows in enumerate((is_anchor, ~is_anchor)):
            n = int(rows.sum())
            if n:
                s = np.broadcast_to(scales[i, j], (n, C)).reshape(-1)
                q[rows] = np.asarray(dec.decode(family, np.zeros_like(s), s)).reshape(n, C)
        x = _reconstruct(torch.from_numpy(q), torch.from_numpy(steps[i]), group)  # (T, C)
        out[i % 2, i // 2] = x.reshape(T, H, d).permute(1, 0, 2)
    return out[0], out[1]
