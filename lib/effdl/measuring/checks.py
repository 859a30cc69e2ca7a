"""Checks for the chapter "Measuring efficiency" (``checks.<name>(your_function)`` after
``from effdl.measuring import checks``)."""

from __future__ import annotations

import random
import time

import torch

from effdl.checks import assert_close, exercise_check, observe, require


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


def _timer_trial(time_on_device, work_s: float, n_kernels: int) -> tuple:
    """Driver (runs where the student's code lives): a fake device with 30 ms of earlier work queued,
    a function launching ``work_s`` of work in ``n_kernels`` kernels (its first call also 'compiles':
    40 ms once).  Returns (what the timer returned, how often it synchronized)."""
    from effdl.measuring.timing import FakeAsyncDevice

    dev = FakeAsyncDevice()
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] == 1:
            dev.launch(0.040)  # the first call also 'compiles': extra device work, once
        for _ in range(n_kernels):
            dev.launch(work_s / n_kernels)

    dev.launch(0.030)  # work someone queued before your timer started
    return time_on_device(fn, dev), dev.synchronizations


@exercise_check(student="time_on_device")
def check_async_timer(time_on_device) -> None:
    """``time_on_device(fn, device) -> float``: median ms of ``fn()`` on an asynchronous device."""
    rng = random.Random(0)
    for n_kernels in (1, 3):
        work_s = rng.uniform(0.004, 0.008)
        got, synchronizations = observe(time_on_device, _timer_trial, work_s, n_kernels)
        require(isinstance(got, (int, float)), f"return a number of milliseconds, got {type(got).__name__}")
        true_ms = work_s * 1e3
        require(synchronizations > 0,
                "your timer never called device.synchronize(): the host clock then only sees the launches")
        require(got >= 0.8 * true_ms,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: you timed the "
                "launch, not the work (synchronize before reading the clock)")
        require(got <= 1.3 * true_ms + 2.0,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: earlier work or "
                "the first call's one-off cost leaked in (warm up, synchronize before starting the clock, "
                "take the median)")


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
