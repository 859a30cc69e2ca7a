"""``python -m effdl.bench memory``: the chapter's measurements as rows.

Rows carry :data:`effdl.memory.experiments.ROW_FIELDS` (``method``, ``bits``,
``batch``, ``seq``, ``peak_mem_bytes``, ``ms_per_step``, ``loss``, ``accuracy``;
``None`` where a field does not apply) and a ``section`` naming the measurement: the
training-step memory sweep, the step comparison (full fp32, bf16 autocast,
checkpointing, LoRA, QLoRA, QST), quantization (error and held-out loss), the
dequantize-matmul timing, fine-tuning accuracy per method and seed, and offloading.
"""

from __future__ import annotations

import torch

from effdl.measure import cpu_thread_policy
from effdl.memory import experiments as E

__all__ = ["run", "gpu_suite"]


def _tag(rows, section):
    for r in rows:
        r["section"] = section
    return rows


def run(S, device: torch.device) -> list[dict]:
    """Every measurement of the chapter at sizes ``S`` (the model trained on first
    use)."""
    from effdl import lm
    from effdl.lm.data import load_corpus
    from effdl.memory.task import load_headers

    with cpu_thread_policy(device, S.threads):
        base = lm.load("target", S.models, device=device, verbose=False)  # large model
        data = load_headers(S.header_bytes)
        rows = _tag(E.memory_sweep(base, data.train, S.batches, S.seqs, device), "sweep")
        steps = E.step_rows(base, data.train, S.batch, S.seq, device, S.repeat,
                            S.lora_r, S.qst_reductions)
        rows += _tag(steps, "step")
        rows += _tag(E.quant_error_rows(base), "quant error")
        held = load_corpus(lm.profiles.SIZES[S.models].corpus_bytes).held_out
        rows += _tag(E.quant_loss_rows(base, held, S.seq, S.eval_windows), "quant loss")
        d = base.config.d_model
        rows += _tag(E.matmul_rows(d, 4 * d, S.matmul_tokens, device, S.repeat),
                     "matmul")
        times = E.tuning_step_times(base, data.train, S.tune_batch, S.seq, device,
                                    S.repeat, S.lora_r, S.qst_reductions)
        rows += _tag(E.finetune_rows(base, data, E.tuning_plans(S.steps, times),
                                     E.lrs_of(S), S.tune_batch, S.seq, S.seeds, device,
                                     S.eval_windows, S.lora_r),
                     "fine-tune")
        return rows + _tag(_offload(S, device), "offload")


def _offload(S, device) -> list[dict]:
    layers, cos, sin = E.offload_stack(S.offload_layers, S.offload_d, 4, S.offload_seq,
                                       device)
    bandwidth = None
    if device.type == "cpu":                       # the modelled link (see the chapter)
        bandwidth = E.cpu_link(layers, cos, sin, S.offload_batch, S.offload_seq, device,
                               S.repeat)["bandwidth"]
    rows = E.offload_rows(layers, cos, sin, S.offload_batch, S.offload_seq,
                          S.offload_ks, device, S.repeat, bandwidth)
    for r in rows:
        r["link_bytes_per_s"] = bandwidth
    return rows


def gpu_suite(device: torch.device, S) -> list[dict]:
    """The same measurements with the gpu-profile model on a GPU (real host-to-device
    copies for the offloading rows, from pinned memory on a side stream)."""
    return run(S, device)
