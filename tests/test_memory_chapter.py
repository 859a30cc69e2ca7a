"""The chapter "Fitting in memory": its training steps (effdl.memory.training), its data
(effdl.memory.task), its measurements (effdl.memory.experiments), sizes and benchmark rows.

The library half (quantization, LoRA, QST, offloading, accounting) is tested in
tests/test_memory.py; here: the chapter's modules built on it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from effdl import lm
from effdl.estimate import Work
from effdl.memory import accounting, task
from effdl.memory import experiments as E
from effdl.memory import training as T
from effdl.memory.offload import OffloadExecutor
from effdl.memory.quant import QuantLinear, quantize_model
from effdl.memory.sizes import SIZES, work

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one CPU thread (the conftest restores the count)."""
    torch.set_num_threads(1)


def _model(seed=0, **kw) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_len=64) | kw
    return lm.ByteLM(lm.LMConfig(**c)).eval()


def _ids(B=3, T_=13, seed=1):
    return torch.randint(0, 256, (B, T_), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ training.forward / loss

def test_checkpointed_forward_equals_plain_in_logits_and_every_gradient():
    idx, tg = _ids(3, 13), _ids(3, 13, seed=2)
    grads, logits = [], []
    for ckpt in (False, True):
        m = _model()
        out = T.forward(m, idx, checkpoint=ckpt)
        nn.functional.cross_entropy(out.flatten(0, 1), tg.flatten()).backward()
        logits.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert logits[0].shape == (3, 13, 256)
    torch.testing.assert_close(logits[1], logits[0])
    assert grads[1].keys() == grads[0].keys() and len(grads[0]) == len(list(_model().parameters()))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    # and the plain path is the model's own forward
    torch.testing.assert_close(logits[0], _model()(idx).detach())


def test_mixed_precision_loss_is_close_to_fp32_and_unknown_precision_is_refused():
    m, idx, tg = _model(), _ids(), _ids(seed=2)
    fp32 = T.loss(m, idx, tg, "fp32")
    mixed = T.loss(m, idx, tg, "mixed")
    assert fp32.dtype == mixed.dtype == torch.float32
    # a random model: loss near ln 256; bf16 rounding moves it by well under 1 %
    assert fp32.item() == pytest.approx(math.log(256), rel=0.05)
    assert mixed.item() == pytest.approx(fp32.item(), rel=1e-2)
    # the loss the step trains on is the model's own mean cross-entropy
    ref = nn.functional.cross_entropy(m(idx).flatten(0, 1), tg.flatten())
    torch.testing.assert_close(fp32, ref)
    torch.testing.assert_close(T.loss(m, idx, tg, "fp32", checkpoint=True), ref)
    with pytest.raises(ValueError, match="for CUDA GPUs.*'mixed'"):
        T.loss(m, idx, tg, "fp16")                   # fp16 + loss scaling: CUDA only
    for bad in ("bf16", "FP32"):
        with pytest.raises(ValueError, match="'fp32', 'mixed', 'fp16'"):
            T.loss(m, idx, tg, bad)


# ------------------------------------------------------------------------ training.tuned_model

@pytest.mark.parametrize("method", T.TUNING)
def test_tuned_model_trains_the_parameters_the_accounting_counts(method):
    base = _model()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    # not the defaults (8, 4): the arguments must reach the adapters
    tm = T.tuned_model(base, method, lora_r=4, qst_reduction=2)
    n = sum(p.numel() for p in T.trainable(tm))
    acc_method = "lora" if method == "qlora" else method
    f = accounting.training_step_memory(base.config, 1, 8, acc_method, lora_r=4,
                                        qst_reduction=2)
    assert n == f.gradients // 4 > 0
    if method != "full":
        assert n < accounting.param_counts(base.config)["total"] / 4
    quantized = [mod for mod in tm.modules() if isinstance(mod, QuantLinear)]
    if method in ("qlora", "qst"):
        # every linear layer but the head is stored in NF4, with no fp32 weight beside it
        assert len(quantized) == 5 * base.config.n_layer
        assert all(q.scheme == "nf4" for q in quantized)
        fp32_linears = [name for name, mod in tm.named_modules()
                        if isinstance(mod, nn.Linear) and mod.weight.requires_grad is False]
        assert all(name.endswith("head") for name in fp32_linears), fp32_linears
        assert T.resident_bytes(tm) < T.resident_bytes(base)
    else:
        assert not quantized
    # the base passed in is left as it was: same values, same requires_grad
    after = dict(base.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, rg) in before.items():
        assert torch.equal(after[name].detach(), value) and after[name].requires_grad == rg
    # a fresh copy: no parameter shared with the base
    own = {p.data_ptr() for p in base.parameters()}
    assert not own & {p.data_ptr() for p in tm.parameters()}


def test_tuned_model_starts_at_the_base_models_output():
    """Every method starts where the pretrained model is (LoRA's B = 0, QST's α = 1);
    the quantized bases only up to NF4's error."""
    base, idx = _model(), _ids()
    want = base(idx)
    for method in T.TUNING:
        got = T.tuned_model(base, method, lora_r=4)(idx)
        tol = dict(rtol=0, atol=1e-5) if method in ("full", "lora") else dict(rtol=0, atol=0.2)
        torch.testing.assert_close(got, want, **tol, msg=method)


def test_tuned_model_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="full, lora, qlora, qst"):
        T.tuned_model(_model(), "prefix")


def test_tuned_full_model_trains_even_a_frozen_base():
    base = _model().requires_grad_(False)
    tm = T.tuned_model(base, "full")
    assert all(p.requires_grad for p in tm.parameters())
    assert not any(p.requires_grad for p in base.parameters())


# ------------------------------------------------------------------------ training.make_step

@pytest.mark.parametrize("method", ["full", "lora"])
def test_make_step_lowers_the_loss_and_drops_the_gradients(method):
    m = T.tuned_model(_model(), method, lora_r=4)
    idx, tg = _ids(2, 16), _ids(2, 16, seed=2)
    step = T.make_step(m, lr=1e-2)
    assert isinstance(step.optimizer, torch.optim.AdamW)
    trained = T.trainable(m)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(5):
        losses.append(step(idx, tg))
        assert all(p.grad is None for p in m.parameters())
    assert all(isinstance(v, float) for v in losses)
    assert losses[-1] < losses[0] - 0.1
    assert sorted(map(id, trained)) == sorted(id(p) for g in step.optimizer.param_groups
                                              for p in g["params"])
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_make_step_refuses_a_model_with_nothing_to_train():
    with pytest.raises(ValueError, match="no trainable parameter"):
        T.make_step(_model().requires_grad_(False))


# ------------------------------------------------------------------------ step_peak, resident_bytes

def test_checkpointing_lowers_the_measured_step_peak():
    base = _model()
    g = torch.Generator().manual_seed(1)
    idx, tg = (torch.randint(0, 256, (4, 64), generator=g) for _ in range(2))
    plain = T.step_peak(T.tuned_model(base, "full"), idx, tg, CPU)
    ckpt = T.step_peak(T.tuned_model(base, "full"), idx, tg, CPU, checkpoint=True)
    P = accounting.param_counts(base.config)["total"]
    for m in (plain, ckpt):
        assert set(m) == {"resident", "optimizer", "step", "total"}
        assert m["total"] == m["resident"] + m["optimizer"] + m["step"]
        assert m["resident"] == T.resident_bytes(base)
        # steady state: AdamW's two moments exist before the measured step
        assert m["optimizer"] == 8 * P
    # activations dominate at batch 4 × 64 tokens, d 32: keeping only block inputs
    # saves far more than the recomputation costs
    assert ckpt["step"] < 0.75 * plain["step"]
    # the step holds at least the gradients (4 bytes/param)
    assert ckpt["step"] >= 4 * P


def test_resident_bytes_counts_distinct_storages_and_packed_codes():
    m = _model()
    params = sum(p.numel() * 4 for p in m.parameters())
    bufs = sum(b.numel() * b.element_size() for b in m.buffers())
    assert T.resident_bytes(m) == params + bufs
    # a tied weight is one storage, counted once
    m.head.weight = m.embed.weight
    assert T.resident_bytes(m) == params + bufs - m.embed.weight.numel() * 4
    q = quantize_model(_model(), "nf4")
    assert T.resident_bytes(q) < 0.6 * T.resident_bytes(_model())


# ------------------------------------------------------------------------ task: C++ headers

def test_load_headers_is_deterministic_disjoint_and_ascii():
    a = task.load_headers(65_536)
    b = task.load_headers(65_536)
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert a.digest == b.digest and len(a.digest) == 64
    assert a.train.dtype == torch.uint8
    assert a.train.numel() + a.held_out.numel() == pytest.approx(65_536, abs=2)
    assert a.held_out.numel() == pytest.approx(0.2 * 65_536, abs=2)
    assert a.train_files and a.held_out_files
    assert not set(a.train_files) & set(a.held_out_files)
    assert all(f.endswith(".h") for f in a.train_files + a.held_out_files)
    for t in (a.train, a.held_out):
        assert int(t.max()) < 128
    # each call hands out its own tensors: changing one leaves the next call's alone
    a.train[0] = 255
    assert int(task.load_headers(65_536).train[0]) < 128
    # a different budget, a different corpus
    assert task.load_headers(32_768).digest != a.digest
    assert task.load_headers(65_536, 0.3).held_out.numel() > a.held_out.numel()


def test_load_headers_refuses_bad_arguments(tmp_path):
    for bad in (1024, 4095, 65_536.0, "65536", True):
        with pytest.raises(ValueError, match="max_bytes must be an int >= 4096"):
            task.load_headers(bad)
    for frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            task.load_headers(65_536, frac)
    with pytest.raises(ValueError, match="is not a folder.*reinstall torch"):
        task.load_headers(65_536, root=tmp_path / "missing")
    # a folder without headers: too few bytes, said so
    with pytest.raises(ValueError, match=r"only 0 train bytes|no \*\.h"):
        task.load_headers(65_536, root=tmp_path)


def test_load_headers_from_a_folder_of_our_own(tmp_path):
    """The split, the separator and the non-ASCII filter, on files whose bytes we know."""
    from effdl.lm.data import SEP, split_of

    names = [f"d{i}/f{i}.h" for i in range(40)]
    for i, rel in enumerate(names):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"// caf\xc3\xa9\n" + f"int x{i};\n".encode() * 40)
    (tmp_path / "skip.cpp").write_bytes(b"x" * 5000)               # not a header
    c = task.load_headers(8192, 0.5, root=tmp_path)
    assert c.train.numel() == c.held_out.numel() == 4096
    for side, files in (("train", c.train_files), ("held_out", c.held_out_files)):
        assert all(split_of(f, 0.5) == side for f in files)
    assert "skip.cpp" not in c.train_files + c.held_out_files
    first = (tmp_path / c.train_files[0]).read_bytes()
    text = bytes(b for b in first if b < 128)
    assert bytes(c.train[:len(text)].tolist()) == text
    assert int(c.train[len(text)]) == SEP
    assert int(c.train.max()) < 128


class _NextByte(nn.Module):
    """Predicts byte (x + 1) % 128 after byte x, with margin ``margin``."""

    def __init__(self, margin=20.0):
        super().__init__()
        self.margin = margin
        self.dummy = nn.Parameter(torch.zeros(()))      # heldout_scores reads the device

    def forward(self, idx):
        return nn.functional.one_hot((idx + 1) % 128, 256).float() * self.margin + self.dummy


def test_heldout_scores_of_a_perfect_and_of_a_wrong_predictor():
    data = (torch.arange(1000) % 128).to(torch.uint8)
    good = task.heldout_scores(_NextByte(), data, seq_len=16, windows=4)
    assert good["accuracy"] == 100.0
    assert good["bits_per_byte"] < 1e-5
    # ce of a one-hot logit with margin 5 among 256: log(1 + 255 e^-5) nats
    soft = task.heldout_scores(_NextByte(margin=5.0), data, seq_len=16, windows=4)
    assert soft["accuracy"] == 100.0
    want = math.log1p(255 * math.exp(-5)) / math.log(2)
    assert soft["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    bad = task.heldout_scores(_NextByte(margin=0.0), data, seq_len=16, windows=4)
    assert bad["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)   # uniform over 256
    shifted = (data.long() + 5) % 128
    wrong = task.heldout_scores(_NextByte(), shifted.to(torch.uint8)[::2], 16, 3)
    assert wrong["accuracy"] == 0.0 and wrong["bits_per_byte"] > 20


def test_heldout_scores_reads_the_windows_it_says():
    """The last window ends at the last byte: a wrong byte there is seen."""
    data = (torch.arange(200) % 128).to(torch.uint8)
    data[-1] = 7                                           # breaks the rule once, at the end
    s = task.heldout_scores(_NextByte(), data, seq_len=10, windows=2)
    assert s["accuracy"] == pytest.approx(95.0)            # 1 of 20 predictions wrong
    data = (torch.arange(200) % 128).to(torch.uint8)
    data[5] = 7                                            # inside the first window
    s = task.heldout_scores(_NextByte(), data, seq_len=10, windows=2)
    assert s["accuracy"] == pytest.approx(90.0)            # byte 5 is a target and an input


def test_heldout_scores_refuses_no_windows_and_short_data():
    data = (torch.arange(100) % 128).to(torch.uint8)
    with pytest.raises(ValueError, match="windows >= 1"):
        task.heldout_scores(_NextByte(), data, 16, 0)
    with pytest.raises(ValueError, match="seq_len=200"):
        task.heldout_scores(_NextByte(), data, 200, 2)


# ------------------------------------------------------------------------ experiments: offloading

def test_offload_rows_memory_ratio_is_k_over_layers():
    layers, cos, sin = E.offload_stack(3, 32, 4, 16, CPU)
    rows = E.offload_rows(layers, cos, sin, 2, 16, (1, 2, 3), CPU, 1, None)
    assert rows[0]["method"] == "all resident"
    assert rows[0]["memory_ratio"] == 1.0 and rows[0]["time_ratio"] == 1.0
    assert rows[0]["k"] == 3
    rest = rows[1:]
    assert [(r["k"], r["method"]) for r in rest] == [
        (k, f"offload, {mode}") for k in (1, 2, 3) for mode in ("sync", "prefetch")]
    for r in rest:
        assert r["memory_ratio"] == pytest.approx(r["k"] / 3)
        assert r["resident_bytes"] == r["k"] * rows[0]["resident_bytes"] // 3
        assert r["ms"] > 0 and r["time_ratio"] > 0
    for r in rows:
        assert set(E.ROW_FIELDS) <= set(r) and r["batch"] == 2 and r["seq"] == 16


def test_offload_rows_checks_the_output(monkeypatch):
    layers, cos, sin = E.offload_stack(3, 32, 4, 16, CPU)
    real = OffloadExecutor.run

    def perturbed(self, x, *args):
        return real(self, x, *args) + 1e-6

    monkeypatch.setattr(OffloadExecutor, "run", perturbed)
    with pytest.raises(AssertionError, match="changed the output"):
        E.offload_rows(layers, cos, sin, 2, 16, (1,), CPU, 1, None)


def test_offload_stack_is_seeded_and_frozen():
    a, cos, sin = E.offload_stack(2, 32, 4, 16, CPU, seed=3)
    b, _, _ = E.offload_stack(2, 32, 4, 16, CPU, seed=3)
    assert len(a) == 2 and cos.shape == sin.shape == (16, 4)
    for la, lb in zip(a, b):
        for pa, pb in zip(la.parameters(), lb.parameters()):
            assert torch.equal(pa, pb) and not pa.requires_grad
    assert not torch.equal(a[0].attn.wq.weight, a[1].attn.wq.weight)


def test_modelled_bandwidth_keeps_the_t4_ratio():
    for f in (1e9, 3.7e10, E.T4_FP32_FLOPS):
        assert E.modelled_bandwidth(f) == pytest.approx(f * E.T4_LINK_BYTES / E.T4_FP32_FLOPS)
        # break-even tokens of an fp32 layer: 2 FLOPs per weight per token vs 4 bytes
        assert 2 * f / E.modelled_bandwidth(f) == pytest.approx(1028.57, abs=0.01)
    assert E.modelled_bandwidth(E.T4_FP32_FLOPS) == E.T4_LINK_BYTES


# ------------------------------------------------------------------------ experiments: quantization

@pytest.mark.parametrize("d_model", [32, 48, 64])
def test_quant_error_rows_per_scheme(d_model):
    base = _model(d_model=d_model)
    rows = E.quant_error_rows(base)
    by = {r["scheme"]: r for r in rows}
    assert list(by) == list(E.SCHEME_LABELS)
    g = math.gcd(64, d_model)
    assert by["int4"]["method"] == f"int4, groups of {g}"
    assert by["nf4"]["method"] == f"NF4, blocks of {g}"
    assert 8 <= by["int8"]["bits"] < 8.05          # one fp32 scale per matrix
    assert 8 < by["int8_channel"]["bits"] < 9
    assert 4 + 32 / g - 0.01 < by["int4"]["bits"] < 4 + 32 / g + 0.01   # an fp32 scale per group
    assert 4.1 < by["nf4"]["bits"] < 4.6 and by["nf4"]["bits"] < by["int4"]["bits"]
    # NF4 in blocks of g, double quantized: an 8-bit scale code per block, plus a little
    assert 4 + 8 / g <= by["nf4"]["bits"] < 4 + 8 / g + 0.04
    assert by["int8_channel"]["rms_error"] <= by["int8"]["rms_error"]
    assert by["int8"]["rms_error"] < by["nf4"]["rms_error"]
    assert by["int8"]["rms_error"] < by["int4"]["rms_error"]
    ws = [m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    rms = math.sqrt(sum(float((w.detach() ** 2).sum()) for w in ws) / sum(w.numel() for w in ws))
    # the pooled error, recomputed matrix by matrix
    from effdl.memory.quant import quantize, rms_error
    n = sum(w.numel() for w in ws)
    for scheme in ("int8", "int8_channel", "int4"):
        sq = sum(rms_error(w, quantize(w, scheme, group_size=g)) ** 2 * w.numel() for w in ws)
        assert by[scheme]["rms_error"] == pytest.approx(math.sqrt(sq / n), rel=1e-5)
    for r in rows:
        assert r["weight_rms"] == pytest.approx(rms, rel=1e-5)
        assert 0 < r["rms_error"] < 0.2 * rms
        assert set(E.ROW_FIELDS) <= set(r)


def test_quant_loss_rows_on_a_tiny_model():
    base = _model()
    data = (torch.arange(2000) * 7 % 128).to(torch.uint8)
    rows = E.quant_loss_rows(base, data, 16, 2)
    assert [r["method"] for r in rows][0] == "fp32"
    assert [r.get("scheme") for r in rows[1:]] == list(E.SCHEME_LABELS)
    fp32 = rows[0]
    assert fp32["loss"] == pytest.approx(
        task.heldout_scores(base, data, 16, 2)["bits_per_byte"])
    assert fp32["resident_bytes"] == T.resident_bytes(base)
    for r in rows[1:]:
        assert r["resident_bytes"] < fp32["resident_bytes"]
        assert r["loss"] == pytest.approx(fp32["loss"], abs=0.05)   # random model: ~8 bits
    assert rows[-1]["resident_bytes"] < rows[1]["resident_bytes"]   # nf4 < int8


# ------------------------------------------------------------------------ experiments: step rows

@pytest.fixture(scope="module")
def step_table():
    torch.set_num_threads(1)
    base = _model()
    data = (torch.arange(3000) * 7 % 256).to(torch.uint8)
    return E.step_rows(base, data, 2, 16, CPU, repeat=1, lora_r=4, qst_reductions=(2,))


def test_step_rows_cover_every_configuration(step_table):
    rows = step_table
    assert [r["method"] for r in rows] == [c[0] for c in E.step_configs(CPU, (2,))]
    by = {r["method"]: r for r in rows}
    assert by["full fp32"]["time_ratio"] == 1.0
    P = accounting.param_counts(_model().config)["total"]
    assert by["full fp32"]["trainable"] == by["full + checkpointing"]["trainable"] == P
    assert by["LoRA"]["trainable"] == by["QLoRA (NF4)"]["trainable"] < P / 4
    assert by["full + checkpointing"]["activations"] < by["full fp32"]["activations"]
    assert by["full bf16 autocast"]["activations"] * 2 == pytest.approx(
        by["full fp32"]["activations"], rel=0.01)
    assert [r["bits"] for r in rows] == [32, 16, 32, 32, 4, 4]
    assert by["QLoRA (NF4)"]["resident_bytes"] < by["LoRA"]["resident_bytes"]
    for r in rows:
        assert r["peak_mem_bytes"] > 0 and r["ms_per_step"] > 0 and r["formula_bytes"] > 0
        assert r["time_ratio_q1"] <= r["time_ratio"] <= r["time_ratio_q3"]
        assert (r["batch"], r["seq"]) == (2, 16)


def test_step_rows_formula_counts_quantized_weights_once(step_table):
    by = {r["method"]: r for r in step_table}
    for label in ("QLoRA (NF4)", E.qst_label(2)):
        r = by[label]
        # formula = stored weights (what the model holds) + grads + AdamW (12 B/param) + acts
        assert r["formula_bytes"] == r["resident_bytes"] + 12 * r["trainable"] + r["activations"]


def test_tuning_plans_give_qst_the_time_of_lora():
    rows = [{"method": "LoRA", "tuning": "lora", "ms_per_step": 30.0},
            {"method": E.qst_label(4), "tuning": "qst", "qst_reduction": 4,
             "ms_per_step": 10.0},
            {"method": E.qst_label(8), "tuning": "qst", "qst_reduction": 8,
             "ms_per_step": 6.0},
            {"method": "full fp32", "tuning": "full", "ms_per_step": 50.0}]
    plans = E.tuning_plans(7, rows)
    assert [p[1] for p in plans] == ["full", "lora", "qlora", "qst", "qst"]
    assert all(p[2] == 7 for p in plans[:3]) and [p[2] for p in plans[3:]] == [21, 35]
    assert [p[3] for p in plans] == [None, None, None, 4, 8]
    rows[1]["ms_per_step"] = 60.0                   # QST slower than LoRA: never fewer steps
    assert E.tuning_plans(7, rows)[3][2] == 7


def test_step_configs_on_the_cpu():
    labels = [c[0] for c in E.step_configs(CPU)]
    assert labels == ["full fp32", "full bf16 autocast", "full + checkpointing", "LoRA",
                      "QLoRA (NF4)", E.qst_label(4)]
    for label, method, precision, ckpt, red in E.step_configs(CPU):
        assert (red is not None) == (method == "qst")
        assert method in T.TUNING and precision in ("fp32", "mixed")
        assert ckpt == (label == "full + checkpointing")


# ------------------------------------------------------------------------ sizes, bench

def test_sizes_profiles_and_work():
    assert set(SIZES) == {"smoke", "cpu", "gpu"}
    flops = []
    for name, S in SIZES.items():
        assert S.models == name
        assert S.offload_d % 4 == 0                   # offload_stack uses 4 heads
        assert all(1 <= k <= S.offload_layers for k in S.offload_ks)
        assert S.header_bytes >= 4096
        w = work(S)
        assert isinstance(w, Work)
        assert w.flops32 > 0 and w.bytes > 0 and w.ops > 0
        flops.append(w.flops32)
        # more of any measurement, more work
        more = [dataclasses.replace(S, batches=S.batches + (32,)),
                dataclasses.replace(S, seeds=S.seeds + (99,)),
                dataclasses.replace(S, steps=S.steps + 10),
                dataclasses.replace(S, offload_ks=S.offload_ks + (1,)),
                dataclasses.replace(S, repeat=S.repeat + 1)]
        for S2 in more:
            assert work(S2).flops32 > w.flops32, S2
    assert flops == sorted(flops)                     # smoke < cpu < gpu
    assert SIZES["smoke"].threads == SIZES["cpu"].threads == 1 and SIZES["gpu"].threads is None
    assert E.lrs_of(SIZES["cpu"]) == {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2, "qst": 1e-2}


SECTIONS = ("sweep", "step", "quant error", "quant loss", "matmul", "fine-tune", "offload")


def test_smoke_bench_rows(smoke_bench_rows):
    S = SIZES["smoke"]
    rows, threads, threads_after = smoke_bench_rows("memory")
    assert threads_after == threads
    assert rows and all(set(E.ROW_FIELDS) <= set(r) for r in rows)
    assert all(r["section"] in SECTIONS for r in rows)
    assert [s for s in SECTIONS if any(r["section"] == s for r in rows)] == list(SECTIONS)
    sec = lambda s: [r for r in rows if r["section"] == s]
    assert len(sec("sweep")) == len(S.batches) * len(S.seqs)
    assert all(r["peak_mem_bytes"] > 0 for r in sec("sweep") + sec("step"))
    assert [r["method"] for r in sec("step")] == [c[0] for c in E.step_configs(CPU)]
    tune = sec("fine-tune")
    plans = E.tuning_plans(S.steps, sec("step"))    # every method, QST at LoRA's time
    assert {p[1] for p in plans} == set(T.TUNING)
    assert [(r["method"], r["seed"]) for r in tune] == [
        (p[0], seed) for seed in S.seeds for p in plans]
    assert [r["steps"] for r in tune] == [p[2] for seed in S.seeds for p in plans]
    for r in tune:
        assert 0 <= r["accuracy"] <= 100 and r["loss"] > 0
    off = sec("offload")
    assert len(off) == 1 + 2 * len(S.offload_ks)
    assert all(r["link_bytes_per_s"] and r["link_bytes_per_s"] > 0 for r in off)
    assert len(sec("matmul")) == len(S.matmul_tokens)


def test_a_gpu_without_bf16_gets_fp16_with_loss_scaling(monkeypatch):
    """A T4 (sm_75) only emulates bf16: the comparison runs fp16 + a loss scaler there."""
    monkeypatch.setattr(T, "has_bf16", lambda device: False)
    labels = [c[0] for c in E.step_configs(torch.device("cuda"))]
    assert "full fp16 + loss scaling" in labels and "full bf16 autocast" not in labels
    monkeypatch.setattr(T, "has_bf16", lambda device: True)
    labels = [c[0] for c in E.step_configs(torch.device("cuda"))]
    assert "full bf16 autocast" in labels and "full fp16 + loss scaling" not in labels


def test_tuning_step_times_rows_feed_the_plans():
    torch.set_num_threads(1)
    base = _model()
    data = (torch.arange(3000) * 7 % 256).to(torch.uint8)
    rows = E.tuning_step_times(base, data, 2, 16, CPU, 1, lora_r=4, qst_reductions=(2, 4))
    assert [r["method"] for r in rows] == ["LoRA", E.qst_label(2), E.qst_label(4)]
    assert all(r["ms_per_step"] > 0 for r in rows)
    plans = E.tuning_plans(5, rows)
    assert [p[3] for p in plans] == [None, None, None, 2, 4]
    assert all(p[2] >= 5 for p in plans)


def test_cpu_link_gives_this_machine_a_t4s_copy_to_compute_ratio():
    layers, cos, sin = E.offload_stack(2, 32, 4, 16, CPU)
    m = E.cpu_link(layers, cos, sin, 2, 16, CPU, repeat=1)
    assert m["flops_per_s"] > 0
    assert m["bandwidth"] == pytest.approx(m["flops_per_s"] * E.T4_LINK_BYTES / E.T4_FP32_FLOPS)
