"""The roofline of the machine in front of you, and real kernels placed on it.

A kernel that performs ``F`` floating-point operations and moves ``B`` bytes between memory and the
processor cannot run faster than ``max(F / peak_flops, B / peak_bandwidth)`` (Williams et al.,
2009).  Its *arithmetic intensity* ``I = F / B`` (FLOP per byte) says which term wins: below the
*ridge point* ``peak_flops / peak_bandwidth`` a kernel is memory-bound, above it compute-bound.

Both peaks are measured here, not copied from a data sheet: a large matrix multiply for compute, a
large copy and a large read for bandwidth, timed with :func:`effdl.measure.benchmark`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from effdl.measure import benchmark, count_flops, resolve_device

__all__ = [
    "Roofline", "Kernel", "arithmetic_intensity", "bytes_per_element",
    "matmul_flops", "matmul_bytes", "elementwise_bytes", "softmax_flops", "softmax_bytes",
    "attention_flops", "naive_attention_bytes", "attention_layer_flops",
    "naive_attention", "attention_layer",
    "softmax_by_ops", "softmax_by_ops_bytes",
    "peak_compute", "peak_matmul", "bandwidths", "peak_bandwidth", "measure_roofline",
    "roofline_from_rows", "kernel_suite", "place_kernels", "plot_roofline",
]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Roofline:
    """Measured peaks of one device: ``peak_flops`` in FLOP/s, ``peak_bandwidth`` in bytes/s."""

    peak_flops: float
    peak_bandwidth: float
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None      # CPU threads it was measured with (None: not recorded)
    peak_side: int | None = None    # side of the square matmul that set peak_flops

    def __post_init__(self):
        if not (self.peak_flops > 0 and self.peak_bandwidth > 0):
            raise ValueError(
                f"a roofline needs positive peaks, got peak_flops={self.peak_flops}, "
                f"peak_bandwidth={self.peak_bandwidth}"
            )

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.peak_flops / self.peak_bandwidth

    def attainable(self, intensity: float) -> float:
        """Best FLOP/s a kernel of this intensity can reach: ``min(peak, I × bandwidth)``."""
        if intensity < 0:
            raise ValueError(f"intensity must be >= 0 FLOP/byte, got {intensity}")
        return min(self.peak_flops, intensity * self.peak_bandwidth)

    def predict_seconds(self, flops: float, nbytes: float) -> float:
        """Lower bound on the run time: the slower of doing the work and moving the bytes."""
        if flops < 0 or nbytes < 0:
            raise ValueError(f"flops and bytes must be >= 0, got flops={flops}, bytes={nbytes}")
        return max(flops / self.peak_flops, nbytes / self.peak_bandwidth)

    def bound(self, intensity: float) -> str:
        """``"memory"`` below the ridge point, ``"compute"`` at or above it."""
        return "memory" if intensity < self.ridge else "compute"

    def __str__(self) -> str:
        threads = ""
        if self.threads:
            threads = f", {self.threads} thread" + ("s" if self.threads > 1 else "")
        return (
            f"roofline of {self.device} ({self.dtype}{threads}): "
            f"{self.peak_flops / 1e9:.1f} GFLOP/s, {self.peak_bandwidth / 1e9:.1f} GB/s, "
            f"ridge at {self.ridge:.1f} FLOP/byte"
        )


def arithmetic_intensity(flops: float, nbytes: float) -> float:
    """FLOP per byte moved."""
    if nbytes <= 0:
        raise ValueError(f"bytes moved must be > 0 to define an intensity, got {nbytes}")
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops}")
    return flops / nbytes


def bytes_per_element(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype such as torch.float32, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# Work and traffic, by hand.  Bytes are the *minimum* traffic: every input read once, every output
# written once (what an ideal kernel moves; caches can only make the real number larger or equal).
# --------------------------------------------------------------------------------------------------
def _check_pos(**dims: int) -> None:
    for name, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def matmul_flops(m: int, n: int, k: int) -> int:
    """(m, k) @ (k, n): m·n dot products of length k, one multiply and one add each."""
    _check_pos(m=m, n=n, k=k)
    return 2 * m * n * k


def matmul_bytes(m: int, n: int, k: int, bytes_per_element: int = 4) -> int:
    """Read A (m·k) and B (k·n) once, write C (m·n) once."""
    _check_pos(m=m, n=n, k=k, bytes_per_element=bytes_per_element)
    return (m * k + k * n + m * n) * bytes_per_element


def elementwise_bytes(numel: int, n_inputs: int = 1, n_outputs: int = 1, bytes_per_element: int = 4) -> int:
    """An elementwise op reads each input and writes each output once."""
    _check_pos(numel=numel, bytes_per_element=bytes_per_element)
    return numel * (n_inputs + n_outputs) * bytes_per_element


def softmax_flops(rows: int, cols: int) -> int:
    """Per element: max-compare, subtract, exp, add to the sum, divide — 5 FLOPs (exp counted as 1)."""
    _check_pos(rows=rows, cols=cols)
    return 5 * rows * cols


def softmax_bytes(rows: int, cols: int, bytes_per_element: int = 4) -> int:
    _check_pos(rows=rows, cols=cols)
    return 2 * rows * cols * bytes_per_element


def softmax_by_ops_bytes(rows: int, cols: int, bytes_per_element: int = 4) -> int:
    """:func:`softmax_by_ops`' traffic: max reads s; subtract reads s, writes out; exp reads
    and writes out; sum reads out; divide reads and writes out — 8 full tensors (the
    per-row max and sum are ``cols`` times smaller and left out)."""
    _check_pos(rows=rows, cols=cols)
    return 8 * rows * cols * bytes_per_element


def softmax_by_ops(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension as five kernels: max, subtract, exp, sum, divide.

    Each kernel reads (and the three elementwise ones write) a whole tensor.  ``out``, a
    tensor like ``s``, receives the result and holds the intermediate, so no call
    allocates a large buffer (fresh outputs cost page faults on a CPU).
    """
    m = s.amax(dim=-1, keepdim=True)          # (rows, 1)
    torch.sub(s, m, out=out)                  # s - max, for a safe exp
    out.exp_()
    return out.div_(out.sum(dim=-1, keepdim=True))


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> int:
    """The two matmuls of attention, S = Q Kᵀ and O = P V: 2·(2·N·N·d) per head.

    The softmax (≈ 5·N² per head) is left out, as ``torch.utils.flop_counter`` and the
    FlashAttention papers do.
    """
    _check_pos(batch=batch, heads=heads, seq=seq, head_dim=head_dim)
    return 4 * batch * heads * seq * seq * head_dim


def naive_attention_bytes(batch: int, heads: int, seq: int, head_dim: int, bytes_per_element: int = 4) -> int:
    """Traffic of :func:`naive_attention`, op by op (each op reads its inputs, writes its output).

    S = q Kᵀ: read 2·B·H·N·d, write B·H·N²; S·scale: read+write B·H·N²; softmax: read+write B·H·N²;
    O = P V: read B·H·N² + B·H·N·d, write B·H·N·d.  Total (4·N·d + 6·N²)·B·H elements.
    """
    _check_pos(batch=batch, heads=heads, seq=seq, head_dim=head_dim)
    bh = batch * heads
    return bh * (4 * seq * head_dim + 6 * seq * seq) * bytes_per_element


def attention_layer_flops(batch: int, seq: int, d_model: int) -> int:
    """A multi-head self-attention layer: Q, K, V and output projections plus the attention matmuls.

    Projections: 4 matmuls of (B·N, D) @ (D, D) = 8·B·N·D².  Attention: 4·B·N²·D (independent of
    how D is split into heads).  Softmax and biases are not counted.
    """
    _check_pos(batch=batch, seq=seq, d_model=d_model)
    return 8 * batch * seq * d_model**2 + 4 * batch * seq**2 * d_model


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v, materializing the (…, N, N) score matrix, for
    (batch, heads, seq, head_dim).

    The course's one implementation, :func:`effdl.reference.naive_attention`, held to
    the 4-d shape this chapter's FLOP and byte formulas assume.
    """
    from effdl.reference import naive_attention as attention_naive

    if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    return attention_naive(q, k, v)


def attention_layer(x: torch.Tensor, w_qkv: torch.Tensor, w_out: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention without biases or masks.

    x: (batch, seq, d_model); w_qkv: (d_model, 3·d_model); w_out: (d_model, d_model).
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq, d_model), got shape {tuple(x.shape)}")
    b, n, d_model = x.shape
    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
    if tuple(w_qkv.shape) != (d_model, 3 * d_model) or tuple(w_out.shape) != (d_model, d_model):
        raise ValueError(
            f"expected w_qkv {(d_model, 3 * d_model)} and w_out {(d_model, d_model)}, "
            f"got {tuple(w_qkv.shape)} and {tuple(w_out.shape)}"
        )
    qkv = (x @ w_qkv).view(b, n, 3, heads, d_model // heads)  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)            # each (B, H, N, d)
    o = naive_attention(q, k, v).transpose(1, 2).reshape(b, n, d_model)
    return o @ w_out


# --------------------------------------------------------------------------------------------------
# Measuring the two roofs
# --------------------------------------------------------------------------------------------------
def peak_matmul(device=None, *, n: int = 1024, dtype: torch.dtype = torch.float32,
                warmup: int = 2, repeat: int = 5) -> dict[str, float]:
    """The fastest square matmul of side n, n/2 or n/4, each size timed by its fastest
    repeat: ``{"m": side, "ms": time, "flops": FLOP/s}``.

    Why the fastest and not the median: a peak is what the machine can do; on a shared
    machine the slower repeats measure the neighbours.  Why several sizes: the largest
    is not always the fastest (on a CPU a smaller one may stay in cache).  Kernels
    placed on the roofline use the median.
    """
    _check_pos(n=n)
    dev = resolve_device(device)
    best = {"m": 0, "ms": math.inf, "flops": 0.0}
    for m in sorted({max(1, n // 4), max(1, n // 2), n}):
        a = torch.randn(m, m, device=dev, dtype=dtype)
        b = torch.randn(m, m, device=dev, dtype=dtype)
        res = benchmark(lambda: a @ b, warmup=warmup, repeat=repeat, device=dev)
        flops = matmul_flops(m, m, m) / (res.min_ms * 1e-3)
        if flops > best["flops"]:
            best = {"m": m, "ms": res.min_ms, "flops": flops}
    return best


def peak_compute(device=None, *, n: int = 1024, dtype: torch.dtype = torch.float32,
                 warmup: int = 2, repeat: int = 5) -> float:
    """Peak FLOP/s of ``dtype`` matmuls on ``device``: :func:`peak_matmul`'s best."""
    return peak_matmul(device, n=n, dtype=dtype, warmup=warmup, repeat=repeat)["flops"]


def bandwidths(
    device=None, *, mib: int = 256, warmup: int = 2, repeat: int = 5, add: bool = False
) -> dict[str, float]:
    """Bytes/s of streaming kernels over a ``mib``-MiB buffer, each from its fastest
    repeat.

    ``copy``: ``dst.copy_(src)``, counted as 2 bytes per byte copied (read + write, the
    STREAM convention).  ``read``: ``src.sum()``, 1 byte per byte.  ``add=True`` adds
    ``add``: ``torch.add(src, src2, out=dst)``, 3 bytes per byte (two reads, one write).
    Which stream is fastest differs between machines, so the roof is their best.  Every
    output is preallocated (a fresh one would add page faults), and the buffer must be
    much larger than the last-level cache, or this measures the cache.
    """
    _check_pos(mib=mib)
    dev = resolve_device(device)
    src = torch.ones(mib * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    streams = {"copy": (lambda: dst.copy_(src), 2), "read": (lambda: src.sum(), 1)}
    if add:
        src2 = torch.ones_like(src)
        streams["add"] = (lambda: torch.add(src, src2, out=dst), 3)
    out = {}
    for name, (fn, moved) in streams.items():
        res = benchmark(fn, warmup=warmup, repeat=repeat, device=dev)
        out[name] = moved * src.nbytes / (res.min_ms * 1e-3)
    return out


def peak_bandwidth(device=None, *, mib: int = 256, warmup: int = 2, repeat: int = 5) -> float:
    """Memory bandwidth (bytes/s): the best of a large copy, read and add (:func:`bandwidths`)."""
    return max(bandwidths(device, mib=mib, warmup=warmup, repeat=repeat, add=True).values())


def measure_roofline(device=None, *, matmul_n: int = 1024, copy_mib: int = 256,
                     dtype: torch.dtype = torch.float32, warmup: int = 2, repeat: int = 5) -> Roofline:
    """Measure both roofs of ``device`` (default CPU) for ``dtype`` matmuls.

    The compute roof comes from square matmuls of side n, n/2 and n/4 (:func:`peak_matmul`);
    ``peak_side`` records which one set it, so a prediction can avoid those sizes.
    """
    dev = resolve_device(device)
    best = peak_matmul(dev, n=matmul_n, dtype=dtype, warmup=warmup, repeat=repeat)
    return Roofline(
        peak_flops=best["flops"],
        peak_bandwidth=peak_bandwidth(dev, mib=copy_mib, warmup=warmup, repeat=repeat),
        device=str(dev), dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        peak_side=best["m"],
    )


# --------------------------------------------------------------------------------------------------
# Kernels to place on it
# --------------------------------------------------------------------------------------------------
@dataclass
class Kernel:
    """A zero-argument callable with its work and minimum traffic counted by hand."""

    name: str
    family: str
    fn: Callable[[], Any]
    flops: int
    nbytes: int

    @property
    def intensity(self) -> float:
        return arithmetic_intensity(self.flops, self.nbytes)


def kernel_suite(
    S, device=None, dtype: torch.dtype = torch.float32, *, matmul_sizes: Sequence[int] | None = None
) -> list[Kernel]:
    """Matmuls at several sizes, elementwise add, a sum, a softmax (one kernel and five),
    an exp over the softmax's input, and naive attention.

    ``S`` is the chapter's sizes (``effdl.profile.sizes("measuring")``).
    """
    dev = resolve_device(device)
    e = bytes_per_element(dtype)
    mk = dict(device=dev, dtype=dtype)
    kernels: list[Kernel] = []
    for n in matmul_sizes or S.matmul_sizes:
        a, b = torch.randn(n, n, **mk), torch.randn(n, n, **mk)
        kernels.append(Kernel(f"matmul {n}", "matmul", lambda a=a, b=b: a @ b,
                              matmul_flops(n, n, n), matmul_bytes(n, n, n, e)))
    m = S.elementwise_numel
    x, y, z = torch.randn(m, **mk), torch.randn(m, **mk), torch.empty(m, **mk)
    # why out=: a fresh output buffer this large costs page faults on the CPU, which are
    # the operating system's work, not the kernel's
    kernels.append(Kernel("add", "elementwise", lambda: torch.add(x, y, out=z), m,
                          elementwise_bytes(m, 2, 1, e)))
    kernels.append(Kernel("sum", "reduction", lambda: x.sum(), m - 1,
                          elementwise_bytes(m, 1, 0, e) + e))
    r, c = S.softmax_shape
    s, o = torch.randn(r, c, **mk), torch.empty(r, c, **mk)
    kernels.append(Kernel("softmax", "softmax", lambda: torch.softmax(s, -1, out=o),
                          softmax_flops(r, c), softmax_bytes(r, c, e)))
    kernels.append(Kernel("softmax, 5 ops", "softmax", lambda: softmax_by_ops(s, out=o),
                          softmax_flops(r, c), softmax_by_ops_bytes(r, c, e)))
    # the softmax's one expensive instruction alone, over the same tensor
    kernels.append(Kernel("exp", "elementwise", lambda: torch.exp(s, out=o), r * c,
                          elementwise_bytes(r * c, 1, 1, e)))
    bsz, h, n, d = S.attention
    q, k, v = (torch.randn(bsz, h, n, d, **mk) for _ in range(3))
    kernels.append(Kernel("naive attention", "attention", lambda: naive_attention(q, k, v),
                          attention_flops(bsz, h, n, d) + softmax_flops(bsz * h * n, n),
                          naive_attention_bytes(bsz, h, n, d, e)))
    return kernels


#: below this fraction of its roof, a kernel shorter than OVERHEAD_MS is labelled
#: overhead-bound: its time is the fixed cost of a call, not its FLOPs or bytes
OVERHEAD_EFFICIENCY = 0.10
OVERHEAD_MS = 0.1


def place_kernels(kernels: Sequence[Kernel], roof: Roofline, *, warmup: int = 2, repeat: int = 5,
                  device=None, progress: bool = False) -> list[dict[str, Any]]:
    """Time each kernel; one row with its intensity, achieved FLOP/s and the roof's bound there.

    ``bound``: the side of the ridge the kernel's intensity falls on (``memory`` or
    ``compute``).  ``efficiency`` = achieved / attainable: 1.0 means the kernel runs at its
    roof.  ``limit``: ``overhead`` for a short kernel far below its roof (see
    :data:`OVERHEAD_EFFICIENCY`), else ``bound``.  ``flops_counted`` is what
    ``torch.utils.flop_counter`` reports for the same call.
    """
    from tqdm.auto import tqdm

    rows = []
    for kern in tqdm(kernels, desc="kernels", disable=not progress, leave=False):
        res = benchmark(kern.fn, warmup=warmup, repeat=repeat, device=device)
        sec = res.median_ms * 1e-3
        intensity = kern.intensity
        achieved = kern.flops / sec
        efficiency = achieved / roof.attainable(intensity)
        overhead = efficiency < OVERHEAD_EFFICIENCY and res.median_ms < OVERHEAD_MS
        rows.append(dict(
            kernel=kern.name, family=kern.family, flops=kern.flops, flops_counted=count_flops(kern.fn),
            bytes=kern.nbytes, intensity=intensity, ms=res.median_ms, ms_iqr=res.iqr_ms,
            gflops=achieved / 1e9, gbs=kern.nbytes / sec / 1e9,
            bound_gflops=roof.attainable(intensity) / 1e9, bound=roof.bound(intensity),
            efficiency=efficiency, limit="overhead" if overhead else roof.bound(intensity),
        ))
    return rows


_FAMILY_MARKERS = {"matmul": "o", "elementwise": "s", "reduction": "v", "softmax": "D", "attention": "*"}


def plot_roofline(roof: Roofline, rows: Sequence[dict] = (), *, ax=None, title: str = "",
                  unit: float = 1e9, unit_name: str = "GFLOP/s", annotate: bool = True):
    """Log-log roofline with measured kernels as points (x = intensity, y = achieved FLOP/s)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6.2, 4.0))
    pts = [r for r in rows if r.get("intensity") and r.get("gflops")]
    lo = min([roof.ridge / 100] + [r["intensity"] / 2 for r in pts])
    hi = max([roof.ridge * 20] + [r["intensity"] * 2 for r in pts])
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs, [roof.attainable(x) / unit for x in xs], color="k", lw=2,
            label=f"roof: {roof.peak_flops / unit:.3g} {unit_name}, {roof.peak_bandwidth / 1e9:.3g} GB/s")
    ax.axvline(roof.ridge, color="k", ls=":", lw=1)
    for fam in dict.fromkeys(r["family"] for r in pts):
        sub = [r for r in pts if r["family"] == fam]
        ax.scatter([r["intensity"] for r in sub], [r["gflops"] * 1e9 / unit for r in sub],
                   marker=_FAMILY_MARKERS.get(fam, "o"), s=40, label=fam, zorder=3)
        if annotate:
            for r in sub:
                ax.annotate(r["kernel"], (r["intensity"], r["gflops"] * 1e9 / unit), fontsize=7,
                            xytext=(4, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel(f"achieved ({unit_name})")
    ax.set_title(title or f"measured roofline: {roof.device}, {roof.dtype}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return ax


def roofline_from_rows(rows: Sequence[dict], dtype: str = "float32", device: str = "") -> Roofline:
    """Rebuild the measured :class:`Roofline` from ``peak`` rows (e.g. of a recorded file)."""
    flops = [r["gflops"] for r in rows if r.get("case") == "peak" and r["kernel"].startswith("matmul")
             and r.get("dtype") == dtype]
    bws = [r["gbs"] for r in rows if r.get("case") == "peak" and r["kernel"].split()[0] in ("copy", "read")]
    if not flops or not bws:
        raise ValueError(f"no peak rows for dtype {dtype!r} and copy in these results; "
                         f"dtypes present: {sorted({r.get('dtype') for r in rows if r.get('case') == 'peak'})}")
    return Roofline(max(flops) * 1e9, max(bws) * 1e9, device=device, dtype=dtype)
