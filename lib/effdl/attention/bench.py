"""``python -m effdl.bench attention`` and the GPU suite of the recorded results.

:func:`run` times prefill (naive / tiled / SDPA [/ Triton]) and decode at a profile's sizes;
:func:`gpu_suite` first checks every Triton path on the GPU with flash-attention's accuracy rule
(:func:`effdl.accuracy.within_baseline`), then times prefill and decode at GPU scale.  Row format:
see :mod:`effdl.attention.experiments`.
"""

from __future__ import annotations

import torch

from effdl.accuracy import within_baseline
from effdl.attention import makespan
from effdl.attention.decode import decode_attention
from effdl.attention.experiments import (
    DTYPES,
    SDPA_BACKENDS,
    decode_impls,
    decode_rows,
    interleaved_prefill,
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
    if not gpu:
        # the CPU comparison at the largest N: the four implementations in alternation, ratios to
        # SDPA per round with their quartiles (the spread); fp32
        rows += interleaved_prefill(S.target_N, d=S.head_dim, batch=S.batch, heads=S.heads, device=device,
                                    rounds=S.repeat + 4, warmup=S.warmup)
    rows += makespan.bench_rows()                      # the decode schedules on a model H100
    return rows


#: forward + backward rows: one B and H at every N (the math backend keeps N x N tensors: they fit
#: at N = 4096); FLOPs counted as FlashAttention-2 counts them, the backward 2.5x the forward
_FWD_BWD_BATCH, _FWD_BWD_HEADS, _FWD_BWD_FLOPS = 4, 16, 3.5
#: grouped-query decode rows: 32 query heads sharing 8 K/V heads (groups of 4, as in Llama-3-8B)
_GQA_HEADS, _GQA_KV_HEADS = 32, 8


def _check_row(out, out_plain, ref, factor: float, **keys) -> dict:
    """One ``check`` row: flash-attention's rule (``factor`` 2 for outputs, 3 for gradients)."""
    res = within_baseline(out, out_plain, ref, factor=factor)
    return dict(name="check", **keys, err=res.err, err_pt=res.err_pt, passed=res.passed)


def _grad_rows(fn, q, k, v, causal: bool, g, impl: str, keys: dict) -> list[dict]:
    """Three ``check`` rows (dq, dk, dv) of ``fn``'s gradients: 3× rule against an fp32 reference,
    plain same-dtype attention as the baseline."""
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=g)
    g_ref = torch.autograd.grad(naive_attention(q32, k32, v32, causal=causal), (q32, k32, v32), do.float())
    g_pt = torch.autograd.grad(naive_attention(qr, kr, vr, causal=causal), (qr, kr, vr), do)
    g_fn = torch.autograd.grad(fn(qr, kr, vr, causal=causal), (qr, kr, vr), do)
    return [_check_row(a, b, c, 3, impl=f"{impl}_grad_{nm}", **keys)
            for nm, a, b, c in zip("qkv", g_fn, g_pt, g_ref)]


def _require_triton_backward(d: int) -> None:
    """Fail loudly where the Triton backward would not run: a silent fallback to the PyTorch
    recomputation would check and time the wrong code under the name "triton"."""
    from effdl.attention.triton_kernels import backward_path

    if backward_path(d) != "triton":
        raise RuntimeError(f"head dim {d}: TritonAttentionFunction would run the PyTorch backward, "
                           "not the Triton kernels; check and time the Triton backward at d <= 128")


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
                    _require_triton_backward(d)
                    rows += _grad_rows(tri, q, k, v, causal, g, "triton", keys)
        # the Triton backward on rectangular problems both ways (causal with Nq > Nk: rows that
        # see no key); head dims as above, so no new compilation
        for nq, nk, d in [(77, 300, 59), (300, 77, 128)]:
            _require_triton_backward(d)
            for causal in (False, True):
                q = torch.randn(2, 3, nq, d, device=device, dtype=dt, generator=g)
                k, v = (torch.randn(2, 3, nk, d, device=device, dtype=dt, generator=g) for _ in range(2))
                keys = dict(N=nq, Nk=nk, d=d, causal=causal, dtype=dt_name)
                rows += _grad_rows(tri, q, k, v, causal, g, "triton", keys)
        if dt_name == "float16":
            # the autotuned kernels, every config compiled and run; causal, so the masked tiles
            # run too, and at the fwd_bwd rows' N and d, so those reuse the compilations
            _require_triton_backward(64)
            q, k, v = (torch.randn(2, 3, 1024, 64, device=device, dtype=dt, generator=g) for _ in range(3))
            rows += _grad_rows(triton_attention, q, k, v, True, g, "triton_tuned",
                               dict(N=1024, d=64, causal=True, dtype=dt_name))
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
        # grouped K/V (GQA; H_kv = 1: MQA): the references read an expanded copy, the kernels do not
        for L, nq, d, h_kv in [(77, 1, 128, 8), (4099, 1, 128, 8), (1000, 3, 64, 1)]:
            H = _GQA_HEADS
            q = torch.randn(2, H, nq, d, device=device, dtype=dt, generator=g)
            k, v = (torch.randn(2, h_kv, L, d, device=device, dtype=dt, generator=g) for _ in range(2))
            ke, ve = (t.repeat_interleave(H // h_kv, dim=1) for t in (k, v))
            ref = naive_attention(q.float(), ke.float(), ve.float(), causal=True)
            pt = naive_attention(q, ke, ve, causal=True)
            splits = default_num_splits(2 * h_kv, L, torch.device(device))
            keys = dict(L=L, Nq=nq, d=d, heads=H, kv_heads=h_kv, causal=True, dtype=dt_name)
            rows.append(_check_row(triton_decode(q, k, v, splits, tuned=False), pt, ref, 2,
                                   impl="triton_split_kv", **keys))
            if dt_name == "float16":            # autotuned, default splits (as the timed rows)
                rows.append(_check_row(decode_attention(q, k, v, backend="triton"), pt, ref, 2,
                                       impl="triton_split_kv_tuned", **keys))
            rows.append(_check_row(decode_attention(q, k, v, num_splits=splits), pt, ref, 2,
                                   impl="torch_split_kv", **keys))
    return rows


def _sdpa_fn(backend: str | None, q, k, v, **kw):
    """A zero-argument SDPA call, pinned to ``backend`` (a key of SDPA_BACKENDS) or not."""
    import torch.nn.functional as F

    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
    if be is None:
        return None

    def fn():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return fn


def _applies(fn) -> bool:
    """Run an SDPA candidate once: False if this backend refuses this GPU / shape / option."""
    from effdl.bench.core import is_oom

    try:
        fn()
    except (RuntimeError, TypeError) as exc:      # TypeError: a torch without enable_gqa
        if is_oom(exc):
            raise
        return False
    return True


class _LastInputs:
    """The tensors of the config being measured, made once per config (frees the previous ones)."""

    def __init__(self, device, make):
        self.device, self.make, self.key, self.val = torch.device(device), make, None, None

    def __call__(self, cfg):
        key = tuple(sorted((k, v) for k, v in cfg.items() if k != "causal"))
        if key != self.key:
            self.val = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=self.device).manual_seed(0)
            self.key, self.val = key, self.make(cfg, g)
        return self.val


def _fwd_bwd_impls(device, names) -> dict:
    """Factories timing forward + backward, ``autograd.grad`` of the output w.r.t. q, k, v."""
    def make(cfg, g):
        mk = lambda: torch.randn(cfg["batch"], cfg["heads"], cfg["N"], cfg["d"], device=device,  # noqa: E731
                                 dtype=DTYPES[cfg["dtype"]], generator=g)
        return mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_(), mk()

    inputs = _LastInputs(device, make)

    def factory(name):
        def build(cfg):
            q, k, v, do = inputs(cfg)
            causal = bool(cfg["causal"])
            if name == "triton":
                from effdl.attention.triton_kernels import triton_attention

                _require_triton_backward(cfg["d"])
                fwd = lambda: triton_attention(q, k, v, causal=causal)    # noqa: E731
            elif name == "tiled":
                fwd = lambda: tiled_attention(q, k, v, causal=causal)     # noqa: E731
            else:                                 # SDPA: square N, so top-left causal is ours
                fwd = _sdpa_fn(name, q, k, v, is_causal=causal)
                if fwd is None:
                    return None
            fn = lambda: torch.autograd.grad(fwd(), (q, k, v), do)        # noqa: E731
            # why only SDPA may be skipped: a Triton or tiled error must stop the suite
            return fn if name not in SDPA_BACKENDS or _applies(fn) else None
        return build

    return {n: factory(n) for n in names}


def _gqa_decode_impls(device, names) -> dict:
    """Factories timing one decode step against a grouped K/V cache, read as it is."""
    def make(cfg, g):
        mk = lambda h, n: torch.randn(cfg["batch"], h, n, cfg["d"], device=device,  # noqa: E731
                                      dtype=DTYPES[cfg["dtype"]], generator=g)
        return mk(cfg["heads"], 1), mk(cfg["kv_heads"], cfg["L"]), mk(cfg["kv_heads"], cfg["L"])

    inputs = _LastInputs(device, make)

    def factory(name):
        def build(cfg):
            q, k, v = inputs(cfg)
            if name in ("triton_split_kv", "torch_split_kv"):
                backend = name.split("_")[0]
                return lambda: decode_attention(q, k, v, backend=backend)
            fn = _sdpa_fn(None if name == "sdpa" else name, q, k, v, enable_gqa=True)
            return fn if fn is not None and _applies(fn) else None
        return build

    return {n: factory(n) for n in names}


def _fwd_bwd_rows(device, S, triton_ok: bool) -> list[dict]:
    """Forward + backward, fp16, at the two smallest ``S.suite_N``, the smallest suite head dim."""
    from effdl.attention.experiments import prefill_flops
    from effdl.bench.core import run_sweep

    names = (["triton"] if triton_ok else []) + ["tiled"] + list(SDPA_BACKENDS)
    d = min(S.suite_head_dims)
    cfgs = [dict(name="fwd_bwd", N=N, d=d, batch=_FWD_BWD_BATCH, heads=_FWD_BWD_HEADS, causal=c,
                 dtype="float16") for N in S.suite_N[:2] for c in (False, True)]

    def derive(cfg, ms):
        flops = _FWD_BWD_FLOPS * prefill_flops(cfg["batch"], cfg["heads"], cfg["N"], cfg["d"], cfg["causal"])
        return {"tflops": flops / (ms * 1e-3) / 1e12}

    return run_sweep(cfgs, _fwd_bwd_impls(device, names), derive=derive, warmup=S.warmup,
                     repeat=S.repeat, device=device, memory=True, progress=False)


def _gqa_decode_rows(device, S, triton_ok: bool) -> list[dict]:
    """One decode step, 32 query heads on 8 K/V heads, at ``S.decode_L``; TB/s of the grouped cache."""
    from effdl.attention.experiments import decode_bytes
    from effdl.bench.core import run_sweep

    names = (["triton_split_kv"] if triton_ok else []) + ["torch_split_kv", "sdpa"] + list(SDPA_BACKENDS)
    cfgs = [dict(name="decode_gqa", L=L, d=max(S.suite_head_dims), batch=S.decode_batch,
                 heads=_GQA_HEADS, kv_heads=_GQA_KV_HEADS, causal=True, dtype="float16")
            for L in S.decode_L]

    def derive(cfg, ms):      # the grouped cache is what a step reads: H_kv heads, not H
        nbytes = decode_bytes(cfg["batch"], cfg["kv_heads"], cfg["L"], cfg["d"], torch.float16)
        return {"tbps": nbytes / (ms * 1e-3) / 1e12}

    return run_sweep(cfgs, _gqa_decode_impls(device, names), derive=derive, warmup=S.warmup,
                     repeat=S.repeat, device=device, memory=True, progress=False)


def gpu_suite(device, S) -> list[dict]:
    """Checks of every Triton path, then prefill at ``S.suite_N`` (``S.suite_tokens`` tokens per
    batch, hidden size ``S.suite_hidden``, as in FlashAttention's benchmarks; gpu profile: N = 1k,
    4k, 16k, 16k tokens, hidden 2048) and decode at ``S.decode_L`` with ``S.decode_batch``
    sequences of ``S.decode_heads`` heads; ``S.warmup`` and ``S.repeat`` calls per point.  Then
    forward + backward (rows ``"fwd_bwd"``: the two smallest N, B = 4, H = 16, fp16) and a
    grouped-query decode step (rows ``"decode_gqa"``: H = 32 query heads on H_kv = 8)."""
    import sys

    device = torch.device(device)
    from effdl.device import capabilities

    caps = capabilities()
    dtypes = ["float16"] + (["bfloat16"] if caps.bf16 else [])
    triton_ok = caps.triton_gpu
    rows = _gpu_checks(device, dtypes) if triton_ok else []
    failed = [r for r in rows if not r["passed"]]
    if failed:                # why not raise: the timings still get recorded, with the failures
        print(f"attention gpu_suite: {len(failed)} CHECKS FAILED:", *failed, sep="\n  ", file=sys.stderr)
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
    rows += _fwd_bwd_rows(device, S, triton_ok)
    rows += _gqa_decode_rows(device, S, triton_ok)
    return rows
