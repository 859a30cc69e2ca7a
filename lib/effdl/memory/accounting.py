"""The memory of one training step of ByteLM, by formula, and a way to check it.

A training step holds four things (``b``: batch, ``s``: sequence length):

- **weights**: 4 bytes per parameter in fp32; a quantized base stores its own bytes
  (:meth:`effdl.memory.quant.QuantizedTensor.nbytes`);
- **gradients**: one per *trainable* parameter, the parameter's size (4 bytes);
- **optimizer states**: AdamW keeps two fp32 moments per trainable parameter, 8 bytes;
- **activations**: the tensors autograd saves in forward for backward, ∝ b · s.

Mixed precision (bf16 autocast, fp32 master weights) adds a 2-byte copy of each
weight and halves most activations; we model it as exactly that (norms and the loss
stay fp32 in practice, so the formula is a little low).

Activations, per token.  For GPT-style layers in fp16 with dropout, Korthikanti,
Casper, Lym, McAfee, Andersch, Shoeybi, Catanzaro 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv:2205.05198, count
``s·b·h·(34 + 5·a·s/h)`` bytes per layer (h width, a heads): 11sbh + 5as²b in
attention (the as² terms are the score matrix, its softmax and dropout mask), 19sbh
in the MLP, 4sbh in the two LayerNorms — :func:`korthikanti_activation_bytes`.

ByteLM differs (fp32, RMSNorm, no dropout, and an attention kernel that keeps only
a log-sum-exp per head and query, not the s × s matrix), so we count its saved
tensors one by one, in fp32 elements per token per layer (d width, m MLP factor, H
heads; K and V are saved expanded to H heads):

- RMSNorm ×2: input, 1/rms, normalized input (for the weight's gradient), output:
  3d + 1 each, 6d + 2;
- attention: q, k, v, output (4d), log-sum-exp (H), the output reshaped for wo (d);
- MLP: GELU input and output (2·m·d).

Total ``(11 + 2m)·d + H + 2`` per layer (19d + H + 2 at m = 4), plus the final norm
(3d + 1), the log-softmax of the logits (V = 256) and the int64 inputs and targets
(8 bytes each).  Activation checkpointing per block keeps each block's input (d) and
recomputes one block at a time in backward: L·d + one layer.  LoRA (all five linear
layers adapted, frozen norms): a frozen norm does not keep its normalized input, a
frozen linear not its input, the adapters keep x·Aᵀ (r per adapter):
``(9 + 2m)·d + H + 2 + 5r`` per layer.  QST: the base keeps nothing; the side network
keeps the base's hidden states (L + 1)·d for its down-projections, its own blocks at
width d / r and the gated mixes (3·d_side per layer), see :func:`activation_bytes`.

:func:`saved_activation_bytes` measures the same thing on a real model (autograd's
saved-tensor hooks): the tests check the formulas against it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from effdl.lm.model import LMConfig

__all__ = ["param_counts", "activation_elements_per_token", "activation_bytes",
           "korthikanti_activation_bytes", "training_step_memory", "StepMemory",
           "saved_activation_bytes", "METHODS", "PRECISIONS"]

METHODS = ("full", "lora", "qst")
PRECISIONS = ("fp32", "mixed")
LORA_TARGETS_PER_LAYER = 5            # wq, wkv, wo, mlp.0, mlp.2


def param_counts(c: LMConfig) -> dict:
    """Parameters of ByteLM by part: embed, per layer (attention, MLP, norms),
    final norm, head, total."""
    d, kv = c.d_model, c.n_kv_head * c.head_dim
    attn = d * d + d * 2 * kv + d * d                       # wq, wkv, wo
    mlp = 2 * c.mlp_mult * d * d
    layer = attn + mlp + 2 * d                              # + two RMSNorm scales
    out = {"embed": c.vocab * d, "attn": attn, "mlp": mlp, "layer": layer,
           "layers": c.n_layer * layer, "final_norm": d, "head": c.vocab * d}
    out["total"] = out["embed"] + out["layers"] + out["final_norm"] + out["head"]
    return out


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int) -> int:
    """Korthikanti et al. 2022, eq. (1): one GPT layer, fp16 with dropout, no
    parallelism: s·b·h·(34 + 5·a·s/h) bytes."""
    return s * b * h * 34 + 5 * a * s * s * b


def activation_elements_per_token(c: LMConfig) -> int:
    """fp32 elements ByteLM's full training saves per token per layer."""
    return (11 + 2 * c.mlp_mult) * c.d_model + c.n_head + 2


def _side_config(c: LMConfig, reduction: int, side_heads: int) -> LMConfig:
    return LMConfig(n_layer=c.n_layer, n_head=side_heads,
                    d_model=c.d_model // reduction, max_len=c.max_len,
                    mlp_mult=c.mlp_mult)


def activation_bytes(c: LMConfig, batch: int, seq: int, method: str = "full",
                     checkpoint: bool = False, lora_r: int = 8,
                     qst_reduction: int = 4, qst_heads: int = 1,
                     bytes_per: int = 4) -> int:
    """Bytes autograd keeps for backward in one ByteLM step (see the module text).

    ``checkpoint`` (full only): block inputs kept, one block recomputed at a time.
    """
    d, L, V, tokens = c.d_model, c.n_layer, c.vocab, batch * seq
    per_layer = activation_elements_per_token(c)
    # int64 targets, and the one fp32 scalar the mean cross-entropy keeps
    ids = 8 * tokens + 4
    if method == "full":
        layers = (L * d + per_layer) if checkpoint else L * per_layer
        return tokens * bytes_per * (layers + 3 * d + 1 + V) + 8 * tokens + ids
    if method == "lora":
        r_part = LORA_TARGETS_PER_LAYER * lora_r
        layer = (9 + 2 * c.mlp_mult) * d + c.n_head + 2 + r_part
        # the first norm needs no input (frozen embedding), the final norm keeps
        # its input and 1/rms: the two cancel, d + 1 each
        return tokens * bytes_per * (L * layer + V) + ids
    if method == "qst":
        sc = _side_config(c, qst_reduction, qst_heads)
        ds = sc.d_model
        side = activation_elements_per_token(sc) + 3 * ds          # block + mixes
        # hidden states h_0..h_L, up(s) (d) and s_L (ds), the final norm (d + 1)
        fixed = (L + 1) * d + d + ds + d + 1 + V
        return tokens * bytes_per * (L * side + fixed) + ids
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class StepMemory:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _qst_trainable(c: LMConfig, reduction: int, heads: int) -> int:
    sc = _side_config(c, reduction, heads)
    ds = sc.d_model
    block = param_counts(sc)["layer"]
    down = (c.n_layer + 1) * c.d_model * ds
    return c.n_layer * block + down + ds * c.d_model + c.n_layer + 1   # + β, α


def training_step_memory(c: LMConfig, batch: int, seq: int, method: str = "full",
                         precision: str = "fp32", checkpoint: bool = False,
                         lora_r: int = 8, qst_reduction: int = 4,
                         qst_heads: int = 1, weight_bytes: int | None = None
                         ) -> StepMemory:
    """Bytes of weights, gradients, AdamW states and activations of one step.

    ``weight_bytes``: the stored base weights when they are quantized (default: 4
    bytes per parameter); ``precision``: ``"fp32"`` or ``"mixed"`` (bf16 compute,
    fp32 master weights, gradients and moments).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    if checkpoint and method != "full":
        raise ValueError("checkpoint=True is modelled for method='full' only")
    P = param_counts(c)
    if method == "full":
        trainable = P["total"]
    elif method == "lora":
        d, kv, m = c.d_model, c.n_kv_head * c.head_dim, c.mlp_mult
        ins_outs = (d + d) + (d + 2 * kv) + (d + d) + (d + m * d) + (m * d + d)
        trainable = c.n_layer * lora_r * ins_outs
    else:
        trainable = _qst_trainable(c, qst_reduction, qst_heads)
    base = 4 * P["total"] if weight_bytes is None else weight_bytes
    extra = trainable if method != "full" else 0            # adapters / side net
    weights = base + 4 * extra
    act_bytes = 2 if precision == "mixed" else 4
    if precision == "mixed":
        weights += 2 * (P["total"] if method == "full" else extra)   # bf16 copies
    acts = activation_bytes(c, batch, seq, method, checkpoint, lora_r, qst_reduction,
                            qst_heads, act_bytes)
    return StepMemory(weights, 4 * trainable, 8 * trainable, acts)


def saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor,
                           targets: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves during ``model(idx)`` and the
    cross-entropy loss, leaving out the model's own parameters and buffers."""
    own = {t.untyped_storage().data_ptr()
           for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return sum(seen.values())
