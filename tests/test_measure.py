"""effdl.measure measures what it claims: a known sleep, a known allocation, a matmul's 2·m·n·k."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdl.measure import BenchResult, benchmark, count_flops, peak_memory, resolve_device, run_meta


# ----------------------------------------------------------------------------------------- benchmark
def test_benchmark_times_a_known_sleep():
    res = benchmark(lambda: time.sleep(0.01), warmup=1, repeat=5)
    assert len(res.times_ms) == 5
    assert res.device == "cpu"
    # a sleep never returns early; on a loaded 2-core machine it may return late, never 3x late in median
    assert 9.9 <= res.median_ms <= 30.0, res
    assert res.min_ms >= 9.9


def test_benchmark_calls_warmup_plus_repeat_times():
    calls = []
    res = benchmark(lambda: calls.append(1), warmup=3, repeat=7)
    assert len(calls) == 10 and len(res.times_ms) == 7 and res.warmup == 3


def test_benchmark_warmup_absorbs_the_first_call():
    state = {"n": 0}

    def slow_first():
        state["n"] += 1
        time.sleep(0.05 if state["n"] == 1 else 0.001)

    assert benchmark(slow_first, warmup=1, repeat=3).median_ms < 20


def test_bench_result_statistics():
    r = BenchResult(times_ms=[1.0, 2.0, 3.0, 4.0, 100.0], device="cpu", warmup=0)
    assert r.median_ms == 3.0
    assert r.iqr_ms == pytest.approx(4.0 - 2.0)  # the outlier does not move the IQR
    assert r.min_ms == 1.0
    assert BenchResult(times_ms=[5.0], device="cpu", warmup=0).iqr_ms == 0.0
    d = r.as_dict()
    assert d["median_ms"] == 3.0 and "times_ms" in d
    assert "ms ±" in str(r)


@pytest.mark.parametrize("kwargs", [dict(repeat=0), dict(warmup=-1)])
def test_benchmark_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="repeat"):
        benchmark(lambda: None, **kwargs)


def test_benchmark_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        benchmark(42)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        benchmark(lambda: None, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        peak_memory(lambda: None, device="cuda")


def test_unsupported_device_is_rejected():
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")


# ----------------------------------------------------------------------------------------- peak_memory
def test_peak_memory_of_a_known_allocation_cpu():
    n = 1_000_000
    assert peak_memory(lambda: torch.empty(n, dtype=torch.float32)) == pytest.approx(4 * n, rel=0.01)


def test_peak_memory_sees_a_temporary_cpu():
    x = torch.randn(512, 512)

    def fn():  # the temporary x*2 (1 MiB) and the result (1 MiB) are live together
        return (x * 2) + 1

    assert peak_memory(fn) >= 2 * x.nbytes


def test_peak_memory_counts_only_what_fn_allocates():
    big = torch.ones(1_000_000)  # live before: not part of the peak
    assert peak_memory(lambda: big.add_(1)) < 1000
    assert peak_memory(lambda: big + 1) == pytest.approx(big.nbytes, rel=0.01)


def test_peak_memory_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        peak_memory("not a function")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- count_flops
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 97), n=st.integers(1, 97), k=st.integers(1, 97))
def test_count_flops_of_a_matmul_is_2mnk(m, n, k):
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert count_flops(lambda: a @ b) == 2 * m * n * k


def test_count_flops_batched_matmul_and_linear():
    a, b = torch.randn(3, 17, 33), torch.randn(3, 33, 9)
    assert count_flops(lambda: a @ b) == 2 * 3 * 17 * 9 * 33
    lin = torch.nn.Linear(33, 9, bias=False)
    x = torch.randn(5, 33)
    assert count_flops(lambda: lin(x)) == 2 * 5 * 33 * 9


def test_count_flops_ignores_elementwise_ops():
    x = torch.randn(1000)
    assert count_flops(lambda: torch.exp(x) + x) == 0  # the counter knows matmul-like ops only


def test_count_flops_of_a_grouped_conv():
    x = torch.randn(2, 8, 11, 13)
    w = torch.randn(8, 2, 3, 3)  # groups=4: each output sees 2 input channels
    got = count_flops(lambda: torch.nn.functional.conv2d(x, w, padding=1, groups=4))
    assert got == 2 * 2 * 8 * 11 * 13 * 2 * 9


def test_count_flops_rejects_non_callable():
    with pytest.raises(TypeError):
        count_flops(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- run_meta
def test_run_meta_records_provenance():
    meta = run_meta("cpu", "smoke")
    for key in ("device", "device_name", "torch", "python", "effdl", "date", "profile", "triton"):
        assert key in meta
    assert meta["profile"] == "smoke" and meta["torch"] == torch.__version__


def test_run_meta_rejects_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile"):
        run_meta("cpu", "huge")


def test_torch_threads_sets_and_restores():
    from effdl.measure import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
