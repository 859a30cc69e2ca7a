"""A small byte-level causal transformer with an explicit KV cache.

The architecture is the usual decoder-only one, kept small enough to train on a CPU:

- bytes are tokens (vocabulary 256), embedded into ``d_model`` dimensions;
- ``n_layer`` pre-norm blocks, ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with
  RMSNorm (one scale vector, no mean: cheaper than LayerNorm and as good here);
- causal self-attention with ``n_head`` query heads and ``n_kv_head`` K/V heads
  (grouped-query attention when fewer: the KV cache shrinks by G = n_head / n_kv_head);
- rotary position embeddings (RoPE) on q and k: position enters as a rotation computed
  from the position itself, so a decode step at position t needs no learned table row
  and the same code serves prefill (positions 0..T-1) and decode (position t);
- a GELU MLP of width ``mlp_mult · d_model``; an untied output projection to 256 logits.

Two ways to run it.  ``model(idx)`` is the full forward: every position attends to its
prefix in one ``scaled_dot_product_attention(..., is_causal=True)`` call.  For
generation, :meth:`ByteLM.prefill` runs the prompt once and fills a :class:`KVCache`;
:meth:`ByteLM.decode_step` then feeds only the new token(s), whose queries attend to the
cached keys and values (grouped K/V read as they are, never expanded) through
:func:`cached_attention`: PyTorch's fused attention by default, or the attention
chapter's split-KV decode (:func:`effdl.attention.decode_attention`, ``"split_kv"`` or
``"triton"``), chosen with :meth:`ByteLM.set_decode_backend`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from effdl.attention.decode import decode_attention

__all__ = ["LMConfig", "KVCache", "ByteLM", "RMSNorm", "rope_tables", "apply_rope",
           "causal_attention", "cached_attention", "kv_bytes_per_token", "DECODE_BACKENDS"]

#: how decode steps attend to the cache (see :func:`cached_attention`)
DECODE_BACKENDS = ("sdpa", "split_kv", "triton")


@dataclass(frozen=True)
class LMConfig:
    """The model's shape; ``n_kv_head=None`` means ``n_head`` (no grouping)."""

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    max_len: int = 256            # longest sequence: RoPE table and KV cache size
    n_kv_head: int | None = None
    vocab: int = 256
    mlp_mult: int = 4
    rope_base: float = 10_000.0

    def __post_init__(self):
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        for f in fields(self):
            v = getattr(self, f.name)
            bad = not isinstance(v, int) or isinstance(v, bool) or v < 1
            if f.name != "rope_base" and bad:
                raise ValueError(f"LMConfig.{f.name} must be a positive int, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head "
                             f"({self.n_head}); pick n_head among the divisors of "
                             f"{self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head "
                             f"({self.n_head}): each K/V head serves a whole group of "
                             f"query heads; pick a divisor of {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_head = {self.head_dim} must be "
                             "even (RoPE rotates pairs of dimensions); change d_model "
                             "or n_head")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def as_dict(self) -> dict:
        return asdict(self)


def kv_bytes_per_token(config: LMConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache grows by per token:
    2 (K and V) · layers · K/V heads · head dim · bytes per element."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * size


class RMSNorm(nn.Module):
    """x / rms(x) · weight, over the last dimension."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float = 10_000.0):
    """cos and sin of the rotation angles, (max_len, head_dim / 2) each.

    Pair i of a head turns by angle t · base^(-2i / head_dim) at position t: fast
    rotations for the first pairs, slow ones for the last.
    """
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    freq = base ** (-2 * i / head_dim)                             # (d/2,)
    angle = torch.arange(max_len, dtype=torch.float64)[:, None] * freq  # (L, d/2)
    # why fp64 then fp32: the tables are exact to fp32 rounding at every position
    return angle.cos().float(), angle.sin().float()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, d) by the angles of its T positions, cos/sin (T, d/2).

    The first and second halves of the head dimensions form the pairs (the
    GPT-NeoX layout: two contiguous slices instead of strided even/odd ones).
    """
    x1, x2 = x.chunk(2, dim=-1)                         # (B, H, T, d/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_attention(q, k, v):
    """Prefill attention: q (B, H, T, d), k, v (B, H_kv, T, d) -> (B, H, T, d)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        # why expand here but not in decode: prefill is compute-bound (the copy is
        # O(T·d) beside O(T²·d) of attention); decode is memory-bound and reads the
        # grouped cache as it is
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def cached_attention(q, k, v, backend: str = "sdpa"):
    """Decode attention: q (B, H, T, d), the last T positions of k, v (B, H_kv, L, d).

    Causal bottom-right: query i, at position L - T + i, sees keys 0..L - T + i (T = 1:
    every key).  ``"sdpa"``: one fused call, the group of query heads sharing a K/V head
    read without copying the cache (``enable_gqa``).  Why it is the default: the
    split-KV decode of the attention chapter spends about a millisecond per call in
    Python on a CPU, several times this small model's whole layer.  ``"split_kv"`` and
    ``"triton"`` run :func:`effdl.attention.decode_attention` with that backend.
    """
    if backend == "sdpa":
        T, L = q.shape[2], k.shape[2]
        mask = None if T == 1 else torch.ones(T, L, dtype=torch.bool,
                                               device=q.device).tril(L - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return decode_attention(q, k, v, backend="torch" if backend == "split_kv" else backend)


@dataclass
class KVCache:
    """Per-layer keys and values, preallocated to ``max_len`` positions.

    ``k[i]``, ``v[i]``: (B, H_kv, max_len, head_dim); positions ``[0, length)`` are
    valid, the same number for every sequence of the batch.  Why preallocate: growing
    the cache with ``torch.cat`` copies all of it at every token (O(L²) bytes moved
    over a generation); writing into a reserved buffer copies only the new token's K
    and V, and the valid prefix is a view.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: LMConfig, batch: int, device=None, dtype=torch.float32):
        shape = (batch, config.n_kv_head, config.max_len, config.head_dim)
        new = lambda: torch.zeros(shape, device=device, dtype=dtype)
        return cls([new() for _ in range(config.n_layer)],
                   [new() for _ in range(config.n_layer)])

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, k, v):
        """Store k, v (B, H_kv, T, d) at positions [length, length + T); return the
        valid prefix including them, (B, H_kv, length + T, d) views."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length: int) -> KVCache:
        """Forget positions from ``length`` on (rejected draft tokens); in place."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must lie in [0, {self.length}] (the filled "
                             f"positions), got {length}")
        self.length = length
        return self

    def nbytes(self) -> int:
        """Bytes reserved (all ``max_len`` positions, K and V, every layer)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.c = c
        self.wq = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.d_model, 2 * c.n_kv_head * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.backend = "sdpa"                   # of decode steps: see cached_attention

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        """x (B, T, d_model) at positions [p, p + T), p = cache.length (0 without)."""
        B, T, _ = x.shape
        H, Hkv, d = self.c.n_head, self.c.n_kv_head, self.c.head_dim
        q = self.wq(x).view(B, T, H, d).transpose(1, 2)           # (B, H, T, d)
        kv = self.wkv(x).view(B, T, 2, Hkv, d).permute(2, 0, 3, 1, 4)
        q, k, v = apply_rope(q, cos, sin), apply_rope(kv[0], cos, sin), kv[1]
        if cache is None or cache.length == 0:                    # prefill
            if cache is not None:
                cache.write(layer, k, v)
            y = causal_attention(q, k, v)                         # (B, H, T, d)
        else:                                                     # decode
            k_all, v_all = cache.write(layer, k, v)               # (B, Hkv, p+T, d)
            y = cached_attention(q, k_all, v_all, self.backend)   # bottom-right causal
        return self.wo(y.transpose(1, 2).reshape(B, T, H * d))


class Block(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(c.d_model), Attention(c)
        self.norm2 = RMSNorm(c.d_model)
        width = c.mlp_mult * c.d_model
        self.mlp = nn.Sequential(nn.Linear(c.d_model, width, bias=False), nn.GELU(),
                                 nn.Linear(width, c.d_model, bias=False))

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer)
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """The language model: byte ids (B, T) -> next-byte logits (B, T, 256)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)
        cos, sin = rope_tables(c.head_dim, c.max_len, c.rope_base)
        # why not persistent: derived from the config, so kept out of the state_dict
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual branches scaled by 1/sqrt(2·layers)
            for w in (block.attn.wo.weight, block.mlp[2].weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def _run(self, idx, cache: KVCache | None):
        start = 0 if cache is None else cache.length
        check_tokens(self.config, idx, start)
        end = start + idx.shape[1]
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, d/2)
        x = self.embed(idx)                                     # (B, T, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = end          # once, after every layer has written
        return self.head(self.norm(x))                          # (B, T, 256)

    def forward(self, idx):
        """Full forward: logits at every position of idx (B, T)."""
        return self._run(idx, None)

    def set_decode_backend(self, backend: str) -> ByteLM:
        """How decode steps attend to the cache: one of :data:`DECODE_BACKENDS`."""
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got "
                             f"{backend!r}")
        for block in self.blocks:
            block.attn.backend = backend
        return self

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` sequences, on the model's device and dtype."""
        w = self.embed.weight
        return KVCache.empty(self.config, batch, w.device, w.dtype)

    def prefill(self, idx):
        """Run the prompt idx (B, T) once: ``(logits (B, T, 256), cache)``."""
        check_tokens(self.config, idx)
        cache = self.new_cache(idx.shape[0])
        return self._run(idx, cache), cache

    def decode_step(self, tokens, cache: KVCache):
        """Feed tokens (B, T) (usually T = 1) after the cached prefix.

        Returns ``(logits (B, T, 256), cache)``; the cache now holds them too (T > 1
        scores several drafted tokens in one call, as speculative decoding needs).
        """
        if cache.length == 0:
            raise ValueError("decode_step needs a filled cache: call "
                             "model.prefill(prompt) first")
        check_tokens(self.config, tokens, cache.length)
        if tokens.shape[0] != cache.batch:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache holds "
                             f"{cache.batch} sequences; pass one row per sequence")
        return self._run(tokens, cache), cache


def check_tokens(config: LMConfig, idx, start: int = 0) -> None:
    """Shape checks of a (B, T) id tensor fed at positions [start, start + T)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = getattr(idx, "dtype", type(idx).__name__)
        raise ValueError(f"token ids must be an int64 tensor of shape (batch, T), got "
                         f"{got}; use torch.tensor(ids)")
    if idx.ndim != 2 or idx.shape[0] < 1:
        raise ValueError(f"token ids must have shape (batch, T), got "
                         f"{tuple(idx.shape)}; add a batch dimension with idx[None]")
    if idx.shape[1] == 0:
        raise ValueError("the token sequence is empty (T = 0); give at least one token")
    if start + idx.shape[1] > config.max_len:
        raise ValueError(f"{start} cached + {idx.shape[1]} new tokens exceed max_len="
                         f"{config.max_len}; shorten the prompt or use a config with a "
                         "larger max_len")
