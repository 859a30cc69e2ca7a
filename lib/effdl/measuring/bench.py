"""``python -m effdl.bench measuring``: this machine's roofline with kernels on it, and the
"fewer FLOPs is not faster" cases.  :func:`gpu_suite` is the GPU-scale version recorded on a lent GPU.

Rows (one dict each), keyed by ``case``:

- ``peak``: ``kernel`` (``matmul N`` / ``copy M MiB`` / ``read M MiB``), ``dtype``, ``ms``, ``gflops``
  or ``gbs`` (the roofline takes the best matmul and the best of copy and read);
- ``roofline``: a kernel placed on the roofline — ``kernel``, ``family``, ``flops`` (by hand),
  ``flops_counted`` (torch's counter), ``bytes``, ``intensity``, ``ms``, ``ms_iqr``, ``gflops``,
  ``bound_gflops``, ``bound``, ``efficiency``;
- ``conv`` / ``fusion``: the two FLOPs-vs-latency cases (see :mod:`effdl.measuring.cases`);
- CPU only: ``threads`` (:func:`effdl.measure.thread_check`: all threads vs one, and
  ``threads_used`` for the rest of the run);
- GPU only: ``async`` (``method``: host clock without sync / with sync / CUDA events, ``ms`` per
  call) and ``attention_memory`` (``seq``, ``peak_bytes``, ``scores_bytes``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from effdl.measure import benchmark, cpu_thread_policy
from effdl.measuring.cases import conv_case, fusion_case
from effdl.measuring.memory import attention_memory_sweep
from effdl.measuring.roofline import (
    bandwidths,
    kernel_suite,
    matmul_flops,
    peak_matmul,
    place_kernels,
    roofline_from_rows,
)

__all__ = ["run", "gpu_suite"]


def _matmul_peak_row(device, n: int, dtype: torch.dtype, warmup: int, repeat: int) -> dict:
    """A ``peak`` row from :func:`~effdl.measuring.roofline.peak_matmul` (the best of n, n/2, n/4)."""
    best = peak_matmul(device, n=n, dtype=dtype, warmup=warmup, repeat=repeat)
    return dict(case="peak", kernel=f"matmul {best['m']}", dtype=str(dtype).replace("torch.", ""),
                ms=best["ms"], gflops=best["flops"] / 1e9)


def _peak_rows(device, *, matmul_n: int, copy_mib: int, dtypes: Sequence[torch.dtype] = (torch.float32,),
              warmup: int = 2, repeat: int = 5) -> list[dict]:
    """One ``peak`` row per matmul dtype (FLOP/s from the fastest repeat), one for the copy, one for the read."""
    rows = [_matmul_peak_row(device, matmul_n, dtype, warmup, repeat) for dtype in dtypes]
    for kind, bw in bandwidths(device, mib=copy_mib, warmup=warmup, repeat=repeat).items():
        moved = copy_mib * 2**20 * (2 if kind == "copy" else 1)
        rows.append(dict(case="peak", kernel=f"{kind} {copy_mib} MiB", dtype="float32",
                         ms=moved / bw * 1e3, gbs=bw / 1e9))
    return rows


def run(S, device: torch.device) -> list[dict]:
    """The chapter's sweep at sizes ``S``: peaks, kernels on the roofline, the conv and fusion cases.

    On the CPU it first runs :func:`effdl.measure.thread_check` and measures with one thread when
    more threads are slower (a shared, oversubscribed machine); a ``threads`` row records it.
    """
    dev = torch.device(device)
    rows: list[dict] = []
    with cpu_thread_policy(dev, "auto") as threads:
        if dev.type == "cpu":
            rows.append({"case": "threads", **threads})
        rows += _peak_rows(dev, matmul_n=S.peak_matmul_n, copy_mib=S.copy_mib, warmup=S.warmup, repeat=S.peak_repeat)
        roof = roofline_from_rows(rows, device=str(dev))
        kernels = kernel_suite(S, dev)
        rows += [{"case": "roofline", **r} for r in place_kernels(kernels, roof, warmup=S.warmup, repeat=S.repeat,
                                                                   device=dev, progress=True)]
        rows += conv_case(S, dev)
        rows += fusion_case(S, dev)
    return rows


# --------------------------------------------------------------------------------------------------
# GPU scale: recorded under book/results/measuring-<gpu>.json by `python -m effdl.bench gpu-suite`
# --------------------------------------------------------------------------------------------------
def _async_rows(device: torch.device, n: int, calls: int, dtype: torch.dtype) -> list[dict]:
    """The async pitfall measured: one matmul launched ``calls`` times, timed three ways."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    out = []
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ b
    t_launch = (time.perf_counter() - t0) * 1e3 / calls  # host clock, no sync: launches only
    sync()
    out.append(dict(case="async", method="host clock, no sync", n=n, ms=t_launch))
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ b
    sync()
    out.append(dict(case="async", method="host clock + synchronize", n=n,
                    ms=(time.perf_counter() - t0) * 1e3 / calls))
    res = benchmark(lambda: a @ b, warmup=2, repeat=calls, device=device)
    out.append(dict(case="async", method="CUDA events (effdl.measure.benchmark)" if cuda else "benchmark",
                    n=n, ms=res.median_ms, ms_iqr=res.iqr_ms))
    flops = matmul_flops(n, n, n)
    for r in out:
        r["dtype"] = str(dtype).replace("torch.", "")
        r["apparent_tflops"] = flops / r["ms"] / 1e9
    return out


def gpu_suite(device: torch.device, S) -> list[dict]:
    """GPU rows for the recorded results (~30 s on an H100): peaks at fp32/tf32/fp16/bf16 and copy
    bandwidth, kernels on the fp16 roofline, the async-timing pitfall, naive-attention memory, and
    the conv and fusion cases, at sizes ``S`` (the ``gpu`` profile's; tests pass smaller ones)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtypes = [torch.float32, torch.float16]
    if not cuda or torch.cuda.is_bf16_supported():
        dtypes.append(torch.bfloat16)
    rows = _peak_rows(dev, matmul_n=S.peak_matmul_n, copy_mib=S.copy_mib, dtypes=dtypes,
                     warmup=S.warmup, repeat=S.peak_repeat)
    if cuda:  # TF32: fp32 inputs on tensor cores, what `torch.backends.cuda.matmul.allow_tf32` enables
        old = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            tf32 = _matmul_peak_row(dev, S.peak_matmul_n, torch.float32, S.warmup, S.peak_repeat)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rows.append({**tf32, "dtype": "tf32"})
    half = torch.float16
    roof = roofline_from_rows(rows, dtype="float16", device=str(dev))
    rows += [{"case": "roofline", "dtype": "float16", **r}
             for r in place_kernels(kernel_suite(S, dev, half), roof, warmup=S.warmup, repeat=S.repeat, device=dev)]
    rows += _async_rows(dev, S.peak_matmul_n, calls=S.repeat, dtype=half)
    b, h, _, d = S.attention
    memory_rows = attention_memory_sweep(
        S.attention_mem_seqs, batch=b, heads=h, head_dim=d, device=dev, dtype=half
    )
    rows += [{"case": "attention_memory", "dtype": "float16", **r} for r in memory_rows]
    rows += conv_case(S, dev)
    rows += fusion_case(S, dev)
    if cuda:
        torch.cuda.empty_cache()
    return rows
