"""``python -m effdl.bench attention`` and the GPU suite of the recorded results.

:func:`run` times prefill (naive / tiled / SDPA [/ Triton]) and decode at a profile's sizes;
:func:`gpu_suite` first checks every Triton path on the GPU with flash-attention's accuracy rule
(:func:`effdl.accuracy.within_baseline`), then times prefill and decode at GPU scale.  Row format:
see :mod:`effdl.attention.experiments`.
"""

from __future__ import annotations

import torch

from effdl.accuracy import within_baseline
from effdl.attention.decode import decode_attention
from effdl.attention.experiments import (
    DTYPES,
    SDPA_BACKENDS,
    decode_impls,
    decode_rows,
    prefill_impls,
    prefill_rows,
)
from effdl.attention.tiled import tiled_attention
from effdl.reference import naive_attention

__all__ = ["run", "gpu_suite"]


def run(S, device: torch.device) -> list[dict]:
    """The chapter's sweep at sizes ``S``: prefill (naive / tiled / SDPA [/ Triton]) and decode."""
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


def _check_row(out, out_plain, ref, factor: float, **keys) -> dict:
    """One ``check`` row: flash-attention's rule (``factor`` 2 for outputs, 3 for gradients)."""
    res = within_baseline(out, out_plain, ref, factor=factor)
    return dict(name="check", **keys, err=res.err, err_pt=res.err_pt, passed=res.passed)


def _gpu_checks(device, dtypes=("float16",)) -> list[dict]:
    """The 2× rule (gradients 3×) against an fp32 reference on irregular shapes, every Triton path."""
    from functools import partial

    from effdl.attention.decode import default_num_splits
    from effdl.attention.triton_kernels import triton_attention, triton_decode

    tri = partial(triton_attention, tuned=False)     # why: one tile config, few compilations
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dt_name in dtypes:
        dt = DTYPES[dt_name]
        for N, d in [(1, 64), (77, 40), (130, 128), (513, 59), (2049, 128)]:
            for causal in (False, True):
                q, k, v = (torch.randn(2, 3, N, d, device=device, dtype=dt, generator=g)
                           for _ in range(3))
                ref = naive_attention(q.float(), k.float(), v.float(), causal=causal)
                pt = naive_attention(q, k, v, causal=causal)
                keys = dict(N=N, d=d, causal=causal, dtype=dt_name)
                for impl, fn in (("triton", tri), ("tiled", tiled_attention)):
                    rows.append(_check_row(fn(q, k, v, causal=causal), pt, ref, 2, impl=impl, **keys))
                if N in (130, 513):                                      # gradients, 3× rule
                    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
                    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
                    do = torch.randn(2, 3, N, d, device=device, dtype=dt, generator=g)
                    g_ref = torch.autograd.grad(naive_attention(q32, k32, v32, causal=causal),
                                                (q32, k32, v32), do.float())
                    g_pt = torch.autograd.grad(naive_attention(qr, kr, vr, causal=causal),
                                               (qr, kr, vr), do)
                    g_tr = torch.autograd.grad(tri(qr, kr, vr, causal=causal), (qr, kr, vr), do)
                    for nm, a, b, c in zip("qkv", g_tr, g_pt, g_ref):
                        rows.append(_check_row(a, b, c, 3, impl=f"triton_grad_{nm}", **keys))
        for L, nq, d in [(1, 1, 64), (77, 1, 128), (4099, 1, 128), (1000, 4, 64), (33333, 1, 80)]:
            q = torch.randn(2, 5, nq, d, device=device, dtype=dt, generator=g)
            k, v = (torch.randn(2, 5, L, d, device=device, dtype=dt, generator=g) for _ in range(2))
            ref = naive_attention(q.float(), k.float(), v.float(), causal=True)
            pt = naive_attention(q, k, v, causal=True)
            splits = default_num_splits(2 * 5 * nq, L, torch.device(device))
            keys = dict(L=L, Nq=nq, d=d, causal=True, dtype=dt_name)
            rows.append(_check_row(triton_decode(q, k, v, splits, tuned=False), pt, ref, 2,
                                   impl="triton_split_kv", **keys))
            rows.append(_check_row(decode_attention(q, k, v, num_splits=splits), pt, ref, 2,
                                   impl="torch_split_kv", **keys))
    return rows


def gpu_suite(device, S) -> list[dict]:
    """Checks of every Triton path, then prefill at ``S.suite_N`` (``S.suite_tokens`` tokens per
    batch, hidden size ``S.suite_hidden``, as in FlashAttention's benchmarks; gpu profile: N = 1k,
    4k, 16k, 16k tokens, hidden 2048) and decode at ``S.decode_L`` with ``S.decode_batch``
    sequences of ``S.decode_heads`` heads; ``S.warmup`` and ``S.repeat`` calls per point."""
    device = torch.device(device)
    from effdl.device import capabilities

    caps = capabilities()
    dtypes = ["float16"] + (["bfloat16"] if caps.bf16 else [])
    triton_ok = caps.triton_gpu
    rows = _gpu_checks(device, dtypes) if triton_ok else []
    pre = ["naive", "tiled"] + (["triton"] if triton_ok else []) + list(SDPA_BACKENDS)
    slow_above = S.suite_N[-2] if len(S.suite_N) > 1 else S.suite_N[-1]
    d_max = max(S.suite_head_dims)
    for dt in dtypes:
        for d in (S.suite_head_dims if dt == "float16" else (d_max,)):  # bf16: one d (compile time)
            impls = prefill_impls(device, pre, naive_max_bytes=40e9, tiled_blocks=(1024, 1024))
            slow = {"naive", "sdpa_math", "tiled"}
            # why: the O(N²)-memory paths at the largest N take seconds per call, tell nothing new
            impls = {n: (f if n not in slow else
                         (lambda f: lambda cfg: None if cfg["N"] > slow_above else f(cfg))(f))
                     for n, f in impls.items()}
            rows += prefill_rows(list(S.suite_N), d=d,
                                 batch=lambda N: max(1, S.suite_tokens // N),
                                 heads=S.suite_hidden // d, device=device, impls=impls,
                                 causal=(False, True), dtype=dt, warmup=S.warmup, repeat=S.repeat,
                                 progress=False)
    dec = (["naive", "torch_split_kv"] + (["triton_split_kv"] if triton_ok else [])
           + list(SDPA_BACKENDS))
    rows += decode_rows(list(S.decode_L), d=d_max, batch=S.decode_batch, heads=S.decode_heads,
                        device=device, impls=decode_impls(device, dec), dtype="float16",
                        warmup=S.warmup, repeat=S.repeat, progress=False)
    return rows
