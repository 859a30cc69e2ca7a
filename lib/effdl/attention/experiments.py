"""Helpers the attention chapter's notebook calls: implementation factories, sweeps, tile studies.

Rows: ``{"name": "prefill"|"decode", "impl", "N" (or "L"), "d", "batch", "heads", "causal", "dtype",
"ms", "peak_mem_bytes", "tflops" (prefill) or "tbps" (decode)}``, and "heads_kv" in decode rows timed
with grouped-query K/V.  FLOPs: 4·B·H·N²·d forward (half when causal); decode bytes: the K and V caches
read once, 2·B·H_kv·L·d·bytes (H_kv = H without grouping).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from effdl.attention.decode import decode_attention
from effdl.attention.tiled import flash2_forward
from effdl.bench.core import run_sweep
from effdl.measure import benchmark, peak_memory
from effdl.reference import expand_kv, naive_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: impl name -> SDPBackend member name
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
#: F.scaled_dot_product_attention takes grouped-query K/V itself (``enable_gqa=True``) from torch 2.5
SDPA_GQA = torch.__version__ >= (2, 5)


def prefill_flops(batch: int, heads: int, N: int, d: int, causal: bool) -> float:
    """Forward FLOPs: two N x N x d products per head (2 FLOPs per multiply-add); half if causal."""
    return 4.0 * batch * heads * N * N * d * (0.5 if causal else 1.0)


def decode_bytes(batch: int, heads: int, L: int, d: int, dtype: torch.dtype) -> float:
    """Bytes a decode step must read: the K and V caches (the query and output are negligible).

    ``heads`` counts K/V heads: pass H_kv for a grouped-query cache
    (:func:`effdl.attention.decode.decode_intensity` adds q, the output and the FLOPs)."""
    return 2.0 * batch * heads * L * d * torch.finfo(dtype).bits / 8


class _Inputs:
    """q, k, v for one config, kept only while that config is being measured (frees big caches)."""

    def __init__(self, device):
        self.device, self.key, self.val = torch.device(device), None, None

    def __call__(self, cfg: Mapping[str, Any]):
        nq = cfg["N"] if cfg["name"] == "prefill" else cfg.get("Nq", 1)
        nk = cfg["N"] if cfg["name"] == "prefill" else cfg["L"]
        h_kv = cfg.get("heads_kv", cfg["heads"])          # grouped-query K/V when < heads
        key = (cfg["name"], cfg["batch"], cfg["heads"], h_kv, nq, nk, cfg["d"], cfg["dtype"])
        if key != self.key:
            self.val = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=self.device).manual_seed(0)
            dt = DTYPES[cfg["dtype"]]
            mk = lambda h, n: torch.randn(cfg["batch"], h, n, cfg["d"], device=self.device,  # noqa: E731
                                          dtype=dt, generator=g)
            self.key, self.val = key, (mk(cfg["heads"], nq), mk(h_kv, nk), mk(h_kv, nk))
        return self.val


def _sdpa_call(q, k, v, causal: bool):
    """SDPA, with grouped-query K/V passed as it is (``enable_gqa``) or, before torch 2.5, expanded
    (a copy per call, as models did: the impl is then named ``<name>_expanded_kv``)."""
    if k.shape[-3] == q.shape[-3]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    h = q.shape[-3]
    return F.scaled_dot_product_attention(q, expand_kv(k, h), expand_kv(v, h), is_causal=causal)


def _sdpa_factory(inputs: _Inputs, backend: str | None, decode: bool = False):
    def make(cfg):
        q, k, v = inputs(cfg)
        causal = bool(cfg["causal"]) and not decode     # decode, Nq = 1: every key is visible
        if backend is None:
            return lambda: _sdpa_call(q, k, v, causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
        if be is None:
            return None

        def fn():
            with sdpa_kernel([be]):
                return _sdpa_call(q, k, v, causal)
        try:
            fn()                                          # unavailable on this GPU / shape -> skip
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise
            return None
        return fn
    return make


def _fits(cfg, budget_bytes: float, copies: int = 3) -> bool:
    """Would ``copies`` score-sized (B·H·Nq·Nk) tensors fit in ``budget_bytes``?"""
    nq = cfg["N"] if cfg["name"] == "prefill" else 1
    nk = cfg["N"] if cfg["name"] == "prefill" else cfg["L"]
    return copies * cfg["batch"] * cfg["heads"] * nq * nk * 4 <= budget_bytes


def prefill_impls(device, names=("naive", "tiled", "sdpa"), naive_max_bytes: float = 16e9,
                  tiled_blocks: tuple[int | None, int | None] = (None, None)) -> dict[str, Callable]:
    """Factories for :func:`effdl.bench.core.run_sweep`: name -> (config -> zero-argument callable)."""
    inputs = _Inputs(device)
    impls: dict[str, Callable] = {}
    for name in names:
        if name == "naive":
            def naive(cfg):
                if not _fits(cfg, naive_max_bytes):   # scores would not fit: skip
                    return None
                q, k, v = inputs(cfg)
                return lambda: naive_attention(q, k, v, causal=cfg["causal"])

            impls[name] = naive
        elif name == "tiled":
            bq, bk = tiled_blocks
            impls[name] = lambda cfg: (lambda q, k, v: lambda: flash2_forward(q, k, v, causal=cfg["causal"],
                                                                               block_q=bq, block_k=bk))(*inputs(cfg))
        elif name == "triton":
            from effdl.attention.triton_kernels import triton_attention as _tri

            impls[name] = lambda cfg: (lambda q, k, v: lambda: _tri(q, k, v, causal=cfg["causal"]))(*inputs(cfg))
        elif name == "sdpa":
            impls[name] = _sdpa_factory(inputs, None)
        elif name in SDPA_BACKENDS:
            impls[name] = _sdpa_factory(inputs, name)
        else:
            raise ValueError(f"unknown prefill implementation {name!r}")
    return impls


def _naive_decode(q, k, v):
    """Textbook attention; grouped K/V is expanded to one K/V head per query head first (a copy per
    call, as models without a grouped kernel do)."""
    if k.shape[-3] != q.shape[-3]:
        k, v = expand_kv(k, q.shape[-3]), expand_kv(v, q.shape[-3])
    return naive_attention(q, k, v)


def decode_impls(device, names=("naive", "sdpa", "torch_split_kv"), heads_kv: int | None = None
                 ) -> dict[str, Callable]:
    """Decode factories for :func:`decode_rows`; each reads grouped K/V when the config has ``heads_kv``.

    ``naive`` expands grouped K/V per call; the split-KV paths read it as it is; SDPA passes it with
    ``enable_gqa=True`` (torch >= 2.5, :data:`SDPA_GQA`).  ``heads_kv`` (the value given to
    :func:`decode_rows`) only names the SDPA entries: on an older torch they expand K/V per call and
    are named ``sdpa_expanded_kv`` (``sdpa_flash_expanded_kv``, ...) so a table says which ran.
    """
    inputs = _Inputs(device)
    impls: dict[str, Callable] = {}
    suffix = "_expanded_kv" if heads_kv is not None and not SDPA_GQA else ""
    for name in names:
        if name == "naive":
            impls[name] = lambda cfg: (lambda q, k, v: lambda: _naive_decode(q, k, v))(*inputs(cfg))
        elif name == "torch_split_kv":
            impls[name] = lambda cfg: (
                lambda q, k, v: lambda: decode_attention(q, k, v, backend="torch")
            )(*inputs(cfg))
        elif name == "triton_split_kv":
            impls[name] = lambda cfg: (
                lambda q, k, v: lambda: decode_attention(q, k, v, backend="triton")
            )(*inputs(cfg))
        elif name == "sdpa":
            impls[name + suffix] = _sdpa_factory(inputs, None, decode=True)
        elif name in SDPA_BACKENDS:
            impls[name + suffix] = _sdpa_factory(inputs, name, decode=True)
        else:
            raise ValueError(f"unknown decode implementation {name!r}")
    return impls


def _derive_prefill(cfg, ms):
    flops = prefill_flops(cfg["batch"], cfg["heads"], cfg["N"], cfg["d"], cfg["causal"])
    return {"tflops": flops / (ms * 1e-3) / 1e12}


def _derive_decode(cfg, ms):
    dtype = DTYPES[cfg["dtype"]]
    nbytes = decode_bytes(cfg["batch"], cfg.get("heads_kv", cfg["heads"]), cfg["L"], cfg["d"], dtype)
    return {"tbps": nbytes / (ms * 1e-3) / 1e12}


def prefill_rows(Ns, *, d, batch, heads, device, impls, causal=(False,), dtype="float32",
                 warmup=1, repeat=3, memory=True, progress=True) -> list[dict]:
    """Time every prefill implementation at every N (a list of ``batch`` may follow ``Ns`` per N)."""
    cfgs = [dict(name="prefill", N=N, d=d, batch=batch(N) if callable(batch) else batch,
                 heads=heads, causal=c, dtype=dtype) for N in Ns for c in causal]
    return run_sweep(cfgs, impls, derive=_derive_prefill, warmup=warmup, repeat=repeat, device=device,
                     memory=memory, progress=progress)


def decode_rows(Ls, *, d, batch, heads, device, impls, heads_kv: int | None = None, dtype="float32",
                warmup=1, repeat=3, memory=True, progress=True) -> list[dict]:
    """Time every decode implementation at every cache length L (one query token per sequence).

    ``heads_kv``: K/V heads of a grouped-query cache (a divisor of ``heads``; 1 is multi-query); the
    rows then carry it, and "tbps" counts the grouped cache's bytes.
    """
    extra = {}
    if heads_kv is not None:
        if not isinstance(heads_kv, int) or isinstance(heads_kv, bool) or heads_kv < 1 or heads % heads_kv:
            raise ValueError(f"heads_kv must be a positive int that divides heads ({heads}), got {heads_kv!r}: "
                             f"each K/V head serves a whole group of query heads")
        extra = dict(heads_kv=heads_kv)
    cfgs = [dict(name="decode", L=L, d=d, batch=batch, heads=heads, **extra, causal=True, dtype=dtype)
            for L in Ls]
    return run_sweep(cfgs, impls, derive=_derive_decode, warmup=warmup, repeat=repeat, device=device,
                     memory=memory, progress=progress)


def tile_sweep(N: int, tiles, *, d: int, batch: int, heads: int, device="cpu", dtype=torch.float32,
               warmup=1, repeat=3, memory=True, modes=(True,)) -> list[dict]:
    """Tiled forward time and peak memory per (block_q, block_k) and mode; also the number of tile steps.

    ``modes``: values of ``flash2_forward(parallel=...)`` — True runs query tiles side by side on the
    cores, False runs them one after another with every operation split across all cores.
    """
    from tqdm.auto import tqdm

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, N, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    rows = []
    for (bq, bk), par in tqdm([(t, m) for t in tiles for m in modes], desc="tile sizes", leave=False):
        fn = lambda: flash2_forward(q, k, v, block_q=bq, block_k=bk, parallel=par)    # noqa: E731
        res = benchmark(fn, warmup=warmup, repeat=repeat, device=device)
        row = dict(mode="tiles across cores" if par else "ops across cores", block_q=bq, block_k=bk,
                   tile_elems=bq * bk, steps=math.ceil(N / bq) * math.ceil(N / bk),
                   ms=res.median_ms, ms_iqr=res.iqr_ms)
        row["tflops"] = prefill_flops(batch, heads, N, d, False) / (res.median_ms * 1e-3) / 1e12
        row["us_per_step"] = res.median_ms * 1e3 / row["steps"]
        if memory:
            row["peak_mem_bytes"] = peak_memory(fn, device=device)
        rows.append(row)
    return rows


def matmul_sweep(sides, *, d: int, heads: int, device="cpu", dtype=torch.float32, total: int = 2 ** 22,
                 warmup=1, repeat=3) -> list[dict]:
    """GFLOP/s of the S-tile product (b x d) @ (d x b) on ``heads`` heads, and of the exp over the tile.

    The same total work (``total`` score elements per head) is split into tiles of side b, so the
    rows compare per-call overhead and matmul efficiency at equal arithmetic.
    """
    rows = []
    for b in sides:
        calls = max(1, total // (b * b))
        q = torch.randn(heads, b, d, device=device, dtype=dtype)
        kT = torch.randn(heads, d, b, device=device, dtype=dtype)

        def mm():
            for _ in range(calls):
                torch.matmul(q, kT)

        s = torch.randn(heads, b, b, device=device, dtype=dtype)

        def ex():
            for _ in range(calls):
                torch.exp(s)
        t_mm = benchmark(mm, warmup=warmup, repeat=repeat, device=device).median_ms
        t_ex = benchmark(ex, warmup=warmup, repeat=repeat, device=device).median_ms
        flops = 2.0 * heads * b * b * d * calls
        rows.append(dict(side=b, calls=calls, matmul_ms=t_mm, exp_ms=t_ex,
                         matmul_gflops=flops / (t_mm * 1e-3) / 1e9,
                         us_per_call=t_mm * 1e3 / calls,
                         exp_gelems=heads * b * b * calls / (t_ex * 1e-3) / 1e9))
    return rows


def interleaved_prefill(N: int, *, d: int, batch: int, heads: int, device, rounds: int,
                        warmup: int = 1, textbook: bool = True) -> list[dict]:
    """Naive, the textbook FA2 loop (128 x 128 tiles), the engineered tiles and SDPA at one size,
    timed in alternation (:func:`effdl.measure.interleaved`) so that they share the machine's
    load.  One row per implementation: ``{"name": "interleaved", "impl", "N", "ms", "ms_min",
    "ratio_to_sdpa", "ratio_q1", "ratio_q3", "peak_mem_bytes"}``; the ratio is the median of
    the per-round ratios to SDPA's time, with its quartiles (the spread)."""
    from effdl.attention.textbook import fa2_forward
    from effdl.attention.tiled import tiled_attention
    from effdl.measure import interleaved, quartiles

    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, N, d, device=device, generator=g) for _ in range(3))
    fns = {"naive": lambda: naive_attention(q, k, v),
           "tiled": lambda: tiled_attention(q, k, v),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if textbook:
        # 128 x 128 tiles: the textbook loop pays a dozen operations per tile step
        fns["textbook_fa2"] = lambda: fa2_forward(q, k, v, block_q=128, block_k=128)
    res = interleaved(fns, rounds=rounds, warmup=warmup, device=device)
    base = res["sdpa"].times_ms
    rows = []
    for impl, r in res.items():
        lo, med, hi = quartiles([a / b for a, b in zip(r.times_ms, base)])
        rows.append(dict(name="interleaved", impl=impl, N=N, ms=r.median_ms, ms_min=r.min_ms,
                         ratio_to_sdpa=med, ratio_q1=lo, ratio_q3=hi,
                         peak_mem_bytes=peak_memory(fns[impl], device=device)))
    return rows
