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
    "check_find_bottleneck", "check_read_profile",
]

#: the library functions that answer each check: refused as answers, and held back in the student
#: version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_async_timer": ["effdl.measuring.timing.sync_timer"],
    "check_matmul_intensity": ["effdl.measuring.roofline.matmul_flops", "effdl.measuring.roofline.matmul_bytes"],
    "check_roofline_time": ["effdl.measuring.roofline.Roofline.predict_seconds"],
    "check_attention_layer_flops": ["effdl.measuring.roofline.attention_layer_flops"],
    "check_find_bottleneck": [],
    "check_read_profile": ["effdl.measuring.profiling.read_profile", "effdl.measuring.profiling.self_times"],
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



# ------------------------------------------------------------------------------ read a profile
#: synthetic traces with answers worked out by hand: (what it tests, events as (name, ts, dur, tid) in ns,
#: the bottleneck, the idle fraction)
_TRACES = [
    ("nested operators, a second thread",
     [("load_batch", 0, 5000, 1), ("aten::stack", 4000, 800, 1),
      ("model", 6000, 10000, 1), ("forward", 6000, 3000, 1), ("aten::addmm", 6100, 2800, 1),
      ("backward", 9500, 6000, 1), ("aten::mm", 9600, 2400, 1),
      ("log_metrics", 10000, 7000, 2), ("aten::_linalg_svd", 10100, 6800, 2),
      ("aten::mm", 12100, 3300, 1), ("aten::item", 18000, 500, 1)],
     # self: mm 2400 + 3300, load_batch 5000 - 800, model 10000 - 3000 - 6000; the rest is smaller
     "aten::mm", 3000 / 18500),
    ("many small calls, a wait, a helper thread with a smaller id",
     [("load_batch", 0, 6000, 7)]
     + [("aten::copy_", 200 + 500 * i, 400, 7) for i in range(10)]
     + [("pin_memory", 1000, 17000, 3), ("aten::_pin_memory", 1100, 15900, 3),
        ("forward", 8000, 3000, 7), ("aten::addmm", 8200, 2800, 7),
        ("backward", 12000, 3000, 7), ("aten::mm", 12500, 2000, 7), ("aten::add_", 14500, 400, 7),
        ("aten::item", 20000, 100, 7)],
     # self: copy_ 10 x 400, addmm 2800, load_batch 6000 - 4000, mm 2000; gaps 6000-8000, 11000-12000,
     # 15000-20000 in a span of 20100
     "aten::copy_", 8000 / 20100),
]


def _trace(rows: list) -> list[dict]:
    """Events as the exercise gives them: dicts sorted by start, longest first among equal starts."""
    events = [dict(name=n, ts=ts, dur=dur, tid=tid) for n, ts, dur, tid in rows]
    return sorted(events, key=lambda e: (e["ts"], -e["dur"]))


def _top_level(events: list, tid: int) -> list[dict]:
    """The events of thread ``tid`` nested in no other event of that thread."""
    from effdl.measuring.profiling import _nest

    return [e for e, parent in _nest(events, tid) if parent is None]


def _mistakes(events: list) -> tuple[dict[str, list[str]], list[tuple[float, str]]]:
    """What the plausible mistakes answer on ``events``: (bottleneck name -> mistakes giving it,
    [(idle value, mistake)])."""
    from effdl.measuring.profiling import _nest, main_thread, self_times

    tid = main_thread(events)
    tids = sorted({e["tid"] for e in events})
    mine = [e for e in events if e["tid"] == tid]
    start, end = min(e["ts"] for e in mine), max(e["ts"] + e["dur"] for e in mine)
    span = end - start
    by_name: dict[str, list[str]] = {}

    def named(totals: dict, why: str) -> None:
        by_name.setdefault(max(totals, key=totals.get), []).append(why)

    total: dict[str, int] = {}
    for e in mine:
        total[e["name"]] = total.get(e["name"], 0) + e["dur"]
    named(total, "that name has the largest total time (duration with its children's time inside): the "
                 "bottleneck is the largest self time, an event's duration minus its children's")
    for t in tids:
        if t != tid:
            named(self_times(events, t), f"that is the bottleneck of thread {t}; the main thread is the thread "
                                         f"of the first event, thread {tid} here")
    every: dict[str, int] = {}
    for t in tids:
        for k, v in self_times(events, t).items():
            every[k] = every.get(k, 0) + v
    named(every, "that name wins when every thread counts: read the main thread only (the thread of the "
                 "first event), other threads run alongside it")
    single: dict[str, int] = {}
    tree = _nest(events, tid)
    own = [e["dur"] for e, _ in tree]
    for e, parent in tree:
        if parent is not None:
            own[parent] -= e["dur"]
    for (e, _), t in zip(tree, own):
        single[e["name"]] = max(single.get(e["name"], 0), t)
    named(single, "that name has the largest self time of a single event: add up the self times of all "
                  "the events with the same name")

    busy = sum(e["dur"] for e in _top_level(events, tid))
    idle = (span - busy) / span
    idles = [(1 - sum(e["dur"] for e in mine) / span,
              "you added up every event's duration, nested ones too: an operator inside a region is "
              "counted twice; only the top-level events (nested in no other) cover the thread"),
             (max(0.0, 1 - sum(e["dur"] for e in mine) / span),
              "you added up every event's duration, nested ones too (and clipped at 0): only the "
              "top-level events (nested in no other) cover the thread")]
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for t in tids for e in _top_level(events, t))
    union, reach = 0, t0
    for a, b in spans:
        if b > reach:
            union += b - max(a, reach)
            reach = b
    for value in ((span - union) / span, (t1 - t0 - union) / (t1 - t0),
                  1 - sum(b - a for a, b in spans) / span, max(0.0, 1 - sum(b - a for a, b in spans) / span)):
        idles.append((value, "other threads' events filled the main thread's gaps: the idle fraction is "
                             "of the main thread alone (the thread of the first event)"))
    for scale, unit in ((1, "nanoseconds"), (1e3, "microseconds"), (1e6, "milliseconds"), (1e9, "seconds")):
        idles.append(((span - busy) / scale, f"that is the idle time in {unit}, not a fraction: divide by "
                                             "the span, from the first event's start to the last one's end"))
    idles.append((100 * idle, "that is a percentage: return a fraction between 0 and 1"))
    idles.append((1 - idle, "that is the busy fraction: the idle fraction is the part no top-level event covers"))
    return by_name, idles


def _judge_profile(got, events: list, what: str) -> None:
    from effdl.measuring.profiling import main_thread, read_profile, self_times

    want_name, want_idle = read_profile(events)
    require(isinstance(got, (tuple, list)) and len(got) == 2,
            f"{what}: return (bottleneck name, idle fraction), got {got!r}"[:300])
    name, idle = got
    require(isinstance(name, str), f"{what}: the bottleneck is an event's name (a str), got {name!r}"[:300])
    by_name, idles = _mistakes(events)
    own = self_times(events, main_thread(events))
    if name != want_name:
        why = by_name.get(name, [])
        hint = f" ({'; '.join(why)})" if why else ""
        mine = f"self time {own[name]} ns" if name in own else "no event of the main thread"
        raise AssertionError(f"{what}: you named {name!r} ({mine}); the largest self time on the main thread "
                             f"is that of {want_name!r}, {own[want_name]} ns in all{hint}")
    value = float(_f64(idle))
    if abs(value - want_idle) > 1e-6:
        why = [w for v, w in idles if abs(value - v) <= 1e-6 * max(1.0, abs(v))]
        hint = f" ({why[0]})" if why else ""
        raise AssertionError(f"{what}: idle fraction {value:.6g}, expected {want_idle:.6f}{hint}")


@exercise_check(student="read_profile")
def check_read_profile(student) -> None:
    """``read_profile(events) -> (name, idle)``: the main thread's largest self time, and its idle share."""
    from effdl.measuring.profiling import SLOW_STEP_TRACE, complete_events, read_profile

    for what, rows, name, idle in _TRACES:
        events = _trace(rows)
        got_name, got_idle = read_profile(events)
        require(got_name == name and abs(got_idle - idle) < 1e-12, f"internal: the reference disagrees on {what}")
        _judge_profile(student([dict(e) for e in events]), events, f"synthetic trace ({what})")
    events = complete_events(SLOW_STEP_TRACE)
    _judge_profile(student([dict(e) for e in events]), events, f"the recorded trace {SLOW_STEP_TRACE.name}")
