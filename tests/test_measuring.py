"""effdl.measuring (the measuring chapter's library) and its benchmark's rows.

Its exercise checks are tested in tests/test_exercises.py; the core tools it re-exports (quartiles,
paired_ratio, thread_check) in tests/test_measure.py."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import nbformat
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effdl.measuring as rl
from effdl.measure import count_flops, peak_memory
from effdl.profile import sizes

ROOT = Path(__file__).resolve().parents[1]
SMOKE = sizes("measuring", "smoke")


# ------------------------------------------------------------------------------------------ roofline
def test_roofline_model():
    roof = rl.Roofline(peak_flops=100e9, peak_bandwidth=10e9)
    assert roof.ridge == pytest.approx(10.0)
    assert roof.attainable(1.0) == pytest.approx(10e9)     # memory roof: I × bandwidth
    assert roof.attainable(1000.0) == pytest.approx(100e9)  # compute roof
    assert roof.bound(9.9) == "memory" and roof.bound(10.0) == "compute"
    assert roof.predict_seconds(100e9, 1e9) == pytest.approx(1.0)   # compute-bound
    assert roof.predict_seconds(1e9, 100e9) == pytest.approx(10.0)  # memory-bound
    assert "ridge" in str(roof)


@pytest.mark.parametrize("bad", [dict(peak_flops=0, peak_bandwidth=1), dict(peak_flops=1, peak_bandwidth=-1)])
def test_roofline_rejects_nonpositive_peaks(bad):
    with pytest.raises(ValueError, match="positive peaks"):
        rl.Roofline(**bad)


def test_bad_inputs_are_clear_errors():
    roof = rl.Roofline(1e9, 1e9)
    with pytest.raises(ValueError, match="intensity"):
        roof.attainable(-1)
    with pytest.raises(ValueError, match=">= 0"):
        roof.predict_seconds(-1, 1)
    with pytest.raises(ValueError, match="bytes moved"):
        rl.arithmetic_intensity(1, 0)
    with pytest.raises(ValueError, match="positive int"):
        rl.matmul_flops(0, 1, 1)
    with pytest.raises(ValueError, match="positive int"):
        rl.matmul_bytes(2, 2, 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.dtype"):
        rl.bytes_per_element("float32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        rl.naive_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        rl.attention_layer(torch.randn(1, 4, 6), torch.randn(6, 18), torch.randn(6, 6), heads=4)
    with pytest.raises(ValueError, match="expected w_qkv"):
        rl.attention_layer(torch.randn(1, 4, 6), torch.randn(6, 6), torch.randn(6, 6), heads=2)


def test_by_hand_counts():
    assert rl.matmul_flops(3, 5, 7) == 210
    assert rl.matmul_bytes(3, 5, 7, 2) == (21 + 35 + 15) * 2
    assert rl.elementwise_bytes(10, 2, 1, 4) == 120
    assert rl.softmax_bytes(3, 4) == 96
    assert rl.attention_layer_flops(1, 1, 1) == 12
    assert rl.bytes_per_element(torch.float16) == 2
    # a square fp32 matmul has intensity n / 6
    assert rl.arithmetic_intensity(rl.matmul_flops(96, 96, 96), rl.matmul_bytes(96, 96, 96)) == pytest.approx(16)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 37), d=st.integers(1, 19))
def test_attention_flops_match_the_counter(b, h, n, d):
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    assert count_flops(lambda: rl.naive_attention(q, k, v)) == rl.attention_flops(b, h, n, d)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 33), heads=st.integers(1, 4), hd=st.integers(1, 9))
def test_attention_layer_flops_match_the_counter(b, n, heads, hd):
    d_model = heads * hd
    x = torch.randn(b, n, d_model)
    w_qkv, w_out = torch.randn(d_model, 3 * d_model), torch.randn(d_model, d_model)
    assert count_flops(lambda: rl.attention_layer(x, w_qkv, w_out, heads)) == rl.attention_layer_flops(b, n, d_model)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 97, 59), (1, 2, 128, 64)])
def test_naive_attention_is_accurate(shape):
    """flash-attention's rule: error vs an fp64 reference ≤ 2× that of PyTorch's own fp32 SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    base_err = (torch.nn.functional.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    err = (rl.naive_attention(q, k, v).double() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)


def test_attention_layer_matches_multihead_attention():
    torch.manual_seed(0)
    b, n, d_model, heads = 2, 11, 12, 3
    mha = torch.nn.MultiheadAttention(d_model, heads, bias=False, batch_first=True)
    x = torch.randn(b, n, d_model)
    want = mha(x, x, x, need_weights=False)[0]
    got = rl.attention_layer(x, mha.in_proj_weight.T.contiguous(), mha.out_proj.weight.T.contiguous(), heads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_measured_peaks_and_kernels_on_the_roofline():
    roof = rl.measure_roofline(matmul_n=128, copy_mib=4, warmup=1, repeat=2)
    assert roof.peak_flops > 1e6 and roof.peak_bandwidth > 1e6 and roof.device == "cpu"
    kernels = rl.kernel_suite(SMOKE, "cpu")
    assert {k.family for k in kernels} == {"matmul", "elementwise", "reduction", "softmax", "attention"}
    rows = rl.place_kernels(kernels, roof, warmup=1, repeat=2)
    for r in rows:
        assert r["ms"] > 0 and r["efficiency"] > 0 and r["bound"] in ("memory", "compute")
        if r["family"] == "matmul":
            assert r["flops_counted"] == r["flops"]
        if r["family"] in ("elementwise", "reduction", "softmax"):
            assert r["flops_counted"] == 0  # the counter knows matmul-like ops only
    ax = rl.plot_roofline(roof, rows)
    assert ax.get_xscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")


# ------------------------------------------------------------------------------------------ timing
def test_naive_time_and_call_times():
    assert 4.9 <= rl.naive_time(lambda: time.sleep(0.005)) < 100
    assert len(rl.call_times(lambda: None, 4)) == 4
    with pytest.raises(ValueError):
        rl.call_times(lambda: None, 0)
    with pytest.raises(TypeError, match="callable"):
        rl.naive_time(None)  # type: ignore[arg-type]


def test_fake_async_device_hides_work_from_the_host_clock():
    dev = rl.FakeAsyncDevice()
    k = dev.kernel(0.010)
    assert rl.naive_time(k) < 9.0                      # the launch only (work: 10 ms)
    assert dev.pending_seconds() > 0
    dev.synchronize()
    assert dev.pending_seconds() == 0
    ms = rl.sync_timer(k, dev, warmup=1, repeat=3)
    assert 9.9 <= ms < 40
    assert dev.launches == 5 and dev.busy_seconds == pytest.approx(0.05)


def test_fake_events_time_the_device():
    dev = rl.FakeAsyncDevice()
    dev.launch(0.02)                                  # earlier work: not between the events
    start, end = dev.Event(), dev.Event()
    start.record()
    dev.launch(0.005)
    end.record()
    with pytest.raises(RuntimeError, match="synchronize"):
        start.elapsed_time(end)
    end.synchronize()
    assert start.elapsed_time(end) == pytest.approx(5.0, abs=0.5)
    with pytest.raises(RuntimeError, match="record"):
        dev.Event().synchronize()
    with pytest.raises(ValueError):
        dev.launch(-1)


def test_sync_timer_rejects_bad_input():
    dev = rl.FakeAsyncDevice()
    with pytest.raises(TypeError):
        rl.sync_timer(3, dev)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rl.sync_timer(lambda: None, dev, repeat=0)


# ------------------------------------------------------------------------------------------ memory
def test_training_step_peak_includes_the_gradients():
    model = rl.make_mlp(64, 2)
    step = rl.training_step(model, torch.randn(128, 64))
    model.zero_grad(set_to_none=True)  # the step then allocates its gradients, as a first step does
    peak = peak_memory(step)
    assert peak > rl.parameter_bytes(model)
    assert peak >= rl.parameter_bytes(model) + rl.mlp_activation_bytes(128, 64, 2)


def test_training_memory_grows_with_the_batch():
    rows = rl.training_memory_sweep(64, 2, [16, 256])
    assert rows[1]["peak_bytes"] > rows[0]["peak_bytes"]
    assert rows[0]["parameter_bytes"] == rows[1]["parameter_bytes"] == rl.parameter_bytes(rl.make_mlp(64, 2))
    growth = rows[1]["peak_bytes"] - rows[0]["peak_bytes"]
    by_hand = rows[1]["activation_bytes"] - rows[0]["activation_bytes"]
    assert 0.5 * by_hand <= growth <= 3 * by_hand
    with pytest.raises(ValueError):
        rl.make_mlp(0, 1)


def test_naive_attention_memory_is_the_score_matrices():
    rows = rl.attention_memory_sweep([64, 128], batch=1, heads=2, head_dim=16)
    for r in rows:
        assert 1.9 * r["scores_bytes"] <= r["peak_bytes"] <= 3.0 * r["scores_bytes"] + r["qkv_bytes"]
    assert rl.max_seq_len_for_memory(2 * 1 * 1 * 2 * 100**2, batch=1, heads=1) == 100
    with pytest.raises(ValueError):
        rl.max_seq_len_for_memory(0, batch=1, heads=1)


# ------------------------------------------------------------------------------------------ cases
def test_conv_variants_flops_match_the_counter():
    for name, (fn, flops, nbytes) in rl.conv_variants(2, 16, 9).items():
        assert count_flops(fn) == flops, name
        assert fn().shape == (2, 16, 9, 9) and nbytes > 0
    with pytest.raises(ValueError, match="divisible"):
        rl.conv_flops(1, 6, 6, 4, groups=4)


def test_conv_and_fusion_cases():
    conv = rl.conv_case(SMOKE, warmup=1, repeat=2)
    assert [r["kernel"] for r in conv][0] == "dense" and conv[0]["time_vs_dense"] == 1.0
    assert conv[2]["flops_vs_dense"] == pytest.approx(1 / SMOKE.conv[1])  # depthwise: 1/C of the FLOPs
    x = torch.randn(1000)
    torch.testing.assert_close(rl.gelu_unfused(x), rl.gelu_fused(x), atol=1e-5, rtol=1e-5)
    fus = rl.fusion_case(SMOKE, warmup=1, repeat=2)
    assert fus[0]["flops"] == fus[1]["flops"] and fus[0]["bytes"] == 9 * fus[1]["bytes"]


def test_pipeline_stages_and_breakdown():
    for batched in (True, False):
        stages = rl.make_pipeline(3, 32, batched=batched)
        out = stages["end_to_end"]()
        assert len(out) == 3 and {"label", "score"} <= set(out[0])
    rows = rl.stage_times(stages, warmup=0, repeat=1)
    assert [r["stage"] for r in rows] == ["decode", "preprocess", "model", "postprocess", "end_to_end"]
    assert sum(r["share"] for r in rows[:-1]) == pytest.approx(1.0) and math.isnan(rows[-1]["share"])
    with pytest.raises(ValueError):
        rl.make_requests(0, 32)


def test_time_to_accuracy():
    r = rl.time_to_accuracy(64, target=0.5, max_epochs=3)
    assert r["seconds_to_target"] is not None and r["steps"] >= 1 and r["samples_per_s"] > 0
    r = rl.time_to_accuracy(64, target=1.01, max_epochs=1)
    assert r["seconds_to_target"] is None and r["epochs"] == 1
    with pytest.raises(ValueError):
        rl.time_to_accuracy(0)


# ------------------------------------------------------------------------------------------ bench
def test_bench_rows(smoke_bench_rows):
    from effdl.measuring.roofline import roofline_from_rows

    rows, threads, threads_after = smoke_bench_rows("measuring")
    assert threads_after == threads
    assert {r["case"] for r in rows} == {"threads", "peak", "roofline", "conv", "fusion"}
    (tc,) = [r for r in rows if r["case"] == "threads"]
    assert tc["threads_used"] in (1, threads) and tc["ratio"] > 0
    peaks = [r for r in rows if r["case"] == "peak"]
    assert sum("gflops" in r for r in peaks) == 1 and sum("gbs" in r for r in peaks) == 2  # matmul; copy, read
    roof = roofline_from_rows(rows)
    assert roof.peak_flops == max(r["gflops"] for r in peaks if "gflops" in r) * 1e9
    assert roof.peak_bandwidth == max(r["gbs"] for r in peaks if "gbs" in r) * 1e9
    placed = [r for r in rows if r["case"] == "roofline"]
    assert {r["family"] for r in placed} == {"matmul", "elementwise", "reduction", "softmax", "attention"}
    for r in placed:
        assert r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
        assert r["bound"] == roof.bound(r["intensity"])
    json.dumps(rows)  # rows are JSON-serializable
    with pytest.raises(ValueError, match="no peak rows"):
        roofline_from_rows([r for r in rows if r["case"] != "peak"])


@pytest.fixture(scope="module")
def gpu_rows():
    """gpu_suite runs on a GPU; here its code paths run on the CPU with smoke sizes."""
    from effdl.measuring import bench

    return bench.gpu_suite(torch.device("cpu"), SMOKE)


def test_gpu_suite_code_paths_on_cpu(tmp_path, gpu_rows):
    from effdl.bench.core import write_json
    from effdl.measuring import plots

    rows = gpu_rows
    cases = {r["case"] for r in rows}
    assert {"peak", "roofline", "async", "attention_memory", "conv", "fusion"} <= cases
    assert {r["dtype"] for r in rows if r["case"] == "peak"} >= {"float32", "float16"}
    assert len([r for r in rows if r["case"] == "async"]) == 3
    doc = write_json(rows, tmp_path / "measuring-test.json", device="cpu", profile="smoke")
    fig = plots.plot_recorded(doc)
    assert "recorded on" in fig._suptitle.get_text()
    text = plots.summarize_recorded({**doc, "path": "book/results/measuring-test.json"})
    assert "TFLOP/s" in text and "naive attention" in text and "no sync" in text
    import matplotlib.pyplot as plt

    plt.close("all")


# ------------------------------------------------------------------------------------------ more
def test_bandwidths_and_peak_compute():
    bw = rl.bandwidths(mib=4, warmup=1, repeat=2)
    assert set(bw) == {"copy", "read"} and min(bw.values()) > 1e6
    assert rl.peak_bandwidth(mib=4, warmup=1, repeat=2) > 1e6
    assert rl.peak_compute(n=64, warmup=1, repeat=2) > 1e5
    with pytest.raises(ValueError):
        rl.peak_compute(n=0)


def test_time_to_result_reports_medians_over_seeds():
    rows = rl.time_to_result([64], seeds=(0, 1), target=0.5, max_epochs=3)
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["reached"] == 2
    assert rows[0]["seconds_to_target"] > 0
    none = rl.time_to_result([64], seeds=(0,), target=1.01, max_epochs=1)
    assert none[0]["seconds_to_target"] is None and none[0]["reached"] == 0


def test_attention_memory_sweep_reports_out_of_memory(monkeypatch):
    import effdl.measuring.memory as mem

    def oom(fn, device=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(mem, "peak_memory", oom)
    rows = mem.attention_memory_sweep([32, 64, 128], batch=1, heads=1, head_dim=8)
    assert len(rows) == 1 and rows[0]["error"] == "out of memory" and rows[0]["peak_bytes"] is None


def test_recorded_results_cell_works_with_a_recorded_file(monkeypatch, tmp_path, gpu_rows, capsys):
    """The notebook's recorded-results cell, run as if book/results/ held a GPU run."""
    import matplotlib.pyplot as plt

    import effdl.results
    from effdl.bench.core import write_json

    doc = write_json(gpu_rows, tmp_path / "measuring-fake.json", device="cpu", profile="smoke")
    doc["path"] = "book/results/measuring-fake.json"
    monkeypatch.setattr(effdl.results, "find_recorded", lambda chapter: [doc] if chapter == "measuring" else [])
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    nb = nbformat.read(ROOT / "notebooks" / "measuring.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and 'show_recorded("measuring")' in c.source)
    plt.close("all")
    exec(cell, {})
    out = capsys.readouterr().out
    assert "book/results/measuring-fake.json" in out and "No recorded GPU run" not in out  # provenance shown
    assert "TFLOP/s" in out and "peak" in out  # the chapter's summary of the run
    (num,) = plt.get_fignums()
    fig = plt.figure(num)
    texts = [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes]
    texts += [fig._suptitle.get_text()] if fig._suptitle else []
    assert any("recorded on" in t for t in texts), texts  # the figure carries device and date
    plt.close("all")


def test_recorded_results_cell_without_a_recorded_file(monkeypatch, capsys):
    import effdl.results

    monkeypatch.setattr(effdl.results, "find_recorded", lambda chapter: [])
    assert effdl.results.show_recorded("measuring") == []
    out = capsys.readouterr().out
    assert "No recorded GPU run of the measuring benchmarks" in out
    assert max(len(line) for line in out.splitlines()) <= 88  # fits the page's code column


# ------------------------------------------------------------------------------------------ profiling
def _synthetic_trace(path, gz=False):
    """A Chrome trace with known answers: one step of 100 µs; the CPU thread works from 0 to
    30 µs (with a nested call) and from 50 to 100 µs, so it is idle 20 % of the step; a GPU
    stream runs two 10 µs kernels, so it is idle 80 %."""
    import gzip

    t0 = 1_000_000.0   # traces carry absolute time stamps; events are read relative to the first

    def x(name, cat, ts, dur, pid=7, tid=7):
        return {"ph": "X", "name": name, "cat": cat, "ts": t0 + ts, "dur": dur, "pid": pid, "tid": tid}

    events = [
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 7, "args": {"name": "main"}},
        x("ProfilerStep#1", "user_annotation", 0, 100),
        x("forward", "user_annotation", 0, 30),
        x("aten::linear", "cpu_op", 0, 30), x("aten::addmm", "cpu_op", 5, 5),
        x("aten::mul", "cpu_op", 50, 50),
        x("ampere_sgemm", "kernel", 10, 10, pid=0, tid=7), x("mul_kernel", "kernel", 60, 10, pid=0, tid=7),
        {"ph": "X", "name": "PyTorch Profiler (0)", "cat": "Trace", "ts": t0, "dur": 500,
         "pid": "Spans", "tid": "PyTorch Profiler"},            # not a thread: ignored
        {"ph": "s", "name": "launch", "cat": "ac2g", "ts": t0 + 10, "pid": 7, "tid": 7, "id": 1},
    ]
    text = json.dumps({"traceEvents": events})
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_a_synthetic_trace_with_a_known_idle_gap(tmp_path, gz):
    events = rl.trace_events(_synthetic_trace(tmp_path / ("t.json.gz" if gz else "t.json"), gz))
    assert rl.lanes(events) == ["CPU main", "GPU 0 stream 7"]   # threads first, then streams
    assert [e["ts"] for e in events][0] == 0.0
    (step,) = rl.step_windows(events)
    assert step == (0.0, 100.0)
    assert rl.idle_fraction(events, "CPU main", step) == pytest.approx(0.2)
    assert rl.idle_fraction(events, "GPU 0 stream 7", step) == pytest.approx(0.8)
    assert rl.idle_fraction(events, "CPU main", (20.0, 60.0)) == pytest.approx(0.5)  # clipped
    assert rl.op_durations(events, "CPU main", step) == [30.0, 50.0]          # outermost only
    assert rl.step_phases(events, step) == pytest.approx({"forward": 0.03, "other": 0.07})
    with pytest.raises(ValueError, match="empty window"):
        rl.idle_fraction(events, "CPU main", (5.0, 5.0))
    ax = rl.plot_timeline(events, step)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["CPU main", "GPU 0 stream 7"]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_trace_without_events_is_a_clear_error(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps([{"ph": "M", "name": "process_name"}]))
    with pytest.raises(ValueError, match="no timed events"):
        rl.trace_events(tmp_path / "empty.json")


@pytest.mark.parametrize("name, short", [
    ("aten::addmm", "addmm"), ("Optimizer.step#SGD.step", "SGD.step"),
    ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", "DataLoader"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "AddmmBackward0"), ("forward", "forward"),
])
def test_short_names(name, short):
    assert rl.short_name(name) == short


@pytest.fixture(scope="module")
def profiled_step():
    batch, steps = 8, 2
    step = rl.make_training_step(32, 1, batch, samples=64, features=16)
    return rl.profile_step(step, "cpu", steps=steps, warmup=1), batch, steps


def test_profile_step_and_its_operator_table(profiled_step):
    prof, batch, steps = profiled_step
    rows = rl.op_table(prof, top=8)
    assert 1 <= len(rows) <= 8
    assert [r["self_ms"] for r in rows] == sorted((r["self_ms"] for r in rows), reverse=True)
    names = {r["op"] for r in rows}
    assert not any(n.startswith("ProfilerStep") or n in ("forward", "backward") or "#" in n
                   for n in names)                          # annotations are not operators
    assert all(r["calls"] > 0 and 0 < r["share"] <= 1 and r["total_ms"] >= r["self_ms"] * 0.99
               for r in rows)
    everything = rl.op_table(prof, top=10_000)
    assert sum(r["share"] for r in everything) == pytest.approx(1.0)
    # the loader fetches a TensorDataset sample by sample: one select per tensor per sample
    assert sum(r["calls"] for r in everything if r["op"] == "aten::select") == 2 * batch
    with pytest.raises(ValueError):
        rl.profile_step(lambda: None, "cpu", steps=0)


def test_a_real_exported_trace_reads_back(profiled_step, tmp_path):
    import gzip

    prof, batch, steps = profiled_step
    gz = rl.export_trace(prof, tmp_path / "trace.json.gz")   # a profile exports once
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json.gz"]   # no stray plain copy
    plain = tmp_path / "trace.json"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    for path in (gz, plain):
        events = rl.trace_events(path)
        windows = rl.step_windows(events)
        assert len(windows) == steps
        (lane,) = rl.lanes(events)                             # one CPU thread, no GPU
        assert lane.startswith("CPU")
        for w in windows:
            phases = rl.step_phases(events, w)
            assert {"DataLoader", "forward", "backward", "SGD.step"} <= set(phases)
            assert sum(phases.values()) == pytest.approx((w[1] - w[0]) / 1e3)
            assert 0 <= rl.idle_fraction(events, lane, w) < 1
            assert len(rl.op_durations(events, lane, w)) > 2 * batch
    html = rl.download_link(gz).data
    assert 'download="trace.json.gz"' in html and "base64," in html


def test_training_step_learns_and_reuses_its_loader():
    step = rl.make_training_step(32, 1, 16, samples=64, features=8)
    losses = [step() for _ in range(12)]                        # three epochs of four batches
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError):
        rl.make_training_step(0, 1, 4)


# ------------------------------------------------------------------------------------------ caches
def test_cache_effect_rows():
    rows = rl.cache_effect([0.01], rounds=2, warmup=0)
    (r,) = rows
    assert r["fraction"] == 0.01 and r["bytes"] == 4 * (int(0.01 * r["llc_bytes"]) // 4)
    assert len(r["warm_ms"]) == len(r["cold_ms"]) == 3 and r["ratio"] > 0
    assert r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"]
    with pytest.raises(ValueError, match="> 0"):
        rl.cache_effect([0.0])


# ------------------------------------------------------------------------------------------ tuning
def test_time_to_accuracy_stops_at_the_time_budget():
    r = rl.time_to_accuracy(64, target=1.01, max_epochs=50, max_seconds=1e-6)
    assert r["seconds_to_target"] is None and r["epochs"] == 1
    with pytest.raises(ValueError):
        rl.time_to_accuracy(64, lr=0.0)
    with pytest.raises(ValueError):
        rl.time_to_accuracy(64, max_seconds=0)


def test_time_to_result_reports_the_seed_spread():
    (row,) = rl.time_to_result([64], seeds=(0, 1, 2), target=0.5, max_epochs=3)
    assert row["seconds_q1"] <= row["seconds_to_target"] <= row["seconds_q3"]
    assert len(row["runs"]) == 3 and row["lr"] == 0.05
    assert all(1 <= e <= 3 for e in row["runs"])                  # epochs to the accuracy
    rows = rl.time_to_result([32, 64], seeds=(0,), lr={32: 0.05, 64: 0.1}, target=0.5,
                             max_epochs=2)
    assert [r["lr"] for r in rows] == [0.05, 0.1]


def test_tuned_time_to_result_picks_the_rate_with_fewest_epochs(monkeypatch):
    import effdl.measuring.cases as cases

    seen, caps = [], []
    need = {(16, 0.05): 3, (16, 0.5): None, (1024, 0.05): 50, (1024, 0.5): 12}  # epochs

    def fake(batch, *, lr, seed, max_epochs=60, **kwargs):
        seen.append((batch, lr, seed))
        caps.append((batch, lr, max_epochs))
        e = need[batch, lr]
        ok = e is not None and e <= max_epochs
        return dict(batch=batch, seconds_to_target=0.01 * e if ok else None,
                    epochs=e if ok else max_epochs, steps=1, samples_per_s=1.0,
                    accuracy=0.9, target=0.9, lr=lr)

    monkeypatch.setattr(cases, "time_to_accuracy", fake)
    known = cases.time_to_result([16, 1024], (7, 8), lr=0.05)     # the single-rate runs
    assert known[1]["runs"] == [50, 50]
    seen.clear()
    caps.clear()
    rows = cases.tuned_time_to_result([16, 1024], [0.05, 0.5], tune_seeds=(7, 8), seeds=(0, 1),
                                      known=known, max_epochs=60)
    assert [r["lr"] for r in rows] == [0.05, 0.5]
    assert rows[0]["grid"] == {0.05: 3, 0.5: None} and rows[1]["grid"] == {0.05: 50, 0.5: 12}
    # the stopped rate ran 3 epochs (the best median so far); the reused ones the budget
    assert rows[0]["stopped_at"] == {0.05: 60, 0.5: 3}
    assert rows[0]["on_edge"] and rows[1]["on_edge"]          # a two-rate grid is all edge
    assert not [x for x in seen if x[1] == 0.05 and x[2] in (7, 8)]   # reused, not rerun
    # a tuning run stops at the best median so far; the fresh runs get the whole budget
    assert [(b, c) for b, lr, c in caps[:-4]] == [(16, 3), (16, 3), (1024, 50), (1024, 50)]
    fresh = [x for x in seen if x[2] in (0, 1)]
    assert fresh == [(16, 0.05, 0), (1024, 0.5, 0), (16, 0.05, 1), (1024, 0.5, 1)]  # interleaved
    assert [c for _, _, c in caps[-4:]] == [60] * 4                   # the fresh runs
    assert cases.rank_by_time(rows) == "16 < 1024"   # 0.03 s vs 0.12 s
    with pytest.raises(ValueError):
        cases.tuned_time_to_result([16], [])
    with pytest.raises(ValueError, match="overlap"):
        cases.tuned_time_to_result([16], [0.05], tune_seeds=(0, 1), seeds=(1,))


def test_tuned_time_to_result_really_trains():
    (row,) = rl.tuned_time_to_result([64], [0.05, 0.2], tune_seeds=(0,), seeds=(1,),
                                     target=0.5, max_epochs=3)
    assert row["lr"] in (0.05, 0.2) and set(row["grid"]) == {0.05, 0.2}
    assert row["seed_list"] == (1,) and row["seconds_to_target"] > 0


def test_a_rate_that_fails_most_seeds_cannot_win():
    from effdl.measuring.cases import _score, rank_by_time

    assert _score({"runs": [0.01, None, None]}) == math.inf
    assert _score({"runs": [0.2, 0.3, None]}) == 0.3
    assert _score({"runs": [0.2, 0.4]}) == 0.4     # upper median: stopping runs is exact
    rows = [dict(batch=16, seconds_to_target=None), dict(batch=128, seconds_to_target=0.2),
            dict(batch=1024, seconds_to_target=0.1)]
    assert rank_by_time(rows) == "1024 < 128 < 16 (not reached)"


@settings(max_examples=60, deadline=None)
@given(runs=st.lists(st.floats(0.01, 10), min_size=1, max_size=6), cap=st.floats(0.01, 10))
def test_stopping_runs_at_the_best_median_never_changes_the_winner(runs, cap):
    """A run stopped once it needs more than the best score so far (recorded as missing)
    leaves the comparison with that score unchanged: tuned_time_to_result's pruning is
    exact."""
    from effdl.measuring.cases import _score

    stopped = [t if t <= cap else None for t in runs]
    assert (_score({"runs": runs}) < cap) == (_score({"runs": stopped}) < cap)


# ------------------------------------------------------------------------ kernels, fairly timed
def test_softmax_by_ops_matches_softmax_and_allocates_nothing_large():
    from effdl.measuring.roofline import softmax_by_ops, softmax_by_ops_bytes, softmax_bytes

    s = torch.randn(37, 129)
    out = torch.empty_like(s)
    assert softmax_by_ops(s, out=out) is out
    torch.testing.assert_close(out, torch.softmax(s, -1))
    assert softmax_by_ops_bytes(37, 129) == 4 * softmax_bytes(37, 129)


def test_gelus_write_into_a_given_output():
    x = torch.randn(1001)
    o1, o2 = torch.empty_like(x), torch.empty_like(x)
    assert rl.gelu_unfused(x, out=o1) is o1 and rl.gelu_fused(x, out=o2) is o2
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)


def test_conv_and_fusion_cases_report_paired_ratios_with_spread():
    conv = rl.conv_case(SMOKE, warmup=1, repeat=3)
    assert conv[0]["time_vs_dense"] == conv[0]["time_vs_dense_q1"] == 1.0
    assert all(r["time_vs_dense_q1"] <= r["time_vs_dense"] <= r["time_vs_dense_q3"]
               for r in conv)
    u, f = rl.fusion_case(SMOKE, warmup=1, repeat=3)
    assert u["ratio_q1"] <= u["ratio"] <= u["ratio_q3"] and f["tanh_ms"] > 0
    assert f["vs_tanh_q1"] <= f["vs_tanh"] <= f["vs_tanh_q3"]


def test_bandwidth_roof_includes_the_add_and_records_threads_and_peak_side():
    bw = rl.bandwidths(mib=4, warmup=1, repeat=2, add=True)
    assert set(bw) == {"copy", "read", "add"} and min(bw.values()) > 1e6
    roof = rl.measure_roofline(matmul_n=64, copy_mib=4, warmup=1, repeat=2)
    assert roof.peak_side in (16, 32, 64) and roof.threads == torch.get_num_threads()
    assert f"{roof.threads} thread" in str(roof)


def test_tiny_kernels_far_below_their_roof_are_labelled_overhead_bound():
    from effdl.measuring.roofline import Kernel

    roof = rl.Roofline(1e15, 1e15)        # a roof no tiny CPU call comes near
    a = torch.randn(4, 4)
    (row,) = rl.place_kernels([Kernel("mm 4", "matmul", lambda: a @ a, 128, 192)], roof,
                              warmup=1, repeat=3)
    assert row["limit"] == "overhead" and row["bound"] == roof.bound(row["intensity"])


def test_rank_by_time_marks_overlapping_ranges_as_ties():
    from effdl.measuring.cases import rank_by_time

    rows = [dict(batch=16, seconds_to_target=0.10, seconds_min=0.09, seconds_max=0.15),
            dict(batch=128, seconds_to_target=0.12, seconds_min=0.11, seconds_max=0.13),
            dict(batch=1024, seconds_to_target=0.30, seconds_min=0.20, seconds_max=0.40),
            dict(batch=4096, seconds_to_target=None)]
    assert rank_by_time(rows) == "16 ≈ 128 < 1024 < 4096 (not reached)"
    chain = [dict(batch=128, seconds_to_target=0.12, seconds_min=0.10, seconds_max=0.15),
             dict(batch=16, seconds_to_target=0.15, seconds_min=0.14, seconds_max=0.25),
             dict(batch=1024, seconds_to_target=0.30, seconds_min=0.23, seconds_max=0.40)]
    assert rank_by_time(chain) == "128 ≈ 16 ≈ 1024 (yet 128 < 1024: their ranges do not overlap)"


def test_op_table_of_the_fastest_step(profiled_step):
    prof, batch, steps = profiled_step
    rows = rl.op_table(prof, top=10_000, step="fastest")
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["calls"] for r in rows if r["op"] == "aten::select") == 2 * batch
    mean = {(r["op"], r["shapes"]): r for r in rl.op_table(prof, top=10_000)}
    assert {(r["op"], r["shapes"]) for r in rows} <= set(mean)
    with pytest.raises(ValueError, match="fastest"):
        rl.op_table(prof, step="median")
