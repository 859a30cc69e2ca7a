"""effdl.measure measures what it claims: a known sleep, a known allocation, a matmul's 2·m·n·k."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdl.measure import (
    BenchResult,
    benchmark,
    count_flops,
    cpu_thread_policy,
    interleaved,
    paired_ratio,
    peak_memory,
    quartiles,
    resolve_device,
    run_meta,
    thread_check,
)


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
    assert "median 3 ms (IQR 2–4, 5 runs, cpu)" in str(r)


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


# ----------------------------------------------------------------------------------------- threads
def test_thread_check_restores_threads():
    before = torch.get_num_threads()
    tc = thread_check(n=32, rounds=3)
    assert torch.get_num_threads() == before
    assert tc["threads"] == before and tc["ratio"] > 0
    assert tc["ratio"] == pytest.approx(tc["all_threads_ms"] / tc["one_thread_ms"])
    with pytest.raises(ValueError):
        thread_check(rounds=0)


@pytest.mark.parametrize("threads, expected", [(1, 1), (None, "unchanged"), ("auto", "checked")])
def test_cpu_thread_policy_sets_and_restores(monkeypatch, threads, expected):
    import effdl.measure as measure

    before = torch.get_num_threads()
    # "auto" runs thread_check; a fake one that reports an oversubscribed machine (all threads slower)
    monkeypatch.setattr(measure, "thread_check", lambda: {"threads": before, "ratio": 3.0})
    with cpu_thread_policy("cpu", threads) as info:
        inside = torch.get_num_threads()
        assert info["threads_used"] == inside
    assert torch.get_num_threads() == before
    if expected == "unchanged":
        assert inside == before and set(info) == {"threads_used"}
    elif expected == "checked":
        assert inside == 1 and info["ratio"] == 3.0  # more threads were slower: one thread
    else:
        assert inside == expected


def test_cpu_thread_policy_auto_keeps_threads_when_they_help(monkeypatch):
    import effdl.measure as measure

    before = torch.get_num_threads()
    monkeypatch.setattr(measure, "thread_check", lambda: {"threads": before, "ratio": 0.5})
    with cpu_thread_policy("cpu", "auto") as info:
        assert torch.get_num_threads() == before == info["threads_used"]


def test_cpu_thread_policy_restores_when_the_body_raises():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_thread_policy("cpu", 1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_cpu_thread_policy_leaves_a_gpu_alone(monkeypatch):
    import effdl.measure as measure

    monkeypatch.setattr(measure, "thread_check", lambda: pytest.fail("no thread check for a GPU"))
    before = torch.get_num_threads()
    with cpu_thread_policy(torch.device("cuda"), "auto") as info:  # no CUDA call is made
        assert torch.get_num_threads() == before == info["threads_used"]


@pytest.mark.parametrize("bad", [0, -2, "x", 1.5, "all"])
def test_cpu_thread_policy_rejects_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="threads must be"):
        with cpu_thread_policy("cpu", bad):
            pass


# ----------------------------------------------------------------------------------------- interleaved
def test_interleaved_rotates_the_order_every_round():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    res = interleaved(fns, rounds=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: each version, untimed
    rounds = [calls[6 + 3 * r: 9 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(res) == {"a", "b", "c"}
    for name, r in res.items():
        assert isinstance(r, BenchResult) and r.label == name and r.warmup == 2 and r.device == "cpu"
        assert len(r.times_ms) == 4 and r.min_ms <= r.median_ms and r.iqr_ms >= 0


def test_interleaved_times_each_version():
    res = interleaved({"slow": lambda: time.sleep(0.006), "fast": lambda: None}, rounds=3, warmup=0)
    assert res["slow"].min_ms >= 5.9 and res["fast"].median_ms < res["slow"].median_ms


@pytest.mark.parametrize("fns, kwargs, error", [
    ({}, {}, TypeError),
    ({"a": 3}, {}, TypeError),
    ({"a": lambda: None}, {"rounds": 0}, ValueError),
    ({"a": lambda: None}, {"warmup": -1}, ValueError),
])
def test_interleaved_rejects_bad_input(fns, kwargs, error):
    with pytest.raises(error):
        interleaved(fns, **kwargs)


# ----------------------------------------------------------------------------------------- ratios
def test_quartiles():
    assert quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
    assert quartiles([4, 1, 3, 2]) == pytest.approx((1.75, 2.5, 3.25))  # inclusive method, any order
    with pytest.raises(ValueError, match="empty"):
        quartiles([])


def test_paired_ratio_finds_a_known_ratio():
    res = paired_ratio(lambda: time.sleep(0.006), lambda: time.sleep(0.002), warmup=1, repeat=6)
    assert 1.5 < res["ratio"] < 3.5
    assert len(res["a_times"]) == len(res["b_times"]) == 6 and res["ratio_q1"] <= res["ratio"] <= res["ratio_q3"]
    assert res["a_ms"] > res["b_ms"]
    with pytest.raises(ValueError):
        paired_ratio(lambda: None, lambda: None, repeat=0)


# ----------------------------------------------------------------------------------------- cold caches
class _SlowFlush:
    """Stands in for the flush buffer: each flush costs 30 ms, far more than the timed call."""

    def __init__(self):
        self.flushes = 0

    def zero_(self):
        self.flushes += 1
        time.sleep(0.03)

    def numel(self):
        return 16


def test_benchmark_flushes_before_every_repeat_outside_the_timed_region(monkeypatch):
    import effdl.measure as measure

    buf = _SlowFlush()
    monkeypatch.setattr(measure, "flush_buffer", lambda device=None: buf)
    res = benchmark(lambda: None, warmup=2, repeat=5, flush=True)
    assert buf.flushes == 5                       # once per timed call, never for warm-up
    assert res.median_ms < 10, res                # a 30 ms flush inside the clock would show
    assert res.meta["flush"] is True and "cold caches" in str(res)
    warm = benchmark(lambda: None, warmup=0, repeat=2)
    assert warm.meta["flush"] is False and "cold" not in str(warm)


def test_interleaved_flushes_only_the_named_versions(monkeypatch):
    import effdl.measure as measure

    buf = _SlowFlush()
    monkeypatch.setattr(measure, "flush_buffer", lambda device=None: buf)
    res = interleaved({"warm": lambda: None, "cold": lambda: None}, rounds=4, warmup=1,
                      flush={"cold"})
    assert buf.flushes == 4
    assert res["cold"].median_ms < 10 and res["cold"].meta["flush"]
    assert not res["warm"].meta["flush"]
    buf.flushes = 0
    interleaved({"a": lambda: None, "b": lambda: None}, rounds=3, warmup=0, flush=True)
    assert buf.flushes == 6


def _fake_caches(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")


def test_flush_buffer_is_twice_the_last_level_cache(monkeypatch, tmp_path):
    import effdl.measure as measure

    _fake_caches(tmp_path, [(1, "Data", "32K"), (1, "Instruction", "32K"),
                            (2, "Unified", "1M"), (3, "Unified", "32768K"),
                            (4, "Instruction", "64M")])   # an instruction cache never counts
    monkeypatch.setattr(measure, "CPU_CACHE_SYSFS", tmp_path)
    assert measure.last_level_cache_bytes() == 32 * 2**20
    buf = measure.flush_buffer()
    assert buf.numel() * buf.element_size() == 64 * 2**20 and buf.device.type == "cpu"


def test_last_level_cache_falls_back_when_the_machine_does_not_say(monkeypatch, tmp_path):
    import effdl.measure as measure

    monkeypatch.setattr(measure, "CPU_CACHE_SYSFS", tmp_path / "missing")
    assert measure.last_level_cache_bytes() == measure.FALLBACK_LLC_BYTES == 64 * 2**20
    _fake_caches(tmp_path / "broken", [(2, "Unified", "lots")])   # unreadable: skipped
    monkeypatch.setattr(measure, "CPU_CACHE_SYSFS", tmp_path / "broken")
    assert measure.last_level_cache_bytes() == measure.FALLBACK_LLC_BYTES


@pytest.mark.parametrize("text, expected", [("32768K", 32 * 2**20), ("1M", 2**20),
                                            ("512", 512), ("2G\n", 2 * 2**30)])
def test_cache_sizes_are_parsed(text, expected):
    from effdl.measure import _parse_cache_size

    assert _parse_cache_size(text) == expected


@pytest.mark.parametrize("call, error", [
    (lambda: benchmark(lambda: None, flush="yes"), TypeError),
    (lambda: interleaved({"a": lambda: None}, flush="a"), TypeError),
    (lambda: interleaved({"a": lambda: None}, flush=3), TypeError),
    (lambda: interleaved({"a": lambda: None}, flush={"b"}), ValueError),
])
def test_flush_rejects_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_thread_check_reports_an_interval_and_decides_only_outside_the_noise():
    from effdl.measure import _one_thread_wins

    tc = thread_check(n=32, rounds=6, resamples=200)
    assert tc["ratio_lo"] <= tc["ratio"] <= tc["ratio_hi"] and tc["rounds"] == 6
    assert tc["one_thread_wins"] == (tc["threads"] > 1 and tc["ratio_lo"] > 1.0)
    assert _one_thread_wins({"ratio": 3.0}) and not _one_thread_wins({"ratio": 0.5})
    assert not _one_thread_wins({"ratio": 3.0, "one_thread_wins": False})
