"""The measurements of the chapter "Fitting in memory", as rows.

Every row carries :data:`ROW_FIELDS` (``None`` where a field does not apply); the
benchmark (:mod:`effdl.memory.bench`) returns the same rows the chapter prints.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from effdl.measure import interleaved, quartiles
from effdl.memory import accounting as A
from effdl.memory import training as T
from effdl.memory.offload import OffloadExecutor, module_bytes
from effdl.memory.quant import quantize, quantize_model, rms_error

__all__ = ["ROW_FIELDS", "SHORT", "row", "load_model", "in_mib", "memory_sweep",
           "step_configs", "step_rows", "quant_error_rows", "quant_loss_rows",
           "matmul_rows", "finetune", "finetune_rows", "tuning_step_times",
           "tuning_plans", "qst_label", "STEP_LABELS", "TUNING_METHODS", "lrs_of",
           "offload_stack", "modelled_bandwidth", "cpu_link", "offload_rows", "stack_flops_per_s",
           "T4_FP32_FLOPS", "T4_LINK_BYTES"]

ROW_FIELDS = ("method", "bits", "batch", "seq", "peak_mem_bytes", "ms_per_step",
              "loss", "accuracy")

#: NVIDIA T4 datasheet: 8.1 TFLOP/s fp32 peak; its link, PCIe 3.0 x16: 15.75 GB/s per
#: direction (theoretical).  Their ratio sets the modelled link of the offloading cells
T4_FP32_FLOPS = 8.1e12
T4_LINK_BYTES = 15.75e9


def load_model(device=None):
    """The course's language model at the current profile (the inference chapter's
    large model), trained on first use and then read from the disk cache."""
    from effdl import lm

    return lm.load("target", device=device)


def row(method: str, **fields) -> dict:
    out = dict.fromkeys(ROW_FIELDS)
    out["method"] = method
    out.update(fields)
    return out


def _windows(data, batch, seq, seed):
    from effdl.lm.data import random_windows

    g = torch.Generator().manual_seed(seed)
    idx, targets = random_windows(data, batch, seq, g)
    return idx, targets


# --------------------------------------------------------------- where memory goes

def memory_sweep(base, data, batches, seqs, device) -> list[dict]:
    """Full fp32 fine-tuning: the formula's four parts and the measured peak, for
    every batch size and sequence length."""
    out = []
    for seq in seqs:
        for b in batches:
            idx, tg = (t.to(device) for t in _windows(data, b, seq, 0))
            f = A.training_step_memory(base.config, b, seq, "full")
            m = T.step_peak(T.tuned_model(base, "full"), idx, tg, device)
            out.append(row("full fp32", bits=32, batch=b, seq=seq,
                           peak_mem_bytes=m["total"], weights=f.weights,
                           gradients=f.gradients, optimizer=f.optimizer,
                           activations=f.activations, formula_bytes=f.total))
    return out


# --------------------------------------------------------------- one training step

def qst_label(reduction: int) -> str:
    return f"QST (NF4), side d/{reduction}"


def step_configs(device, qst_reductions=(4,)) -> list[tuple]:
    """(label, method, precision, checkpoint, side reduction) of the step comparison.

    bf16 autocast runs on any CPU (converted to fp32 around the products where the
    CPU has no bf16 instructions: slow, but its memory is what it would be) and on
    GPUs from sm_80; a GPU without bf16 (a T4) gets fp16 with loss scaling instead."""
    out = [("full fp32", "full", "fp32", False, None)]
    if T.has_bf16(device):
        out.append(("full bf16 autocast", "full", "mixed", False, None))
    elif device.type == "cuda":
        out.append(("full fp16 + loss scaling", "full", "fp16", False, None))
    out += [("full + checkpointing", "full", "fp32", True, None),
            ("LoRA", "lora", "fp32", False, None),
            ("QLoRA (NF4)", "qlora", "fp32", False, None)]
    out += [(qst_label(r), "qst", "fp32", False, r) for r in qst_reductions]
    return out


def step_rows(base, data, batch, seq, device, repeat: int, lora_r: int = 8,
              qst_reductions=(4,)) -> list[dict]:
    """Peak memory (measured, and by formula) and time of one training step of each
    configuration; times interleaved round by round, ratios to full fp32 per round."""
    idx, tg = (t.to(device) for t in _windows(data, batch, seq, 0))
    rows, steps = [], {}
    for label, method, precision, ckpt, red in step_configs(device, qst_reductions):
        model = T.tuned_model(base, method, lora_r=lora_r, qst_reduction=red or 4)
        m = T.step_peak(model, idx, tg, device, precision, ckpt)
        n_train = sum(p.numel() for p in T.trainable(model))
        # a quantized base's stored bytes: the resident bytes less the fp32 trainable
        # parameters, which the formula adds itself
        f = A.training_step_memory(
            base.config, batch, seq, "lora" if method == "qlora" else method,
            "fp32" if precision == "fp32" else "mixed",    # fp16: the same bytes as bf16
            ckpt, lora_r=lora_r, qst_reduction=red or 4,
            weight_bytes=m["resident"] - 4 * n_train if "q" in method else None)
        bits = 4 if method in ("qlora", "qst") else (32 if precision == "fp32" else 16)
        rows.append(row(label, bits=bits, batch=batch, seq=seq, tuning=method,
                        qst_reduction=red, peak_mem_bytes=m["total"],
                        resident_bytes=m["resident"], activations=f.activations,
                        formula_bytes=f.total, trainable=n_train))
        step = T.make_step(model, precision=precision, checkpoint=ckpt)
        steps[label] = lambda step=step: step(idx, tg)
    times = interleaved(steps, rounds=repeat, warmup=1, device=device)
    ref = times[rows[0]["method"]].times_ms
    for r in rows:
        t = times[r["method"]].times_ms
        q1, med, q3 = quartiles([a / b for a, b in zip(t, ref)])
        r.update(ms_per_step=statistics.median(t), time_ratio=med, time_ratio_q1=q1,
                 time_ratio_q3=q3)
    return rows


#: short column names of the chapter's tables (bytes shown in MiB)
SHORT = {"weights": "weights_MiB", "gradients": "grads_MiB", "optimizer": "adam_MiB",
         "activations": "act_MiB", "formula_bytes": "count_MiB",
         "peak_mem_bytes": "peak_MiB", "resident_bytes": "resident_MiB",
         "ms_per_step": "ms", "time_ratio": "time", "time_ratio_q1": "q1",
         "time_ratio_q3": "q3", "memory_ratio": "memory"}


def in_mib(rows) -> list[dict]:
    """Copies of ``rows`` with the short column names of :data:`SHORT` added (bytes
    in MiB, one decimal), for tables that fit the page."""
    out = []
    for r in rows:
        r = dict(r)
        for key, name in SHORT.items():
            if r.get(key) is not None:
                r[name] = round(r[key] / 2 ** 20, 1) if name.endswith("MiB") else r[key]
        out.append(r)
    return out


# --------------------------------------------------------------- quantization

SCHEME_LABELS = {"int8": "int8, one scale", "int8_channel": "int8, per channel",
                 "int4": "int4, groups of 64", "nf4": "NF4, blocks of 64"}


def _group(model) -> int:
    """int4's group size: 64, or the largest divisor of the width below it (the
    smoke profile's model is 48 wide)."""
    return math.gcd(64, model.config.d_model)


def _label(scheme: str, group: int) -> str:
    return SCHEME_LABELS[scheme].replace("64", str(group))


def _weights(model):
    """The 2-D weights of the linear layers a quantized model would replace."""
    return [m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "head"]


def quant_error_rows(base) -> list[dict]:
    """RMS error per weight of every scheme over the model's linear weights (pooled),
    with the bits each weight costs (scales included)."""
    out = []
    ws = _weights(base)
    n = sum(w.numel() for w in ws)
    g = _group(base)
    for scheme in SCHEME_LABELS:
        kw = {"double_quant": True} if scheme == "nf4" else {}   # as in QLoRA
        qts = [quantize(w, scheme, group_size=g, block=g, **kw) for w in ws]
        sq = sum(rms_error(w, q) ** 2 * w.numel() for w, q in zip(ws, qts))
        bits = 8 * sum(q.nbytes() for q in qts) / n
        out.append(row(_label(scheme, g), bits=bits, scheme=scheme,
                       rms_error=(sq / n) ** 0.5,
                       weight_rms=(sum(float((w * w).sum()) for w in ws) / n) ** 0.5))
    return out


def quant_loss_rows(base, held_out, seq: int, windows: int) -> list[dict]:
    """Held-out loss (bits per byte of Python source) of the model quantized with
    each scheme, and its resident bytes."""
    loss = _bpb(base, held_out, seq, windows)
    out = [row("fp32", bits=32, code_bits=32, loss=loss, bits_per_byte=loss,
               resident_bytes=T.resident_bytes(base))]
    g = _group(base)
    for scheme in SCHEME_LABELS:
        kw = {"double_quant": True} if scheme == "nf4" else {}
        q = quantize_model(base, scheme, group_size=g, block=g, **kw)
        loss = _bpb(q, held_out, seq, windows)
        code = 4 if "4" in scheme else 8
        out.append(row(_label(scheme, g), bits=code, code_bits=code, scheme=scheme,
                       loss=loss, bits_per_byte=loss,
                       resident_bytes=T.resident_bytes(q)))
    return out


@torch.no_grad()
def _bpb(model, data, seq, windows) -> float:
    from effdl.memory.task import heldout_scores

    return heldout_scores(model, data, seq, windows)["bits_per_byte"]


def matmul_rows(d_in: int, d_out: int, tokens: tuple[int, ...], device,
                repeat: int) -> list[dict]:
    """Time of y = x Wᵀ with W in fp32 against W stored in NF4 and dequantized in
    every call, for a few token counts (1 token: a decode step)."""
    from effdl.memory.quant import QuantLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.02)
    ql = QuantLinear.from_linear(lin, "nf4").to(device)
    out = []
    for n in tokens:
        x = torch.randn(n, d_in, generator=g).to(device)
        with torch.no_grad():
            res = interleaved({"fp32": lambda: lin(x), "nf4": lambda: ql(x)},
                              rounds=repeat, warmup=2, device=device)
        ratios = [a / b for a, b in zip(res["nf4"].times_ms, res["fp32"].times_ms)]
        q1, med, q3 = quartiles(ratios)
        out.append(row("NF4 dequantize + matmul", bits=4, tokens=n,
                       ms=statistics.median(res["nf4"].times_ms),
                       fp32_ms=statistics.median(res["fp32"].times_ms),
                       time_ratio=med, time_ratio_q1=q1, time_ratio_q3=q3))
    return out


# --------------------------------------------------------------- fine-tuning

#: the fine-tuning methods compared (see :data:`effdl.memory.training.TUNING`)
TUNING_METHODS = T.TUNING


def lrs_of(S) -> dict:
    """The learning rate of each method at sizes ``S``."""
    return {m: S.lr_full if m == "full" else S.lr_adapter for m in TUNING_METHODS}

def finetune(base, method: str, data, steps: int, batch: int, seq: int, lr: float,
             seed: int, device, eval_windows: int, lora_r: int = 8,
             qst_reduction: int = 4) -> dict:
    """Fine-tune a fresh copy of ``base`` with ``method`` on ``data.train``; held-out
    accuracy (%) and bits per byte, and the seconds the steps took."""
    from effdl.memory.task import heldout_scores

    torch.manual_seed(seed)                     # LoRA's A, the side network's init
    model = T.tuned_model(base, method, lora_r=lora_r, qst_reduction=qst_reduction)
    step = T.make_step(model, lr=lr)
    g = torch.Generator().manual_seed(1000 + seed)   # the batches, per seed
    from effdl.lm.data import random_windows

    t0 = time.perf_counter()
    for _ in range(steps):
        idx, tg = random_windows(data.train, batch, seq, g)
        step(idx.to(device), tg.to(device))
    seconds = time.perf_counter() - t0
    model.eval()
    scores = heldout_scores(model, data.held_out, seq, eval_windows)
    alpha = float(model.alpha.detach()) if method == "qst" else None   # QST's final mix
    return {"method": method, "seed": seed, "seconds": seconds, "alpha": alpha,
            **scores}


def finetune_rows(base, data, plans, lrs: dict, batch: int, seq: int, seeds, device,
                  eval_windows: int, lora_r: int = 8) -> list[dict]:
    """One row per plan and seed; ``plans``: (label, method, steps, side reduction)."""
    out = []
    for seed in seeds:
        for label, method, steps, red in plans:
            r = finetune(base, method, data, steps, batch, seq, lrs[method], seed,
                         device, eval_windows, lora_r, red or 4)
            out.append(row(label, batch=batch, seq=seq, accuracy=r["accuracy"],
                           loss=r["bits_per_byte"], seed=seed, tuning=method,
                           seconds=r["seconds"], steps=steps, lr=lrs[method],
                           alpha=r["alpha"]))
    return out


def tuning_step_times(base, data, batch: int, seq: int, device, repeat: int,
                      lora_r: int = 8, qst_reductions=(4,)) -> list[dict]:
    """Time of one step of LoRA and of each QST variant at the fine-tuning batch,
    interleaved (the rows :func:`tuning_plans` reads)."""
    idx, tg = (t.to(device) for t in _windows(data, batch, seq, 0))
    rows = [row("LoRA", tuning="lora", qst_reduction=None)]
    rows += [row(qst_label(r), tuning="qst", qst_reduction=r) for r in qst_reductions]
    steps = {}
    for r in rows:
        model = T.tuned_model(base, r["tuning"], lora_r=lora_r,
                              qst_reduction=r["qst_reduction"] or 4)
        step = T.make_step(model)
        steps[r["method"]] = lambda step=step: step(idx, tg)
    # why more rounds than elsewhere: these steps are short, and their ratio sets a
    # number of steps, not just a figure
    times = interleaved(steps, rounds=max(6, 2 * repeat), warmup=2, device=device)
    for r in rows:
        r["ms_per_step"] = statistics.median(times[r["method"]].times_ms)
    return rows


def tuning_plans(steps: int, step_rows_: list[dict]) -> list[tuple]:
    """Full fine-tuning, LoRA and QLoRA for ``steps`` steps each; every QST variant of
    ``step_rows_`` for as many steps as take it the time of LoRA's (from measured step
    times at the fine-tuning batch: :func:`tuning_step_times`)."""
    by = {r["method"]: r for r in step_rows_}
    plans = [(STEP_LABELS[m], m, steps, None) for m in ("full", "lora", "qlora")]
    for r in step_rows_:
        if r["tuning"] == "qst":
            same_time = max(steps, round(steps * by["LoRA"]["ms_per_step"]
                                         / r["ms_per_step"]))
            plans.append((r["method"], "qst", same_time, r["qst_reduction"]))
    return plans


#: the step comparison's label of each fine-tuning method
STEP_LABELS = {"full": "full fp32", "lora": "LoRA", "qlora": "QLoRA (NF4)"}


# --------------------------------------------------------------- offloading

def offload_stack(n_layer: int, d_model: int, n_head: int, seq: int, device,
                  seed: int = 0):
    """``n_layer`` transformer blocks of width ``d_model`` (random weights: timing
    and memory do not depend on their values) and the RoPE tables for ``seq``."""
    from effdl.lm.model import Block, LMConfig, rope_tables

    torch.manual_seed(seed)
    c = LMConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, max_len=seq)
    layers = [Block(c).to(device).requires_grad_(False) for _ in range(n_layer)]
    cos, sin = rope_tables(c.head_dim, seq, c.rope_base)
    return layers, cos.to(device), sin.to(device)


def modelled_bandwidth(flops_per_s: float) -> float:
    """The link speed (bytes/s) that gives this machine a T4's ratio of copy to
    compute: ``flops_per_s · T4_LINK_BYTES / T4_FP32_FLOPS``."""
    return flops_per_s * T4_LINK_BYTES / T4_FP32_FLOPS


def _resident_run(layers, x, cos, sin):
    with torch.no_grad():
        for layer in layers:
            x = layer(x, cos, sin)
    return x


def offload_rows(layers, cos, sin, batch: int, seq: int, ks, device, repeat: int,
                 bandwidth: float | None) -> list[dict]:
    """Time and resident layer bytes of the all-resident stack and of the offloading
    executor with k slots, synchronous and prefetching.  Every version runs once per
    round, rounds interleaved (:func:`effdl.measure.interleaved`); time ratios to the
    all-resident stack are taken per round.  Each offloaded run starts with no layer
    resident, and its output must equal the all-resident stack's, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, layers[0].norm1.weight.numel(), generator=g).to(device)
    every = len(layers) * module_bytes(layers[0])
    want = _resident_run(layers, x, cos, sin)
    executors = {(k, mode): OffloadExecutor(layers, k=k, mode=mode, device=device,
                                            bandwidth=bandwidth)
                 for k in ks for mode in ("sync", "prefetch")}
    got = {}

    def offloaded(key):
        ex = executors[key]
        ex.evict_all()                       # each run loads every layer again
        got[key] = ex.run(x, cos, sin)

    fns = {"all resident": lambda: _resident_run(layers, x, cos, sin)}
    fns.update({key: (lambda key=key: offloaded(key)) for key in executors})
    try:
        times = interleaved(fns, rounds=repeat, warmup=1, device=device)
    finally:
        for ex in executors.values():
            ex.close()
    ref = times["all resident"].times_ms
    out = [row("all resident", batch=batch, seq=seq, k=len(layers),
               ms=statistics.median(ref), resident_bytes=every, time_ratio=1.0,
               time_ratio_q1=1.0, time_ratio_q3=1.0, memory_ratio=1.0)]
    for (k, mode), ex in executors.items():
        if not torch.equal(got[(k, mode)], want):
            raise AssertionError("the offloaded stack changed the output")
        t = times[(k, mode)].times_ms
        q1, med, q3 = quartiles([a / b for a, b in zip(t, ref)])
        peak = ex.stats["peak_resident_bytes"]
        out.append(row(f"offload, {mode}", batch=batch, seq=seq, k=k,
                       ms=statistics.median(t), resident_bytes=peak, time_ratio=med,
                       time_ratio_q1=q1, time_ratio_q3=q3, memory_ratio=peak / every))
    return out


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def cpu_link(layers, cos, sin, batch: int, seq: int, device, repeat: int) -> dict:
    """The modelled link of the offloading measurements on a CPU: this machine's
    FLOP rate on the resident stack (timed, FLOPs counted) and the bandwidth that gives
    it a T4's ratio of copy to compute (:func:`modelled_bandwidth`)."""
    ref = offload_rows(layers, cos, sin, batch, seq, (), device, repeat, None)
    flops = stack_flops_per_s(layers, cos, sin, batch, seq, device, ref[0]["ms"])
    return {"flops_per_s": flops, "bandwidth": modelled_bandwidth(flops)}


def stack_flops_per_s(layers, cos, sin, batch, seq, device, ms: float) -> float:
    """FLOPs of one run of the stack (counted) over its measured time."""
    from effdl.measure import count_flops

    x = torch.zeros(batch, seq, layers[0].norm1.weight.numel(), device=device)
    return count_flops(lambda: _resident_run(layers, x, cos, sin)) / (ms / 1e3)

