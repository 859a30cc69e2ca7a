"""Attention benchmarks: ``python -m effdl.bench attention`` and the GPU suite of the recorded results.

Rows: ``{"name": "prefill"|"decode", "impl", "N" (or "L"), "d", "batch", "heads", "causal", "dtype",
"ms", "peak_mem_bytes", "tflops" (prefill) or "tbps" (decode)}``.  FLOPs: 4·B·H·N²·d forward (half
when causal); decode bytes: the K and V caches read once, 2·B·H·L·d·bytes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from effdl.attention.decode import decode_attention
from effdl.attention.naive import naive_attention, reference_attention
from effdl.attention.tiled import flash2_forward, tiled_attention
from effdl.bench.core import run_sweep
from effdl.measure import benchmark, peak_memory
from effdl.profile import sizes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: impl name -> SDPBackend member name
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def prefill_flops(batch: int, heads: int, N: int, d: int, causal: bool) -> float:
    """Forward FLOPs: two N x N x d products per head (2 FLOPs per multiply-add); half if causal."""
    return 4.0 * batch * heads * N * N * d * (0.5 if causal else 1.0)


def decode_bytes(batch: int, heads: int, L: int, d: int, dtype: torch.dtype) -> float:
    """Bytes a decode step must read: the K and V caches (the query and output are negligible)."""
    return 2.0 * batch * heads * L * d * torch.finfo(dtype).bits / 8


class _Inputs:
    """q, k, v for one config, kept only while that config is being measured (frees big caches)."""

    def __init__(self, device):
        self.device, self.key, self.val = torch.device(device), None, None

    def __call__(self, cfg: Mapping[str, Any]):
        nq = cfg["N"] if cfg["name"] == "prefill" else cfg.get("Nq", 1)
        nk = cfg["N"] if cfg["name"] == "prefill" else cfg["L"]
        key = (cfg["name"], cfg["batch"], cfg["heads"], nq, nk, cfg["d"], cfg["dtype"])
        if key != self.key:
            self.val = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=self.device).manual_seed(0)
            dt = DTYPES[cfg["dtype"]]
            mk = lambda n: torch.randn(cfg["batch"], cfg["heads"], n, cfg["d"], device=self.device,  # noqa: E731
                                       dtype=dt, generator=g)
            self.key, self.val = key, (mk(nq), mk(nk), mk(nk))
        return self.val


def _sdpa_factory(inputs: _Inputs, backend: str | None, decode: bool = False):
    def make(cfg):
        q, k, v = inputs(cfg)
        causal = bool(cfg["causal"]) and not decode     # decode, Nq = 1: every key is visible
        if backend is None:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
        if be is None:
            return None

        def fn():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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
            impls[name] = lambda cfg: (None if not _fits(cfg, naive_max_bytes) else
                                       (lambda q, k, v: lambda: naive_attention(q, k, v, causal=cfg["causal"]))(*inputs(cfg)))
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


def decode_impls(device, names=("naive", "sdpa", "torch_split_kv")) -> dict[str, Callable]:
    inputs = _Inputs(device)
    impls: dict[str, Callable] = {}
    for name in names:
        if name == "naive":
            impls[name] = lambda cfg: (lambda q, k, v: lambda: naive_attention(q, k, v))(*inputs(cfg))
        elif name == "torch_split_kv":
            impls[name] = lambda cfg: (lambda q, k, v: lambda: decode_attention(q, k, v, backend="torch"))(*inputs(cfg))
        elif name == "triton_split_kv":
            impls[name] = lambda cfg: (lambda q, k, v: lambda: decode_attention(q, k, v, backend="triton"))(*inputs(cfg))
        elif name == "sdpa":
            impls[name] = _sdpa_factory(inputs, None, decode=True)
        elif name in SDPA_BACKENDS:
            impls[name] = _sdpa_factory(inputs, name, decode=True)
        else:
            raise ValueError(f"unknown decode implementation {name!r}")
    return impls


def _derive_prefill(cfg, ms):
    return {"tflops": prefill_flops(cfg["batch"], cfg["heads"], cfg["N"], cfg["d"], cfg["causal"]) / (ms * 1e-3) / 1e12}


def _derive_decode(cfg, ms):
    return {"tbps": decode_bytes(cfg["batch"], cfg["heads"], cfg["L"], cfg["d"], DTYPES[cfg["dtype"]]) / (ms * 1e-3) / 1e12}


def prefill_rows(Ns, *, d, batch, heads, device, impls, causal=(False,), dtype="float32",
                 warmup=1, repeat=3, memory=True, progress=True) -> list[dict]:
    """Time every prefill implementation at every N (a list of ``batch`` may follow ``Ns`` per N)."""
    cfgs = [dict(name="prefill", N=N, d=d, batch=batch(N) if callable(batch) else batch,
                 heads=heads, causal=c, dtype=dtype) for N in Ns for c in causal]
    return run_sweep(cfgs, impls, derive=_derive_prefill, warmup=warmup, repeat=repeat, device=device,
                     memory=memory, progress=progress)


def decode_rows(Ls, *, d, batch, heads, device, impls, dtype="float32", warmup=1, repeat=3,
                memory=True, progress=True) -> list[dict]:
    cfgs = [dict(name="decode", L=L, d=d, batch=batch, heads=heads, causal=True, dtype=dtype) for L in Ls]
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


def interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 1, device="cpu") -> dict[str, dict]:
    """Time several functions in alternation (round r runs each once), so all see the same machine load.

    On a shared machine a burst of load hits whichever function runs during it; interleaving spreads
    it over all of them.  Returns per name the median and the minimum (the least disturbed run).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += benchmark(fn, warmup=0, repeat=1, device=device).times_ms
    import statistics

    return {n: {"ms": statistics.median(t), "ms_min": min(t), "times_ms": t} for n, t in times.items()}


def run(profile: str, device: torch.device) -> list[dict]:
    """The chapter's sweep: prefill (naive / tiled / SDPA [/ Triton]) and decode, at this profile's sizes."""
    S = sizes("attention", profile)
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = "float16" if gpu else "float32"
    names = ["naive", "tiled", "sdpa"]
    dec = ["naive", "sdpa", "torch_split_kv"]
    if gpu:
        from effdl.device import capabilities

        if capabilities().triton_gpu:
            names.append("triton")
            dec.append("triton_split_kv")
    Ns = sorted(set(S.seq_lens) | {S.target_N})
    rows = prefill_rows(Ns, d=S.head_dim, batch=S.batch, heads=S.heads, device=device,
                        impls=prefill_impls(device, names), dtype=dtype, warmup=S.warmup, repeat=S.repeat)
    rows += prefill_rows([S.target_N], d=S.head_dim, batch=S.batch, heads=S.heads, device=device, causal=(True,),
                         impls=prefill_impls(device, names), dtype=dtype, warmup=S.warmup, repeat=S.repeat)
    rows += decode_rows(S.decode_L, d=S.head_dim, batch=S.decode_batch, heads=S.decode_heads, device=device,
                        impls=decode_impls(device, dec), dtype=dtype, warmup=S.warmup, repeat=S.repeat)
    return rows


def plot(rows, path=None):
    """Two panels: prefill time against N (non-causal), decode bandwidth against L."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    pre = [r for r in rows if r.get("name") == "prefill" and not r.get("causal") and "ms" in r]
    for impl in dict.fromkeys(r["impl"] for r in pre):
        pts = sorted((r["N"], r["ms"]) for r in pre if r["impl"] == impl)
        a.plot(*zip(*pts), marker="o", label=impl)
    a.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="forward time (ms)", title="prefill")
    dec = [r for r in rows if r.get("name") == "decode" and "tbps" in r]
    for impl in dict.fromkeys(r["impl"] for r in dec):
        pts = sorted((r["L"], r["tbps"] * 1e3) for r in dec if r["impl"] == impl)
        b.plot(*zip(*pts), marker="o", label=impl)
    b.set(xscale="log", xlabel="KV cache length L", ylabel="K/V read bandwidth (GB/s)", title="decode (1 query token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel can be empty (e.g. no decode rows recorded)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------------------------
# GPU suite (issue 7): correctness of the Triton paths, then prefill and decode timings
# ----------------------------------------------------------------------------------------------

def _err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def _rule(err, err_pt, ref, dtype, factor):
    """flash-attn's rule: err <= factor · err_pt + a rounding epsilon of the output's size."""
    eps = 2 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    return err <= factor * err_pt + eps


def gpu_checks(device, dtypes=("float16",)) -> list[dict]:
    """2x rule (gradients 3x) vs an fp32 reference on irregular shapes, for every Triton path."""
    from functools import partial

    from effdl.attention.decode import default_num_splits
    from effdl.attention.triton_kernels import triton_attention, triton_decode

    tri = partial(triton_attention, tuned=False)                          # one config: few compilations
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dt_name in dtypes:
        dt = DTYPES[dt_name]
        for N, d in [(1, 64), (77, 40), (130, 128), (513, 59), (2049, 128)]:
            for causal in (False, True):
                q, k, v = (torch.randn(2, 3, N, d, device=device, dtype=dt, generator=g) for _ in range(3))
                ref = naive_attention(q.float(), k.float(), v.float(), causal=causal)
                pt = naive_attention(q, k, v, causal=causal)
                for impl, fn in (("triton", tri), ("tiled", tiled_attention)):
                    out = fn(q, k, v, causal=causal)
                    e, ep = _err(out, ref), _err(pt, ref)
                    rows.append(dict(name="check", impl=impl, N=N, d=d, causal=causal, dtype=dt_name,
                                     err=e, err_pt=ep, passed=_rule(e, ep, ref, dt, 2)))
                if N in (130, 513):                                      # gradients, 3x rule
                    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
                    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
                    do = torch.randn(2, 3, N, d, device=device, dtype=dt, generator=g)
                    g_ref = torch.autograd.grad(naive_attention(q32, k32, v32, causal=causal), (q32, k32, v32), do.float())
                    g_pt = torch.autograd.grad(naive_attention(qr, kr, vr, causal=causal), (qr, kr, vr), do)
                    g_tr = torch.autograd.grad(tri(qr, kr, vr, causal=causal), (qr, kr, vr), do)
                    for nm, a, b, c in zip("qkv", g_tr, g_pt, g_ref):
                        e, ep = _err(a, c), _err(b, c)
                        rows.append(dict(name="check", impl=f"triton_grad_{nm}", N=N, d=d, causal=causal,
                                         dtype=dt_name, err=e, err_pt=ep, passed=_rule(e, ep, c, dt, 3)))
        for L, nq, d in [(1, 1, 64), (77, 1, 128), (4099, 1, 128), (1000, 4, 64), (33333, 1, 80)]:
            q = torch.randn(2, 5, nq, d, device=device, dtype=dt, generator=g)
            k, v = (torch.randn(2, 5, L, d, device=device, dtype=dt, generator=g) for _ in range(2))
            ref = naive_attention(q.float(), k.float(), v.float(), causal=True)
            pt = naive_attention(q, k, v, causal=True)
            splits = default_num_splits(2 * 5 * nq, L, torch.device(device))
            for impl, fn in (("triton_split_kv", lambda: triton_decode(q, k, v, splits, tuned=False)),
                             ("torch_split_kv", lambda: decode_attention(q, k, v, num_splits=splits))):
                out = fn()
                e, ep = _err(out, ref), _err(pt, ref)
                rows.append(dict(name="check", impl=impl, L=L, Nq=nq, d=d, causal=True, dtype=dt_name,
                                 err=e, err_pt=ep, passed=_rule(e, ep, ref, dt, 2)))
    return rows


def gpu_suite(device) -> list[dict]:
    """Issue 7's rows for this chapter: checks, prefill at N in {1k, 4k, 16k}, decode at L in {4k, 32k, 128k}."""
    device = torch.device(device)
    from effdl.device import capabilities

    caps = capabilities()
    dtypes = ["float16"] + (["bfloat16"] if caps.bf16 else [])
    triton_ok = caps.triton_gpu
    rows = gpu_checks(device, dtypes) if triton_ok else []
    # prefill: 16k tokens per batch, hidden size 2048 (heads = 2048 / d), as FlashAttention's benchmarks
    pre = ["naive", "tiled"] + (["triton"] if triton_ok else []) + list(SDPA_BACKENDS)
    for dt in dtypes:
        for d in ((64, 128) if dt == "float16" else (128,)):             # bf16: d=128 only (compile time)
            impls = prefill_impls(device, pre, naive_max_bytes=40e9, tiled_blocks=(1024, 1024))
            slow = {"naive", "sdpa_math", "tiled"}
            # why: the O(N²)-memory paths at 16k take seconds per call and tell nothing new
            impls = {n: (f if n not in slow else (lambda f: lambda cfg: None if cfg["N"] > 4096 else f(cfg))(f))
                     for n, f in impls.items()}
            rows += prefill_rows([1024, 4096, 16384], d=d, batch=lambda N: max(1, 16384 // N), heads=2048 // d,
                                 device=device, impls=impls, causal=(False, True), dtype=dt, warmup=3, repeat=10,
                                 progress=False)
    dec = ["naive", "torch_split_kv"] + (["triton_split_kv"] if triton_ok else []) + list(SDPA_BACKENDS)
    rows += decode_rows([4096, 32768, 131072], d=128, batch=8, heads=32, device=device,
                        impls=decode_impls(device, dec), dtype="float16", warmup=3, repeat=10, progress=False)
    return rows
