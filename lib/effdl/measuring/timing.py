"""Timing, the naive way and the right way.

- :func:`naive_time` — one host-clock reading around one call: what goes wrong is the lesson.
- :func:`call_times` — the time of each of the first calls: warm-up made visible.
- :class:`FakeAsyncDevice` — a stand-in for a GPU stream on any machine: a launch returns at once,
  the work finishes later.  It shows why a host clock without synchronization times the launch.
- :func:`sync_timer` — a correct timer for any asynchronous device with a ``synchronize()``.
- :func:`cache_effect` — the same read timed with warm and with cold caches, interleaved.

Comparing two versions by a ratio measured in one interleaved run is the course's shared harness:
:func:`effdl.measure.paired_ratio` (and :func:`effdl.measure.thread_check` for the CPU's threads).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["naive_time", "call_times", "FakeAsyncDevice", "FakeEvent", "sync_timer",
           "cache_effect"]


def naive_time(fn: Callable[[], Any]) -> float:
    """Milliseconds of ONE call, read from the host clock: no warm-up, no repeats,
    no sync."""
    if not callable(fn):
        raise TypeError(
            "naive_time expects a callable taking no arguments, "
            f"got {type(fn).__name__}"
        )
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def call_times(fn: Callable[[], Any], n: int = 5) -> list[float]:
    """Milliseconds of each of ``n`` consecutive calls (call 1 pays the first-call costs)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [naive_time(fn) for _ in range(n)]


class FakeEvent:
    """A marker in a :class:`FakeAsyncDevice`'s queue, like ``torch.cuda.Event(enable_timing=True)``."""

    def __init__(self, device: FakeAsyncDevice):
        self._device = device
        self._t: float | None = None

    def record(self) -> None:
        """Enqueue the marker: it 'happens' when the device has finished all work queued before it."""
        self._t = self._device._enqueue(0.0)

    def synchronize(self) -> None:
        if self._t is None:
            raise RuntimeError("synchronize() on an event that was never recorded; call record() first")
        self._device._wait_until(self._t)

    def elapsed_time(self, end: FakeEvent) -> float:
        """Milliseconds between this event and ``end`` (both must have been reached, like CUDA)."""
        if self._t is None or end._t is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        if time.perf_counter() < max(self._t, end._t):
            raise RuntimeError("elapsed_time() on an event the device has not reached: synchronize first")
        return (end._t - self._t) * 1e3


class FakeAsyncDevice:
    """An asynchronous device simulated in real time on the host.

    ``launch(seconds)`` queues that much work and returns after ``launch_overhead_s`` (the host cost
    of a kernel launch); the device works through its queue in order, in the background of real
    time.  ``synchronize()`` blocks until the queue is empty.  This is how a CUDA stream behaves,
    which is why ``time.perf_counter()`` around a launch measures the launch only.
    """

    def __init__(self, launch_overhead_s: float = 20e-6):
        if launch_overhead_s < 0:
            raise ValueError(f"launch_overhead_s must be >= 0, got {launch_overhead_s}")
        self.launch_overhead_s = launch_overhead_s
        self._busy_until = time.perf_counter()
        self.launches = 0
        self.synchronizations = 0
        self.busy_seconds = 0.0  # total work ever queued: the ground truth a timer should find

    def _enqueue(self, seconds: float) -> float:
        start = max(time.perf_counter(), self._busy_until)
        self._busy_until = start + seconds
        return self._busy_until

    def _wait_until(self, t: float) -> None:
        while (left := t - time.perf_counter()) > 0:
            time.sleep(min(left, 0.05))

    def launch(self, seconds: float) -> None:
        """Queue ``seconds`` of device work; return after the launch overhead only."""
        if seconds < 0:
            raise ValueError(f"work must be >= 0 seconds, got {seconds}")
        t0 = time.perf_counter()
        self._enqueue(seconds)
        self.launches += 1
        self.busy_seconds += seconds
        # the host-side cost of a launch
        while time.perf_counter() - t0 < self.launch_overhead_s:
            pass

    def kernel(self, seconds: float) -> Callable[[], None]:
        """A zero-argument 'kernel' that launches ``seconds`` of work each call."""
        return lambda: self.launch(seconds)

    def synchronize(self) -> None:
        """Block until all queued work is done."""
        self.synchronizations += 1
        self._wait_until(self._busy_until)

    def Event(self, enable_timing: bool = True) -> FakeEvent:  # noqa: N802 - mirrors torch.cuda.Event
        return FakeEvent(self)

    def pending_seconds(self) -> float:
        return max(0.0, self._busy_until - time.perf_counter())


def sync_timer(
    fn: Callable[[], Any], device, *, warmup: int = 3, repeat: int = 10
) -> float:
    """Median milliseconds of ``fn()`` on an asynchronous ``device`` (anything with
    ``synchronize()``).

    Warm up; drain the queue so earlier work is not charged to us; then around each call
    synchronize before starting the clock and before stopping it.
    """
    if not callable(fn):
        raise TypeError(
            "sync_timer expects a callable taking no arguments, "
            f"got {type(fn).__name__}"
        )
    if repeat < 1 or warmup < 0:
        raise ValueError(
            "need repeat >= 1 and warmup >= 0, "
            f"got repeat={repeat}, warmup={warmup}"
        )
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        # why: work queued earlier must not land in this timing
        device.synchronize()
        t0 = time.perf_counter()
        fn()
        device.synchronize()  # why: wait for the work, not just its launch
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cache_effect(
    fractions, *, rounds: int = 11, warmup: int = 2, device=None
) -> list[dict]:
    """Sum a buffer of each ``fraction`` of the last-level cache, warm and cold.

    Both versions run interleaved, round by round (:func:`effdl.measure.interleaved`);
    the cold one writes a buffer of twice the cache first (``flush``, untimed).  Per
    size: the quartiles of each one's milliseconds, and the median and quartiles of the
    per-round ratio cold / warm.
    """
    import torch

    from effdl.measure import interleaved, last_level_cache_bytes, quartiles, resolve_device

    dev = resolve_device(device)
    llc = last_level_cache_bytes(dev)
    rows = []
    for frac in fractions:
        if frac <= 0:
            raise ValueError(f"buffer fractions of the cache must be > 0, got {frac}")
        x = torch.randn(max(1, int(frac * llc) // 4), device=dev)  # float32: 4 bytes
        res = interleaved({"warm": x.sum, "cold": x.sum}, rounds=rounds, warmup=warmup,
                          device=dev, flush={"cold"})
        warm, cold = res["warm"].times_ms, res["cold"].times_ms
        q1, ratio, q3 = quartiles([c / w for c, w in zip(cold, warm)])
        rows.append(dict(
            fraction=frac, bytes=4 * x.numel(), llc_bytes=llc,
            warm_ms=quartiles(warm), cold_ms=quartiles(cold),
            ratio=ratio, ratio_q1=q1, ratio_q3=q3,
        ))
    return rows
