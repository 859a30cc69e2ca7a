"""effdl.memory — fitting a model in memory (a library; its chapter is to come).

- :mod:`effdl.memory.quant`      — absmax int8 (per tensor, per channel), group-wise
  int4, QLoRA's NF4 with double quantization; :class:`QuantLinear`,
  :func:`quantize_model`
- :mod:`effdl.memory.lora`       — :class:`LoRALinear`, :func:`add_lora` (QLoRA when
  the base is quantized)
- :mod:`effdl.memory.qst`        — Quantized Side Tuning: :class:`QSTModel`
- :mod:`effdl.memory.offload`    — :class:`OffloadExecutor`: k layers resident,
  synchronous or prefetching copies, a modelled link
- :mod:`effdl.memory.accounting` — the bytes of a training step, by formula

Why no ``sizes.py`` here (yet): a package with a ``sizes`` module is a chapter by the
chapter contract (:mod:`effdl.chapters`); this is the library half of one.
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
