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
