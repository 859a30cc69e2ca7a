"""Checks for the chapter "Measuring efficiency" (``checks.<name>(your_function)`` after
``from effdl.measuring import checks``)."""

from __future__ import annotations

import random
import time

import torch

from effdl.checks import assert_close, exercise_check, observe, require, same, when_solved  # noqa: F401


def _f64(x) -> torch.Tensor:
    """A float64 scalar tensor (``torch.as_tensor`` of a Python float would round it to float32)."""
    try:
        return torch.tensor(float(x), dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"expected a number, got {type(x).__name__}: {x!r}") from exc


__all__ = [
    "check_async_timer", "check_matmul_intensity", "check_roofline_time", "check_attention_layer_flops",
    "check_find_bottleneck",
]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_async_timer": ["effdl.measuring.timing.sync_timer"],
    "check_matmul_intensity": ["effdl.measuring.roofline.matmul_flops", "effdl.measuring.roofline.matmul_bytes"],
    "check_roofline_time": ["effdl.measuring.roofline.Roofline.predict_seconds"],
    "check_attention_layer_flops": ["effdl.measuring.roofline.attention_layer_flops"],
    "check_find_bottleneck": [],
}

#: the host clocks a timer may read (in the time module, or imported from it by name)
_CLOCKS = ("perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns")
_MAX_EVENTS = 5000


def _timer_trial(time_on_device, work_s: float, n_kernels: int) -> tuple:
    """Driver (runs where the student's code lives): a fake device with 30 ms of earlier work queued,
    a function launching ``work_s`` of work in ``n_kernels`` kernels (its first call also 'compiles':
    40 ms once).  Returns (what the timer returned, how often it synchronized, what happened in order:
    ``["clock" | "record" | "sync" | "call", device work still queued in ms]``).  A clock reading is
    seen when the timer calls ``time.perf_counter`` and the like (or ``timeit.default_timer``)."""
    import sys
    import threading
    import time as time_module
    import timeit

    from effdl.measuring.timing import FakeAsyncDevice

    dev = FakeAsyncDevice()
    events: list = []
    calls = {"n": 0}

    def seen(kind: str) -> None:
        if len(events) < _MAX_EVENTS:
            events.append([kind, 1e3 * dev.pending_seconds()])

    def fn():
        seen("call")
        calls["n"] += 1
        if calls["n"] == 1:
            dev.launch(0.040)  # the first call also 'compiles': extra device work, once
        for _ in range(n_kernels):
            dev.launch(work_s / n_kernels)

    device_sync, device_event = dev.synchronize, dev.Event

    def synchronize():
        seen("sync")
        device_sync()

    def event(*args, **kwargs):
        e = device_event(*args, **kwargs)
        record = e.record

        def recorded():
            seen("record")
            record()
        e.record = recorded
        return e

    dev.synchronize, dev.Event = synchronize, event

    thread = threading.get_ident()

    def watched(clock):
        def read(*args):
            # the fake device reads the clock too, to play the device, and the kernel's other threads
            # read it for their own reasons: neither is the timer's reading
            if threading.get_ident() == thread and \
                    sys._getframe(1).f_globals.get("__name__") != "effdl.measuring.timing":
                seen("clock")
            return clock(*args)
        return read

    originals = {name: getattr(time_module, name) for name in _CLOCKS}
    spy = {name: watched(clock) for name, clock in originals.items()}
    names = getattr(time_on_device, "__globals__", {})
    own = {k: v for k, v in names.items() if any(v is c for c in originals.values())}
    default_timer = timeit.default_timer
    dev.launch(0.030)  # work someone queued before your timer started
    try:
        for name, clock in spy.items():
            setattr(time_module, name, clock)
        timeit.default_timer = spy["perf_counter"]
        for k, v in own.items():
            names[k] = next(spy[n] for n, c in originals.items() if c is v)
        got = time_on_device(fn, dev)
    finally:
        for name, clock in originals.items():
            setattr(time_module, name, clock)
        timeit.default_timer = default_timer
        names.update(own)
    return got, dev.synchronizations, events


def _timed_windows(events: list) -> list[tuple[int, int]]:
    """(open, close) positions of the timed windows: between two consecutive readings of the clock
    (or two recorded events) with at least one call in between and, for the clock, a synchronize
    after the last call (a window read without it is the launch-only mistake, judged elsewhere)."""
    marks = [i for i, (kind, _) in enumerate(events) if kind in ("clock", "record")]
    windows = []
    for a, b in zip(marks, marks[1:]):
        inside = [events[i][0] for i in range(a + 1, b)]
        if "call" not in inside:
            continue
        last_call = max(i for i in range(a + 1, b) if events[i][0] == "call")
        synced = any(events[i][0] == "sync" for i in range(last_call + 1, b))
        if events[a][0] == "record" or synced:
            windows.append((a, b))
    return windows


@exercise_check(student="time_on_device")
def check_async_timer(time_on_device) -> None:
    """``time_on_device(fn, device) -> float``: median ms of ``fn()`` on an asynchronous device."""
    rng = random.Random(0)
    for n_kernels in (1, 3):
        work_s = rng.uniform(0.004, 0.008)
        got, synchronizations, events = observe(time_on_device, _timer_trial, work_s, n_kernels)
        require(isinstance(got, (int, float)) and not isinstance(got, bool),
                f"return a number of milliseconds, got {type(got).__name__}")
        true_ms = work_s * 1e3
        require(synchronizations > 0,
                "your timer never called device.synchronize(): the host clock then only sees the launches")
        unit = (" (that looks like seconds: the exercise asks for milliseconds)"
                if 0.8 * true_ms <= got * 1e3 <= 1.3 * true_ms + 2.0 else "")
        require(got >= 0.8 * true_ms,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: you timed the "
                "launch, not the work (synchronize before reading the clock)" + unit)
        windows = _timed_windows(events)
        first_call = next((i for i, (kind, _) in enumerate(events) if kind == "call"), None)
        if windows and first_call is not None:
            require(not any(a < first_call < b for a, b in windows),
                    "your timer timed the first call of fn, which pays one-off costs (compilation, caches): "
                    "warm up with a few untimed calls first (here the first call queues 40 ms of extra work; "
                    "a median hides it only when most calls are warm, and a mean does not hide it at all)")
            late = [events[a][1] for a, _ in windows if events[a][0] == "clock" and events[a][1] > 0.5]
            if late:
                raise AssertionError(
                    f"your timer started the clock with {late[0]:.1f} ms of earlier work still queued on the "
                    "device (from before your timer, or from your warm-up): synchronize before starting "
                    "the clock, or that work is charged to the call you time")
        per_call = sum(events[i][0] == "call" for a, b in windows for i in range(a + 1, b)) or \
            sum(e[0] == "call" for e in events)
        total = (f" (that is about the time of all {per_call} calls together: divide by the number of calls)"
                 if per_call > 1 and 0.8 * true_ms <= got / per_call <= 1.3 * true_ms + 2.0 else "")
        require(got <= 1.3 * true_ms + 2.0,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: earlier work or "
                "the first call's one-off cost leaked in (warm up, synchronize before starting the clock, "
                "take the median)" + total)


@exercise_check(student="matmul_intensity")
def check_matmul_intensity(student) -> None:
    """``matmul_intensity(m, n, k, bytes_per_element) -> float`` FLOP/byte of (m,k) @ (k,n)."""
    from effdl.measuring.roofline import arithmetic_intensity, matmul_bytes, matmul_flops

    rng = random.Random(1)
    cases = [(1, 1, 1, 4), (1, 4096, 4096, 2), (97, 33, 1025, 4), (4096, 4096, 4096, 2)]
    cases += [(rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(1, 3000), rng.choice([1, 2, 4, 8]))
              for _ in range(6)]
    for m, n, k, e in cases:
        want = arithmetic_intensity(matmul_flops(m, n, k), matmul_bytes(m, n, k, e))
        assert_close(_f64(student(m, n, k, e)), want, what=f"matmul_intensity(m={m}, n={n}, k={k}, "
                     f"bytes_per_element={e})", rtol=1e-9, atol=0)


@exercise_check(student="roofline_time")
def check_roofline_time(student) -> None:
    """``roofline_time(flops, nbytes, peak_flops, peak_bandwidth) -> float`` lower bound in seconds."""
    from effdl.measuring.roofline import Roofline

    rng = random.Random(2)
    for _ in range(12):
        roof = Roofline(10 ** rng.uniform(10, 15), 10 ** rng.uniform(9, 12.5))
        intensity = roof.ridge * 10 ** rng.uniform(-2, 2)
        nbytes = 10 ** rng.uniform(3, 10)
        flops = intensity * nbytes
        want = roof.predict_seconds(flops, nbytes)
        got = student(flops, nbytes, roof.peak_flops, roof.peak_bandwidth)
        assert_close(_f64(got), want, what=f"roofline_time for a {roof.bound(intensity)}-bound kernel "
                     f"(intensity {intensity:.3g} FLOP/byte, ridge {roof.ridge:.3g})", rtol=1e-9, atol=0)


@exercise_check(student="attention_layer_flops")
def check_attention_layer_flops(student) -> None:
    """``attention_layer_flops(batch, seq, d_model) -> int``: projections + attention matmuls."""
    from effdl.measure import count_flops
    from effdl.measuring.roofline import attention_layer
    from effdl.measuring.roofline import attention_layer_flops as reference

    g = torch.Generator().manual_seed(3)
    for b, n, d_model, heads in ((1, 7, 8, 2), (2, 33, 24, 3), (3, 97, 64, 4), (1, 128, 48, 1)):
        x = torch.randn(b, n, d_model, generator=g)
        w_qkv = torch.randn(d_model, 3 * d_model, generator=g)
        w_out = torch.randn(d_model, d_model, generator=g)
        counted = count_flops(lambda: attention_layer(x, w_qkv, w_out, heads))
        got = student(b, n, d_model)
        require(int(got) == reference(b, n, d_model),
                f"attention_layer_flops(batch={b}, seq={n}, d_model={d_model}) = {got}, but torch's flop counter "
                f"counts {counted} for the layer (projections: 4 matmuls (B·N, D) @ (D, D); attention: "
                "Q Kᵀ and P V)")
        require(counted == reference(b, n, d_model), "internal: the reference disagrees with the counter")


def _bottleneck_trial(find_bottleneck, plan: list) -> object:
    """Driver (runs where the student's code lives): ``plan`` is [(name, first_ms, then_ms), ...];
    each stage sleeps ``first_ms`` on its first call and ``then_ms`` after.  Returns the answer."""
    def stage(first_ms, then_ms):
        state = {"calls": 0}

        def fn():
            state["calls"] += 1
            time.sleep((first_ms if state["calls"] == 1 else then_ms) / 1e3)
        return fn

    return find_bottleneck({name: stage(first, then) for name, first, then in plan})


@exercise_check(student="find_bottleneck")
def check_find_bottleneck(student) -> None:
    """``find_bottleneck(stages) -> (name, share)``: the stage with the largest steady-state time."""
    rng = random.Random(4)
    names = ["load", "decode", "resize", "model", "postprocess"]
    rng.shuffle(names)
    steady = {names[0]: 14.0, names[1]: 3.0, names[2]: 5.0, names[3]: 1.0, names[4]: 0.5}
    first = {**steady, names[3]: 120.0}  # a slow first call (compilation, a cold cache) fools a one-shot timer
    order = list(steady)
    rng.shuffle(order)
    got = observe(student, _bottleneck_trial, [(n, first[n], steady[n]) for n in order])
    require(isinstance(got, tuple) and len(got) == 2, f"return (name, share), got {got!r}")
    name, share = got
    want_share = steady[names[0]] / sum(steady.values())
    require(name == names[0],
            f"you picked {name!r}; in steady state {names[0]!r} takes {steady[names[0]]} ms per call and "
            f"{name!r} {steady.get(name, '?')} ms (did a one-off first call fool you? warm up first)")
    require(abs(float(share) - want_share) < 0.2,
            f"share {share:.2f} of the total, expected about {want_share:.2f} (its time over the sum of all stages)")
