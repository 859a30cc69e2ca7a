"""Training steps of ByteLM that fit in less memory: the methods the chapter compares.

- ``forward(model, idx, checkpoint=...)``: ByteLM's forward, optionally with
  **activation checkpointing** per block (Chen, Xu, Zhang, Guestrin 2016, "Training
  Deep Nets with Sublinear Memory Cost"): only each block's input is kept in
  forward; backward runs the block's forward again to get the rest.
- ``precision="mixed"``: the forward under ``torch.autocast`` in bfloat16 (fp32
  master weights, gradients and optimizer states; Micikevicius et al. 2018 with bf16,
  which needs no loss scaling); refused where the GPU has no native bf16.
  ``precision="fp16"``: fp16 autocast with a loss scaler, on CUDA (a T4's mixed
  precision).
- :func:`tuned_model`: the model a method trains: ``"full"`` (every weight),
  ``"lora"``, ``"qlora"`` (LoRA on an NF4 base) and ``"qst"`` (a side network on an
  NF4 base).

:func:`step_peak` measures one training step's peak memory; :func:`resident_bytes`
counts what the model holds at rest (quantized codes at their packed size).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from effdl.memory.lora import add_lora
from effdl.memory.qst import QSTModel
from effdl.memory.quant import quantize_model

__all__ = ["TUNING", "PRECISIONS", "has_bf16", "forward", "loss", "tuned_model", "make_step", "step_peak",
           "resident_bytes", "trainable"]

#: the fine-tuning methods of the chapter, in the order it meets them
TUNING = ("full", "lora", "qlora", "qst")


def forward(model, idx, checkpoint: bool = False):
    """ByteLM logits (B, T, 256); ``checkpoint``: keep only each block's input."""
    if not checkpoint:
        return model(idx)
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(idx)                                          # (B, T, d)
    for block in model.blocks:
        # why use_reentrant=False: the variant PyTorch recommends; it works when
        # the block's input needs no gradient and with autocast
        x = _checkpoint(block, x, cos, sin, use_reentrant=False)
    return model.head(model.norm(x))


#: the precisions of a training step: fp32; bf16 autocast ("mixed"); fp16 autocast
#: with a loss scaler ("fp16", CUDA only: the mixed precision of GPUs without bf16)
PRECISIONS = ("fp32", "mixed", "fp16")


def has_bf16(device: torch.device) -> bool:
    """Does ``device`` compute in bfloat16 natively?  Every CPU runs bf16 autocast
    (converting where it has no bf16 instructions); a GPU needs sm_80 or later.
    Why ``including_emulation=False``: by default PyTorch also answers yes for a GPU
    that only emulates bf16 (a T4), slowly."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision='fp16' (with a loss scaler) is for CUDA GPUs; "
                             "on a CPU use 'mixed' (bf16) or 'fp32'")
        return torch.autocast("cuda", dtype=torch.float16)
    if not has_bf16(device):
        raise ValueError("this GPU has no native bfloat16 (a T4 is sm_75); use "
                         "precision='fp16' (fp16 with a loss scaler) or 'fp32'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss(model, idx, targets, precision: str = "fp32", checkpoint: bool = False):
    """Mean next-byte cross-entropy (nats), computed in fp32 whatever the precision."""
    dev = idx.device
    with _autocast(dev, precision):
        logits = forward(model, idx, checkpoint)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def tuned_model(base, method: str, lora_r: int = 8, qst_reduction: int = 4):
    """A fresh copy of ``base`` set up for ``method`` (one of :data:`TUNING`)."""
    if method == "full":
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(True)
        return m
    if method == "lora":
        return add_lora(base, r=lora_r)
    if method in ("qlora", "qst"):
        # QLoRA's storage: NF4 in blocks of 64, the blocks' scales quantized again
        q = quantize_model(base, "nf4", double_quant=True)
        if method == "qlora":
            return add_lora(q, r=lora_r)
        return QSTModel(q, reduction=qst_reduction)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(TUNING)}")


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model, lr: float = 1e-3, precision: str = "fp32",
              checkpoint: bool = False):
    """``step(idx, targets) -> loss``: one AdamW step on the trainable parameters.

    Gradients are set to None after each step (so a step allocates them afresh, as a
    measurement of its peak should see)."""
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # why a scaler with fp16: its 5 exponent bits flush small gradients to zero; the
    # loss is multiplied before backward and the gradients divided before the update
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def step(idx, targets):
        value = loss(model, idx, targets, precision, checkpoint)
        if scaler is None:
            value.backward()
            opt.step()
        else:
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(value.detach())

    step.optimizer = opt
    return step


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (distinct storages)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def step_peak(model, idx, targets, device, precision: str = "fp32",
              checkpoint: bool = False) -> dict:
    """Peak memory of a training step of ``model`` in steady state (bytes).

    One step runs first, so AdamW's moments exist (on the first step they are created
    inside ``optimizer.step()``, after backward has freed the activations, and would
    never be seen alongside them).  ``resident``: the model at rest; ``optimizer``:
    the moments; ``step``: the most the second step allocated above those
    (gradients, activations, temporaries); ``total``: their sum.
    """
    from effdl.measure import peak_memory

    step = make_step(model, precision=precision, checkpoint=checkpoint)
    step(idx, targets)                          # creates the optimizer's state
    rest = resident_bytes(model)
    moments = sum(t.untyped_storage().nbytes() for st in step.optimizer.state.values()
                  for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    used = peak_memory(lambda: step(idx, targets), device)
    return {"resident": rest, "optimizer": moments, "step": used,
            "total": rest + moments + used}
