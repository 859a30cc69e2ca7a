"""``python -m effdl.bench measuring``: this machine's roofline with kernels on it, and the
"fewer FLOPs is not faster" cases.  :func:`gpu_suite` is the GPU-scale version recorded on a lent GPU.

Rows (one dict each), keyed by ``case``:

- ``peak``: ``kernel`` (``matmul N`` / ``copy M MiB`` / ``read M MiB``), ``dtype``, ``ms``, ``gflops``
  or ``gbs`` (the roofline takes the best matmul and the best of copy and read);
- ``roofline``: a kernel placed on the roofline — ``kernel``, ``family``, ``flops`` (by hand),
  ``flops_counted`` (torch's counter), ``bytes``, ``intensity``, ``ms``, ``ms_iqr``, ``gflops``,
  ``bound_gflops``, ``bound``, ``efficiency``;
- ``conv`` / ``fusion``: the two FLOPs-vs-latency cases (see :mod:`effdl.roofline.cases`);
- CPU only: ``threads`` (:func:`~effdl.roofline.timing.thread_check`: all threads vs one, and
  ``threads_used`` for the rest of the run);
- GPU only: ``async`` (``method``: host clock without sync / with sync / CUDA events, ``ms`` per
  call) and ``attention_memory`` (``seq``, ``peak_bytes``, ``scores_bytes``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from effdl.measure import benchmark, torch_threads
from effdl.profile import sizes
from effdl.roofline.cases import conv_case, fusion_case
from effdl.roofline.timing import thread_check
from effdl.roofline.roofline import (
    Roofline, bandwidths, kernel_suite, matmul_flops, place_kernels, plot_roofline,
)

__all__ = ["run", "plot", "plot_cases", "gpu_suite", "plot_recorded", "summarize_recorded", "roofline_from_rows",
           "peak_rows"]


def _matmul_peak_row(device, n: int, dtype: torch.dtype, warmup: int, repeat: int) -> dict:
    """The best of n, n/2, n/4 (as :func:`~effdl.roofline.roofline.peak_compute`), with its size."""
    best: dict = {}
    for m in sorted({max(1, n // 4), max(1, n // 2), n}):
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        res = benchmark(lambda: a @ b, warmup=warmup, repeat=repeat, device=device)
        g = matmul_flops(m, m, m) / res.min_ms / 1e6
        if g > best.get("gflops", 0.0):
            best = dict(case="peak", kernel=f"matmul {m}", dtype=str(dtype).replace("torch.", ""),
                        ms=res.min_ms, gflops=g)
        del a, b
    return best


def peak_rows(device, *, matmul_n: int, copy_mib: int, dtypes: Sequence[torch.dtype] = (torch.float32,),
              warmup: int = 2, repeat: int = 5) -> list[dict]:
    """One ``peak`` row per matmul dtype (FLOP/s from the fastest repeat), one for the copy, one for the read."""
    rows = [_matmul_peak_row(device, matmul_n, dtype, warmup, repeat) for dtype in dtypes]
    for kind, bw in bandwidths(device, mib=copy_mib, warmup=warmup, repeat=repeat).items():
        moved = copy_mib * 2**20 * (2 if kind == "copy" else 1)
        rows.append(dict(case="peak", kernel=f"{kind} {copy_mib} MiB", dtype="float32",
                         ms=moved / bw * 1e3, gbs=bw / 1e9))
    return rows


def roofline_from_rows(rows: Sequence[dict], dtype: str = "float32", device: str = "") -> Roofline:
    """Rebuild the measured :class:`Roofline` from ``peak`` rows (e.g. of a recorded file)."""
    flops = [r["gflops"] for r in rows if r.get("case") == "peak" and r["kernel"].startswith("matmul")
             and r.get("dtype") == dtype]
    bws = [r["gbs"] for r in rows if r.get("case") == "peak" and r["kernel"].split()[0] in ("copy", "read")]
    if not flops or not bws:
        raise ValueError(f"no peak rows for dtype {dtype!r} and copy in these results; "
                         f"dtypes present: {sorted({r.get('dtype') for r in rows if r.get('case') == 'peak'})}")
    return Roofline(max(flops) * 1e9, max(bws) * 1e9, device=device, dtype=dtype)


def run(profile: str, device: torch.device) -> list[dict]:
    """The chapter's sweep: peaks, kernels on the roofline, the conv and fusion cases.

    On the CPU it first runs :func:`~effdl.roofline.timing.thread_check` and measures with one thread
    when more threads are slower (a shared, oversubscribed machine); a ``threads`` row records it.
    """
    S = sizes("measuring", profile)
    dev = torch.device(device)
    rows: list[dict] = []
    with torch_threads(None):  # restores the caller's thread count, whatever thread_check decides
        if dev.type == "cpu":
            tc = thread_check()
            if tc["ratio"] > 1.0:
                torch.set_num_threads(1)
            rows.append({"case": "threads", **tc, "threads_used": torch.get_num_threads()})
        rows += peak_rows(dev, matmul_n=S.peak_matmul_n, copy_mib=S.copy_mib, warmup=S.warmup, repeat=S.peak_repeat)
        roof = roofline_from_rows(rows, device=str(dev))
        kernels = kernel_suite(S, dev)
        rows += [{"case": "roofline", **r} for r in place_kernels(kernels, roof, warmup=S.warmup, repeat=S.repeat,
                                                                   device=dev, progress=True)]
        rows += conv_case(S, dev)
        rows += fusion_case(S, dev)
    return rows


def plot_cases(rows: Sequence[dict], ax) -> None:
    """Bars: time relative to the baseline next to FLOPs relative to it, per case."""
    import numpy as np

    sub = [r for r in rows if r.get("case") in ("conv", "fusion")]
    base = {}
    for r in sub:
        base.setdefault(r["case"], r)
    names = [r["kernel"] for r in sub]
    flops = [r["flops"] / base[r["case"]]["flops"] for r in sub]
    times = [r["ms"] / base[r["case"]]["ms"] for r in sub]
    xs = np.arange(len(sub))
    ax.bar(xs - 0.2, flops, 0.4, label="FLOPs (relative)")
    ax.bar(xs + 0.2, times, 0.4, label="time (relative)")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to the first of its group")
    ax.set_title("fewer FLOPs is not faster")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot(rows: Sequence[dict], path=None, title: str = ""):
    """Two panels: the measured roofline with its kernels, and FLOPs vs time of the cases."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    dtype = next((r["dtype"] for r in rows if r.get("case") == "peak"), "float32")
    roof = roofline_from_rows(rows, dtype=dtype)
    plot_roofline(roof, [r for r in rows if r.get("case") == "roofline"], ax=a, title=title or None)
    plot_cases(rows, b)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --------------------------------------------------------------------------------------------------
# GPU scale (issue 7): run on a lent GPU, recorded under book/results/measuring-<gpu>.json
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


def gpu_suite(device: torch.device, S=None) -> list[dict]:
    """GPU rows for the recorded results (~30 s on an H100): peaks at fp32/tf32/fp16/bf16 and copy
    bandwidth, kernels on the fp16 roofline, the async-timing pitfall, naive-attention memory, and
    the conv and fusion cases.  ``S`` defaults to the ``gpu`` sizes (tests pass smaller ones)."""
    from effdl.roofline.memory import attention_memory_sweep

    dev = torch.device(device)
    S = S or sizes("measuring", "gpu")
    cuda = dev.type == "cuda"
    dtypes = [torch.float32, torch.float16]
    if not cuda or torch.cuda.is_bf16_supported():
        dtypes.append(torch.bfloat16)
    rows = peak_rows(dev, matmul_n=S.peak_matmul_n, copy_mib=S.copy_mib, dtypes=dtypes,
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
    rows += [{"case": "attention_memory", "dtype": "float16", **r}
             for r in attention_memory_sweep(S.attention_mem_seqs, batch=b, heads=h, head_dim=d, device=dev, dtype=half)]
    rows += conv_case(S, dev)
    rows += fusion_case(S, dev)
    if cuda:
        torch.cuda.empty_cache()
    return rows


def plot_recorded(doc: dict[str, Any]):
    """Figure of a recorded GPU run: fp16 roofline with kernels, and the async-timing pitfall."""
    import matplotlib.pyplot as plt

    from effdl.plot import recorded_label

    rows = doc["results"]
    label = recorded_label(doc["meta"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    dtype = "float16" if any(r.get("dtype") == "float16" and r.get("case") == "peak" for r in rows) else "float32"
    roof = roofline_from_rows(rows, dtype=dtype, device=doc["meta"].get("device_name", ""))
    plot_roofline(roof, [r for r in rows if r.get("case") == "roofline"], ax=a, unit=1e12, unit_name="TFLOP/s",
                  title=f"roofline, {dtype}")
    asy = [r for r in rows if r.get("case") == "async"]
    b.barh([r["method"] for r in asy], [r["ms"] for r in asy], color=["tab:red", "tab:green", "tab:blue"][:len(asy)])
    b.set_xscale("log")
    b.set_xlabel("measured time per matmul (ms, log)")
    if asy:
        b.set_title(f"timing an async {asy[0]['n']}² {asy[0]['dtype']} matmul")
    b.grid(alpha=0.3, axis="x")
    fig.suptitle(label)
    fig.tight_layout()
    return fig


def summarize_recorded(doc: dict[str, Any]) -> str:
    """Plain-text lines of a recorded GPU run: peaks per dtype, the async pitfall, attention memory,
    and the FLOPs-vs-time cases."""
    rows = doc["results"]
    lines = [f"{doc.get('path', 'recorded run')}: {doc['meta'].get('device_name', '?')}, "
             f"{str(doc['meta'].get('date', '?'))[:10]}, torch {doc['meta'].get('torch', '?')}"]
    for r in rows:
        if r.get("case") == "peak" and "gflops" in r:
            lines.append(f"  peak {r['dtype']:9s} {r['kernel']:12s} {r['gflops'] / 1e3:8.1f} TFLOP/s")
        elif r.get("case") == "peak":
            lines.append(f"  peak {r['kernel']:22s} {r['gbs']:8.0f} GB/s")
    for r in rows:
        if r.get("case") == "async":
            lines.append(f"  timing: {r['method']:40s} {r['ms']:9.4f} ms/matmul  (apparent {r['apparent_tflops']:,.0f} TFLOP/s)")
    for r in rows:
        if r.get("case") == "attention_memory":
            peak = "out of memory" if r.get("peak_bytes") is None else f"peak {r['peak_bytes'] / 2**30:7.2f} GiB"
            lines.append(f"  naive attention N={r['seq']:6d}: {peak}  (one score matrix {r['scores_bytes'] / 2**30:.2f} GiB)")
    for r in rows:
        if r.get("case") in ("conv", "fusion"):
            lines.append(f"  {r['case']:6s} {r['kernel']:20s} {r['flops'] / 1e9:9.2f} GFLOP  {r['ms']:8.3f} ms  "
                         f"{r['gflops'] / 1e3:7.2f} TFLOP/s")
    return "\n".join(lines)
