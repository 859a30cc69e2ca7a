"""Measuring efficiency: timing pitfalls, memory, FLOPs and bytes, the measured roofline, and the
cases where fewer FLOPs or a faster model do not mean a faster result.

The measuring tools every chapter uses (``benchmark``, ``peak_memory``, ``count_flops``,
``paired_ratio``, ``thread_check``) live in the core module :mod:`effdl.measure`; this package is the
chapter's own code built on them (re-exported here under the chapter's names).
"""

from effdl.measure import paired_ratio, quartiles, thread_check
from effdl.measuring.cases import (
    conv_case,
    conv_flops,
    conv_variants,
    fusion_case,
    gelu_fused,
    gelu_unfused,
    make_pipeline,
    make_requests,
    rank_by_time,
    stage_times,
    time_to_accuracy,
    time_to_result,
    tuned_time_to_result,
)
from effdl.measuring.memory import (
    attention_memory_sweep,
    attention_scores_bytes,
    make_mlp,
    max_seq_len_for_memory,
    mlp_activation_bytes,
    parameter_bytes,
    training_memory_sweep,
    training_step,
)
from effdl.measuring.profiling import (
    download_link,
    export_trace,
    idle_fraction,
    lanes,
    make_training_step,
    op_durations,
    op_table,
    plot_timeline,
    profile_step,
    short_name,
    step_phases,
    step_windows,
    trace_events,
)
from effdl.measuring.roofline import (
    Kernel,
    Roofline,
    arithmetic_intensity,
    attention_flops,
    attention_layer,
    attention_layer_flops,
    bandwidths,
    bytes_per_element,
    elementwise_bytes,
    kernel_suite,
    matmul_bytes,
    matmul_flops,
    measure_roofline,
    naive_attention,
    naive_attention_bytes,
    peak_bandwidth,
    peak_compute,
    peak_matmul,
    place_kernels,
    plot_roofline,
    roofline_from_rows,
    softmax_bytes,
    softmax_flops,
)
from effdl.measuring.timing import (
    FakeAsyncDevice,
    FakeEvent,
    cache_effect,
    call_times,
    naive_time,
    sync_timer,
)

__all__ = [
    # roofline
    "Roofline", "Kernel", "arithmetic_intensity", "bytes_per_element", "matmul_flops", "matmul_bytes",
    "elementwise_bytes", "softmax_flops", "softmax_bytes", "attention_flops", "naive_attention_bytes",
    "attention_layer_flops", "naive_attention", "attention_layer", "peak_compute",
    "peak_matmul", "roofline_from_rows", "bandwidths", "peak_bandwidth",
    "measure_roofline", "kernel_suite", "place_kernels", "plot_roofline",
    # timing
    "naive_time", "call_times", "quartiles", "FakeAsyncDevice", "FakeEvent", "sync_timer", "paired_ratio",
    "thread_check", "cache_effect",
    # profiling
    "make_training_step", "profile_step", "op_table", "export_trace", "trace_events", "step_windows",
    "idle_fraction", "step_phases", "op_durations", "plot_timeline", "short_name", "download_link",
    "lanes",
    # memory
    "parameter_bytes", "make_mlp", "training_step", "mlp_activation_bytes",
    "training_memory_sweep", "attention_scores_bytes", "attention_memory_sweep", "max_seq_len_for_memory",
    # cases
    "conv_flops", "conv_variants", "conv_case", "gelu_unfused", "gelu_fused", "fusion_case",
    "make_requests", "make_pipeline", "stage_times", "time_to_accuracy", "time_to_result",
    "tuned_time_to_result", "rank_by_time",
]
