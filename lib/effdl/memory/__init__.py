"""effdl.memory — the chapter "Fitting in memory" (book/memory.md) and its library.

- :mod:`effdl.memory.quant`      — absmax int8 (per tensor, per channel), group-wise
  int4, QLoRA's NF4 with double quantization; :class:`QuantLinear`,
  :func:`quantize_model`
- :mod:`effdl.memory.lora`       — :class:`LoRALinear`, :func:`add_lora` (QLoRA when
  the base is quantized)
- :mod:`effdl.memory.qst`        — Quantized Side Tuning: :class:`QSTModel`
- :mod:`effdl.memory.offload`    — :class:`OffloadExecutor`: k layers resident,
  synchronous or prefetching copies, a modelled link
- :mod:`effdl.memory.accounting` — the bytes of a training step, by formula
- :mod:`effdl.memory.training`   — checkpointed and bf16 training steps; the tuned
  model of each method (full, LoRA, QLoRA, QST); a step's measured peak
- :mod:`effdl.memory.task`       — the fine-tuning data: the C++ headers in torch's wheel

The chapter's parts (:mod:`effdl.chapters`): ``sizes``, ``bench``, ``checks``, ``plots``,
``experiments``.
"""

# the main names; the rest stays in the submodules (effdl.memory.quant.pack_4bit, ...)
from effdl.memory.accounting import StepMemory, saved_activation_bytes, training_step_memory
from effdl.memory.lora import LoRALinear, add_lora, trainable_parameters
from effdl.memory.offload import OffloadExecutor, offloaded_forward
from effdl.memory.qst import QSTModel
from effdl.memory.quant import NF4_LEVELS, QuantizedTensor, QuantLinear, quantize, quantize_model

__all__ = ["NF4_LEVELS", "LoRALinear", "OffloadExecutor", "QSTModel", "QuantLinear", "QuantizedTensor",
           "StepMemory", "add_lora", "offloaded_forward", "quantize", "quantize_model", "saved_activation_bytes",
           "trainable_parameters", "training_step_memory"]
