"""Checks for the chapter "Measuring efficiency" (``checks.<name>(your_function)`` after
``from effdl.measuring import checks``)."""

from __future__ import annotations

import random
import time

import torch

from effdl.checks import assert_close, exercise_check, require


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


@exercise_check
def check_async_timer(time_on_device) -> None:
    """``time_on_device(fn, device) -> float``: median ms of ``fn()`` on an asynchronous device."""
    from effdl.measuring.timing import FakeAsyncDevice

    rng = random.Random(0)
    for n_kernels in (1, 3):
        dev = FakeAsyncDevice()
        work_s = rng.uniform(0.004, 0.008)
        calls = {"n": 0}

        def fn(dev=dev, work_s=work_s, n_kernels=n_kernels):
            calls["n"] += 1
            if calls["n"] == 1:
                dev.launch(0.040)  # the first call also 'compiles': extra device work, once
            for _ in range(n_kernels):
                dev.launch(work_s / n_kernels)

        dev.launch(0.030)  # work someone queued before your timer started
        got = time_on_device(fn, dev)
        require(isinstance(got, (int, float)), f"return a number of milliseconds, got {type(got).__name__}")
        true_ms = work_s * 1e3
        require(dev.synchronizations > 0,
                "your timer never called device.synchronize(): the host clock then only sees the launches")
        require(got >= 0.8 * true_ms,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: you timed the "
                "launch, not the work (synchronize before reading the clock)")
        require(got <= 1.3 * true_ms + 2.0,
                f"measured {got:.3f} ms for a call whose device work takes {true_ms:.3f} ms: earlier work or "
                "the first call's one-off cost leaked in (warm up, synchronize before starting the clock, "
                "take the median)")


@exercise_check
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


@exercise_check
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


@exercise_check
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


@exercise_check
def check_find_bottleneck(student) -> None:
    """``find_bottleneck(stages) -> (name, share)``: the stage with the largest steady-state time."""
    rng = random.Random(4)

    def sleeper(ms):
        return lambda: time.sleep(ms / 1e3)

    def slow_first(first_ms, then_ms):
        state = {"calls": 0}

        def fn():
            state["calls"] += 1
            time.sleep((first_ms if state["calls"] == 1 else then_ms) / 1e3)
        return fn

    names = ["load", "decode", "resize", "model", "postprocess"]
    rng.shuffle(names)
    steady = {names[0]: 14.0, names[1]: 3.0, names[2]: 5.0, names[3]: 1.0, names[4]: 0.5}
    stages = {names[0]: sleeper(14.0), names[1]: sleeper(3.0), names[2]: sleeper(5.0),
              names[3]: slow_first(120.0, 1.0), names[4]: sleeper(0.5)}
    order = list(stages)
    rng.shuffle(order)
    stages = {k: stages[k] for k in order}
    got = student(stages)
    require(isinstance(got, tuple) and len(got) == 2, f"return (name, share), got {got!r}")
    name, share = got
    want_share = steady[names[0]] / sum(steady.values())
    require(name == names[0],
            f"you picked {name!r}; in steady state {names[0]!r} takes {steady[names[0]]} ms per call and "
            f"{name!r} {steady.get(name, '?')} ms (did a one-off first call fool you? warm up first)")
    require(abs(float(share) - want_share) < 0.2,
            f"share {share:.2f} of the total, expected about {want_share:.2f} (its time over the sum of all stages)")
