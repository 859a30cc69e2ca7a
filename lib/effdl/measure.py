"""Measuring honestly: time, peak memory, FLOPs, and the record that goes with a number.

- :func:`benchmark` — warm-up, repeats, median and inter-quartile range.  On CUDA every repeat is
  timed with CUDA events after a synchronize, never with a bare host clock around asynchronous work.
  ``flush=True`` times every repeat with cold caches (:func:`last_level_cache_bytes`,
  :func:`flush_buffer`).
- :func:`peak_memory` — the peak bytes allocated while ``fn`` runs, on the CPU (from the PyTorch
  profiler's allocation events) or on CUDA (from the caching allocator's statistics).
- :func:`count_flops` — floating-point operations counted by ``torch.utils.flop_counter``.
- :func:`run_meta` — device, versions, date and profile: every recorded number carries it.

The harness every chapter's benchmark shares:

- :func:`interleaved` / :func:`paired_ratio` — compare versions in one run, round by round, and
  report ratios with their spread (a drift in the machine's speed hits every version alike);
- :func:`torch_threads`, :func:`thread_check`, :func:`cpu_thread_policy` — how many CPU threads a
  measurement uses, decided once and always restored.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchResult", "benchmark", "peak_memory", "count_flops", "run_meta", "resolve_device",
           "torch_threads", "thread_check", "cpu_thread_policy", "interleaved", "paired_ratio",
           "quartiles", "last_level_cache_bytes", "flush_buffer"]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (``None``: leave as is), then restore the old number.

    Why: every CPU op splits itself across the threads and ends when the slowest is done; for tiny
    ops, or on a shared machine with more busy threads than cores, one thread can be many times
    faster (the measuring chapter measures this).  Benchmarks choose, and never leak, the setting.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quartiles(values) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("quartiles of an empty list")
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def thread_check(n: int = 256, rounds: int = 30, *, resamples: int = 1000) -> dict:
    """Is this CPU oversubscribed?  Time single calls of an n×n matmul with all of torch's threads
    and with one, interleaved, and compare their MEAN times (ratio = all threads / one thread).

    On an idle multi-core machine more threads are faster (ratio < 1).  When other jobs keep the
    cores busy, a parallel kernel now and then waits at a barrier for a descheduled thread — a stall
    of a whole scheduler time slice — and the ratio goes above 1.  The mean, not the median or the
    minimum, is the criterion because occasional stalls are exactly the cost in question.

    The spread: ``ratio_lo``/``ratio_hi`` bound the middle 90% of the ratio over ``resamples``
    bootstrap resamples of the rounds.  ``one_thread_wins`` only when the whole interval is
    above 1: a difference inside the noise changes nothing.  The thread count is restored.
    """
    import random

    if n < 1 or rounds < 1:
        raise ValueError(f"need n >= 1 and rounds >= 1, got n={n}, rounds={rounds}")
    threads = torch.get_num_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    many: list[float] = []
    one: list[float] = []
    with torch_threads(None):  # restores the count, whatever happens below
        for i in range(rounds + 2):
            for k in ((threads, 1) if i % 2 == 0 else (1, threads)):
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                a @ b
                t = (time.perf_counter() - t0) * 1e3
                if i >= 2:  # the first two rounds are warm-up
                    (many if k == threads and threads > 1 else one).append(t)
    many = many or one
    pairs = list(zip(many, one))
    rng = random.Random(0)
    boot = sorted(
        statistics.fmean(p[0] for p in sample) / statistics.fmean(p[1] for p in sample)
        for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(resamples))
    )
    lo, hi = boot[int(0.05 * (resamples - 1))], boot[int(0.95 * (resamples - 1))]
    ratio = statistics.fmean(many) / statistics.fmean(one)
    return dict(threads=threads, all_threads_ms=statistics.fmean(many),
                one_thread_ms=statistics.fmean(one), ratio=ratio, ratio_lo=lo, ratio_hi=hi,
                rounds=rounds, one_thread_wins=threads > 1 and lo > 1.0)


def _one_thread_wins(info: dict) -> bool:
    """The decision :func:`cpu_thread_policy` and the measuring chapter take from a check."""
    return bool(info.get("one_thread_wins", info["ratio"] > 1.0))


@contextlib.contextmanager
def cpu_thread_policy(device, threads: int | str | None = "auto"):
    """The thread count a CPU measurement runs with, always restored afterwards.

    ``threads``: ``None`` leaves torch's setting; an int sets it; ``"auto"`` runs
    :func:`thread_check` and uses one thread when all threads are slower beyond the noise (an
    oversubscribed machine).  On a GPU nothing changes.  Yields a dict saying what was decided (for a result row).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    bad_int = not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
    if threads is not None and threads != "auto" and bad_int:
        raise ValueError(f"threads must be None, 'auto' or a positive int, got {threads!r}")
    with torch_threads(None):
        info: dict[str, Any] = {}
        if dev.type == "cpu" and threads == "auto":
            info = thread_check()
            if _one_thread_wins(info):
                torch.set_num_threads(1)
        elif dev.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)
        info["threads_used"] = torch.get_num_threads()
        yield info

#: where Linux describes the first CPU's caches (index0, index1, ...: level, type, size)
CPU_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
#: the last-level cache assumed when the machine does not say (a large server L3)
FALLBACK_LLC_BYTES = 64 * 2**20


def _parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``32768K``, ``1M`` or ``512``."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _cpu_llc_bytes(root: Path) -> int | None:
    """Bytes of the highest-level data (or unified) cache listed under ``root``."""
    best: tuple[int, int] | None = None  # (level, bytes)
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or level > best[0]):
            best = (level, size)
    return best[1] if best else None


def last_level_cache_bytes(device: str | torch.device | None = None) -> int:
    """Bytes of the last cache before main memory.

    CUDA: the GPU's L2 (``torch.cuda.get_device_properties(...).L2_cache_size``).
    CPU: the highest-level data cache Linux lists in :data:`CPU_CACHE_SYSFS`.  When the
    machine does not say, :data:`FALLBACK_LLC_BYTES`.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
    else:
        size = _cpu_llc_bytes(CPU_CACHE_SYSFS)
    return int(size) if size else FALLBACK_LLC_BYTES


def flush_buffer(device: str | torch.device | None = None) -> torch.Tensor:
    """A buffer twice the last-level cache: writing all of it evicts what was cached.

    ``buf.zero_()`` between timed calls is how ``triton.testing.do_bench`` clears the
    GPU's L2 (it zeroes a fixed 256 MiB); the size here comes from the machine.
    """
    dev = resolve_device(device)
    n = 2 * last_level_cache_bytes(dev) // 4
    return torch.empty(n, dtype=torch.int32, device=dev)


def _flush_names(flush: bool | Collection[str], names: Collection[str]) -> set[str]:
    """Which versions :func:`interleaved` times with cold caches."""
    if isinstance(flush, bool):
        return set(names) if flush else set()
    if isinstance(flush, str) or not isinstance(flush, Collection):
        raise TypeError(f"flush must be a bool or a collection of names, got {flush!r}")
    unknown = set(flush) - set(names)
    if unknown:
        raise ValueError(f"flush names {sorted(unknown)} are not among {sorted(names)}")
    return set(flush)


def _one_call_ms(
    fn: Callable[[], Any], dev: torch.device, flush: torch.Tensor | None = None
) -> float:
    """Milliseconds of one call: on CUDA between two events (never just the launch), as
    in :func:`benchmark`; on the CPU from the host clock.  ``flush``: a buffer written
    just before the clock starts: the call finds cold caches, the writing goes untimed.
    """
    if flush is not None:
        flush.zero_()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # why: earlier work must not land in this call
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    flush: bool | Collection[str] = False,
) -> dict[str, BenchResult]:
    """Time several versions in rounds: each round calls every version once, the order
    rotating.

    Why: on a shared machine the speed drifts (other jobs, clock boost, heat).  Timing
    all of A and then all of B lets a drift masquerade as a difference; round by round
    every version sees the same machine.  Returns one :class:`BenchResult` per name;
    ``times_ms[r]`` is round ``r``, so per-round ratios (see :func:`paired_ratio`) pair
    measurements taken moments apart.  ``flush``: ``True`` clears the caches before
    every timed call (as :func:`benchmark` does), or a collection of the names to time
    cold.
    """
    if not isinstance(fns, dict) or not fns:
        raise TypeError(
            "interleaved expects a non-empty dict of name -> zero-argument callable"
        )
    _check_timing_args("interleaved", list(fns.values()), repeat=rounds, warmup=warmup,
                       repeat_name="rounds")
    dev = resolve_device(device)
    cold = _flush_names(flush, fns)
    buf = flush_buffer(dev) if cold else None
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = _timed_rounds(fns, rounds, dev, cold, buf)
    return {n: BenchResult(times_ms=t, device=str(dev), warmup=warmup, label=str(n),
                           meta={"flush": n in cold})
            for n, t in times.items()}


def _timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int, dev: torch.device,
                  cold: Collection[str] = (), buf: torch.Tensor | None = None
                  ) -> dict[str, list[float]]:
    """Milliseconds of every version in every round: each round calls each version once,
    starting one version further along than the round before."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        # why: rotate, so no version always runs right after another
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            f = buf if name in cold else None
            times[name].append(_one_call_ms(fns[name], dev, f))
    return times


def paired_ratio(
    fn_a: Callable[[], Any],
    fn_b: Callable[[], Any],
    *,
    warmup: int = 2,
    repeat: int = 10,
    device=None,
) -> dict:
    """A's time over B's, measured interleaved: the median of the per-round ratios and
    its quartiles.

    ``ratio < 1``: A is faster.  Each round times A and B moments apart (order
    alternating), so the ratio of a round cancels the machine's speed at that moment;
    the quartiles of the ratios are the spread to report with it.
    """
    res = interleaved(
        {"a": fn_a, "b": fn_b}, rounds=repeat, warmup=warmup, device=device
    )
    ta, tb = res["a"].times_ms, res["b"].times_ms
    lo, med, hi = quartiles([a / b for a, b in zip(ta, tb)])
    return dict(ratio=med, ratio_q1=lo, ratio_q3=hi, a_ms=statistics.median(ta),
                b_ms=statistics.median(tb), a_times=ta, b_times=tb)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cpu``; validates that a CUDA device is really usable."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was requested but CUDA is not available on this machine; "
            "pass device='cpu' (or leave it None), or run on a GPU runtime"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}: effdl.measure handles 'cpu' and 'cuda'")
    return dev


@dataclass
class BenchResult:
    """Timings of one function: all in milliseconds."""

    times_ms: list[float]
    device: str
    warmup: int
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range: the spread that ignores the odd outlier."""
        if len(self.times_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median_ms=self.median_ms, iqr_ms=self.iqr_ms)
        return d

    @property
    def quartiles_ms(self) -> tuple[float, float, float]:
        """(25th percentile, median, 75th percentile) of the times."""
        return quartiles(self.times_ms)

    def __str__(self) -> str:  # e.g. "mm: median 12.31 ms (IQR 12.10–12.50, 20 runs, cpu)"
        name = f"{self.label}: " if self.label else ""
        cold = ", cold caches" if self.meta.get("flush") else ""
        q1, med, q3 = self.quartiles_ms
        return (
            f"{name}median {med:.3g} ms (IQR {q1:.3g}–{q3:.3g}, "
            f"{len(self.times_ms)} runs, {self.device}{cold})"
        )


def benchmark(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeat: int = 10,
    device: str | torch.device | None = None,
    label: str = "",
    flush: bool = False,
) -> BenchResult:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed calls.

    Each timed call is :func:`_one_call_ms`: on CUDA between two CUDA events (a host
    clock would only measure the launch), on the CPU from a monotonic clock.
    ``flush=True``: before every timed call, write a buffer twice the size of the
    last-level cache (:func:`flush_buffer`), outside the timed region (cold caches).
    """
    _check_timing_args("benchmark", [fn], repeat=repeat, warmup=warmup)
    if not isinstance(flush, bool):
        raise TypeError(f"flush must be True or False, got {flush!r}")
    dev = resolve_device(device)
    buf = flush_buffer(dev) if flush else None
    # why: first calls pay for lazy init, allocator growth, compilation
    for _ in range(warmup):
        fn()
    times = [_one_call_ms(fn, dev, buf) for _ in range(repeat)]
    meta = {"flush": flush, "flush_bytes": buf.numel() * 4 if buf is not None else 0}
    return BenchResult(times_ms=times, device=str(dev), warmup=warmup, label=label,
                       meta=meta)


def _check_timing_args(who: str, fns, *, repeat: int, warmup: int,
                       repeat_name: str = "repeat") -> None:
    """Errors that name the fix: callables taking no arguments, repeat >= 1, warmup >= 0."""
    bad = next((f for f in fns if not callable(f)), None)
    if bad is not None or not fns:
        raise TypeError(
            f"{who} expects a callable taking no arguments, got {type(bad).__name__}"
        )
    if repeat < 1 or warmup < 0:
        raise ValueError(
            f"need {repeat_name} >= 1 and warmup >= 0, "
            f"got {repeat_name}={repeat}, warmup={warmup}"
        )


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints 'profiler_start/stop'."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (some notebook front ends)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes allocated *during* ``fn``, from the profiler's allocation records.

    Every allocation and free is recorded with its own time stamp; replaying them in time order gives
    the live-bytes curve, and its maximum is the peak.  Temporaries allocated and freed *inside* one op
    (autograd's backward nodes do this) count too.  Fallback for a torch without the raw event tree:
    each op's net bytes (a resolution of one op).
    """
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr_fd():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        from torch._C._profiler import _EventType

        deltas: list[tuple[int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
                deltas.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
            stack.extend(node.children)
    except (ImportError, AttributeError):
        deltas = [(int(e.time_range.start * 1e3), int(e.self_cpu_memory_usage))
                  for e in prof.events() if e.self_cpu_memory_usage]
    deltas.sort(key=lambda t: t[0])
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return int(peak)


def peak_memory(
    fn: Callable[[], Any], device: str | torch.device | None = None
) -> int:
    """Peak bytes allocated by ``fn()`` above what was live before it ran.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset.  CPU: the PyTorch
    profiler's allocation records replayed in time order (tensors only; Python objects
    are not counted).
    """
    if not callable(fn):
        raise TypeError(
            "peak_memory expects a callable taking no arguments, "
            f"got {type(fn).__name__}"
        )
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    return _cpu_peak_bytes(fn)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter`` (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _device_meta(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "device": "cuda",
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": int(props.total_memory),
        }
    return {
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def run_meta(device: str | torch.device | None = None, profile: str | None = None) -> dict[str, Any]:
    """Provenance of a result: device, versions, date, profile."""
    from effdl import __version__
    from effdl.profile import current

    dev = resolve_device(device)
    meta: dict[str, Any] = {
        **_device_meta(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "effdl": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "profile": current(profile),
        "platform": platform.platform(),
    }
    try:
        import triton  # noqa: F401

        meta["triton"] = triton.__version__
    except Exception:  # triton missing or broken: record that, do not fail
        meta["triton"] = None
    return meta
